"""SDClip (PR #1394; the per-class sigmas of PR #1586 as PR #1611 runs them): the quantization rules' `clip:
sdclip`, a row scale `s_r = fp16(max(sigmas·std(w_r)/qmax, 1e-10))` with no clip search, by round-to-nearest
or inside full GPTQ (pgolf/quant/gptq.py).

An optional part of the runtime (pgolf/optional.py, `sdclip`): pgolf/quant/rules.py reaches this module
through `optional.get("sdclip")` to check a `clip: sdclip` rule and to quantize by it, so a packed
train_gpt.py whose export rules do not use SDClip leaves it out (and refuses such a rule, naming the part).
"""

from __future__ import annotations

import math
import sys

import torch

from pgolf import optional
from pgolf.quant.numerics import code_bounds, round_codes_or_zero, sdclip_scale_rows
from pgolf.quant.settings import GPTQSettings


def check_rule(rule, who: str) -> None:
    """A `store: int`, `clip: sdclip` rule (a pgolf/quant/rules.py `QuantRule`) needs `sigmas` (a positive
    number) and a per-row fp16 scale with its own floor. Raises ValueError naming `who`."""
    k = rule.sigmas
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"{who}: clip sdclip needs sigmas, a positive number (e.g. 12.85), got {k!r}")
    if rule.granularity != "row":
        raise ValueError(f"{who}: clip sdclip is per row (granularity: row)")
    if rule.scale_floor:
        raise ValueError(
            f"{who}: clip sdclip has its own scale floor (1e-10, PR #1394), not 1/qmax: set scale_floor: false"
        )
    if rule.divide_by != "fp16":
        raise ValueError(f"{who}: clip sdclip computes codes with the stored fp16 scale (divide_by: fp16)")
    if rule.clips is not None:
        raise ValueError(f"{who}: clips applies to clip search/search_rows, not sdclip")


def quantize_rows_sdclip(
    w: torch.Tensor, bits: int, sigmas: float, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per row of w [rows, cols >= 2] with SDClip scales (PR #1394): (q int8 [rows, cols],
    scale fp16 [rows]); `s_r = fp16(max(sigmas·std(w_r)/qmax, 1e-10))` (`sdclip_scale_rows`),
    `q = clamp(round(w/s_r), ±qmax)` ([-qmax-1, qmax] with `full_range`): weights beyond the clamp are
    clipped by it, with no clip search. Where a row's fp16 scale underflows to 0 its nonzero weights clamp
    to ±qmax and its zeros store 0, as the reference's arithmetic does (`round_codes_or_zero`; all de-quantize
    to 0). Raises ValueError for a tensor that is not 2-D or has fewer than 2 columns."""
    s = sdclip_scale_rows(w, bits, sigmas)
    qmin, qmax = code_bounds(bits, full_range)
    return round_codes_or_zero(w.float(), s.float()[:, None], qmax, qmin).to(torch.int8), s


def quantize(
    t: torch.Tensor, rule, hessian: torch.Tensor | None, gptq: GPTQSettings | None, info: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDClip codes and scales of a matrix t [rows, cols] by `rule` (a checked `clip: sdclip` QuantRule): full
    GPTQ with SDClip scales when the rule says `method: gptq` and there is a Hessian [cols, cols], else
    round-to-nearest with SDClip scales (`info["method"]` `rtn`, or `rtn_fallback` for a GPTQ rule without a
    Hessian). Fills `info` (clip, sigmas)."""
    bits, full, k = int(rule.bits), rule.code_range == "full", float(rule.sigmas)
    info.update(clip="sdclip", sigmas=k)
    if rule.method == "gptq" and hessian is not None:
        g = gptq or GPTQSettings()
        q, s, ginfo = optional.get("gptq")(
            t, hessian, bits, (), block_size=g.block_size, damp=g.damp, act_order=g.act_order,
            full_range=full, sigmas=k,
        )  # fmt: skip
        info.update(ginfo)
        return q, s
    info["method"] = "rtn" if rule.method == "rtn" else "rtn_fallback"
    return quantize_rows_sdclip(t, bits, k, full)


optional.register("sdclip")(sys.modules[__name__])
