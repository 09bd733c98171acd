"""Selective ±1 pruning to a size target (PR #609, as in PR #1019).

Candidates: every entry with |q| = 1 of the integer tensors of the chosen bit widths (int6 in the
reference), each with the error proxy (its row scale)²; sorted ascending (ties: tensor order, then
position, so the order is deterministic). `size(n)` = the real artifact size with the n cheapest
candidates zeroed, packed and compressed exactly as it will be written. If size(0) fits, nothing is
pruned; if even size(all) does not, all are zeroed and the result is reported over target; otherwise a
bracketing search (bisection sped up by interpolation, `_search`) finds the smallest n with
size(n) <= target: size(n-1) was measured over the target and size(n) within it. Like the reference's
binary search it assumes that zeroing more entries never makes the compressed artifact larger; the chosen
n is always one whose real size was measured to fit.

The target is in decimal bytes: the 16,000,000-byte limit (or `prune.total_bytes`) minus the code bytes.
PR #1019's target is `TARGET_MB × 1024 × 1024` (MiB), 16,672,358 bytes at 15.9, above the decimal cap,
so as shipped it could not enforce the cap (docs/techniques.md#selective-pruning).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pgolf.quant.rules import QuantEntry


@dataclass
class Candidates:
    names: list[str]  # the tensors that have candidates, in state order
    tensor: torch.Tensor  # [N] index into names
    flat: torch.Tensor  # [N] flat position in that tensor's q
    cost: torch.Tensor  # [N] (row scale)^2, ascending

    def __len__(self) -> int:
        return int(self.cost.numel())


def prune_candidates(entries: dict[str, QuantEntry], bits: list[int]) -> Candidates:
    """Every |q| = 1 entry of the per-row integer tensors with the given widths, cheapest first."""
    names, tid, flat, cost = [], [], [], []
    for name, e in entries.items():
        if e.kind != "int" or e.bits not in bits or e.q.ndim != 2 or e.scale.numel() != e.q.size(0):
            continue
        pos = torch.nonzero(e.q.reshape(-1).abs() == 1).flatten()
        if pos.numel() == 0:
            continue
        rows = pos // e.q.size(1)
        tid.append(torch.full_like(pos, len(names)))
        flat.append(pos)
        cost.append(e.scale.float()[rows].square())
        names.append(name)
    if not names:
        z = torch.zeros(0, dtype=torch.long)
        return Candidates(names=[], tensor=z, flat=z, cost=torch.zeros(0))
    cost_all = torch.cat(cost)
    order = torch.sort(cost_all, stable=True).indices
    return Candidates(names=names, tensor=torch.cat(tid)[order], flat=torch.cat(flat)[order], cost=cost_all[order])


def zero_cheapest(entries: dict[str, QuantEntry], cands: Candidates, n: int) -> dict[str, QuantEntry]:
    """A copy of `entries` with the n cheapest candidates set to 0 (untouched tensors are shared)."""
    out = dict(entries)
    if n <= 0:
        return out
    tid, flat = cands.tensor[:n], cands.flat[:n]
    for i, name in enumerate(cands.names):
        sel = flat[tid == i]
        if sel.numel() == 0:
            continue
        e = entries[name]
        q = e.q.clone()
        q.view(-1)[sel] = 0
        out[name] = replace(e, q=q)
    return out


def _search(size: Callable[[int], int], target: int, lo: int, s_lo: int, hi: int, s_hi: int) -> int:
    """Smallest n in (lo, hi] with size(n) <= target, given size(lo) > target >= size(hi).

    A bracketing search: each round interpolates where the size crosses the target (the size falls
    almost linearly with n) and probes just below and just above that estimate, so both ends of the
    bracket close in; a round that fails to halve the bracket is followed by a bisection probe, so it
    never needs more than about twice the probes of plain bisection, and usually far fewer (each probe
    compresses the whole artifact)."""
    while hi - lo > 1:
        width = hi - lo
        est = lo + (s_lo - target) / max(s_lo - s_hi, 1) * width
        w = max(1, width // 64)
        for p in sorted({min(max(round(est) - w, lo + 1), hi - 1), min(max(round(est) + w, lo + 1), hi - 1)}):
            if not lo < p < hi:
                continue
            s = size(p)
            if s <= target:
                hi, s_hi = p, s
                break  # the crossing is at or below p: the upper probe would tell nothing
            lo, s_lo = p, s
        if hi - lo > width // 2 and hi - lo > 1:
            mid = (lo + hi) // 2
            s = size(mid)
            if s <= target:
                hi, s_hi = mid, s
            else:
                lo, s_lo = mid, s
    return hi


def prune_to_target(
    entries: dict[str, QuantEntry],
    size_of: Callable[[dict[str, QuantEntry], dict], int],
    target_bytes: int,
    bits: list[int],
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, QuantEntry], dict]:
    """Zero the fewest cheapest ±1 entries so that `size_of(entries, info) <= target_bytes`.

    `size_of` returns the real artifact size of the given entries with `info` (this function's record of
    the pruning) in the metadata, so each probe measures exactly what would be written."""
    t0 = time.perf_counter()
    cands = prune_candidates(entries, bits)
    N = len(cands)
    probes: list[tuple[int, int]] = []

    def info_for(n: int) -> dict:
        return {"target_model_bytes": int(target_bytes), "candidates": N, "zeroed": int(n), "bits": list(bits)}

    def size(n: int) -> int:
        b = size_of(zero_cheapest(entries, cands, n), info_for(n))
        probes.append((n, b))
        if log is not None:
            log(f"prune: probe zeroed:{n}/{N} model_bytes:{b} target:{target_bytes}")
        return b

    s0 = size(0)
    if s0 <= target_bytes:
        n, fits = 0, True
    elif N == 0 or size(N) > target_bytes:
        n, fits = N, False
    else:
        n, fits = _search(size, target_bytes, 0, s0, N, probes[-1][1]), True
    final = dict(probes)[n]
    info = {
        **info_for(n),
        "model_bytes_before": s0,
        "model_bytes": final,
        "fits": fits,
        "probes": len(probes),
        "seconds": round(time.perf_counter() - t0, 3),
        "max_cost_zeroed": float(cands.cost[n - 1]) if n > 0 else None,
    }
    return zero_cheapest(entries, cands, n), info
