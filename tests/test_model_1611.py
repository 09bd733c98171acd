"""The PR #1611 model stack (records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611):
progressive depth recurrence, gated U-Net skips, the two-lane parallel decoder, the sparse attention output
gate, the gated SmearGate with its BOS mask, document-bounded attention, the softcapped CE, the exact
parameter count and init, the banked state-dict map, and a forward written independently from the record's
formulas that pgolf's GPT must reproduce."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.model import doc_attention
from pgolf.model import gpt as gpt_module
from pgolf.model.banks import bank_layout, from_record_1611, to_record_1611
from pgolf.model.config import GPTConfig
from pgolf.model.doc_attention import DocumentMask, pick_impl, segment_groups
from pgolf.model.gpt import GPT, count_params, softcap_cross_entropy
from pgolf.model.layers import rms_norm, rope_tables
from pgolf.model.record_1611 import GatedSmear, forward_lanes
from pgolf.model.varlen import document_cu_seqlens
from pgolf.optim.groups import partition_params

CONF = Path(__file__).resolve().parent.parent / "conf"
V = 64
BOS = 1


def model_cfg(name: str, **over) -> GPTConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    return GPTConfig.from_dict({**OmegaConf.to_container(cfg.model, resolve=True), **over})


@pytest.fixture(scope="module")
def tiny_cfg() -> GPTConfig:
    """conf/model/tiny_1611.yaml at vocab 64 and width 64 (every feature of the record, small)."""
    return model_cfg("tiny_1611", vocab_size=V, model_dim=64)


def randomize(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Deterministic random values per parameter name, so zero-initialised paths (gates, output
    projections, lambdas) are live."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}{tuple(p.shape)}".encode()))
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.ndim <= 1 else 0.0))
    return model


def build(cfg: GPTConfig, **over) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(GPTConfig(**{**cfg.to_dict(), **over})))


def tokens(B=2, T=24, seed=0, bos_at=()):
    x = torch.randint(2, V, (B, T), generator=torch.Generator().manual_seed(seed))  # no BOS unless placed
    for t in bos_at:
        x[:, t] = BOS
    return x


# ---- configuration, count, init ------------------------------------------------------------------------------
def test_record_1611_parameter_count_and_schedules():
    cfg = model_cfg("record_1611", vocab_size=8192)  # the record's SP8192 (the data group sets it)
    with torch.device("meta"):  # the count needs no values (a real build takes seconds on 2 cores)
        m = GPT(cfg)
    assert count_params(m) == 35_945_671  # logged model_params:35945671
    assert cfg.encoder_decoder(looping=True) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert cfg.encoder_decoder(looping=False) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert len(cfg.layer_schedule) == 17 and cfg.layer_schedule.count(4) == 3
    assert tuple(m.skip_weights.shape) == tuple(m.skip_gates.shape) == (8, 512)
    assert tuple(m.parallel_resid_lambdas.shape) == (11, 2) and tuple(m.parallel_post_lambdas.shape) == (11, 2, 2)
    assert tuple(m.blocks[0].attn.attn_gate_w.shape) == (8, 12) and m.blocks[0].mlp.fc.weight.shape[0] == 2048
    assert tuple(m.smear.gate.shape) == (1, 12) and tuple(m.smear.lam.shape) == (1,)
    assert (cfg.rope_dims, cfg.rope_ntk_base_len, cfg.qk_gain_init, cfg.xsa_last_n) == (16, 0, 5.0, 11)
    assert [cfg.looping_at(f) for f in (0.0, 0.3499, 0.35, 1.0)] == [False, False, True, True]


def test_record_1611_init():
    cfg = model_cfg("tiny_1611", vocab_size=V)  # width 128: every matrix has both dims >= 64, as in the record
    torch.manual_seed(0)
    m = GPT(cfg)
    d, kv = cfg.model_dim, cfg.kv_dim
    assert m.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)
    for i, b in enumerate(m.blocks):
        a = b.attn
        assert torch.allclose(a.c_q.weight.T @ a.c_q.weight, torch.eye(d), atol=1e-5)  # orthogonal
        for w in (a.c_k.weight, a.c_v.weight):  # [kv, d]: orthonormal rows
            assert torch.allclose(w @ w.T, torch.eye(kv), atol=1e-5)
        assert torch.allclose(b.mlp.fc.weight.T @ b.mlp.fc.weight, torch.eye(d), atol=1e-5)  # [4d, d]
        assert a.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0
        assert torch.all(a.q_gain == 5.0) and a.attn_gate_w.abs().sum() == 0
        assert torch.all(b.attn_scale == 1) and torch.all(b.mlp_scale == 1)
        assert torch.all(b.resid_mix[0] == 1) and torch.all(b.resid_mix[1] == 0)
        assert b.norm_scale == pytest.approx(1 / math.sqrt(i + 1))  # LN scale of the physical layer
    assert torch.all(m.skip_weights == 1) and torch.all(m.skip_gates == 0)
    assert torch.all(m.parallel_resid_lambdas == 1.1) and torch.all(m.parallel_post_lambdas == 1)
    assert m.smear.gate.abs().sum() == 0 and m.smear.lam.item() == 0.0
    assert m.looping_active  # a new model evaluates looped; the trainer switches it off until enable_looping_at


def test_config_validation_of_the_new_fields():
    base = dict(vocab_size=V, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
    for over, msg in [
        (dict(num_loops=1, loop_start=2, loop_end=4), "loop span"),
        (dict(num_loops=1, loop_start=2, loop_end=1), "loop span"),
        (dict(num_loops=1, loop_end=1, recur_end=2, recur_times=2), "two forms of depth recurrence"),
        (dict(enable_looping_at=1.5), "enable_looping_at"),
        (dict(skip_gates=True, unet_skips=False), "skip_gates needs unet_skips"),
        (dict(parallel_start_layer=4), "parallel_start_layer 4 must be in 0..3"),
        (dict(parallel_start_layer=2, parallel_residual=True), "two forms of parallel blocks"),
        (dict(parallel_final_lane="sum"), "parallel_final_lane"),
        (dict(sparse_attn_gate=True, gate_window=33), "gate_window 33"),
        (dict(smear_gate="gated", gate_window=0), "gate_window 0"),
        (dict(smear_bos_id=-2), "smear_bos_id"),
    ]:
        with pytest.raises(ValueError, match=msg):
            GPTConfig(**base, **over)
    with pytest.raises(ValueError, match="num_loops 0"):
        GPT(GPTConfig(**base)).set_looping(True)


def test_new_scalars_go_to_the_adam_scalar_group(tiny_cfg):
    m = GPT(tiny_cfg)
    groups = partition_params(m.named_parameters())
    scalar = set(groups["scalar"])
    for name in ("skip_gates", "parallel_post_lambdas", "parallel_resid_lambdas", "smear.gate", "smear.lam"):
        assert name in scalar, name
    assert all(f"blocks.{i}.attn.attn_gate_w" in scalar for i in range(tiny_cfg.num_layers))  # 2-D, not Muon
    assert sorted(groups["matrix"]) == sorted(n for names in bank_layout(tiny_cfg.num_layers).values() for n in names)
    assert groups["embed"] == ["tok_emb.weight"]


# ---- features: causality, effect, formulas --------------------------------------------------------------------
SMALL = dict(vocab_size=V, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
FEATURES = {
    "loops": dict(num_loops=2, loop_start=1, loop_end=2),
    "skip_gates": dict(skip_gates=True),
    "lanes": dict(parallel_start_layer=2),
    "lanes_attn_lane": dict(parallel_start_layer=2, parallel_final_lane="attn"),
    "sparse_attn_gate": dict(sparse_attn_gate=True, sparse_attn_gate_scale=0.5),
    "gated_smear": dict(smear_gate="gated"),
    "all": dict(
        num_loops=1,
        loop_start=1,
        loop_end=2,
        skip_gates=True,
        parallel_start_layer=3,
        sparse_attn_gate=True,
        smear_gate="gated",
        xsa_last_n=4,
        rope_dims=8,
        ln_scale=True,
        mlp_act="leaky_relu2",
        qk_gain_init=5.0,
    ),  # fmt: skip
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_causality_and_effect(feature):
    cfg = GPTConfig(**SMALL)
    m = build(cfg, **FEATURES[feature]).eval()
    x = tokens(bos_at=(0, 9))
    with torch.no_grad():
        base = m(x)
        for t in (0, 5, 9, 23):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % V
            out = m(x2)
            assert torch.equal(out[:, :t], base[:, :t]), f"{feature}: token {t} changed earlier outputs"
            assert not torch.equal(out[:, t:], base[:, t:])
        assert not torch.allclose(build(cfg).eval()(x), base, atol=1e-5), f"{feature} had no effect"


def test_looping_runs_the_span_again_and_switches_with_a_flag(tiny_cfg):
    m = build(tiny_cfg).eval()
    calls = []
    hooks = [b.register_forward_hook(lambda mod, i, o, k=k: calls.append(k)) for k, b in enumerate(m.blocks)]
    x = tokens()
    with torch.no_grad():
        looped = m(x)
        m.set_looping(False)
        plain = m(x)
    for h in hooks:
        h.remove()
    # forward hooks fire for the sequential blocks; the lane blocks (layers 3, 4) run through forward_lanes
    assert calls == [0, 1, 2, 1, 2] + [0, 1, 2]
    assert not torch.allclose(looped, plain, atol=1e-4)
    assert m.virtual_layers() == ([0, 1, 2, 3, 4], 2)
    m.set_looping(True)
    assert m.virtual_layers() == ([0, 1, 2, 1, 2, 3, 4], 3)


def test_gated_skip_rows_used_with_and_without_looping():
    """As PR #1611 (8 skip rows; looping fills all 8, the plain split rows 0-4): here 5 rows, of which the
    plain split's 3 encoder outputs fill rows 0-2 and rows 3-4 stay idle."""
    cfg = GPTConfig(**{**SMALL, "num_layers": 6}, num_loops=2, loop_start=2, loop_end=3, skip_gates=True)
    assert cfg.encoder_decoder(True) == ([0, 1, 2, 3, 2], [3, 2, 3, 4, 5])
    assert cfg.encoder_decoder(False) == ([0, 1, 2], [3, 4, 5])
    for looping, used in ((True, 5), (False, 3)):
        m = build(cfg)
        m.set_looping(looping)
        m(tokens(), tokens(seed=1)).backward()
        for p in (m.skip_weights, m.skip_gates):
            rows = p.grad.abs().sum(1)
            assert torch.all(rows[:used] > 0) and torch.all(rows[used:] == 0), (looping, rows)


def test_skip_gate_is_a_lerp():
    m = build(GPTConfig(**SMALL, skip_gates=True))
    x, s = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    g = torch.sigmoid(m.skip_gates[1])
    want = g * x + (1 - g) * (m.skip_weights[1] * s)
    assert torch.allclose(m._skip(1, x, [s]), want, atol=1e-6)
    m.skip_gates.data.zero_()
    assert torch.allclose(m._skip(1, x, [s]), 0.5 * x + 0.5 * m.skip_weights[1] * s, atol=1e-6)  # init: half/half
    assert m._skip(1, x, []) is x  # empty stack: no skip


def test_lane_block_formula():
    m = build(GPTConfig(**SMALL, parallel_start_layer=2))
    blk = m.blocks[2]
    torch.manual_seed(1)
    l0, l1, x0 = torch.randn(3, 2, 5, 64).unbind(0)
    r, P = m.parallel_resid_lambdas[2], m.parallel_post_lambdas[2]
    cos, sin = rope_tables(5, 16, 1e4, 0, "cpu")
    a = blk.attn_scale * blk.attn(rms_norm(blk.resid_mix[0] * l0 + blk.resid_mix[1] * x0), cos, sin)
    mo = blk.mlp_scale * blk.mlp(rms_norm(l1))
    n0, n1 = forward_lanes(blk, l0, l1, x0, r, P, cos, sin)
    assert torch.allclose(n0, r[0] * l0 + P[0, 0] * a + P[1, 0] * mo, atol=1e-5)
    assert torch.allclose(n1, r[1] * l1 + P[0, 1] * a + P[1, 1] * mo, atol=1e-5)
    m(tokens(), tokens(seed=1)).backward()
    used = m.parallel_post_lambdas.grad.abs().flatten(1).sum(1)
    assert torch.all(used[:2] == 0) and torch.all(used[2:] > 0)  # allocated for every layer, used from layer 2


def test_sparse_gate_halves_the_attention_output_at_init():
    torch.manual_seed(0)
    plain = randomize(GPT(GPTConfig(**SMALL)))
    gated = GPT(GPTConfig(**SMALL, sparse_attn_gate=True))
    sd = plain.state_dict()
    gated.load_state_dict({**sd, **{k: v for k, v in gated.state_dict().items() if "attn_gate_w" in k}})
    with torch.no_grad():
        for b in plain.blocks:
            b.attn.proj.weight.mul_(0.5)  # sigmoid(0) = 0.5 per head
        x = tokens()
        assert torch.allclose(gated(x), plain(x), atol=1e-5)


def test_gated_smear_formula_and_bos_mask():
    torch.manual_seed(0)
    s = GatedSmear(window=4, bos_id=BOS, init=0.0)
    e = torch.randn(2, 6, 8)
    ids = torch.tensor([[5, 6, BOS, 7, 8, 9], [BOS, 3, 4, BOS, 5, 6]])
    assert torch.equal(s(e, ids), e)  # identity at init
    with torch.no_grad():
        s.gate.copy_(torch.randn(1, 4))
        s.lam.fill_(0.7)
    out = s(e, ids)
    g = 0.7 * torch.sigmoid(e[..., :4] @ s.gate.T)  # [B,T,1]
    for b in range(2):
        for t in range(6):
            want = e[b, t] if t == 0 or ids[b, t] == BOS else e[b, t] + g[b, t] * e[b, t - 1]
            assert torch.allclose(out[b, t], want, atol=1e-6), (b, t)
    leak = GatedSmear(window=4, bos_id=-1, init=0.7)
    leak.gate.data.copy_(s.gate)
    assert not torch.allclose(leak(e, ids)[0, 2], e[0, 2])  # PR #1667 without the fix smears into BOS


# ---- document-bounded attention --------------------------------------------------------------------------------
def test_document_cu_seqlens_as_the_record_cuts_them():
    ids = torch.tensor([7, 8, BOS, 3, 4, 5, 6, 7, 8, BOS, 2])
    cu = document_cu_seqlens(ids, BOS, max_seg_len=3, pad_multiple=8)
    # row start (no BOS) 0; doc at 2 cut every 3 tokens: 2, 5, 8; doc at 9; end 11; padded to 8 entries
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 8, 9, 11, 11, 11]
    two_rows = document_cu_seqlens(torch.tensor([[BOS, 3, 4, 5], [6, BOS, 7, 8]]), BOS, 2048, pad_multiple=1)
    assert two_rows.tolist() == [0, 4, 5, 8]  # each row start is a segment start
    with pytest.raises(ValueError, match="max_seg_len"):
        document_cu_seqlens(ids, BOS, 0)


def packed(tiny_cfg, **over):
    """A randomized tiny PR #1611 model and one packed row of three BOS-led documents."""
    m = build(tiny_cfg, **over).eval()
    x = tokens(B=1, T=30, seed=3, bos_at=(0, 11, 19))
    cu = document_cu_seqlens(x, BOS, max_seg_len=2048, pad_multiple=8)
    assert cu.tolist()[:4] == [0, 11, 19, 30]
    return m, x, cu


def test_documents_never_see_each_other(tiny_cfg):
    m, x, cu = packed(tiny_cfg)
    x2 = x.clone()
    x2[0, 12:19] = (x2[0, 12:19] + 5) % V  # every token of the middle document but its BOS
    x2[0, 12:19] = torch.where(x2[0, 12:19] == BOS, 2, x2[0, 12:19])
    with torch.no_grad():
        a, b = m(x, cu_seqlens=cu), m(x2, cu_seqlens=cu)
        assert torch.equal(a[:, :11], b[:, :11]) and torch.equal(a[:, 19:], b[:, 19:])
        assert not torch.allclose(a[:, 12:19], b[:, 12:19])
        assert not torch.allclose(m(x)[:, 19:], m(x2)[:, 19:])  # without boundaries the change leaks forward
    # the BOS mask is what stops the SmearGate leak: without it the last token of doc 2 smears into doc 3's BOS
    leaky, x, cu = packed(tiny_cfg, smear_bos_id=-1)
    x3 = x.clone()
    x3[0, 18] = (x3[0, 18] + 5) % V
    with torch.no_grad():
        assert not torch.allclose(leaky(x, cu_seqlens=cu)[:, 19:], leaky(x3, cu_seqlens=cu)[:, 19:])


def f64_rope_tables(T, dims, base, ntk_base_len, device):
    """pgolf.model.layers.rope_tables computed in float64 (no NTK scaling), for exact float64 checks."""
    inv_freq = 1.0 / base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float64) / dims)
    ang = torch.outer(torch.arange(T, device=device, dtype=torch.float64), inv_freq)
    return ang.cos(), ang.sin()


def test_packed_row_equals_each_document_alone(tiny_cfg, monkeypatch):
    """Row positions with relative RoPE: the packed forward equals each document's own forward (positions
    from 0). Exact (< 1e-10) in float64 with float64 RoPE tables, for both implementations. In float32 the
    masked SDPA over 30 keys and the causal SDPA over one document sum in different orders, and RoPE's
    float32 cos/sin round differently at larger angles: < 1e-6 on logits of a model with weights of std 0.05
    (|logit| <= 1.5); the std-0.3 weights of the other tests amplify the same rounding to ~1e-5 (as
    tests/test_model.py's decode check explains), already on the first document, whose positions agree."""
    _, x, cu = packed(tiny_cfg)
    torch.manual_seed(0)
    m = randomize(GPT(tiny_cfg), scale=0.05).eval()
    docs = ((0, 11), (11, 19), (19, 30))
    with torch.no_grad():
        full = m(x, cu_seqlens=cu)
        for a, b in docs:
            assert (full[:, a:b] - m(x[:, a:b])).abs().max() < 1e-6, (a, b)
        m = build(tiny_cfg).double().eval()
        monkeypatch.setattr(gpt_module, "rope_tables", f64_rope_tables)
        full = m(x, cu_seqlens=cu)
        for a, b in docs:
            assert (full[:, a:b] - m(x[:, a:b])).abs().max() < 1e-10, (a, b)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_attention_equals_the_mask(tiny_cfg):
    """The GPU path (flex attention with a document BlockMask; forward only on the CPU, unfused) gives the
    masked SDPA's logits. The first flex call in a process costs a few seconds of setup on the CPU."""
    m, x, cu = packed(tiny_cfg)
    m = m.double()
    with torch.no_grad():
        flex = m.logits_from_hidden(m.forward_hidden(x, cu_seqlens=cu, doc_impl="flex"))
        assert (flex - m(x, cu_seqlens=cu)).abs().max() < 1e-10


def test_long_rows_are_attended_in_groups_of_whole_segments(tiny_cfg, monkeypatch):
    """A row longer than MASK_GROUP_TOKENS (here 8) is cut at segment starts into groups of at most 8 tokens (a
    longer segment alone): logits and gradients equal the one-mask forward's (float64, to 1e-12 relative), and
    no [T,T] mask of the whole row is built."""
    assert segment_groups(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3]), 8) == [
        (0, 5),
        (5, 14),
        (14, 16),
    ]
    m, x, cu = packed(tiny_cfg)  # documents of 11, 8 and 11 tokens
    m = m.double()
    x_ref = m(x, cu_seqlens=cu)
    (g_ref,) = torch.autograd.grad(x_ref.square().sum(), [m.tok_emb.weight])
    monkeypatch.setattr(doc_attention, "MASK_GROUP_TOKENS", 8)
    mask = DocumentMask(cu, 1, 30, impl="mask")
    assert mask.dense is None and [(a, b) for a, b, _ in mask.groups[0]] == [(0, 11), (11, 19), (19, 30)]
    got = m(x, cu_seqlens=cu)
    (g,) = torch.autograd.grad(got.square().sum(), [m.tok_emb.weight])
    torch.testing.assert_close(got, x_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-10)  # |g| up to ~100
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the groups are host values: one mask
    assert DocumentMask(cu, 1, 30, impl="mask").groups is None
    # `auto`: flex on CUDA inside torch.compile or for rows up to MASK_GROUP_TOKENS; the grouped mask for a
    # longer eager row (eager flex would materialise [T,T] scores) and on the CPU
    assert [pick_impl(True, True, 30), pick_impl(True, False, 8), pick_impl(True, False, 30)] == [
        "flex",
        "flex",
        "mask",
    ]
    assert pick_impl(False, True, 8) == "mask"


def test_document_mask_rejects_bad_input(tiny_cfg):
    m, x, cu = packed(tiny_cfg)
    with pytest.raises(ValueError, match="rise from 0 to B\\*T = 30"):
        m(x, cu_seqlens=torch.tensor([0, 11, 29], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        DocumentMask(torch.tensor([0.0, 30.0]), 1, 30)
    with pytest.raises(ValueError, match="impl"):
        DocumentMask(cu, 1, 30, impl="fa3")
    with pytest.raises(ValueError, match="decode cache"):
        m.forward_hidden(x, cache=m.new_cache(1, 30), cu_seqlens=cu)
    bigram = build(GPTConfig(**SMALL, bigram="xor", bigram_buckets=32, bigram_dim=16))
    with pytest.raises(ValueError, match="BigramHash"):
        bigram(tokens(B=1, T=30), cu_seqlens=cu)


# ---- softcapped CE ---------------------------------------------------------------------------------------------
def test_fused_softcap_ce_equals_the_unfused_form():
    """PR #1787's fused kernel: u = 2C sigmoid(2z/C), loss = lse(u) - u_target, and its hand-written gradient
    g (softmax(u) - onehot) 4 sigma (1 - sigma); equal to CE(float32(C tanh(z/C))) and its autograd."""
    torch.manual_seed(0)
    C, N = 30.0, 64
    z = (torch.randn(N, 512) * 40).requires_grad_()  # well into the cap's curve
    y = torch.randint(0, 512, (N,))
    loss = softcap_cross_entropy(z, y, C)
    loss.backward()
    with torch.no_grad():
        sig = torch.sigmoid(2 * z / C)
        u = 2 * C * sig
        lse = torch.logsumexp(u, dim=-1)
        fused = (lse - u.gather(1, y[:, None]).squeeze(1)).mean()
        grad = (torch.softmax(u, -1) - F.one_hot(y, 512)) * 4 * sig * (1 - sig) / N
    assert torch.allclose(fused, loss, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad, z.grad, rtol=1e-4, atol=1e-7)
    m = build(GPTConfig(**SMALL))
    x = tokens()
    with torch.no_grad():
        want = F.cross_entropy(m(x).flatten(0, 1).float(), x.flatten())
        assert torch.allclose(m(x, x), want, atol=1e-6)


# ---- the record's state-dict layout and an independent forward -------------------------------------------------
def test_bank_map_round_trips(tiny_cfg):
    m = build(tiny_cfg)
    ours = m.state_dict()
    rec = to_record_1611(ours, tiny_cfg.num_layers)
    L, d, kv = tiny_cfg.num_layers, tiny_cfg.model_dim, tiny_cfg.kv_dim
    assert tuple(rec["qo_bank"].shape) == (2 * L, d, d) and tuple(rec["kv_bank"].shape) == (2 * L, kv, d)
    assert tuple(rec["mlp_up_bank"].shape) == (L, 4 * d, d) and tuple(rec["mlp_down_bank"].shape) == (L, d, 4 * d)
    assert torch.equal(rec["qo_bank"][L + 2], ours["blocks.2.attn.proj.weight"])  # W_o of layer 2
    assert torch.equal(rec["kv_bank"][L + 1], ours["blocks.1.attn.c_v.weight"])  # W_v of layer 1
    assert "smear_gate.weight" in rec and "smear_lambda" in rec and "smear.gate" not in rec
    assert sum(t.numel() for t in rec.values()) == count_params(m)
    back = from_record_1611(rec, L)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    fresh = GPT(tiny_cfg)
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(fresh.blocks[3].mlp.fc.weight, m.blocks[3].mlp.fc.weight)
    with pytest.raises(ValueError, match="no kv_bank"):
        from_record_1611({k: v for k, v in rec.items() if k != "kv_bank"}, L)
    with pytest.raises(ValueError, match="qo_bank: expected 10 rows"):
        from_record_1611({**rec, "qo_bank": rec["qo_bank"][:4]}, L)
    with pytest.raises(ValueError, match="pgolf name"):
        from_record_1611({**rec, "smear.gate": rec["smear_gate.weight"]}, L)
    with pytest.raises(ValueError, match="lacks blocks.0.attn.c_q.weight"):
        to_record_1611({k: v for k, v in ours.items() if k != "blocks.0.attn.c_q.weight"}, L)


def reference_forward(sd: dict, cfg: GPTConfig, ids: torch.Tensor, looping: bool) -> torch.Tensor:
    """PR #1611's forward pass from its banked state dict, written from the record's formulas with explicit
    attention (no pgolf module): soft-capped logits [B,T,V]."""
    L, d, H, Hkv, D, W = cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.gate_window
    B, T = ids.shape
    rms = lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps)  # noqa: E731
    e = sd["tok_emb.weight"][ids]
    g = sd["smear_lambda"] * torch.sigmoid(e[:, 1:, :W] @ sd["smear_gate.weight"].T) * (ids[:, 1:, None] != BOS)
    x = x0 = rms(torch.cat((e[:, :1], e[:, 1:] + g * e[:, :-1]), 1))
    r = cfg.rope_dims
    ang = torch.arange(T, dtype=x.dtype)[:, None] / cfg.rope_base ** (torch.arange(0, r, 2, dtype=x.dtype) / r)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]  # [1,T,1,r/2]

    def rope(t):  # pairs (i, i + r/2) of the first r dims
        a, b, rest = t[..., : r // 2], t[..., r // 2 : r], t[..., r:]
        return torch.cat((a * cos + b * sin, b * cos - a * sin, rest), -1)

    def attn(i, h):
        q = rope(rms((h @ sd["qo_bank"][i].T).view(B, T, H, D))) * sd[f"blocks.{i}.attn.q_gain"][:, None]
        k = rope(rms((h @ sd["kv_bank"][i].T).view(B, T, Hkv, D))).repeat_interleave(H // Hkv, 2)
        v = (h @ sd["kv_bank"][L + i].T).view(B, T, Hkv, D).repeat_interleave(H // Hkv, 2)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)
        vn = v / v.norm(dim=-1, keepdim=True)
        y = y - (y * vn).sum(-1, keepdim=True) * vn  # XSA on every layer
        y = y * torch.sigmoid(cfg.sparse_attn_gate_scale * h[..., :W] @ sd[f"blocks.{i}.attn.attn_gate_w"].T)[..., None]
        return y.reshape(B, T, d) @ sd["qo_bank"][L + i].T

    def mlp(i, h):
        return F.leaky_relu(h @ sd["mlp_up_bank"][i].T, 0.5).square() @ sd["mlp_down_bank"][i].T

    p = lambda i, n: sd[f"blocks.{i}.{n}"]  # noqa: E731
    f = lambda i: 1 / math.sqrt(i + 1)  # noqa: E731
    if looping:
        seq = list(range(cfg.loop_start)) + list(range(cfg.loop_start, cfg.loop_end + 1)) * (cfg.num_loops + 1)
        seq += list(range(cfg.loop_end + 1, L))
        enc, dec = seq[: len(seq) // 2], seq[len(seq) // 2 :]
    else:
        enc, dec = list(range(L // 2)), list(range(L // 2, L))
    skips = []

    def block(i, x):
        xi = p(i, "resid_mix")[0] * x + p(i, "resid_mix")[1] * x0
        x = xi + p(i, "attn_scale") * attn(i, rms(xi) * f(i))
        return x + p(i, "mlp_scale") * mlp(i, rms(x) * f(i))

    def skip(j, dest):
        if j >= sd["skip_weights"].size(0) or not skips:
            return dest
        gate = torch.sigmoid(sd["skip_gates"][j])
        return gate * dest + (1 - gate) * sd["skip_weights"][j] * skips.pop()

    for i in enc:
        x = block(i, x)
        skips.append(x)
    lane0 = lane1 = None
    for j, i in enumerate(dec):
        if i >= cfg.parallel_start_layer:
            if lane0 is None:
                lane0 = lane1 = x
            lane0 = skip(j, lane0)
            mix = p(i, "resid_mix")
            a = p(i, "attn_scale") * attn(i, rms(mix[0] * lane0 + mix[1] * x0) * f(i))
            m = p(i, "mlp_scale") * mlp(i, rms(lane1) * f(i))
            R, P = sd["parallel_resid_lambdas"][i], sd["parallel_post_lambdas"][i]
            lane0, lane1 = R[0] * lane0 + P[0, 0] * a + P[1, 0] * m, R[1] * lane1 + P[0, 1] * a + P[1, 1] * m
        else:
            x = block(i, skip(j, x))
    z = rms(0.5 * (lane0 + lane1)) @ sd["tok_emb.weight"].T
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


@pytest.mark.parametrize("looping", [True, False])
def test_forward_equals_the_record_formulas(tiny_cfg, looping, monkeypatch):
    """In float64 (RoPE tables too, which pgolf computes in float32): equal to rounding."""
    monkeypatch.setattr(gpt_module, "rope_tables", f64_rope_tables)
    m = build(tiny_cfg).double().eval()
    m.set_looping(looping)
    x = tokens(T=20, bos_at=(0, 7))
    rec = to_record_1611(m.state_dict(), tiny_cfg.num_layers)
    with torch.no_grad():
        want = reference_forward(rec, tiny_cfg, x, looping)
        assert (m(x) - want).abs().max() < 1e-9


def test_cached_decoding_equals_the_full_forward(tiny_cfg):
    m = build(tiny_cfg).double().eval()
    x = tokens(T=16, bos_at=(0, 6))
    for looping in (True, False):
        m.set_looping(looping)
        with torch.no_grad():
            c = m.new_cache(2, 16, dtype=torch.float64)
            steps = torch.cat([m.decode(x[:, :5], c)] + [m.decode(x[:, t : t + 1], c) for t in range(5, 16)], 1)
            assert (steps - m(x)).abs().max() < 1e-10


# ---- the tiny variant trains, and compiles in both states ------------------------------------------------------
def test_tiny_1611_trains_with_looping_off_and_on(one_thread):
    cfg = model_cfg("tiny_1611")  # the demo vocabulary
    torch.manual_seed(0)
    m = GPT(cfg).train()
    m.set_looping(cfg.looping_at(0.0))
    assert not m.looping_active and cfg.enable_looping_at == 0.35
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(6):
        if not m.looping_active and cfg.looping_at(step / 6):
            m.set_looping(True)  # the trainer's switch, at step 3 of 6
        loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert m.looping_active and all(math.isfinite(v) for v in losses)
    assert losses[2] < losses[0] and losses[5] < losses[3]  # learns in both states


@pytest.mark.slow  # ~7-9 s on a loaded 2-core CPU: AOT tracing of forward + backward, twice
def test_both_looping_states_compile_fullgraph(tiny_cfg, one_thread):
    """One graph per state of the looping flag (fullgraph, aot_eager on the CPU), forward and backward, with a
    document mask: a 3-layer variant that still has every feature (virtual [0,1,1,2], lanes on layer 2)."""
    import torch._dynamo

    over = dict(num_layers=3, loop_start=1, loop_end=1, parallel_start_layer=2, xsa_last_n=3, model_dim=32)
    cfg = GPTConfig(**{**tiny_cfg.to_dict(), **over, "num_heads": 2, "num_kv_heads": 1, "rope_dims": 8})
    m = build(cfg).train()
    x = tokens(B=1, T=16, bos_at=(0, 9))
    cu = document_cu_seqlens(x, BOS, 2048, pad_multiple=4)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
    for looping in (False, True):
        m.set_looping(looping)
        m.zero_grad()
        loss = cm(x, x, cu_seqlens=cu)
        loss.backward()
        with torch.no_grad():
            assert torch.allclose(loss, m(x, x, cu_seqlens=cu), atol=1e-5)
        assert m.blocks[1].attn.attn_gate_w.grad.abs().sum() > 0


@pytest.mark.gpu
def test_gpu_flex_document_attention_compiles_and_keeps_documents_apart(tiny_cfg):
    """On CUDA, `auto` document attention is flex attention: compiled (inductor, fullgraph) it matches the
    eager masked SDPA in float32, keeps the documents apart, and trains under bf16 autocast in both looping
    states (forward + backward)."""
    m = build(tiny_cfg).cuda()
    x = tokens(B=1, T=256, seed=3, bos_at=(0, 100, 180)).cuda()
    cu = document_cu_seqlens(x, BOS, 2048).cuda()
    x2 = x.clone()
    x2[0, 101:180] = torch.where(x2[0, 101:180] == 2, 3, 2)  # the middle document's tokens, its BOS kept
    hidden = torch.compile(m.forward_hidden, fullgraph=True, dynamic=False)
    fwd = torch.compile(m, fullgraph=True, dynamic=False)
    for looping in (False, True):
        m.set_looping(looping)
        with torch.no_grad():
            h, h2 = hidden(x, cu_seqlens=cu), hidden(x2, cu_seqlens=cu)
            ref = m.forward_hidden(x, cu_seqlens=cu, doc_impl="mask")
        assert (h - ref).abs().max() < 1e-2, looping  # final-normed (|h| ~ 1); allows TF32 matmuls
        assert torch.allclose(h[:, :100], h2[:, :100], atol=1e-6) and torch.allclose(h[:, 180:], h2[:, 180:], atol=1e-6)
        assert not torch.allclose(h[:, 101:180], h2[:, 101:180], atol=1e-3)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(x, x, cu_seqlens=cu)
        loss.backward()
        assert torch.isfinite(loss) and m.blocks[1].attn.attn_gate_w.grad.abs().sum() > 0
