"""Row-wise symmetric integer quantization numerics shared by the model's fake quantization (QAT), the
round-to-nearest and GPTQ quantizers and the exporter, so that what training simulates is exactly what the
export stores; also SDClip's row scales (PR #1394) and the packing of LQER's low-rank factors (PR #1797).

Codes are `clamp(round(w/s), -qmax, qmax)` with qmax = 2^(bits-1) - 1. A row's scale is clip/qmax with clip
the row's max |w| (or a quantile of |w|), floored at 1/qmax like the baseline's int8 export and the records'
int6 export (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd, PR #549); the row scale is
stored as fp16, so the simulated value uses the fp16-rounded scale.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def round_codes_or_zero(x: torch.Tensor, scale: torch.Tensor, qmax: int, qmin: int | None = None) -> torch.Tensor:
    """`round_codes` with 0/0 := 0. An fp16 scale underflows to 0 for an all-zero (or near-zero) row when
    nothing floors it (the int8 gate's unfloored max/127, the LQER factors' scales): the references then
    divide 0 by 0 and store the int8 cast of NaN, which is 0 on x86; a nonzero value over a zero scale
    clamps to ±qmax, as theirs does. Every such code de-quantizes to 0. scale broadcasts against x."""
    return torch.nan_to_num(round_codes(x, scale, qmax, qmin), nan=0.0)


# The references' clamp before an fp16 scale is rounded: on SDClip's fp32 scale (PR #1394) and on the LQER
# factors' maxima (PR #1797).
CLAMP_MIN = 1e-10


# ---- SDClip (PR #1394; per-class sigmas PR #1586) ----------------------------------------------------


def sdclip_scale_rows(w: torch.Tensor, bits: int, sigmas: float) -> torch.Tensor:
    """SDClip row scales of w [rows, cols] (cols >= 2): fp16 [rows],
    `s_r = fp16(max(sigmas · std(w_r) / qmax, 1e-10))` with the unbiased row standard deviation in fp32, as
    PR #1394's `gptq_quantize_weight` computes it (kept by PR #1611). Codes `clamp(round(w/s), ±qmax)` then
    clip every weight beyond ±sigmas·σ_r (roughly) to ±qmax. Raises ValueError for a tensor that is not 2-D
    or has fewer than 2 columns (no unbiased standard deviation)."""
    if w.ndim != 2 or w.size(1) < 2:
        raise ValueError(f"SDClip needs a matrix with at least 2 columns, got shape {tuple(w.shape)}")
    std = w.detach().float().std(dim=1)
    return (sigmas * std / qmax_for(bits)).clamp_min(CLAMP_MIN).half()


# ---- LQER factors (PR #1797, a port of PR #1530's; used by PR #1611): packing, unpacking, the container ----
LQER_A_QMIN, LQER_A_QMAX, LQER_A_DIV = -2, 1, 1.5  # asymmetric INT2 of A: one scale max|A|/1.5
LQER_B_QMIN, LQER_B_QMAX, LQER_B_DIV = -8, 7, 7.5  # asymmetric INT4 of B: a scale max|group|/7.5 per group


def pack_lqer_asym(
    A: torch.Tensor, B: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PR #1797's asymmetric packing of the factors A [rows, r] and B [r, cols] (B.numel() % group == 0):
    A as INT2 with one fp16 scale `s_A = fp16(max(max|A|, 1e-10) / 1.5)`, `q_A = clamp(round(A/s_A), -2, 1)`;
    B flattened row-major into groups of `group` consecutive values, `s_g = fp16(max(max|group|, 1e-10) /
    7.5)`, `q_B = clamp(round(B/s_g), -8, 7)`. Returns (q_A int8 [rows, r], s_A fp16 [] (a 0-d scalar, as the
    record stores it), q_B int8 [r, cols], s_B fp16 [r·cols/group]). Raises ValueError when B's size is not a
    multiple of `group`."""
    if group < 1 or B.numel() % group:
        raise ValueError(f"asymmetric LQER needs B's {B.numel()} values in groups of {group}")
    A, B = A.float(), B.float()
    sa = (A.abs().amax().clamp_min(CLAMP_MIN) / LQER_A_DIV).half()
    qa = round_codes_or_zero(A, sa.float(), LQER_A_QMAX, LQER_A_QMIN)
    Bg = B.reshape(-1, group)
    sb = (Bg.abs().amax(dim=1).clamp_min(CLAMP_MIN) / LQER_B_DIV).half()
    qb = round_codes_or_zero(Bg, sb.float()[:, None], LQER_B_QMAX, LQER_B_QMIN).reshape(B.shape)
    return qa.to(torch.int8), sa, qb.to(torch.int8), sb


def pack_lqer_sym(
    A: torch.Tensor, B: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PR #1797's symmetric fallback: each factor per row as INT`bits`, `s = fp16(max(max|row|, 1e-10) /
    qmax)`, `q = clamp(round(x/s), ±qmax)`. Returns (q_A int8 [rows, r], s_A fp16 [rows], q_B int8 [r, cols],
    s_B fp16 [r])."""
    qmax = qmax_for(bits)
    out = []
    for x in (A.float(), B.float()):
        s = (x.abs().amax(dim=1).clamp_min(CLAMP_MIN) / qmax).half()
        out += [round_codes_or_zero(x, s.float()[:, None], qmax).to(torch.int8), s]
    return out[0], out[1], out[2], out[3]


def unpack_lqer(
    qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The de-quantized factors (A [rows, r], B [r, cols], fp32) of `pack_lqer_asym` (`group` > 0: one A
    scale, a B scale per `group` consecutive values) or `pack_lqer_sym` (`group` 0: a scale per row)."""
    if group > 0:
        A = qa.float() * sa.float().reshape(())
        B = (qb.float().reshape(-1, group) * sb.float()[:, None]).reshape(qb.shape)
    else:
        A = qa.float() * sa.float()[:, None]
        B = qb.float() * sb.float()[:, None]
    return A, B


LQER_MODES = ("asym", "sym")


@dataclass
class LQERFactors:
    """The quantized low-rank factors of one matrix's quantization error E ≈ A·B (LQER, PR #1797 as used by
    PR #1611; built by pgolf/quant/lqer.py), for a matrix [rows, cols] and rank r:

    - `mode` "asym": `qa` int8 [rows, r] in [-2, 1] with one scale `sa` fp16 [] (0-d; [1] in artifacts written
      before 2026-11-30, read as 0-d); `qb` int8 [r, cols] in
      [-8, 7] with a scale per `group` consecutive values of B flattened row-major, `sb` fp16 [r·cols/group];
    - `mode` "sym" (the fallback when r·cols is not a multiple of the group): `qa` and `qb` in ±(2^(bits-1)-1)
      with a scale per row, `sa` fp16 [rows], `sb` fp16 [r]; `group` 0.

    `dense()` = A·B [rows, cols] fp32 with A = q_A·s_A and B = q_B ⊙ s_B (`unpack_lqer`); `check` validates
    stored factors (an artifact reader's check)."""

    mode: str
    qa: torch.Tensor
    sa: torch.Tensor
    qb: torch.Tensor
    sb: torch.Tensor
    group: int = 0
    bits: int = 0

    @property
    def rank(self) -> int:
        return int(self.qa.size(1))

    def dense(self) -> torch.Tensor:
        A, B = unpack_lqer(self.qa, self.sa, self.qb, self.sb, self.group if self.mode == "asym" else 0)
        return A @ B

    def check(self, rows: int, cols: int, what: str = "lqer") -> None:
        """The factors fit a [rows, cols] matrix: mode, dtypes, shapes, group and code ranges as
        pgolf/quant/lqer.py makes them. Raises ValueError naming `what` and the field."""
        if self.mode not in LQER_MODES:
            raise ValueError(f"{what}.mode {self.mode!r} not in {LQER_MODES}")
        qa, sa, qb, sb = self.qa, self.sa, self.qb, self.sb
        if qa.dtype != torch.int8 or qa.ndim != 2 or qa.size(0) != rows or not 1 <= qa.size(1) <= min(rows, cols):
            want = f"int8 [rows={rows}, r <= {min(rows, cols)}]"
            raise ValueError(f"{what}.qa must be {want}, got {qa.dtype} {list(qa.shape)}")
        r = qa.size(1)
        if qb.dtype != torch.int8 or tuple(qb.shape) != (r, cols):
            raise ValueError(f"{what}.qb must be int8 [{r}, {cols}], got {qb.dtype} {list(qb.shape)}")
        if self.mode == "asym":
            if self.group < 1 or (r * cols) % self.group:
                raise ValueError(f"{what}.group {self.group} must divide r·cols = {r * cols}")
            want_sa, want_sb = (), ((r * cols) // self.group,)
            ranges = ((LQER_A_QMIN, LQER_A_QMAX), (LQER_B_QMIN, LQER_B_QMAX))
        else:
            if not 2 <= self.bits <= 8:
                raise ValueError(f"{what}.bits {self.bits} must be in 2..8 for the symmetric factors")
            qmax = 2 ** (self.bits - 1) - 1
            want_sa, want_sb, ranges = (rows,), (r,), ((-qmax, qmax), (-qmax, qmax))
        for fld, t, want in (("sa", sa, want_sa), ("sb", sb, want_sb)):
            if t.dtype != torch.float16 or tuple(t.shape) != want:
                raise ValueError(f"{what}.{fld} must be float16 {list(want)}, got {t.dtype} {list(t.shape)}")
        for fld, t, (lo, hi) in (("qa", qa, ranges[0]), ("qb", qb, ranges[1])):
            if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
                raise ValueError(f"{what}.{fld}: codes must lie in [{lo}, {hi}]")
