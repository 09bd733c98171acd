"""The quantization rules' reference-parity switches, on the smallest cases where each one changes a code:
`divide_by` (the baseline divides by the fp32 row scale, pgolf by the stored fp16 one), `control_patterns`
(the baseline's control set stores smear.gate and ve_layer_scales fp16), the per-tensor path without the
scale floor (the baseline's), and `code_range: full` (int5 [-16, 15] as in the PR #1090 non-record).
Expected codes are computed here from the formulas of the baseline's `quantize_float_tensor`
(openai/parameter-golf train_gpt.py), not by calling the quantizer twice."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.rules import (
    BASELINE_CONTROL_PATTERNS,
    QuantRule,
    dequantize_state,
    pick_rule,
    quantize_state,
    quantize_tensor_by_rule,
    rules_from_config,
)

Q = 0.9999984  # the baseline's INT8_CLIP_Q

# The baseline's int8 export as rules, with its three details switched on (what its experiment selects).
BASELINE_PARITY_RULES = [
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "control_patterns": "baseline", "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 8, "clip": Q, "divide_by": "fp32"},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": Q, "scale_floor": False},
]
# pgolf's int8 export (conf/export/int8_zlib.yaml's rules).
PGOLF_RULES = [
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 8, "clip": Q, "scale_floor": True},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": Q, "scale_floor": True},
]


def quantile_linear(a: torch.Tensor, q: float) -> float:
    """torch.quantile's default ('linear') interpolation, in float64: sorted[i] + f·(sorted[i+1] - sorted[i])
    at position q·(n-1)."""
    s = torch.sort(a.double().flatten()).values
    pos = q * (s.numel() - 1)
    i = int(pos)
    return float(s[i] + (pos - i) * (s[min(i + 1, s.numel() - 1)] - s[i]))


def test_row_codes_divide_by_the_fp32_scale_like_the_baseline():
    """1 x 65,537 zeros with w[0] = 1.0, w[1] = 63.4999/127: the row clip (0.9999984 quantile, ~0.9476) is
    below 1, so the scale is the floor 1/127; in fp16 that is 0.0078735 < 1/127, and w[1]/s crosses .5:
    the baseline (fp32 scale) writes 63, pgolf (fp16 scale) 64."""
    w = torch.zeros(1, 65537)
    w[0, 0], w[0, 1] = 1.0, 63.4999 / 127
    clip = quantile_linear(w.abs(), Q)
    assert 0.947 < clip < 0.948  # sorted[65535] + 0.895 * (1 - sorted[65535])
    s32 = torch.tensor(max(clip / 127, 1 / 127), dtype=torch.float32)  # the floor binds: 1/127
    s16 = s32.half()
    rec = torch.round(w[0, 1] / s32).item()
    pg = torch.round(w[0, 1] / s16.float()).item()
    assert (rec, pg) == (63.0, 64.0)
    w0_code = round(min(1.0, clip) / s32.item())  # w[0] clipped to the row clip first
    assert w0_code == 120

    by_rule = {}
    for rules in (BASELINE_PARITY_RULES, PGOLF_RULES):
        e = quantize_state({"m.weight": w}, rules_from_config(rules))["m.weight"]
        assert e.kind == "int" and e.scale.dtype == torch.float16 and e.scale.item() == s16.item()
        by_rule[rules[3].get("divide_by", "fp16")] = e.q
    assert by_rule["fp32"][0, :3].tolist() == [w0_code, 63, 0]
    assert by_rule["fp16"][0, :3].tolist() == [w0_code, 64, 0]
    assert (by_rule["fp32"][0, 2:] == 0).all() and (by_rule["fp16"][0, 2:] == 0).all()


def test_baseline_control_set_stores_smear_gate_and_ve_scales_fp16():
    """The baseline keeps small tensors whose name matches its CONTROL_TENSOR_NAME_PATTERNS in fp32 and
    the other small floats in fp16; smear.gate and ve_layer_scales are not in its set."""
    g = torch.Generator().manual_seed(0)
    state = {
        name: torch.randn(shape, generator=g) / 3
        for name, shape in {
            "smear.gate": (512,),
            "ve_layer_scales": (2,),
            "blocks.0.attn_scale": (512,),
            "blocks.0.mlp_scale": (512,),
            "blocks.0.resid_mix": (2, 512),
            "blocks.0.attn.q_gain": (8,),
            "skip_weights": (4, 512),
        }.items()
    }
    base = quantize_state(state, rules_from_config(BASELINE_PARITY_RULES))
    ours = quantize_state(state, rules_from_config(PGOLF_RULES))
    for name in ("smear.gate", "ve_layer_scales"):
        assert base[name].kind == "fp16" and base[name].data.dtype == torch.float16
        assert ours[name].kind == "fp32" and ours[name].data.dtype == torch.float32
    for name in ("blocks.0.attn_scale", "blocks.0.mlp_scale", "blocks.0.resid_mix", "blocks.0.attn.q_gain"):
        assert base[name].kind == ours[name].kind == "fp32"
    assert base["skip_weights"].kind == "fp32"
    back = dequantize_state(base)
    assert back["smear.gate"].dtype == torch.float32  # restored to the original dtype
    assert torch.equal(back["smear.gate"], state["smear.gate"].half().float())
    assert torch.equal(back["blocks.0.attn_scale"], state["blocks.0.attn_scale"])


def test_per_tensor_path_without_the_floor_is_the_baselines():
    """A 65,537-element vector with |w| <= 1e-3: pgolf's floored per-tensor scale (1/127) rounds every entry
    to 0; the baseline's scale clip/127 (no floor) keeps them. Expected codes from the baseline's formula:
    c = quantile(|w|), s = c/127 (fp32), q = clamp(round(clamp(w, ±c)/s), ±127)."""
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(65537, generator=g) * 2 - 1) * 1e-3
    c = torch.quantile(w.abs(), Q).item()
    s = torch.tensor(c / 127.0, dtype=torch.float32)
    want = torch.clamp(torch.round(torch.clamp(w, -c, c) / s), -127, 127).to(torch.int8)
    assert (want != 0).float().mean() > 0.99

    base = quantize_state({"v": w}, rules_from_config(BASELINE_PARITY_RULES))["v"]
    ours = quantize_state({"v": w}, rules_from_config(PGOLF_RULES))["v"]
    assert base.info["rule"] == ours.info["rule"] == "other"
    assert torch.equal(base.q, want) and base.scale.dtype == torch.float32 and base.scale.item() == s.item()
    assert (ours.q == 0).all() and ours.scale.item() == pytest.approx(1 / 127)

    zeros = quantize_state({"v": torch.zeros(70000)}, rules_from_config(BASELINE_PARITY_RULES))["v"]
    assert zeros.scale.item() == 1.0 and (zeros.q == 0).all()  # the baseline's scale for an all-zero tensor


def test_per_tensor_quantile_clip_clips_values_first():
    """Two outliers beyond the quantile of a 10^6-element tensor: the baseline clips them to ±c before
    rounding, so their codes are ±127 with the scale c/127 (no floor)."""
    w = torch.linspace(-0.5, 0.5, 1_000_000)
    w[0], w[1] = 5.0, -5.0
    c = torch.quantile(w.abs(), Q).item()
    e = quantize_tensor_by_rule("v", w, QuantRule(store="int", granularity="tensor", clip=Q, scale_floor=False))
    assert e.scale.item() == torch.tensor(c / 127.0, dtype=torch.float32).item()
    assert e.q[0].item() == 127 and e.q[1].item() == -127


def test_full_code_range_reaches_the_lowest_code():
    """int5 with `code_range: full` as the PR #1090 non-record's clamp(…, -16, 15): a negative outlier
    beyond the clip reaches -16 (symmetric: -15); with the clip at the row max the bound never binds."""
    w = torch.linspace(-1.0, 1.0, 1001)[None, :].repeat(2, 1)
    w[0, 0] = -3.0
    w[1, -1] = 3.0
    c = torch.quantile(w.abs(), 0.99, dim=1)
    s = (c / 15).half().float()
    want = torch.clamp(torch.round(w / s[:, None]), -16, 15)
    rule = dict(store="int", bits=5, clip="search", clips=[0.99], scale_floor=False)  # no value clipping
    full = quantize_tensor_by_rule("m", w, QuantRule(**rule, code_range="full"))
    sym = quantize_tensor_by_rule("m", w, QuantRule(**rule))
    assert torch.equal(full.q.float(), want)
    assert full.q[0, 0] == -16 and sym.q[0, 0] == -15 and full.q[1, -1] == sym.q[1, -1] == 15
    at_max = QuantRule(store="int", bits=5, clip="max", scale_floor=False)
    q_max = quantize_tensor_by_rule("m", w, at_max).q
    assert torch.equal(q_max, quantize_tensor_by_rule("m", w, replace(at_max, code_range="full")).q)


def test_new_rule_fields_are_validated():
    with pytest.raises(ValueError, match="divide_by"):
        QuantRule(store="int", divide_by="bf16")
    with pytest.raises(ValueError, match="divide_by fp32"):
        QuantRule(store="int", method="gptq", divide_by="fp32")
    with pytest.raises(ValueError, match="code_range"):
        QuantRule(store="int", code_range="asymmetric")
    with pytest.raises(ValueError, match="only with a `control` condition"):
        QuantRule(store="fp32", control_patterns="baseline")
    with pytest.raises(ValueError, match="not a set"):
        QuantRule(store="fp32", control=True, control_patterns="records")
    with pytest.raises(ValueError, match="non-empty list"):
        QuantRule(store="fp32", control=True, control_patterns=[])
    r = QuantRule(store="fp16", control=True, control_patterns=["smear", "q_gain"])
    assert r.is_control("smear.gate") and r.is_control("blocks.0.attn.q_gain") and not r.is_control("skip_weights")
    assert QuantRule(store="fp32", control=True, control_patterns="baseline").is_control("skip_weights")
    assert "smear" not in BASELINE_CONTROL_PATTERNS


# ---- the record schemes the rule language now expresses --------------------------------------------
V5_RULES = [  # records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd train_gpt_v5.py
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "control_patterns": "baseline", "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "embed_fp16", "pattern": r"^tok_emb\.|^bigram\.embed\.", "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 6, "clip": Q, "divide_by": "fp32"},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": Q, "scale_floor": False},
]
MIXED_1090_RULES = [  # records/track_non_record_16mb/2026-03-24_11L_XSA_SwiGLU_LoRATTT_1xH100 train_gpt.py
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small", "max_numel": 896, "store": "fp16"},
    {
        "name": "control",
        "control": True,
        "control_patterns": ["attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear"],
        "store": "fp16",
    },
    {
        "name": "embed",
        "pattern": "tok_emb",
        "store": "int",
        "bits": 8,
        "clip": "max",
        "scale_floor": False,
        "code_range": "full",
    },  # fmt: skip
    {
        "name": "mlp",
        "pattern": r"mlp\.|gate\.|up\.",
        "store": "int",
        "bits": 5,
        "clip": "max",
        "scale_floor": False,
        "code_range": "full",
    },  # fmt: skip
    {"name": "attn", "store": "int", "bits": 6, "clip": "max", "scale_floor": False, "code_range": "full"},
]


def test_v5_scheme_classes_and_codes():
    cfg = GPTConfig(num_layers=2, mlp_mult=3.0, smear_gate="v5", bigram="v5", bigram_buckets=4096)
    sd = {k: v.float() for k, v in GPT(cfg).state_dict().items()}
    rules = rules_from_config(V5_RULES)
    got = {n: pick_rule(n, t, rules).name for n, t in sd.items()}
    assert got["tok_emb.weight"] == got["bigram.embed.weight"] == "embed_fp16"
    assert got["bigram.proj.weight"] == got["smear.gate"] == "small"  # smear.gate: fp16 in V5's export
    assert got["blocks.0.attn_scale"] == got["skip_weights"] == "small_control"
    assert got["blocks.0.attn.c_q.weight"] == got["blocks.1.mlp.fc.weight"] == "matrix"
    w = torch.randn(1536, 512, generator=torch.Generator().manual_seed(3)) * 2
    e = quantize_tensor_by_rule("blocks.0.mlp.fc.weight", w, rules[4])
    c = torch.quantile(w.abs(), Q, dim=1)
    s = (c / 31).clamp_min(1 / 31)
    want = torch.clamp(torch.round(torch.maximum(torch.minimum(w, c[:, None]), -c[:, None]) / s[:, None]), -31, 31)
    assert torch.equal(e.q.float(), want) and torch.equal(e.scale, s.half())


def test_1090_mixed_scheme_classes_and_codes():
    cfg = GPTConfig(num_layers=4, mlp_act="swiglu", mlp_mult=3.0, smear_gate="record", xsa_last_n=2)
    sd = {k: v.float() for k, v in GPT(cfg).state_dict().items()}
    rules = rules_from_config(MIXED_1090_RULES)
    got = {n: pick_rule(n, t, rules).name for n, t in sd.items()}
    assert got["tok_emb.weight"] == "embed"
    assert {got[n] for n in sd if ".mlp." in n and n.endswith(".weight")} == {"mlp"}
    assert {got[n] for n in sd if ".attn.c_" in n or ".attn.proj" in n} == {"attn"}
    assert got["blocks.0.attn_scale"] == got["smear.gate"] == got["blocks.0.attn.q_gain"] == "small"  # <= 896
    assert got["blocks.0.resid_mix"] == got["skip_weights"] == "control"  # 1,024 elements: fp16 by pattern
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(4))
    e = quantize_tensor_by_rule("blocks.0.mlp.fc.weight", w, rules[4])
    s = (w.abs().amax(dim=1) / 15).clamp_min(1e-12).half()
    want = torch.clamp(torch.round(w / s.float()[:, None]), -16, 15)
    assert torch.equal(e.q.float(), want) and torch.equal(e.scale, s)
