"""Post-training quantization of a state dict by config-driven rules (docs/techniques.md#export).

A scheme is an ordered list of rules; the first rule whose conditions hold decides how a tensor is
stored. Conditions: `pattern` (regex searched in the name), `float` (is floating point), `control`
(name contains a control pattern; the set is the rule's `control_patterns`: `pgolf` (default, the
optimizer's CONTROL_PATTERNS), `baseline` (the baseline train_gpt.py's CONTROL_TENSOR_NAME_PATTERNS), or a
list), `max_numel` / `min_numel`, `ndim`. Storage: `raw` (as is), `fp16`, `fp32` (restored to the original
dtype on load), or `int` with `bits` (2..8), `granularity` (`row` or `tensor`), `clip` (a per-row quantile
such as 0.9999984, `max`, `search` = GPTQ-lite's one clip level per matrix, `search_rows` = the best
level for each row; the levels are `clips`; or `sdclip` = SDClip, PR #1394: a row scale
`fp16(sigmas·std(w_r)/qmax)` with no search, `sigmas` per rule as PR #1586's per-class sigmas, in
pgolf/quant/sdclip.py, an optional part) and `method`
(`rtn` round-to-nearest, or `gptq` = full-Hessian GPTQ with the same clip choice, arXiv:2210.17323,
`pgolf/quant/gptq.py`).

Integer codes are `q = clamp(round(w/s), -qmax, qmax)` with `qmax = 2^(bits-1)-1` (`code_range: full`:
down to -qmax-1), an fp16 scale per row (or one fp32 scale per tensor), floored at `1/qmax` as in the
baseline's int8 and the records' int6 exports unless `scale_floor: false`. With a fixed quantile clip the
weights are clipped to the clip value before rounding, as the baseline's int8 export does. Row codes are
computed with the fp16-rounded scale that dequantization uses (`divide_by: fp16`), or with the unrounded
fp32 scale as the baseline's int8 export does (`divide_by: fp32`). Values live in int8 containers.

An int entry may carry an LQER correction (`QuantEntry.lqer`, pgolf/quant/numerics.py `LQERFactors`: the
quantized low-rank factors of its quantization error, PR #1797 as used by PR #1611; made by
pgolf/quant/lqer.py): it de-quantizes to `diag(s)·q + A·B`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from pgolf import optional
from pgolf.model.roles import CONTROL_PATTERNS
from pgolf.quant import sdclip as _sdclip_part  # noqa: F401  (registers the optional part `sdclip`: pgolf/optional.py)
from pgolf.quant.numerics import (
    GPTQ_LITE_CLIPS,
    LQERFactors,
    code_bounds,
    quant_scale_rows,
    round_codes,
    round_codes_or_zero,
    scale_from_clip,
)
from pgolf.quant.settings import GPTQSettings

STORES = ("raw", "fp16", "fp32", "int")
METHODS = ("rtn", "gptq")
CLIP_MODES = ("max", "search", "search_rows", "sdclip")
DIVIDE_BY = ("fp16", "fp32")
CODE_RANGES = ("symmetric", "full")
# The baseline's CONTROL_TENSOR_NAME_PATTERNS (openai/parameter-golf train_gpt.py, also the V5 record's
# and the PR #1090 non-record's): smear.gate and ve_layer_scales are not in it, so its int8 export stores
# them fp16 where pgolf's set keeps them fp32.
BASELINE_CONTROL_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)
CONTROL_SETS = {"pgolf": CONTROL_PATTERNS, "baseline": BASELINE_CONTROL_PATTERNS}


@dataclass
class QuantRule:
    store: str
    pattern: str | None = None
    float: bool | None = None
    control: bool | None = None
    max_numel: int | None = None
    min_numel: int | None = None
    ndim: int | None = None
    bits: int = 8
    granularity: str = "row"
    clip: float | str = 0.9999984
    scale_floor: bool = True
    method: str = "rtn"
    clips: list[float] | None = None  # clip levels of `search` / `search_rows` (default GPTQ_LITE_CLIPS)
    divide_by: str = "fp16"  # row codes from the stored fp16 scale, or (fp32) from the unrounded scale
    code_range: str = "symmetric"  # symmetric ±qmax, or full [-qmax-1, qmax]
    control_patterns: str | list[str] | None = None  # the `control` condition's set: pgolf, baseline or a list
    sigmas: float | None = None  # SDClip's k (`clip: sdclip`): the row scale is fp16(k·std(w_r)/qmax)
    name: str = ""

    def __post_init__(self):
        who = f"quant rule {self.name or self.pattern!r}"
        if self.store not in STORES:
            raise ValueError(f"{who}: store {self.store!r} not in {STORES}")
        if self.store == "int":
            if not 2 <= int(self.bits) <= 8:
                raise ValueError(f"{who}: bits {self.bits} must be in 2..8")
            if self.granularity not in ("row", "tensor"):
                raise ValueError(f"{who}: granularity must be row or tensor")
            if self.method not in METHODS:
                raise ValueError(f"{who}: method {self.method!r} not in {METHODS}")
            if isinstance(self.clip, str):
                if self.clip not in CLIP_MODES:
                    raise ValueError(f"{who}: clip {self.clip!r} must be a quantile in (0, 1] or one of {CLIP_MODES}")
            elif not 0.0 < float(self.clip) <= 1.0:
                raise ValueError(f"{who}: clip {self.clip} must be a quantile in (0, 1] or one of {CLIP_MODES}")
            if self.clips is not None and (not self.clips or not all(0.0 < float(c) <= 1.0 for c in self.clips)):
                raise ValueError(f"{who}: clips {self.clips} must be a non-empty list of quantiles in (0, 1]")
            if self.divide_by not in DIVIDE_BY:
                raise ValueError(f"{who}: divide_by {self.divide_by!r} not in {DIVIDE_BY}")
            if self.divide_by == "fp32" and self.method == "gptq":
                raise ValueError(f"{who}: divide_by fp32 applies to round-to-nearest rules; GPTQ uses the fp16 scale")
            if self.code_range not in CODE_RANGES:
                raise ValueError(f"{who}: code_range {self.code_range!r} not in {CODE_RANGES}")
        self._check_sdclip(who)
        self._control_set = self._resolve_control_patterns(who)

    def _check_sdclip(self, who: str) -> None:
        """`sigmas` means nothing without `clip: sdclip`; a `clip: sdclip` rule is checked by the optional
        part `sdclip` (pgolf/quant/sdclip.py `check_rule`): ValueError naming the rule, also when the part is
        not in this program."""
        if self.store == "int" and self.clip == "sdclip":
            _sdclip(who).check_rule(self, who)
        elif self.sigmas is not None:
            raise ValueError(f"{who}: sigmas applies only to store: int with clip: sdclip")

    def _resolve_control_patterns(self, who: str) -> tuple[str, ...]:
        cp = self.control_patterns
        if cp is None:
            return CONTROL_PATTERNS
        if self.control is None:
            raise ValueError(f"{who}: control_patterns applies only with a `control` condition")
        if isinstance(cp, str):
            if cp not in CONTROL_SETS:
                raise ValueError(f"{who}: control_patterns {cp!r} is not a set ({sorted(CONTROL_SETS)}) or a list")
            return CONTROL_SETS[cp]
        pats = tuple(cp)
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise ValueError(f"{who}: control_patterns {cp!r} must be a set name or a non-empty list of names")
        return pats

    def is_control(self, name: str) -> bool:
        """True when `name` contains one of this rule's control patterns (substring match, as the
        reference)."""
        return any(pat in name for pat in self._control_set)

    @property
    def clip_levels(self) -> tuple[float, ...]:
        """The candidate clip levels this rule tries (one level unless clip is search/search_rows; none for
        sdclip, whose scale is not a clip level)."""
        if self.clip == "sdclip":
            return ()
        if self.clip in ("search", "search_rows"):
            return tuple(float(c) for c in (self.clips or GPTQ_LITE_CLIPS))
        return (1.0 if self.clip == "max" else float(self.clip),)

    def matches(self, name: str, t: torch.Tensor) -> bool:
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.float is not None and self.float != t.is_floating_point():
            return False
        if self.control is not None and self.control != self.is_control(name):
            return False
        if self.max_numel is not None and t.numel() > self.max_numel:
            return False
        if self.min_numel is not None and t.numel() < self.min_numel:
            return False
        return self.ndim is None or t.ndim == self.ndim


def _sdclip(who: str):
    """pgolf/quant/sdclip.py, the optional part `sdclip` (left out of a packed train_gpt.py whose export rules do
    not use it). Raises ValueError naming `who` when it is not loaded."""
    try:
        return optional.get("sdclip")
    except LookupError as e:
        raise ValueError(f"{who}: clip sdclip: {e}") from None


def rules_from_config(rules: list[dict]) -> list[QuantRule]:
    out = [QuantRule(**dict(r)) for r in rules]
    if not out:
        raise ValueError("a quantization scheme needs at least one rule")
    return out


def pick_rule(name: str, t: torch.Tensor, rules: list[QuantRule]) -> QuantRule:
    for r in rules:
        if r.matches(name, t):
            return r
    raise ValueError(f"no quantization rule matches tensor {name} {tuple(t.shape)} {t.dtype}; add a catch-all rule")


# ---- integer quantizers ------------------------------------------------------------------------------


def quantize_rows(
    w: torch.Tensor,
    bits: int,
    clip: float = 1.0,
    floor: bool = True,
    clip_values: bool = False,
    divide_by: str = "fp16",
    full_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per row of w [rows, cols]: (q int8 [rows, cols], scale fp16 [rows]).

    The row scale is clip/qmax (clip = the row's `clip` quantile of |w|, 1.0 = max), floored at 1/qmax with
    `floor`. With `clip_values` the weights are first clipped to ±(the row's clip), as the baseline's int8
    export does; this only differs from the plain clamp when the scale floor binds. `divide_by`
    "fp16" computes the codes with the fp16-rounded scale that is stored and dequantized with; "fp32" with
    the unrounded scale, as the baseline's `quantize_float_tensor` (openai/parameter-golf train_gpt.py)
    does before storing it as fp16. Codes in ±qmax, or [-qmax-1, qmax] with `full_range`."""
    w = w.float()
    s32 = quant_scale_rows(w, bits, clip, floor)  # [rows, 1]
    s16 = s32.half().float()
    if clip_values and clip < 1.0:
        c = torch.quantile(w.abs(), clip, dim=1, keepdim=True)
        w = torch.maximum(torch.minimum(w, c), -c)
    qmin, qmax = code_bounds(bits, full_range)
    # 0/0 := 0 where an unfloored fp16 scale underflows (an all-zero row, e.g. a zero-init gate)
    q = round_codes_or_zero(w, s32 if divide_by == "fp32" else s16, qmax, qmin).to(torch.int8)
    return q, s16.half().view(-1)


def quantize_tensor(
    w: torch.Tensor, bits: int, clip: float = 1.0, floor: bool = True, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale for the whole tensor (any shape): (q int8 [w's shape], scale fp32 [1]).

    clip c = the `clip` quantile of |w| (1.0 = max; quantile over the first 2^24 elements); scale c/qmax,
    floored at 1/qmax with `floor`; w clipped to ±c before rounding. Without the floor this is the
    reference's per-tensor path exactly (`quantize_float_tensor` of the baseline, V5 and records: no floor,
    scale 1.0 when c = 0). Codes in ±qmax, or [-qmax-1, qmax] with `full_range`."""
    w = w.detach().float()
    a = w.abs().flatten()
    c = a.max() if clip >= 1.0 else torch.quantile(a[: 1 << 24], clip)
    s = scale_from_clip(c, bits, floor)
    if not floor and c == 0:
        s = torch.ones_like(s)
    if clip < 1.0:
        w = torch.maximum(torch.minimum(w, c), -c)
    qmin, qmax = code_bounds(bits, full_range)
    q = round_codes(w, s, qmax, qmin).to(torch.int8)
    return q, s.reshape(1).float()


def dequantize_int(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() == 1:
        return q.float() * scale.float()
    return q.float() * scale.float().view(-1, *([1] * (q.ndim - 1)))


def clip_search_rows(
    w: torch.Tensor,
    bits: int,
    clips=GPTQ_LITE_CLIPS,
    floor: bool = True,
    per_row: bool = False,
    divide_by: str = "fp16",
    full_range: bool = False,
):
    """GPTQ-lite (PR #414): try each clip level; keep the one with the lowest whole-matrix MSE (or, with
    `per_row`, the best level for each row separately). Returns (q, scale, chosen clip(s)). Like the
    reference, a candidate's codes are `clamp(round(w/s))` without clipping w first."""
    w = w.float()
    best = None
    for c in clips:
        q, s = quantize_rows(w, bits, float(c), floor, divide_by=divide_by, full_range=full_range)
        err = (dequantize_int(q, s) - w).square()
        if per_row:
            e = err.mean(dim=1)
            if best is None:
                best = [q.clone(), s.clone(), e, torch.full_like(e, c)]
            else:
                better = e < best[2]
                best[0][better], best[1][better], best[2][better], best[3][better] = q[better], s[better], e[better], c
        else:
            e = err.mean().item()
            if best is None or e < best[2]:
                best = [q, s, e, c]
    return best[0], best[1], (best[3].tolist() if per_row else best[3])


# ---- state-dict quantization ----------------------------------------------------------------------
@dataclass
class QuantEntry:
    """One stored tensor: `kind` raw/fp16/fp32 -> `data`; int -> `q` and `scale`, and optionally `lqer`
    (an int matrix's low-rank error correction, added when de-quantized)."""

    kind: str
    shape: tuple[int, ...]
    orig_dtype: str
    data: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bits: int = 0
    info: dict = field(default_factory=dict)
    lqer: LQERFactors | None = None


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def quantize_tensor_by_rule(
    name: str, t: torch.Tensor, rule: QuantRule, hessian: torch.Tensor | None = None, gptq: GPTQSettings | None = None
) -> QuantEntry:
    """One tensor stored by `rule`; a `method: gptq` rule uses `hessian` [cols, cols] when given."""
    t = t.detach().cpu()
    shape, orig = tuple(t.shape), _dtype_name(t.dtype)
    if rule.store == "raw":
        return QuantEntry(kind="raw", shape=shape, orig_dtype=orig, data=t.contiguous())
    if rule.store in ("fp16", "fp32"):
        data = t.to(torch.float16 if rule.store == "fp16" else torch.float32)
        return QuantEntry(kind=rule.store, shape=shape, orig_dtype=orig, data=data)
    bits, floor = int(rule.bits), bool(rule.scale_floor)
    full, div = rule.code_range == "full", rule.divide_by
    info: dict = {"method": "rtn", "clip": rule.clip, "rule": rule.name}
    per_row = rule.clip == "search_rows"
    if rule.clip == "sdclip":
        check_rule_fits(name, t, rule)
        q, s = _sdclip(f"quant rule {rule.name or rule.pattern!r}").quantize(t, rule, hessian, gptq, info)
    elif rule.granularity == "tensor" or t.ndim != 2:
        clip = 1.0 if isinstance(rule.clip, str) else float(rule.clip)
        q, s = quantize_tensor(t, bits, clip, floor, full_range=full)
    elif rule.method == "gptq" and hessian is not None:
        g = gptq or GPTQSettings()
        q, s, ginfo = optional.get("gptq")(
            t,
            hessian,
            bits,
            rule.clip_levels,
            block_size=g.block_size,
            damp=g.damp,
            act_order=g.act_order,
            floor=floor,
            per_row=per_row,
            full_range=full,
        )
        info.update(ginfo)
    elif rule.clip in ("search", "search_rows") or rule.method == "gptq":
        # GPTQ without a Hessian (a tensor no hook saw) falls back to GPTQ-lite, as the reference does.
        q, s, chosen = clip_search_rows(
            t, bits, rule.clip_levels, floor=floor, per_row=per_row, divide_by=div, full_range=full
        )
        info["method"] = "gptq_lite" if rule.method == "rtn" else "gptq_lite_fallback"
        info["clip"] = "per_row" if per_row else chosen
    else:
        q, s = quantize_rows(t, bits, rule.clip_levels[0], floor, clip_values=True, divide_by=div, full_range=full)
    return QuantEntry(
        kind="int", shape=shape, orig_dtype=orig, q=q.contiguous(), scale=s.contiguous(), bits=bits, info=info
    )


def check_rule_fits(name: str, t: torch.Tensor, rule: QuantRule) -> None:
    """Raise ValueError (naming the tensor and the rule) when `rule` cannot store `t`: SDClip needs a
    matrix with at least 2 columns (an unbiased row standard deviation)."""
    if rule.store == "int" and rule.clip == "sdclip" and (t.ndim != 2 or t.size(1) < 2):
        raise ValueError(
            f"quant rule {rule.name or rule.pattern!r} (clip sdclip) matches {name} of shape {tuple(t.shape)}: "
            "SDClip needs a matrix with at least 2 columns; add a rule before it for such tensors"
        )


def quantize_state(
    state: dict[str, torch.Tensor],
    rules: list[QuantRule],
    hessians: dict[str, torch.Tensor] | None = None,
    gptq: GPTQSettings | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, QuantEntry]:
    """Quantize every tensor by the first rule that matches it; `hessians` (by weight name) feed the
    `method: gptq` rules. `timings`, if given, accumulates seconds per method (rtn, gptq, gptq_lite...).
    Every tensor is routed first, so a tensor no rule matches or its rule cannot store (ValueError) fails
    before any quantization work."""
    hessians = hessians or {}
    routed = {name: pick_rule(name, t, rules) for name, t in state.items()}
    for name, rule in routed.items():
        check_rule_fits(name, state[name], rule)
    out = {}
    for name, t in state.items():
        t0 = time.perf_counter()
        e = quantize_tensor_by_rule(name, t, routed[name], hessians.get(name), gptq)
        out[name] = e
        if timings is not None:
            key = e.info.get("method", e.kind) if e.kind == "int" else "passthrough"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
    return out


def uses_gptq(rules: list[QuantRule]) -> bool:
    return any(r.store == "int" and r.method == "gptq" for r in rules)


def config_uses_gptq(config: dict) -> bool:
    """Whether the export rules of a plain run config (`config["export"]["rules"]`) use full GPTQ: the rule of
    the optional parts `gptq` and `gptq_calibration` (pgolf/config/runtime.py's PART_RULES)."""
    return uses_gptq(rules_from_config(config["export"]["rules"]))


def dequantize_entry(e: QuantEntry) -> torch.Tensor:
    """The tensor an entry stores, in its original dtype and shape: raw data, fp16/fp32 data cast back, or
    `q·s` (per row or per tensor) plus the LQER correction `A·B` when the entry has one (in fp32, before
    the cast, as PR #1611's `dequantize_mixed`)."""
    dt = getattr(torch, e.orig_dtype)
    if e.kind == "raw":
        return e.data
    if e.kind in ("fp16", "fp32"):
        return e.data.to(dt)
    w = dequantize_int(e.q, e.scale)
    if e.lqer is not None:
        w = w + e.lqer.dense()
    return w.to(dt).view(e.shape)


def dequantize_state(entries: dict[str, QuantEntry]) -> dict[str, torch.Tensor]:
    return {name: dequantize_entry(e) for name, e in entries.items()}
