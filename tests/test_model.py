"""The GPT and every record-stack feature (docs/techniques.md#model): parameter counts, causality, feature
effects, init,
XSA and partial-RoPE properties, and compilation without graph breaks."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT, count_params
from pgolf.model.layers import apply_rope, exclusive_self_attention, rope_tables

CONF = Path(__file__).resolve().parent.parent / "conf"

PARAM_COUNTS = {
    "baseline": 17_059_912,
    "v5_1556": 22_368_840,
    "pr549": 26_928_220,
    "pr1019": 27_067_484,
    "pr1263": 26_993_756,
    "pr1298": 26_895_452,
}


def model_cfg(name: str, **over) -> GPTConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"])
    return GPTConfig.from_dict({**OmegaConf.to_container(cfg.model, resolve=True), **over})


@pytest.mark.parametrize("name,expected", sorted(PARAM_COUNTS.items()))
def test_parameter_counts_match_the_records(name, expected):
    assert count_params(GPT(model_cfg(name))) == expected


SMALL = dict(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
FEATURES = {
    "mlp3x": dict(mlp_mult=3.0),
    "leaky_relu2": dict(mlp_act="leaky_relu2"),
    "swiglu": dict(mlp_act="swiglu"),
    "swiglu_split": dict(mlp_act="swiglu", swiglu_split=True),
    "smear_v5": dict(smear_gate="v5"),
    "smear_record": dict(smear_gate="record"),
    "bigram_v5": dict(bigram="v5", bigram_buckets=128, bigram_dim=32),
    "bigram_xor": dict(bigram="xor", bigram_buckets=128, bigram_dim=32),
    "bigram_xor_full_width": dict(bigram="xor", bigram_buckets=100, bigram_dim=64),
    "value_embeddings": dict(ve_dim=16, ve_layers=(2, 3)),
    "xsa_last2": dict(xsa_last_n=2),
    "xsa_all": dict(xsa_last_n=4),
    "partial_rope": dict(rope_dims=8),
    "ntk_rope": dict(rope_dims=8, rope_ntk_base_len=8),
    "ln_scale": dict(ln_scale=True),
    "depth_recurrence": dict(recur_start=1, recur_end=3, recur_times=2),
    "parallel_residual": dict(parallel_residual=True),
    "no_unet": dict(unet_skips=False),
    "untied_head": dict(tie_embeddings=False),
    "qat_always": dict(qat="always", qat_bits=4),
    "qat_v5_ste": dict(qat="always", qat_bits=4, qat_scale_floor=False, qat_scale_fp16=False),
    "record_combo": dict(
        mlp_mult=3.0,
        mlp_act="leaky_relu2",
        smear_gate="record",
        bigram="xor",
        bigram_buckets=128,
        bigram_dim=32,
        ve_dim=16,
        ve_layers=(2, 3),
        xsa_last_n=4,
        rope_dims=8,
        rope_ntk_base_len=16,
        ln_scale=True,
        ortho_init=True,
        qk_gain_init=4.0,
    ),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Deterministic random values per parameter name, so zero-initialised paths are live and models that
    share a parameter name and shape share its values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}{tuple(p.shape)}".encode()))
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim <= 1 else 0.0))
    return model


def build(**over) -> GPT:
    torch.manual_seed(0)
    return randomize(GPT(GPTConfig(**{**SMALL, **over})))


def tokens(B=2, T=32, seed=0):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("feature", ["baseline", *FEATURES])
def test_causality(feature):
    m = build(**FEATURES.get(feature, {}))
    m.train(feature.startswith("qat_"))  # QAT acts in training mode only
    x = tokens()
    with torch.no_grad():
        base = m(x)
        for t in (0, 5, 17, 31):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 7) % 64
            out = m(x2)
            assert torch.equal(out[:, :t], base[:, :t]), f"{feature}: token {t} changed earlier outputs"
            assert not torch.equal(out[:, t:], base[:, t:])


@pytest.mark.parametrize("feature", [f for f in FEATURES if f != "record_combo"])
def test_each_feature_changes_the_output(feature):
    x = tokens()
    off, on = build(), build(**FEATURES[feature])
    if feature.startswith("qat_"):
        off.train(), on.train()
    with torch.no_grad():
        assert not torch.allclose(off(x), on(x), atol=1e-5), f"{feature} had no effect"


def test_bf16_tables_are_the_fp32_init_rounded_and_read_in_fp32_outside_autocast():
    """`embed_dtype: bf16`, the records' policy: the token, BigramHash and VE tables are initialised in fp32
    and rounded (same RNG draws); outside autocast they are read in fp32, so the model computes exactly what
    the fp32 model with the rounded tables computes; under autocast the lookups stay bf16."""
    over = dict(bigram="xor", ve_dim=32, ve_layers=[1], smear_gate="record")
    torch.manual_seed(0)
    m32 = GPT(GPTConfig(**{**SMALL, **over}))
    torch.manual_seed(0)
    m16 = GPT(GPTConfig(**{**SMALL, **over, "embed_dtype": "bf16"}))
    tables = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    s32, s16 = m32.state_dict(), m16.state_dict()
    assert {k for k, v in s16.items() if v.dtype == torch.bfloat16} == tables
    assert all(torch.equal(s16[k], s32[k].bfloat16() if k in tables else s32[k]) for k in s32)
    assert not all(torch.equal(s32[k], s16[k].float()) for k in tables)  # the rounding is real
    with torch.no_grad():
        for k in tables:
            s32[k].copy_(s16[k].float())
    x = tokens()
    assert torch.equal(m16(x, x), m32(x, x)) and m16.output_weight().dtype == torch.float32
    m16(x, x).backward()
    m32(x, x).backward()
    for k, p in m16.named_parameters():
        q = dict(m32.named_parameters())[k]
        assert p.grad.dtype == p.dtype and (p.grad.float() - q.grad).norm() <= 1e-2 * q.grad.norm(), k
    with torch.autocast("cpu", torch.bfloat16):
        assert m16.tok_emb(x).dtype == m16.bigram(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="embed_dtype"):
        GPTConfig(**{**SMALL, "embed_dtype": "fp16"})


def test_qat_off_in_eval_mode_and_late_qat_switches_with_a_flag():
    x = tokens()
    ref = build()
    late = build(qat="late", qat_bits=4)
    with torch.no_grad():
        late.train()
        assert torch.equal(late(x), ref.train()(x)) and not late.qat_enabled  # late QAT starts inactive
        late.set_qat("late", enabled=True)
        assert late.qat_enabled and all(m.qat for m in late.quantized_linears())
        assert not torch.equal(late(x), ref(x))
        late.set_qat("late")  # None keeps the switch where it is
        assert late.qat_enabled
        late.eval()
        assert torch.equal(late(x), ref.eval()(x))  # never in eval mode
        late.train().set_qat("late", enabled=False)
        assert torch.equal(late(x), ref.train()(x))
        late.set_qat("always")
        assert late.qat_enabled and late.qat_mode == "always"
        late.set_qat("off")
        assert not late.qat_enabled and torch.equal(late(x), ref(x))
    with pytest.raises(ValueError, match="qat mode"):
        late.set_qat("on")


def test_late_qat_costs_nothing_before_its_switch(monkeypatch):
    """Before the switch a training forward never calls the fake quantizer (eagerly) and the traced graph
    holds no rounding op; after it, one call and one round per quantized linear."""
    import torch._dynamo

    import pgolf.model.layers as layers

    calls = []
    real = layers.fake_quant_rows
    monkeypatch.setattr(layers, "fake_quant_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = build(qat="late").train()
    x = tokens()

    def rounds() -> int:
        torch._dynamo.reset()
        graphs = torch._dynamo.explain(m)(x, x).graphs
        return sum(n.target is torch.round for g in graphs for n in g.graph.nodes)

    m(x, x)
    assert calls == [] and rounds() == 0
    m.set_qat("late", enabled=True)
    calls.clear()
    m(x, x)
    n = len(m.quantized_linears())
    assert len(calls) == n and rounds() == n


def test_init_features():
    cfg = GPTConfig(
        **{**SMALL, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2},
        ortho_init=True,
        qk_gain_init=4.0,
        bigram="xor",
        bigram_buckets=64,
        bigram_dim=64,
        smear_gate="record",
        ve_dim=64,
        ve_layers=(3,),
    )
    torch.manual_seed(0)
    m = GPT(cfg)
    eye = torch.eye(64)
    for b in m.blocks:
        assert torch.allclose(b.attn.c_k.weight @ b.attn.c_k.weight.T, eye, atol=1e-5)  # [64,128]: orthonormal rows
        assert torch.allclose(b.attn.c_q.weight.T @ b.attn.c_q.weight, torch.eye(128), atol=1e-5)
        assert b.attn.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0  # zero-init projections
        assert torch.all(b.attn.q_gain == 4.0)
        assert torch.equal(b.resid_mix[0], torch.ones(128)) and torch.equal(b.resid_mix[1], torch.zeros(128))
    assert m.bigram.embed.weight.abs().sum() == 0 and m.bigram.scale.item() == pytest.approx(0.05)
    # the bigram/VE projections are created zero but the model-wide ortho init re-initialises them (as in PR #549)
    assert torch.allclose(m.bigram.proj.weight.T @ m.bigram.proj.weight, eye, atol=1e-5)  # [128, 64]
    assert torch.allclose(m.ve_shared.proj.weight @ m.ve_shared.proj.weight.T, eye, atol=1e-5)  # [64, 64]
    assert m.ve_shared.scale.item() == pytest.approx(0.1)
    assert torch.all(m.smear.gate == 0.0)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.05)
    # V5 forms: gate init 3.0, bigram table N(0, 0.01^2), projection zero even with ortho init
    v5 = GPT(GPTConfig(**SMALL, smear_gate="v5", bigram="v5", bigram_buckets=4096, bigram_dim=128, ortho_init=True))
    assert torch.all(v5.smear.gate == 3.0) and v5.bigram.proj.weight.abs().sum() == 0
    assert v5.bigram.embed.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert v5.bigram.scale is None


def test_ln_scale_values():
    m = GPT(GPTConfig(**SMALL, ln_scale=True))
    assert [b.norm_scale for b in m.blocks] == pytest.approx([1 / math.sqrt(i + 1) for i in range(4)])


def test_xsa_removes_the_component_along_the_own_value():
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 8, 4, 10, 16
    y, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D)
    out = exclusive_self_attention(y, v)
    vn = F.normalize(v, dim=-1).repeat_interleave(H // Hkv, dim=1)  # head h uses KV group h // (H/Hkv)
    assert (out * vn).sum(-1).abs().max() < 1e-5
    diff = y - out  # what was removed is parallel to the own value
    assert torch.allclose(diff, (diff * vn).sum(-1, keepdim=True) * vn, atol=1e-5)
    # the other components are untouched: projecting out again changes nothing
    assert torch.allclose(exclusive_self_attention(out, v), out, atol=1e-5)


def test_partial_rope_leaves_unrotated_dims_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 3, 16)
    cos, sin = rope_tables(12, 8, 10000.0, 0, "cpu")
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert not torch.allclose(out[:, 1:, :, :8], x[:, 1:, :, :8])
    assert torch.equal(out[:, 0], x[:, 0])  # position 0: angle 0
    pair = lambda t: t[..., :4] ** 2 + t[..., 4:8] ** 2  # noqa: E731 - rotation of pairs (i, i+4) keeps norms
    assert torch.allclose(pair(out), pair(x), atol=1e-5)


def test_ntk_base_scaling_matches_the_reference():
    cos, sin = rope_tables(2048, 16, 10000.0, 1024, "cpu")
    base = 10000.0 * 2 ** (16 / 14)
    assert base == pytest.approx(22081.8, abs=0.1)
    ang1 = torch.atan2(sin[1], cos[1])  # position 1: angle = inv_freq
    want = 1.0 / base ** (torch.arange(0, 16, 2) / 16)
    assert torch.allclose(ang1, want, atol=1e-6)
    cos2, _ = rope_tables(1024, 16, 10000.0, 1024, "cpu")  # <= 1024: the plain base
    assert torch.allclose(torch.acos(cos2[1].clamp(-1, 1)), 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16), atol=1e-4)


def test_depth_recurrence_schedule_and_shared_weights():
    cfg = GPTConfig(**SMALL, recur_start=1, recur_end=3, recur_times=3)
    assert cfg.layer_schedule == [0, 1, 2, 1, 2, 1, 2, 3]
    m = GPT(cfg)
    assert len(m.blocks) == 4  # weights shared across repeats
    assert m.skip_weights.shape[0] == 4  # U-Net over the 8 virtual layers


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        GPTConfig(**{**SMALL, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="mlp_act"):
        GPTConfig(**SMALL, mlp_act="gelu")
    with pytest.raises(ValueError, match="ve_layers"):
        GPTConfig(**SMALL, ve_dim=8, ve_layers=(7,))
    with pytest.raises(ValueError, match="unknown fields"):
        GPTConfig.from_dict({"num_layer": 3})


def test_attention_uses_sdpa_with_native_gqa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa"), kw.get("is_causal")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    build()(tokens())
    assert calls and all(c == (4, 2, True, True) for c in calls)  # K/V stay at 2 heads: no repeat


@pytest.mark.parametrize("name", ["v5_1556", "pr1263", "pr1298"])
def test_record_configs_compile_fullgraph_without_graph_breaks(name):
    """Every feature combination the record configs use traces as one graph (dynamo explain), and the
    record stack compiles with fullgraph=True and runs forward + backward (aot_eager backend on CPU)."""
    import torch._dynamo

    cfg = model_cfg(
        name,
        vocab_size=64,
        num_layers=4,
        model_dim=64,
        num_heads=4,
        num_kv_heads=2,
        ve_layers=[2, 3] if name != "v5_1556" else [],
        xsa_last_n=4 if name != "v5_1556" else 0,
        bigram_buckets=128,
        bigram_dim=32,
        rope_ntk_base_len=16 if name != "v5_1556" else 0,
    )
    m = GPT(cfg).train()
    if cfg.qat == "late":
        m.set_qat("late", enabled=True)
    x = tokens()
    torch._dynamo.reset()
    ex = torch._dynamo.explain(m)(x, x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    if name == "pr1263":
        torch._dynamo.reset()
        cm = torch.compile(m, fullgraph=True, dynamic=False, backend="aot_eager")
        loss = cm(x, x)
        loss.backward()
        assert torch.isfinite(loss) and m.blocks[0].attn.c_q.weight.grad is not None
        with torch.no_grad():
            assert torch.allclose(cm(x, x), m(x, x), atol=1e-5)


DECODE_FEATURES = {
    "record_combo": dict(FEATURES["record_combo"], rope_ntk_base_len=8),  # NTK active: T=24 > 8
    "v5_forms": dict(smear_gate="v5", bigram="v5", bigram_buckets=128, bigram_dim=32, rope_dims=8),
    "recurrence_parallel": dict(
        recur_start=1, recur_end=3, recur_times=2, parallel_residual=True, ve_dim=16, ve_layers=(1,), xsa_last_n=2
    ),
    "swiglu_untied": dict(mlp_act="swiglu", tie_embeddings=False, unet_skips=False),
}


def decode_both_ways(m: GPT, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(full forward, prefill of 5 then single tokens, uneven chunks) logits [B,T,V] of x [B,T]."""
    B, T = x.shape
    c = m.new_cache(B, T, dtype=dtype)
    steps = [m.decode(x[:, :5], c)] + [m.decode(x[:, t : t + 1], c) for t in range(5, T)]
    c = m.new_cache(B, T, dtype=dtype)
    chunks = [m.decode(x[:, a:b], c) for a, b in ((0, 1), (1, 9), (9, 10), (10, T))]
    with pytest.raises(ValueError, match=f"holds {T} positions"):
        m.decode(x[:, :1], c)
    return m(x), torch.cat(steps, 1), torch.cat(chunks, 1)


@pytest.mark.parametrize("feature", sorted(DECODE_FEATURES))
def test_cached_decoding_equals_the_full_forward(feature):
    """KV-cache decoding (prefill chunk + single tokens, or uneven chunks) gives the full forward's logits,
    with SmearGate/BigramHash looking back across chunk boundaries, XSA, VE, partial RoPE and NTK scaling
    (the cache uses the RoPE table of its full length, which is what one forward of that length uses).

    The two paths compute the same sums in a different order: the cache path multiplies [B,k,d] inputs and
    attends over the cached keys with an explicit mask, the full forward multiplies [B,T,d] with is_causal.
    In float64 they agree to ~1e-13 (a feature whose cache path diverged would differ by O(1)), so float64
    is the exact check. In float32 the rounding differences (~1e-6 on attention outputs) are amplified about
    350x per block by these random-weight test models (weights std 0.3, activations up to ~50, relu² MLPs),
    reaching ~2e-4 on logits of magnitude ~9, i.e. ~2e-5 of the logit scale: the float32 check allows 1e-4
    of the largest logit."""
    x = tokens(B=3, T=24, seed=5)
    m = build(**DECODE_FEATURES[feature]).eval()
    with torch.no_grad():
        full64, steps64, chunks64 = decode_both_ways(m.double(), x, torch.float64)
        assert (steps64 - full64).abs().max() < 1e-10 and (chunks64 - full64).abs().max() < 1e-10
        full, steps, chunks = decode_both_ways(m.float(), x, torch.float32)
        tol = 1e-4 * full.abs().max().item()
        assert (steps - full).abs().max() < tol and (chunks - full).abs().max() < tol
    if feature == "record_combo":  # the NTK base depends on the length: a shorter forward differs
        with torch.no_grad():
            assert not torch.allclose(m(x[:, :12]), full[:, :12], atol=1e-4)
