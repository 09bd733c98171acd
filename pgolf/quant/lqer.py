"""LQER: low-rank correction of the quantization error of the worst-quantized matrices (PR #1797, a port of
PR #1530's v2; used by PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611).

After quantization, for every matrix a `method: gptq` rule stored (with or without a Hessian): the error
`E = W − diag(s)·q` (fp32) and its Frobenius norm. The `top_k` matrices by ‖E‖_F (ties: state order) get
a rank-r correction from the SVD `E = U Σ Vᵀ`: `A = U[:, :r]·Σ[:r]` [rows, r], `B = Vᵀ[:r, :]` [r, cols],
stored quantized (pgolf/quant/numerics.py): asymmetric when r·cols is a multiple of `asym_group` (A as INT2
with one scale max|A|/1.5, codes [-2, 1]; B as INT4 in groups of `asym_group` consecutive values of B
flattened row-major, scale max|group|/7.5, codes [-8, 7]), else symmetric (both per row as INT`factor_bits`).
The entry then de-quantizes to `diag(s)·q + (q_A s_A)(q_B ⊙ s_B)` (pgolf/quant/rules.py `dequantize_entry`).

`apply_lqer` is the optional part `lqer` (pgolf/optional.py): the export runs it after quantization when
the export config's `lqer.enabled` is set.

The SVD's sign of each singular pair is the LAPACK routine's choice; the asymmetric INT2 range makes the
stored codes depend on it (the product A·B does not), so a CPU and a GPU export may store different codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch

from pgolf.optional import register
from pgolf.quant.numerics import LQERFactors, pack_lqer_asym, pack_lqer_sym
from pgolf.quant.rules import QuantEntry, dequantize_int
from pgolf.quant.settings import LQERSettings

# The `info["method"]` of the entries a `method: gptq` rule stored: full GPTQ, or without a Hessian
# GPTQ-lite (clip levels) or round-to-nearest (SDClip). PR #1611 takes every GPTQ'd tensor as a candidate.
LQER_METHODS = ("gptq", "gptq_lite_fallback", "rtn_fallback")


def is_candidate(e: QuantEntry) -> bool:
    """Whether LQER may correct this entry: an int matrix with a scale per row from a GPTQ rule."""
    return (
        e.kind == "int"
        and len(e.shape) == 2
        and e.scale is not None
        and e.scale.numel() == e.shape[0]
        and e.info.get("method") in LQER_METHODS
    )


def quant_error(e: QuantEntry, w: torch.Tensor) -> torch.Tensor:
    """E = W − diag(s)·q [rows, cols] fp32 (W the float weight the entry was quantized from)."""
    return w.detach().float().cpu() - dequantize_int(e.q, e.scale)


def lqer_factors(E: torch.Tensor, settings: LQERSettings) -> LQERFactors:
    """The quantized rank-r factors of E [rows, cols] (r = min(rank, rows, cols)): asymmetric packing when
    r·cols is a multiple of `asym_group` and `asym` is on, else the symmetric INT`factor_bits` fallback."""
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    r = min(settings.rank, S.numel())
    A = (U[:, :r] * S[:r]).contiguous()  # [rows, r]
    B = Vh[:r, :].contiguous()  # [r, cols]
    g = settings.asym_group
    if settings.asym and B.numel() % g == 0:
        qa, sa, qb, sb = pack_lqer_asym(A, B, g)
        return LQERFactors(mode="asym", qa=qa, sa=sa, qb=qb, sb=sb, group=g)
    qa, sa, qb, sb = pack_lqer_sym(A, B, settings.factor_bits)
    return LQERFactors(mode="sym", qa=qa, sa=sa, qb=qb, sb=sb, bits=settings.factor_bits)


@register("lqer")
def apply_lqer(
    entries: dict[str, QuantEntry],
    state: dict[str, torch.Tensor],
    settings: LQERSettings,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, QuantEntry], dict]:
    """LQER on quantized `entries` (from `quantize_state`) of the float `state` they were quantized from.

    Returns (a copy of `entries` in which the `top_k` candidates by ‖E‖_F carry `lqer` factors and
    `info["lqer"]` = {mode, rank, group | bits}; the other entries are the same objects), and a report:
    {candidates, seconds, tensors: [{name, mode, rank, error_fro, corrected_error_fro}]} (errors in the
    weight's units, ‖W − Ŵ‖_F before and after the correction, in the order chosen). The caller decides
    whether LQER runs (`settings.enabled`); `log` receives the report's `report_lines`. Raises ValueError,
    before any SVD, when a candidate's float tensor is missing from `state` or has another shape, or an
    entry already carries factors."""
    t0 = time.perf_counter()
    names = [n for n, e in entries.items() if is_candidate(e)]
    for n in names:
        e = entries[n]
        if e.lqer is not None:
            raise ValueError(f"LQER: {n} already carries LQER factors")
        if n not in state:
            raise ValueError(f"LQER: the float weights have no tensor {n} (quantized as {e.info.get('method')})")
        if tuple(state[n].shape) != tuple(e.shape):
            raise ValueError(f"LQER: {n} is {tuple(state[n].shape)} in the float weights but {e.shape} quantized")
    norms = {n: float(torch.linalg.matrix_norm(quant_error(entries[n], state[n]))) for n in names}
    chosen = sorted(names, key=lambda n: -norms[n])[: settings.top_k]  # stable: ties keep state order
    out = dict(entries)
    tensors = []
    for n in chosen:
        e = entries[n]
        E = quant_error(e, state[n])
        f = lqer_factors(E, settings)
        extra = {"group": f.group} if f.mode == "asym" else {"bits": f.bits}
        out[n] = replace(e, lqer=f, info={**e.info, "lqer": {"mode": f.mode, "rank": f.rank, **extra}})
        after = float(torch.linalg.matrix_norm(E - f.dense()))
        tensors.append({"name": n, "mode": f.mode, "rank": f.rank, "error_fro": norms[n], "corrected_error_fro": after})
    report = {"candidates": len(names), "tensors": tensors, "seconds": round(time.perf_counter() - t0, 3)}
    for line in report_lines(report) if log is not None else ():
        log(line)
    return out, report


def report_lines(report: dict) -> list[str]:
    """`lqer:` log lines of an `apply_lqer` report: one summary line, then one per corrected tensor."""
    lines = [f"lqer: tensors:{len(report['tensors'])} candidates:{report['candidates']} time:{report['seconds']:.1f}s"]
    for t in report["tensors"]:
        lines.append(
            f"lqer: {t['name']} mode:{t['mode']} rank:{t['rank']} "
            f"error_fro:{t['error_fro']:.6g} -> {t['corrected_error_fro']:.6g}"
        )
    return lines
