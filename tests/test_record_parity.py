"""The model and optimizer switches that reproduce the seed records' training, checked from the formulas:
V5's training-time int6 STE (fp32 scale, no floor), Polar Express at 4 vs 5 steps (PR #1298), PR #1263's
depth-scaled auxiliary projections in Muon, and PR #1090's model (separate SwiGLU gate/up matrices, each its
own Muon matrix; XSA formula; smear gate and bigram module in no optimizer group; logged parameter count)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT, count_params
from pgolf.model.layers import exclusive_self_attention
from pgolf.optim.groups import build_optimizer, partition_params
from pgolf.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, newton_schulz, ns_coefficients

# The values proposed for conf/model/pr1090.yaml (on top of conf/model/baseline.yaml's defaults) and
# conf/optim/pr1090.yaml (on top of conf/optim/baseline.yaml).
R1090_MODEL = dict(
    num_layers=11,
    mlp_mult=3.0,
    mlp_act="swiglu",
    swiglu_split=True,
    ortho_init=True,
    aux_proj_depth_scale=True,
    smear_gate="record",
    bigram="xor",
    bigram_buckets=4096,
    bigram_dim=128,
    bigram_scale_init=0.05,
    xsa_last_n=4,
)
R1090_FROZEN = ["smear.gate", "bigram.*"]
OPTIM = dict(matrix_lr=0.04, scalar_lr=0.04, embed_lr=0.05, head_lr=0.008, muon_momentum=0.95, ns_steps=5)
SMALL = dict(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
WIDE = dict(SMALL, model_dim=512, num_heads=8, num_kv_heads=4, num_layers=1)
# a bigram projection 64 -> 128 large enough for the orthogonal init (both dims >= 64)
BIGRAM = dict(
    SMALL, model_dim=128, smear_gate="record", bigram="xor", bigram_buckets=64, bigram_dim=64, ortho_init=True
)


# ---- V5: the training-time STE (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd) -----------
def v5_matrix() -> torch.Tensor:
    return torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) / math.sqrt(512)  # N(0, 1/512)


def numpy_fake_quant(w: np.ndarray, quantile: float, floor: bool, fp16: bool) -> np.ndarray:
    """s_r = quantile_r(|w|)/31 (fp32), optionally floored at 1/31 and rounded to fp16; clamp(round(w/s), ±31)·s."""
    s = np.quantile(np.abs(w).astype(np.float64), quantile, axis=1, keepdims=True).astype(np.float32) / np.float32(31)
    if floor:
        s = np.maximum(s, np.float32(1 / 31))
    if fp16:
        s = s.astype(np.float16).astype(np.float32)
    return np.clip(np.round(w / s), -31, 31) * s


@pytest.mark.parametrize("floor_fp16,zero_fraction", [(False, 0.042736), (True, 0.285439)])
def test_v5_ste_zero_fraction(floor_fp16, zero_fraction):
    """The model's training forward with V5's STE (scale = row clip/31 in fp32, no floor) zeroes 4.27% of a
    512x512 N(0, 1/512) matrix; the export-matching form (floor 1/31, fp16 scale) zeroes 28.54%. The
    effective weight is read through the layer itself: lin(I) = Wqᵀ."""
    w = v5_matrix()
    cfg = GPTConfig(
        **WIDE, qat="always", qat_clip_quantile=0.9999984, qat_scale_floor=floor_fp16, qat_scale_fp16=floor_fp16
    )
    lin = GPT(cfg).train().blocks[0].attn.c_q
    with torch.no_grad():
        lin.weight.copy_(w)
        wq = lin(torch.eye(512)).T.numpy()
    ref = numpy_fake_quant(w.numpy(), 0.9999984, floor_fp16, floor_fp16)
    assert np.array_equal(wq == 0, ref == 0)  # the same entries vanish
    assert (np.abs(wq - ref) > 1e-6).sum() <= 2  # fp32 quantile ulps may move an entry at a rounding boundary
    assert (wq == 0).mean() == pytest.approx(zero_fraction, abs=1e-6)
    lin.eval()
    assert torch.equal(lin(torch.eye(512)).T, w)  # never in eval mode


def test_v5_ste_has_no_floor_and_an_fp32_scale():
    """Rows whose clip/31 lies below the floor 1/31 keep their own scale; the scale is not fp16-rounded."""
    w = v5_matrix()
    cfg = GPTConfig(**WIDE, qat="always", qat_scale_floor=False, qat_scale_fp16=False)
    lin = GPT(cfg).train().blocks[0].attn.c_q
    with torch.no_grad():
        lin.weight.copy_(w)
        wq = lin(torch.eye(512)).T
    s = w.abs().amax(dim=1, keepdim=True) / 31  # qat_clip_quantile 1.0: the row max
    assert torch.all(s < 1 / 31)
    assert torch.equal(wq, torch.clamp(torch.round(w / s), -31, 31) * s)
    assert not torch.equal(s, s.half().float())


# ---- PR #1298: Polar Express steps ---------------------------------------------------------------------
@pytest.mark.parametrize("steps,lo,hi", [(4, 0.42447, 1.57553), (5, 0.85888, 1.14113)])
def test_polar_express_singular_values_at_4_and_5_steps(steps, lo, hi):
    """Each Polar Express step maps every singular value σ of the Frobenius-normalised matrix through
    aσ + bσ³ + cσ⁵ (the tuples of arXiv:2505.16932): on one 512x1536 Gaussian matrix the first 4 tuples leave
    singular values in [0.42, 1.58], all 5 in [0.86, 1.14] (PR #1298's code runs 5: MUON_BACKEND_STEPS)."""
    G = torch.randn(512, 1536, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(G, ns_coefficients("polar_express", steps), dtype=torch.float32)
    s = torch.linalg.svdvals(out.double()).sort().values
    x = torch.linalg.svdvals(G.double()) / (G.double().norm() + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps]:
        x = a * x + b * x**3 + c * x**5
    assert torch.allclose(s, x.sort().values, atol=2e-4)
    assert s.min().item() == pytest.approx(lo, abs=1e-4) and s.max().item() == pytest.approx(hi, abs=1e-4)
    if steps == 4:
        o5 = newton_schulz(G, ns_coefficients("polar_express", 5), dtype=torch.float32)
        assert ((out - o5).norm() / o5.norm()).item() == pytest.approx(0.397, abs=1e-3)


# ---- PR #1263: auxiliary projections --------------------------------------------------------------------
def r1263_like(**over) -> GPTConfig:
    """PR #1263's auxiliary-projection shapes (bigram 128 -> 512, VE 128 -> 256) on 11 layers, narrow blocks."""
    return GPTConfig(
        **{
            **dict(vocab_size=64, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=1.0),
            **dict(ortho_init=True, bigram="xor", bigram_buckets=64, bigram_dim=128, ve_dim=128, ve_layers=(9, 10)),
            **over,
        }
    )


@pytest.mark.parametrize("depth_scale,sv", [(True, 0.213201), (False, 1.0)])
def test_aux_projection_init_singular_values(depth_scale, sv):
    """Orthogonal then x 1/sqrt(2L): every singular value 1/sqrt(22) = 0.2132 at 11 layers (PR #1263); gain 1
    otherwise (PR #549 / #1298). The block matrices keep gain 1 either way."""
    torch.manual_seed(0)
    m = GPT(r1263_like(aux_proj_depth_scale=depth_scale))
    for proj in (m.bigram.proj, m.ve_shared.proj):
        s = torch.linalg.svdvals(proj.weight)
        assert proj.weight.shape[1] == 128 and s.numel() == 128
        assert torch.allclose(s, torch.full_like(s, sv), atol=1e-5)
    s = torch.linalg.svdvals(m.blocks[0].attn.c_q.weight)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)
    with pytest.raises(ValueError, match="aux_proj_depth_scale needs ortho_init"):
        r1263_like(aux_proj_depth_scale=True, ortho_init=False)


def test_aux_projections_in_the_muon_group():
    m = GPT(r1263_like(num_layers=2, ve_layers=(1,)))
    aux = {"bigram.proj.weight", "ve_shared.proj.weight"}
    assert aux <= set(partition_params(m.named_parameters(), aux_proj_to_muon=True)["matrix"])
    assert aux <= set(partition_params(m.named_parameters())["scalar"])
    opt = build_optimizer(m, {**OPTIM, "aux_proj_to_muon": True})
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert {id(m.bigram.proj.weight), id(m.ve_shared.proj.weight)} <= {id(p) for p in muon["params"]}


# ---- PR #1090 (records/track_non_record_16mb/2026-03-24_11L_XSA_SwiGLU_LoRATTT_1xH100) -------------------
def test_r1090_parameter_count_and_init():
    """27,092,057 parameters, as its train.log logs: 11 layers of SwiGLU (hidden 1024, separate gate and up),
    XSA on the last 4, and the XOR BigramHash 4096x128 its script builds (table zero, never stepped)."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**R1090_MODEL))
    assert count_params(m) == 27_092_057
    assert [b.attn.xsa for b in m.blocks] == [False] * 7 + [True] * 4
    mlp = m.blocks[0].mlp
    assert mlp.fc is None and mlp.gate.weight.shape == mlp.up.weight.shape == (1024, 512)
    for w in (mlp.gate.weight, mlp.up.weight):  # each orthogonal on its own: orthonormal columns
        assert torch.allclose(w.T @ w, torch.eye(512), atol=1e-4)
    assert mlp.proj.weight.abs().sum() == 0
    assert torch.allclose(torch.linalg.svdvals(m.bigram.proj.weight), torch.full((128,), 1 / math.sqrt(22)), atol=1e-5)
    assert m.bigram.embed.weight.abs().sum() == 0 and torch.all(torch.sigmoid(m.smear.gate) == 0.5)


def perturb(m: GPT) -> GPT:
    """Add fixed noise to every parameter (seeded by its name's length and size) so zero-init paths are live."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n) * 7919 + p.numel())) * 0.05)
    return m


def split_and_fused(live: bool = False) -> tuple[GPT, GPT]:
    """A small SwiGLU model with separate gate/up matrices and a fused one holding the same weights (`live`:
    the split model's weights perturbed first)."""
    torch.manual_seed(0)
    cfg = dict(**SMALL, mlp_mult=3.0, mlp_act="swiglu", ortho_init=True)
    split = GPT(GPTConfig(**cfg, swiglu_split=True))
    if live:
        perturb(split)
    fused = GPT(GPTConfig(**cfg))
    src = split.state_dict()
    sd = {}
    for k, v in src.items():
        if k.endswith("mlp.gate.weight"):
            sd[k.replace("gate", "fc")] = torch.cat((v, src[k.replace("gate", "up")]))
        elif not k.endswith("mlp.up.weight"):
            sd[k] = v
    fused.load_state_dict(sd)
    return split, fused


def test_swiglu_split_computes_the_fused_function():
    split, fused = split_and_fused()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(split(x), fused(x), atol=1e-6)
    # fused init: one orthogonal [2·hidden, d], so each half's columns have norm 1/sqrt(2) (PR #1090: 1)
    torch.manual_seed(0)
    fc = GPT(GPTConfig(**SMALL, mlp_mult=3.0, mlp_act="swiglu", ortho_init=True)).blocks[0].mlp.fc.weight
    assert torch.allclose(fc[:128].norm(dim=0), torch.full((64,), 2**-0.5), atol=0.15)
    with pytest.raises(ValueError, match="swiglu_split needs mlp_act swiglu"):
        GPTConfig(**SMALL, swiglu_split=True)


def quintic_muon_update(g: torch.Tensor, momentum: float) -> torch.Tensor:
    """The first Muon update of one matrix from the formula: Nesterov u = g + μ·g (the buffer is g after
    one step), Newton-Schulz (quintic, 5 steps, on the wide orientation after Frobenius normalisation),
    times sqrt(max(1, rows/cols))."""
    u = (g + momentum * g).double()
    X = u.T if u.shape[0] > u.shape[1] else u
    X = X / (X.norm() + 1e-7)
    a, b, c = QUINTIC
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    X = X.T if u.shape[0] > u.shape[1] else X
    return (X * math.sqrt(max(1.0, u.shape[0] / u.shape[1]))).float()


def test_split_gate_is_its_own_muon_matrix():
    """The gate matrix's update is Muon applied to that matrix alone (shape scale sqrt(128/64)); the fused
    matrix's update is not the concatenation of the two halves' updates."""
    split, fused = split_and_fused(live=True)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    names = partition_params(split.named_parameters())["matrix"]
    assert "blocks.0.mlp.gate.weight" in names and "blocks.0.mlp.up.weight" in names
    updates = []
    for m, w in ((split, split.blocks[0].mlp.gate.weight), (fused, fused.blocks[0].mlp.fc.weight)):
        opt = build_optimizer(m, OPTIM)
        m(x, x).backward()
        g, before = w.grad.clone(), w.detach().clone()
        opt.step()
        updates.append(((before - w.detach()) / 0.04, g))
    (u_gate, g_gate), (u_fc, g_fc) = updates
    assert torch.allclose(g_fc[:128], g_gate, atol=1e-6)  # same function, same gradient
    assert torch.allclose(u_gate, quintic_muon_update(g_gate, 0.95), atol=2e-5)
    assert torch.allclose(u_fc, quintic_muon_update(g_fc, 0.95), atol=2e-5)
    assert (u_fc[:128] - u_gate).norm() / u_gate.norm() > 0.2


def test_r1090_xsa_formula():
    """PR #1090's XSA, y - (y·v)/max(v·v, 1e-8)·v on repeat-interleaved v, is pgolf's exclusive self-attention."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 4, 10, 16
    y, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)
    vr = v.repeat_interleave(H // Hkv, dim=1)
    ref = y - ((y * vr).sum(-1, keepdim=True) / (vr * vr).sum(-1, keepdim=True).clamp_min(1e-8)) * vr
    assert torch.allclose(exclusive_self_attention(y, v), ref, atol=1e-6)


def test_frozen_parameters_get_gradients_but_never_move():
    """PR #1090's smear gate (a fixed 0.5 blend) and bigram module are in no optimizer: the backward computes
    their gradient, the step leaves them bit-identical, zero_grad clears them with the rest."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(**BIGRAM))
    parts = partition_params(m.named_parameters(), frozen=R1090_FROZEN)
    frozen = ["bigram.scale", "bigram.embed.weight", "bigram.proj.weight", "smear.gate"]
    assert sorted(parts["frozen"]) == sorted(frozen)
    assert not set(frozen) & {n for k, names in parts.items() if k != "frozen" for n in names}
    opt = build_optimizer(m, {**OPTIM, "frozen": R1090_FROZEN})
    assert [g["kind"] for g in opt.param_groups if g["name"] == "frozen"] == ["frozen"]
    named = dict(m.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        opt.zero_grad()
        m(x, x).backward()
        assert named["smear.gate"].grad.abs().sum() > 0 and named["bigram.embed.weight"].grad.abs().sum() > 0
        opt.step()
    for n in frozen:
        assert torch.equal(named[n], before[n]), n
    assert not torch.equal(named["blocks.0.attn.c_q.weight"], before["blocks.0.attn.c_q.weight"])
    opt.zero_grad()
    assert named["smear.gate"].grad is None
    with pytest.raises(ValueError, match="match no parameter"):
        partition_params(m.named_parameters(), frozen=["smear.gates"])


def test_frozen_bigram_leaves_the_forward_unchanged():
    """With its table at its zero init, the never-stepped bigram module adds exactly nothing: the R1090 model
    with it computes the logits of the same model without it."""
    torch.manual_seed(0)
    small = dict(R1090_MODEL, **BIGRAM, xsa_last_n=1)
    with_b = GPT(GPTConfig(**small))
    without = GPT(GPTConfig(**{**small, "bigram": "none"}))
    without.load_state_dict({k: v for k, v in with_b.state_dict().items() if not k.startswith("bigram.")})
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(with_b(x), without(x))


@pytest.mark.parametrize(
    "over",
    [
        dict(R1090_MODEL, **BIGRAM, xsa_last_n=1),
        dict(SMALL, qat="always", qat_clip_quantile=0.9999984, qat_scale_floor=False, qat_scale_fp16=False),
    ],
    ids=["r1090", "v5_ste"],
)
def test_record_switches_trace_as_one_graph(over):
    """PR #1090's split SwiGLU and V5's STE compile with fullgraph (no graph break), forward and backward."""
    import torch._dynamo

    m = GPT(GPTConfig(**over)).train()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x, x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
    loss = cm(x, x)
    loss.backward()
    assert torch.allclose(loss, m(x, x), atol=1e-5) and m.blocks[0].attn.c_q.weight.grad is not None
