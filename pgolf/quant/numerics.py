"""Row-wise symmetric integer quantization numerics shared by the model's fake quantization (QAT), the
round-to-nearest and GPTQ quantizers and the exporter, so that what training simulates is exactly what the
export stores.

Codes are `clamp(round(w/s), -qmax, qmax)` with qmax = 2^(bits-1) - 1. A row's scale is clip/qmax with clip
the row's max |w| (or a quantile of |w|), floored at 1/qmax like the baseline's int8 export and the records'
int6 export (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd, PR #549); the row scale is
stored as fp16, so the simulated value uses the fp16-rounded scale.
"""

from __future__ import annotations

import torch

# GPTQ-lite's clip levels (PR #414): quantiles of |w| per row, 1.0 = the row's max.
GPTQ_LITE_CLIPS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


def qmax_for(bits: int) -> int:
    """The largest code of symmetric intN: 2^(bits-1) - 1 (31 for int6, 127 for int8)."""
    return 2 ** (bits - 1) - 1


def scale_from_clip(clip: torch.Tensor, bits: int, floor: bool = True) -> torch.Tensor:
    """clip/qmax (any shape), floored at 1/qmax like the reference (`floor`), else at 1e-12."""
    qmax = qmax_for(bits)
    return (clip / qmax).clamp_min(1.0 / qmax if floor else 1e-12)


def quant_scale_rows(w: torch.Tensor, bits: int, clip_quantile: float = 1.0, floor: bool = True) -> torch.Tensor:
    """Per-row fp32 scale [rows, 1] of symmetric intN quantization of w [rows, cols]: clip/(2^(bits-1)-1)
    with clip the row's max |w| (`clip_quantile` 1.0) or that quantile of |w|, floored like the reference."""
    a = w.detach().float().abs()
    clip = (
        a.amax(dim=1, keepdim=True) if clip_quantile >= 1.0 else torch.quantile(a, clip_quantile, dim=1, keepdim=True)
    )
    return scale_from_clip(clip, bits, floor)


def fp16_scale_rows(w: torch.Tensor, bits: int, clip_quantile: float = 1.0, floor: bool = True) -> torch.Tensor:
    """The row scale [rows, 1] as the artifact stores it: `quant_scale_rows` rounded to fp16, as fp32."""
    return quant_scale_rows(w, bits, clip_quantile, floor).half().float()


def code_bounds(bits: int, full_range: bool = False) -> tuple[int, int]:
    """The (lowest, highest) code of intN: symmetric (-qmax, qmax), or with `full_range` the whole
    two's-complement range (-qmax-1, qmax), e.g. int5 [-16, 15] as in the PR #1090 non-record's mixed
    export (records/track_non_record_16mb/2026-03-24_11L_XSA_SwiGLU_LoRATTT_1xH100)."""
    qmax = qmax_for(bits)
    return (-qmax - 1 if full_range else -qmax), qmax


def round_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None) -> torch.Tensor:
    """Integer codes `clamp(round(x/scale), qmin, qmax)` in x's float dtype (scale broadcasts against x);
    `qmin` defaults to -qmax (symmetric)."""
    return torch.clamp(torch.round(x / scale), -qmax if qmin is None else qmin, qmax)


def fake_quant_rows(
    w: torch.Tensor, bits: int, clip_quantile: float = 1.0, floor: bool = True, fp16_scale: bool = True
) -> torch.Tensor:
    """Quantize-dequantize a matrix [rows, cols] row-wise: `clamp(round(w/s), ±qmax) · s` with the row scale
    s of `quant_scale_rows` (clip/qmax, floored at 1/qmax with `floor`). `fp16_scale` (default) rounds s to
    fp16 exactly as the int export stores it; False keeps the fp32 scale, the V5 record's training-time STE
    (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd; it also has no floor). Returns w's
    shape and dtype."""
    if fp16_scale:
        s = fp16_scale_rows(w, bits, clip_quantile, floor)
    else:
        s = quant_scale_rows(w, bits, clip_quantile, floor)
    return (round_codes(w.float(), s, qmax_for(bits)) * s).to(w.dtype)
