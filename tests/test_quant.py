"""Quantization rules and per-row integer quantizers (docs/techniques.md#export)."""

from __future__ import annotations

import statistics

import pytest
import torch

from pgolf.export.config import BASELINE_RULES
from pgolf.quant import rules as rules_module
from pgolf.quant.numerics import fake_quant_rows
from pgolf.quant.rules import (
    QuantRule,
    clip_search_rows,
    dequantize_int,
    pick_rule,
    quantize_rows,
    quantize_state,
    rules_from_config,
)


def test_baseline_rules_classify_like_the_reference():
    rules = rules_from_config(BASELINE_RULES)
    cases = {
        ("blocks.0.attn.c_q.weight", (512, 512), torch.float32): "matrix",
        ("tok_emb.weight", (1024, 512), torch.float32): "matrix",
        ("blocks.0.attn_scale", (512,), torch.float32): "small_control",
        ("blocks.0.resid_mix", (2, 512), torch.float32): "small_control",
        ("skip_weights", (4, 512), torch.float32): "small_control",
        ("bigram.proj.weight", (512, 128), torch.float32): "small",
        ("some.conv", (300, 20, 20), torch.float32): "other",
        ("steps", (3,), torch.int64): "non_float",
    }
    for (name, shape, dt), want in cases.items():
        assert pick_rule(name, torch.zeros(shape, dtype=dt), rules).name == want, name


def test_int8_rows_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 3
    q, s = quantize_rows(w, 8, clip=1.0)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.abs().max() <= 127
    err = (dequantize_int(q, s) - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()


def test_scale_floor_matches_reference_and_can_be_disabled():
    w = torch.full((2, 8), 0.05)
    _, s = quantize_rows(w, 6, clip=1.0, floor=True)
    assert torch.allclose(s.float(), torch.full((2,), 1 / 31), rtol=1e-3)  # floored: 0.05/31 < 1/31
    _, s2 = quantize_rows(w, 6, clip=1.0, floor=False)
    assert torch.allclose(s2.float(), torch.full((2,), 0.05 / 31), rtol=1e-3)


def test_fake_quant_equals_export_dequantization():
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    q, s = quantize_rows(w, 6, clip=1.0)
    assert torch.equal(fake_quant_rows(w, 6), dequantize_int(q, s))


def test_gptq_lite_never_worse_than_any_single_clip():
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    w[0, 0] = 40.0  # an outlier makes clipping worthwhile
    q, s, chosen = clip_search_rows(w, 6, floor=False)
    best = ((dequantize_int(q, s) - w) ** 2).mean()
    for c in (0.999, 0.9995, 0.9999, 0.99999, 1.0):
        qc, sc = quantize_rows(w, 6, c, floor=False)
        assert best <= ((dequantize_int(qc, sc) - w) ** 2).mean() + 1e-12
    qr, sr, _ = clip_search_rows(w, 6, floor=False, per_row=True)
    assert ((dequantize_int(qr, sr) - w) ** 2).mean() <= best + 1e-12  # per-row choice is at least as good


def test_rule_validation():
    with pytest.raises(ValueError, match="store"):
        QuantRule(store="int4")
    with pytest.raises(ValueError, match="bits"):
        QuantRule(store="int", bits=12)
    with pytest.raises(ValueError, match="no quantization rule matches"):
        quantize_state({"x": torch.zeros(3)}, [QuantRule(store="fp16", ndim=2)])


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_per_row_int_n_with_fp16_row_scales(bits):
    torch.manual_seed(bits)
    w = torch.randn(48, 80) * torch.linspace(0.1, 3.0, 48)[:, None]
    rule = QuantRule(store="int", bits=bits, clip="max", scale_floor=False, name="m")
    e = quantize_state({"m.weight": w}, [rule])["m.weight"]
    qmax = 2 ** (bits - 1) - 1
    assert e.q.dtype == torch.int8 and e.scale.dtype == torch.float16 and e.scale.shape == (48,)
    assert e.q.abs().max() == qmax  # each row's max reaches the top code
    err = (dequantize_int(e.q, e.scale) - w).abs()
    assert (err <= e.scale.float()[:, None] / 2 + 1e-5).all()


def test_rtn_quantile_clip_clips_values_like_the_reference():
    """The baseline's int8 export: with a quantile clip, w is clipped to ±clip_r before rounding; this matters
    when the scale floor binds (clip_r < 1), where a bare clamp would keep outliers up to qmax steps."""
    w = torch.full((1, 1000), 0.01)
    w[0, 0] = 0.5  # an outlier beyond the 0.99 quantile
    q, s = quantize_rows(w, 8, clip=0.99, floor=True, clip_values=True)
    assert torch.allclose(s.float(), torch.tensor([1 / 127]), rtol=1e-3)
    assert q[0, 0] == 1  # clipped to the quantile (0.01) -> round(0.01 * 127) = 1, not round(0.5 * 127)
    q2, _ = quantize_rows(w, 8, clip=0.99, floor=True)
    assert q2[0, 0] == 64


def test_rule_options_are_validated():
    with pytest.raises(ValueError, match="method"):
        QuantRule(store="int", method="awq")
    with pytest.raises(ValueError, match="clip"):
        QuantRule(store="int", clip="searchrows")
    with pytest.raises(ValueError, match="clip"):
        QuantRule(store="int", clip=1.5)
    with pytest.raises(ValueError, match="clips"):
        QuantRule(store="int", clip="search", clips=[])
    assert QuantRule(store="int", clip="search", clips=[0.9, 1.0]).clip_levels == (0.9, 1.0)
    assert QuantRule(store="int", clip="max").clip_levels == (1.0,)


def test_sdclip_rule_options_are_validated():
    ok = dict(store="int", bits=6, clip="sdclip", sigmas=12.85, scale_floor=False)
    assert QuantRule(**ok).clip_levels == ()
    for bad in (None, 0, -1.0, float("nan"), float("inf"), "12", True):
        with pytest.raises(ValueError, match="needs sigmas"):
            QuantRule(**{**ok, "sigmas": bad})
    with pytest.raises(ValueError, match="sigmas applies only"):
        QuantRule(store="int", clip="max", sigmas=12.0)
    with pytest.raises(ValueError, match="sigmas applies only"):
        QuantRule(store="fp16", sigmas=12.0)
    with pytest.raises(ValueError, match="scale_floor: false"):
        QuantRule(**{**ok, "scale_floor": True})
    with pytest.raises(ValueError, match="per row"):
        QuantRule(**{**ok, "granularity": "tensor"})
    with pytest.raises(ValueError, match="divide_by"):
        QuantRule(**{**ok, "divide_by": "fp32"})
    with pytest.raises(ValueError, match="clips applies"):
        QuantRule(**{**ok, "clips": [0.99]})


def test_sdclip_round_to_nearest_scales_codes_and_fallback():
    """SDClip without a Hessian (PR #1394's scales, round-to-nearest): s_r = fp16(k·std(w_r)/qmax) with the
    unbiased std; the clamp clips an outlier to qmax; an all-zero row has scale 0 and codes 0; a GPTQ rule
    without a Hessian records `rtn_fallback`."""
    torch.manual_seed(3)
    w = torch.randn(6, 50)
    w[1, 4] = 30.0
    w[2] = 0.0
    rule = QuantRule(store="int", bits=7, clip="sdclip", sigmas=4.0, scale_floor=False, method="gptq", name="e")
    e = quantize_state({"tok_emb.weight": w}, [rule])["tok_emb.weight"]
    std = torch.tensor([statistics.stdev(r) for r in w.double().tolist()])  # unbiased, independently
    s = (4.0 * std / 63).clamp_min(1e-10).half()
    assert e.scale.dtype == torch.float16 and torch.equal(e.scale, s) and e.scale[2] == 0
    want = torch.clamp(torch.round(w / torch.where(s == 0, 1.0, s.float())[:, None]), -63, 63).to(torch.int8)
    want[2] = 0
    assert torch.equal(e.q, want) and e.q[1, 4] == 63 and (e.q[2] == 0).all()
    assert e.info == {"method": "rtn_fallback", "clip": "sdclip", "sigmas": 4.0, "rule": "e"}
    rtn = QuantRule(store="int", bits=7, clip="sdclip", sigmas=4.0, scale_floor=False, name="r")
    assert quantize_state({"m": w}, [rtn])["m"].info["method"] == "rtn"


def test_sdclip_rule_on_a_vector_fails_before_any_work(monkeypatch):
    rules = [QuantRule(store="int", bits=6, clip="sdclip", sigmas=12.0, scale_floor=False, name="sd")]
    calls = []
    monkeypatch.setattr(rules_module, "quantize_tensor_by_rule", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"'sd' \(clip sdclip\) matches b of shape \(8,\)"):
        quantize_state({"a": torch.randn(4, 8), "b": torch.randn(8)}, rules)
    assert calls == []
