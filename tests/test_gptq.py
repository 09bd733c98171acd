"""Full-Hessian GPTQ (arXiv:2210.17323): equality with a slow column-by-column reference (GPTQ-lite clip
levels and SDClip scales, PR #1394), lower output error than round-to-nearest, dead columns, Hessian
collection by forward hooks (and of the tied output head, PR #1611)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.gptq import (
    collect_hessians,
    gptq_quantize,
    linear_names,
    needs_output_hessian,
    output_head_name,
)
from pgolf.quant.rules import (
    GPTQ_LITE_CLIPS,
    QuantRule,
    clip_search_rows,
    dequantize_int,
    quantize_rows,
    quantize_tensor_by_rule,
    rules_from_config,
)
from pgolf.quant.sdclip import quantize_rows_sdclip
from pgolf.quant.settings import GPTQSettings

CONF = Path(__file__).resolve().parent.parent / "conf"


def reference_gptq(w, H, bits, clips, damp=0.01, act_order=True, floor=True, full_range=False, sigmas=None):
    """The GPTQ paper's column-by-column form (OBS update with the explicit inverse Hessian, then the
    quantized column eliminated from the inverse), in float64, one clip level at a time; codes in ±qmax, or
    [-qmax-1, qmax] with `full_range`. With `sigmas`, SDClip instead of the clip levels, written from PR
    #1394's formula: s = fp16(max(sigmas·std(w_r)/qmax, 1e-10)), the unbiased std in fp32 of the original
    row (before the dead column is zeroed), with a zero scale used as it is: a nonzero weight over it clamps
    to ±qmax, 0/0 gives NaN that runs along the row, stored as 0 (the int8 cast of NaN on x86)."""
    if sigmas is not None:
        s_sd = (sigmas * w.float().std(dim=1) / (2 ** (bits - 1) - 1)).clamp_min(1e-10).half().double()
    w, H = w.double().clone(), H.double().clone()
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax - 1 if full_range else -qmax
    dead = torch.diag(H) == 0
    for j in torch.nonzero(dead).flatten().tolist():
        H[j, j] = 1.0
        w[:, j] = 0.0
    H = H + damp * torch.diag(H).mean() * torch.eye(H.size(0), dtype=H.dtype)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.size(0))
    W0, Hp = w[:, perm], H[perm][:, perm]
    best = None
    for c in clips if sigmas is None else [None]:
        if sigmas is None:
            a = W0.abs()
            clip = a.amax(dim=1) if c >= 1.0 else torch.quantile(a, c, dim=1)
            s = (clip / qmax).clamp_min(1.0 / qmax if floor else 1e-12).half().double()
        else:
            s = s_sd
        W, Hinv = W0.clone(), torch.linalg.inv(Hp)
        Q = torch.zeros_like(W)
        for i in range(W.size(1)):
            q = torch.clamp(torch.round(W[:, i] / s), qmin, qmax)
            Q[:, i] = q
            err = W[:, i] - q * s
            W[:, i + 1 :] -= (err / Hinv[i, i])[:, None] * Hinv[i, i + 1 :][None, :]
            Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
        if sigmas is not None:
            Q = torch.nan_to_num(Q, nan=0.0)
        mse = (W0 - Q * s[:, None]).square().mean().item()
        if best is None or mse < best[0]:
            best = (mse, Q, s, c)
    _, Q, s, c = best
    return Q[:, torch.argsort(perm)].to(torch.int8), s.half(), c


def correlated_inputs(n, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g) @ mix
    return x * torch.linspace(0.2, 3.0, cols)  # unequal input scales, so act-order matters


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_equals_the_column_by_column_reference(act_order, bits):
    torch.manual_seed(bits)
    rows, cols = 12, 40
    w = torch.randn(rows, cols) * 0.5
    x = correlated_inputs(200, cols, seed=3)
    x[:, 7] = 0.0  # a dead input column
    H = x.T @ x
    q, s, info = gptq_quantize(
        w, H, bits, GPTQ_LITE_CLIPS, block_size=16, act_order=act_order, floor=False, dtype=torch.float64
    )
    q_ref, s_ref, c_ref = reference_gptq(w, H, bits, GPTQ_LITE_CLIPS, act_order=act_order, floor=False)
    assert info["clip"] == c_ref and info["dead_columns"] == 1
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    assert (q[:, 7] == 0).all()  # the dead column's weights are dropped


def test_an_all_zero_row_does_not_decide_the_clip_level():
    """Without a scale floor an all-zero row has scale 0 and 0/0 codes, stored as 0: it adds no error to
    any clip level, so the level chosen is the one chosen for the other rows (NaN errors chose the first)."""
    torch.manual_seed(3)
    w = torch.randn(8, 32) * 0.5
    w[0, 0] = 6.0  # an outlier: a clip below 1.0 would cut it
    H = correlated_inputs(128, 32, seed=2).T @ correlated_inputs(128, 32, seed=2)
    _, _, ref = gptq_quantize(w, H, 6, GPTQ_LITE_CLIPS, block_size=16, floor=False)
    wz = torch.cat([w, torch.zeros(1, 32)])
    q, s, info = gptq_quantize(wz, H, 6, GPTQ_LITE_CLIPS, block_size=16, floor=False)
    assert info["clip"] == ref["clip"] != GPTQ_LITE_CLIPS[0]
    assert s[-1] == 0 and (q[-1] == 0).all()


def test_gptq_full_code_range_equals_the_reference():
    """`code_range: full` (int4 in [-8, 7]): with a low clip level the error feedback pushes some codes
    past -7, where the symmetric range would clamp."""
    torch.manual_seed(5)
    w = torch.randn(12, 40) * 0.5
    H = correlated_inputs(200, 40, seed=6).T @ correlated_inputs(200, 40, seed=6)
    clips = (0.9,)
    q, s, _ = gptq_quantize(w, H, 4, clips, block_size=16, floor=False, full_range=True, dtype=torch.float64)
    q_ref, s_ref, _ = reference_gptq(w, H, 4, clips, floor=False, full_range=True)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    assert (q == -8).any() and q.max() <= 7
    q_sym, _, _ = gptq_quantize(w, H, 4, clips, block_size=16, floor=False, dtype=torch.float64)
    assert q_sym.min() >= -7


def test_gptq_output_error_is_lower_than_round_to_nearest():
    # A fixed layer and inputs (seeded): ||XWᵀ - XŴᵀ||_F measured 156.4 for round-to-nearest and 96.3 for
    # GPTQ at int4, 35.6 vs 22.0 at int6 (same row scales, clip = row max, no scale floor; torch 2.13 CPU).
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.3
    x = correlated_inputs(512, 96, seed=1)
    H = x.T @ x
    for bits in (4, 6):
        q_rtn, s_rtn = quantize_rows(w, bits, clip=1.0, floor=False)
        q_g, s_g, _ = gptq_quantize(w, H, bits, (1.0,), block_size=32, floor=False)
        assert torch.equal(s_rtn, s_g)
        e_rtn = torch.linalg.norm(x @ w.T - x @ dequantize_int(q_rtn, s_rtn).T).item()
        e_g = torch.linalg.norm(x @ w.T - x @ dequantize_int(q_g, s_g).T).item()
        assert e_g < 0.7 * e_rtn, (bits, e_rtn, e_g)


def test_gptq_per_row_clip_choice_and_block_size_invariance():
    torch.manual_seed(2)
    w = torch.randn(16, 48)
    w[3, 5] = 12.0  # an outlier row where clipping pays
    x = correlated_inputs(300, 48, seed=4)
    H = x.T @ x
    kw = dict(floor=False, dtype=torch.float64)
    q_a, s_a, info = gptq_quantize(w, H, 6, GPTQ_LITE_CLIPS, block_size=8, **kw)
    q_b, s_b, _ = gptq_quantize(w, H, 6, GPTQ_LITE_CLIPS, block_size=48, **kw)
    assert torch.equal(q_a, q_b) and torch.equal(s_a, s_b)  # lazy batch updates change nothing
    q_r, s_r, info_r = gptq_quantize(w, H, 6, GPTQ_LITE_CLIPS, block_size=8, per_row=True, **kw)
    assert info_r["clip"] == "per_row"
    mse = lambda q, s: (dequantize_int(q, s) - w).square().mean().item()
    assert mse(q_r, s_r) <= mse(q_a, s_a) + 1e-12


def test_rule_dispatch_gptq_and_fallback():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = correlated_inputs(256, 64, seed=0)
    rule = QuantRule(store="int", bits=6, clip="search", method="gptq", scale_floor=False, name="m")
    e = quantize_tensor_by_rule("m.weight", w, rule, x.T @ x, GPTQSettings(block_size=32))
    assert e.info["method"] == "gptq" and e.info["clip"] in GPTQ_LITE_CLIPS and e.q.abs().max() <= 31
    fb = quantize_tensor_by_rule("m.weight", w, rule, None)  # no Hessian: GPTQ-lite
    q_lite, s_lite, c = clip_search_rows(w, 6, floor=False)
    assert fb.info["method"] == "gptq_lite_fallback" and fb.info["clip"] == c and torch.equal(fb.q, q_lite)


def test_collect_hessians_matches_explicit_inputs():
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, bigram="xor", bigram_buckets=64,
        bigram_dim=16, ve_dim=8, ve_layers=(1,), xsa_last_n=2, smear_gate="record", mlp_act="leaky_relu2",
    )  # fmt: skip
    m = GPT(cfg).eval()
    seqs = torch.randint(0, 64, (5, 12))
    H, info = collect_hessians(m, seqs, batch=2)
    assert set(H) == set(linear_names(m).values()) and info["layers"] == len(m.quantized_linears()) == 14
    assert info["sequences"] == 5 and info["tokens"] == 60
    # c_q, c_k, c_v read the same input; check one block's attention input and MLP-out input explicitly.
    got = {}
    blk = m.blocks[1]
    hooks = [
        blk.attn.c_q.register_forward_hook(lambda mod, a, o: got.setdefault("attn", []).append(a[0])),
        blk.mlp.proj.register_forward_hook(lambda mod, a, o: got.setdefault("mlp", []).append(a[0])),
    ]
    with torch.no_grad():
        m.forward_hidden(seqs)
    for h in hooks:
        h.remove()
    for key, name in (("attn", "blocks.1.attn.c_q.weight"), ("mlp", "blocks.1.mlp.proj.weight")):
        x = got[key][0].reshape(-1, got[key][0].size(-1))
        assert torch.allclose(H[name], x.T @ x / 5, rtol=1e-4, atol=1e-5)
    assert torch.equal(H["blocks.0.attn.c_q.weight"], H["blocks.0.attn.c_k.weight"])
    assert torch.equal(H["blocks.0.attn.c_q.weight"], H["blocks.0.attn.c_v.weight"])
    Hd, _ = collect_hessians(m, seqs, batch=5, damp=0.01)
    h0 = H["blocks.0.mlp.fc.weight"]
    assert torch.allclose(Hd["blocks.0.mlp.fc.weight"], h0 + 0.01 * h0.diag().mean() * torch.eye(32), atol=1e-5)
    # bit for bit the records' accumulation: `H.addmm_(X.T, X)` per linear and batch (3 batches of 2 x 512
    # tokens; `H += X.T @ X` rounds differently at this size)
    big = torch.randint(0, 64, (6, 512), generator=torch.Generator().manual_seed(1))
    Hb, _ = collect_hessians(m, big, batch=2)
    fc = m.blocks[0].mlp.proj
    d = fc.in_features
    ref = torch.zeros(d, d)

    def add(mod, args, out) -> None:  # a hook that returns nothing (a returned tensor replaces the output)
        ref.addmm_(args[0].reshape(-1, d).T, args[0].reshape(-1, d))

    hook = fc.register_forward_hook(add)
    with torch.no_grad():
        for i in range(0, 6, 2):
            m.forward_hidden(big[i : i + 2])
    hook.remove()
    assert torch.equal(Hb["blocks.0.mlp.proj.weight"], ref / 6)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [6, 7])
def test_sdclip_gptq_equals_the_column_by_column_reference(act_order, bits):
    """SDClip GPTQ (PR #1394, as PR #1611 runs it at int6 and int7): exact codes and scales against the
    reference, with a dead input column (whose weights still count in the row std, as in the record), an
    all-zero row (fp16 scale 0: codes 0), a constant row and a row of std 1e-9 (fp16 scale 0: the record's
    arithmetic clamps w/0 to ±qmax until the zeroed dead column's 0/0 makes the rest of the row 0) and a k
    small enough that the clamp clips."""
    torch.manual_seed(10 + bits)
    rows, cols = 12, 40
    w = torch.randn(rows, cols) * 0.5
    w[:, 7] = 1.5  # the dead input's weights: dropped by GPTQ, but part of each row's std
    w[5] = 0.0
    w[3] = 0.01
    w[9] = torch.randn(cols) * 1e-9
    x = correlated_inputs(200, cols, seed=3)
    x[:, 7] = 0.0
    H = x.T @ x
    k = 2.0
    q, s, info = gptq_quantize(w, H, bits, (), block_size=16, act_order=act_order, dtype=torch.float64, sigmas=k)
    q_ref, s_ref, _ = reference_gptq(w, H, bits, None, act_order=act_order, sigmas=k)
    assert info == {"method": "gptq", "clip": "sdclip", "sigmas": k, "dead_columns": 1}
    assert s.dtype == torch.float16 and torch.equal(s, s_ref) and torch.equal(q, q_ref)
    qmax = 2 ** (bits - 1) - 1
    assert q.abs().max() == qmax and (q[:, 7] == 0).all() and s[5] == 0 and (q[5] == 0).all()
    for r in (3, 9):  # scale 0: ±qmax before the dead column's NaN, 0 from there on
        assert s[r] == 0 and (q[r] != 0).any() and set(q[r].abs().unique().tolist()) <= {0, qmax}
    w_dead = w.clone()
    w_dead[:, 7] = 0.0
    s_dead = (k * w_dead.std(dim=1) / qmax).half()
    assert not torch.equal(s_dead[:5], s[:5])  # the std is of the original rows, dead column included


def test_sdclip_zero_scale_rows_and_extra_damping():
    """Round-to-nearest SDClip with a zero fp16 scale: a constant row stores +qmax everywhere, a row of
    ±1e-9 its signs times qmax, an all-zero row 0, as the record's clamp(round(w/0)) does. A Hessian that is
    not positive definite is damped further and the info says by how much (0.01 × mean diag H here)."""
    w = torch.randn(4, 16)
    w[1] = 0.01
    w[2] = torch.tensor([1e-9, -1e-9] * 8)
    w[3] = 0.0
    q, s = quantize_rows_sdclip(w, 6, 12.85)
    assert s[0] > 0 and (s[1:] == 0).all()
    assert (q[1] == 31).all() and torch.equal(q[2], torch.tensor([31, -31] * 8, dtype=torch.int8))
    assert (q[3] == 0).all()
    H = torch.eye(16)
    H[0, 1] = H[1, 0] = 1.5  # indefinite
    _, _, info = gptq_quantize(torch.randn(4, 16), H, 6, (), sigmas=12.85)
    assert info["extra_damp"] > 0
    _, _, info = gptq_quantize(torch.randn(4, 16), torch.eye(16), 6, (), sigmas=12.85)
    assert "extra_damp" not in info


def test_sdclip_gptq_lowers_output_error_and_needs_two_columns():
    """With SDClip scales too, GPTQ's output error is below round-to-nearest's at the same scales (seeded:
    ‖XWᵀ − XŴᵀ‖_F 161.8 round-to-nearest vs 98.8 GPTQ at int6, k 12.85; torch 2.13 CPU)."""
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.3
    x = correlated_inputs(512, 96, seed=1)
    q_rtn, s_rtn = quantize_rows_sdclip(w, 6, 12.85)
    q_g, s_g, _ = gptq_quantize(w, x.T @ x, 6, (), block_size=32, sigmas=12.85)
    assert torch.equal(s_rtn, s_g)
    e_rtn = torch.linalg.norm(x @ w.T - x @ dequantize_int(q_rtn, s_rtn).T).item()
    e_g = torch.linalg.norm(x @ w.T - x @ dequantize_int(q_g, s_g).T).item()
    assert e_g < 0.8 * e_rtn, (e_rtn, e_g)
    with pytest.raises(ValueError, match="at least 2 columns"):
        gptq_quantize(torch.ones(4, 1), torch.ones(1, 1), 6, (), sigmas=12.85)


def tiny_gpt(vocab: int = 64, **over) -> GPT:
    cfg = GPTConfig(
        vocab_size=vocab, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_act="leaky_relu2", **over
    )
    torch.manual_seed(0)
    return GPT(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_collect_hessians_of_the_output_head(tied):
    """`output_head=True` adds the output projection's Hessian: X = the final-normed hidden states
    `forward_hidden` returns (PR #1611 hooks `final_norm` for tok_emb.weight); without it, nothing changes."""
    m = tiny_gpt(tie_embeddings=tied)
    seqs = torch.randint(0, 64, (5, 12))
    H0, info0 = collect_hessians(m, seqs, batch=2)
    H, info = collect_hessians(m, seqs, batch=2, output_head=True)
    head = "tok_emb.weight" if tied else "lm_head.weight"
    assert output_head_name(m) == head and head not in H0 and set(H) == set(H0) | {head}
    assert info["layers"] == info0["layers"] + 1
    for k in H0:
        assert torch.equal(H[k], H0[k])
    with torch.no_grad():
        h = m.forward_hidden(seqs).reshape(-1, 32)
    assert torch.allclose(H[head], h.T @ h / 5, rtol=1e-4, atol=1e-5)


def test_needs_output_hessian_follows_the_rule_of_the_head():
    """The record's rules (conf/export/sdclip_gptq_1611.yaml) GPTQ a tied embedding of more than 65,536
    elements at int7; pgolf's int6 GPTQ scheme stores tok_emb by round-to-nearest int8, a small one is fp16."""
    rec = rules_from_config(OmegaConf.to_container(OmegaConf.load(CONF / "export" / "sdclip_gptq_1611.yaml"))["rules"])
    int6 = rules_from_config(OmegaConf.to_container(OmegaConf.load(CONF / "export" / "int6_gptq_zstd.yaml"))["rules"])
    big, small = tiny_gpt(vocab=2100), tiny_gpt(vocab=64)  # 2100 x 32 = 67,200 > 65,536 elements
    assert needs_output_hessian(big, rec) and not needs_output_hessian(small, rec)
    assert not needs_output_hessian(big, int6)
