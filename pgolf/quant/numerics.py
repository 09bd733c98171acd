"""Row-wise symmetric integer quantization numerics shared by the model's fake quantization (QAT) and the
exporter, so that what training simulates is exactly what the export stores.

A row's scale is clip/qmax with qmax = 2^(bits-1) - 1 and clip the row's max |w| (or a quantile of |w|),
floored at 1/qmax like the baseline's int8 export and the records' int6 export
(records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd, PR #549); the scale is stored as fp16, so
the simulated value uses the fp16-rounded scale.
"""

from __future__ import annotations

import torch


def quant_scale_rows(w: torch.Tensor, bits: int, clip_quantile: float = 1.0, floor: bool = True) -> torch.Tensor:
    """Per-row scale [rows, 1] of symmetric intN quantization: clip/(2^(bits-1)-1), floored like the reference."""
    qmax = 2 ** (bits - 1) - 1
    a = w.detach().float().abs()
    clip = (
        a.amax(dim=1, keepdim=True) if clip_quantile >= 1.0 else torch.quantile(a, clip_quantile, dim=1, keepdim=True)
    )
    s = clip / qmax
    return s.clamp_min(1.0 / qmax) if floor else s.clamp_min(1e-12)


def fake_quant_rows(w: torch.Tensor, bits: int, clip_quantile: float = 1.0, floor: bool = True) -> torch.Tensor:
    """Quantize-dequantize a matrix row-wise exactly as the int export does (fp16 scale, range ±qmax)."""
    qmax = 2 ** (bits - 1) - 1
    s = quant_scale_rows(w, bits, clip_quantile, floor).half().float()
    return (torch.clamp(torch.round(w.float() / s), -qmax, qmax) * s).to(w.dtype)
