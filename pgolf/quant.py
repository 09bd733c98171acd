"""Post-training quantization of a state dict by config-driven rules (SPEC §8).

A scheme is an ordered list of rules; the first rule whose conditions hold decides how a tensor is
stored. Conditions: `pattern` (regex searched in the name), `float` (is floating point), `control`
(name matches a control pattern), `max_numel` / `min_numel`, `ndim`. Storage: `raw` (as is), `fp16`,
`fp32` (restored to the original dtype on load), or `int` with `bits` (2..8), `granularity` (`row` or
`tensor`) and `clip` (a per-row quantile such as 0.9999984, `max`, or `search` for GPTQ-lite).

Integer storage is symmetric: `q = clamp(round(w/s), -qmax, qmax)` with `qmax = 2^(bits-1)-1`, an fp16
scale per row (or one fp32 scale per tensor), floored at `1/qmax` like the reference unless
`scale_floor: false` (SPEC §8.1, §11.9). Values live in int8 containers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from pgolf.model import quant_scale_rows
from pgolf.optim import is_control

STORES = ("raw", "fp16", "fp32", "int")


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
    name: str = ""

    def __post_init__(self):
        if self.store not in STORES:
            raise ValueError(f"quant rule {self.name or self.pattern!r}: store {self.store!r} not in {STORES}")
        if self.store == "int":
            if not 2 <= int(self.bits) <= 8:
                raise ValueError(f"quant rule {self.name!r}: bits {self.bits} must be in 2..8")
            if self.granularity not in ("row", "tensor"):
                raise ValueError(f"quant rule {self.name!r}: granularity must be row or tensor")
            if self.method not in ("rtn",):
                raise ValueError(f"quant rule {self.name!r}: method must be rtn")

    def matches(self, name: str, t: torch.Tensor) -> bool:
        if self.pattern is not None and not re.search(self.pattern, name):
            return False
        if self.float is not None and self.float != t.is_floating_point():
            return False
        if self.control is not None and self.control != is_control(name):
            return False
        if self.max_numel is not None and t.numel() > self.max_numel:
            return False
        if self.min_numel is not None and t.numel() < self.min_numel:
            return False
        return self.ndim is None or t.ndim == self.ndim


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
GPTQ_LITE_CLIPS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # PR #414 (SPEC §8.3)


def quantize_rows(
    w: torch.Tensor, bits: int, clip: float = 1.0, floor: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest per-row: (q int8 [rows, cols], scale fp16 [rows])."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    s = quant_scale_rows(w, bits, clip, floor).half()
    q = torch.clamp(torch.round(w / s.float()), -qmax, qmax).to(torch.int8)
    return q, s.view(-1)


def quantize_tensor(
    w: torch.Tensor, bits: int, clip: float = 1.0, floor: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale for the whole tensor (any shape)."""
    qmax = 2 ** (bits - 1) - 1
    a = w.detach().float().abs().flatten()
    c = a.max() if clip >= 1.0 else torch.quantile(a[: 1 << 24], clip)
    s = (c / qmax).clamp_min(1.0 / qmax if floor else 1e-12)
    q = torch.clamp(torch.round(w.float() / s), -qmax, qmax).to(torch.int8)
    return q, s.reshape(1).float()


def dequantize_int(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() == 1:
        return q.float() * scale.float()
    return q.float() * scale.float().view(-1, *([1] * (q.ndim - 1)))


def clip_search_rows(w: torch.Tensor, bits: int, clips=GPTQ_LITE_CLIPS, floor: bool = True, per_row: bool = False):
    """GPTQ-lite (SPEC §8.3): try each clip level; keep the one with the lowest whole-matrix MSE (or, with
    `per_row`, the best level for each row separately). Returns (q, scale, chosen clip(s))."""
    w = w.float()
    best = None
    for c in clips:
        q, s = quantize_rows(w, bits, c, floor)
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
    """One stored tensor: `kind` raw/fp16/fp32 -> `data`; int -> `q` and `scale`."""

    kind: str
    shape: tuple[int, ...]
    orig_dtype: str
    data: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bits: int = 0
    info: dict = field(default_factory=dict)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def quantize_tensor_by_rule(name: str, t: torch.Tensor, rule: QuantRule) -> QuantEntry:
    t = t.detach().cpu()
    shape, orig = tuple(t.shape), _dtype_name(t.dtype)
    if rule.store == "raw":
        return QuantEntry("raw", shape, orig, data=t.contiguous())
    if rule.store in ("fp16", "fp32"):
        return QuantEntry(rule.store, shape, orig, data=t.to(torch.float16 if rule.store == "fp16" else torch.float32))
    bits, floor = int(rule.bits), bool(rule.scale_floor)
    info: dict = {"method": rule.method, "clip": rule.clip}
    if rule.granularity == "tensor" or t.ndim != 2:
        clip = 1.0 if rule.clip in ("max", "search") else float(rule.clip)
        q, s = quantize_tensor(t, bits, clip, floor)
    elif rule.clip in ("search", "search_rows"):
        q, s, chosen = clip_search_rows(t, bits, floor=floor, per_row=rule.clip == "search_rows")
        info["clip"] = chosen if rule.clip == "search" else "per_row"
    else:
        q, s = quantize_rows(t, bits, 1.0 if rule.clip == "max" else float(rule.clip), floor)
    return QuantEntry("int", shape, orig, q=q.contiguous(), scale=s.contiguous(), bits=bits, info=info)


def quantize_state(state: dict[str, torch.Tensor], rules: list[QuantRule]) -> dict[str, QuantEntry]:
    return {name: quantize_tensor_by_rule(name, t, pick_rule(name, t, rules)) for name, t in state.items()}


def dequantize_entry(e: QuantEntry) -> torch.Tensor:
    dt = getattr(torch, e.orig_dtype)
    if e.kind == "raw":
        return e.data
    if e.kind in ("fp16", "fp32"):
        return e.data.to(dt)
    return dequantize_int(e.q, e.scale).to(dt).view(e.shape)


def dequantize_state(entries: dict[str, QuantEntry]) -> dict[str, torch.Tensor]:
    return {name: dequantize_entry(e) for name, e in entries.items()}
