"""Scoring the validation stream: standard (non-overlapping) and sliding-window evaluation (SPEC §4.1-4.2).

Every mode returns an `EvalResult` with float64 sums reduced across ranks (loss, tokens, bytes), BPB as a
ratio of sums, the wall time, and whether the mode is compliant with the challenge's rules (SPEC §1:
each prediction may depend only on the prefix; adaptation only on tokens already scored). Windows are
split contiguously across ranks and scored in fixed-shape batches (the last batch is padded with empty
windows), so a compiled model sees one shape.

A window is `(start, length, score_from)`: inputs `val[start : start+length]`, targets shifted by one,
scored positions `[score_from, length)`. Target index t predicts `val[t+1]` from `val[:t+1]`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from pgolf.data import rank_slice
from pgolf.tokenizer import ByteLUTs, bpb

Window = tuple[int, int, int]
CAUSAL_REASON = "each target is scored once from its prefix only; no weights or state adapt to validation tokens"


@dataclass
class EvalResult:
    mode: str
    val_loss: float
    val_bpb: float
    tokens: int
    bytes: float
    seconds: float
    compliant: bool
    reason: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, key: str | None = None) -> str:
        ms = 1000 * self.seconds
        return f"{key or self.mode} val_loss:{self.val_loss:.8f} val_bpb:{self.val_bpb:.8f} eval_time:{ms:.0f}ms"


@dataclass
class TargetLog:
    """Per-target audit trail: target index in the validation stream, NLL (nats), bytes."""

    index: list[np.ndarray] = field(default_factory=list)
    nll: list[np.ndarray] = field(default_factory=list)
    nbytes: list[np.ndarray] = field(default_factory=list)

    def add(self, index: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor) -> None:
        self.index.append(index.cpu().numpy().astype(np.int64))
        self.nll.append(nll.float().cpu().numpy())
        self.nbytes.append(nbytes.cpu().numpy().astype(np.float32))

    def arrays(self) -> dict[str, np.ndarray]:
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        idx, nll, nb = cat(self.index, np.int64), cat(self.nll, np.float32), cat(self.nbytes, np.float32)
        order = np.argsort(idx, kind="stable")
        return {"index": idx[order], "nll": nll[order], "bytes": nb[order]}


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def gather_log(log: TargetLog | None) -> dict[str, np.ndarray] | None:
    """All ranks' audit arrays on every rank, in stream order."""
    if log is None:
        return None
    arrays = log.arrays()
    rank, world = dist_info()
    if world == 1:
        return arrays
    parts: list = [None] * world
    dist.all_gather_object(parts, arrays)
    idx = np.concatenate([p["index"] for p in parts])
    order = np.argsort(idx, kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in arrays}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_batch(tokens: torch.Tensor, windows: list[Window], seq_len: int, batch_windows: int):
    """x, y [batch_windows, S] (zero-padded) and the scored mask; missing windows are all-False."""
    x = torch.zeros(batch_windows, seq_len, dtype=torch.long)
    y = torch.zeros_like(x)
    mask = torch.zeros(batch_windows, seq_len, dtype=torch.bool)
    start = torch.zeros(batch_windows, dtype=torch.long)
    for j, (s, n, lo) in enumerate(windows):
        seg = tokens[s : s + n + 1]
        x[j, :n], y[j, :n], mask[j, lo:n], start[j] = seg[:-1], seg[1:], True, s
    return x, y, mask, start


@torch.inference_mode()
def score_windows(
    model,
    tokens: torch.Tensor,
    windows: list[Window],
    *,
    seq_len: int,
    batch_windows: int,
    luts: ByteLUTs,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    log: TargetLog | None = None,
) -> torch.Tensor:
    """float64 [loss_sum, tokens, bytes] over this rank's windows (not reduced)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    pos = torch.arange(seq_len, device=device)
    for i in range(0, len(windows), batch_windows):
        x, y, mask, start = (
            t.to(device, non_blocking=True)
            for t in make_batch(tokens, windows[i : i + batch_windows], seq_len, batch_windows)
        )
        with autocast_ctx(device, autocast_dtype):
            nll = model(x, y, reduction="none")
        nb = luts.target_bytes(x, y)
        sums += torch.stack((nll.double()[mask].sum(), mask.sum().double(), nb[mask].sum()))
        if log is not None:
            log.add((start[:, None] + pos[None, :])[mask], nll[mask], nb[mask])
    return sums


def finish(mode: str, sums: torch.Tensor, seconds: float, compliant: bool, reason: str, settings: dict) -> EvalResult:
    loss_sum, n, nbytes = (float(v) for v in reduce_sums(sums).cpu())
    val_loss, val_bpb = bpb(loss_sum, n, nbytes)
    return EvalResult(mode, val_loss, val_bpb, int(n), nbytes, seconds, compliant, reason, settings)


def standard_windows(total_targets: int, seq_len: int) -> list[Window]:
    return [(k * seq_len, seq_len, 0) for k in range(total_targets // seq_len)]


def sliding_windows(total_targets: int, seq_len: int, stride: int, reference_tail: bool = False) -> list[Window]:
    """Sliding windows at starts 0, stride, 2*stride, ... (SPEC §4.2).

    Window 0 scores all of its positions; later windows score their last `stride` positions, so every
    target has at least S - stride tokens of context. Intended behaviour (default): windows stop once the
    stream's last target is scored, and the final window scores only targets no window scored before, so
    every target is scored exactly once. `reference_tail=True` reproduces the reference: a window at every
    start < total, the shorter tail windows each re-scoring the final targets (SPEC §11.8).
    """
    if stride <= 0 or stride > seq_len:
        raise ValueError(f"stride {stride} must be in 1..{seq_len}")
    out: list[Window] = []
    scored_to = 0
    ws = 0
    while ws < total_targets:
        n = min(seq_len, total_targets - ws)
        lo = 0 if ws == 0 else max(n - stride, 0)
        if reference_tail:
            out.append((ws, n, lo))
        else:
            lo = max(lo, scored_to - ws)
            if lo < n:
                out.append((ws, n, lo))
                scored_to = ws + n
            if scored_to >= total_targets:
                break
        ws += stride
    return out


def run_windows(
    mode: str,
    model,
    tokens: torch.Tensor,
    windows: list[Window],
    *,
    seq_len: int,
    batch_windows: int,
    luts: ByteLUTs,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    compliant: bool,
    reason: str,
    settings: dict,
    log: TargetLog | None = None,
) -> EvalResult:
    rank, world = dist_info()
    a, b = rank_slice(len(windows), rank, world)
    sync(device)
    t0 = time.perf_counter()
    sums = score_windows(
        model,
        tokens,
        windows[a:b],
        seq_len=seq_len,
        batch_windows=batch_windows,
        luts=luts,
        device=device,
        autocast_dtype=autocast_dtype,
        log=log,
    )
    res = finish(mode, sums, 0.0, compliant, reason, settings)
    sync(device)
    res.seconds = time.perf_counter() - t0
    return res


def eval_standard(model, tokens, *, seq_len, batch_windows, luts, device, autocast_dtype=None, log=None) -> EvalResult:
    total = tokens.numel() - 1
    windows = standard_windows(total, seq_len)
    settings = {"seq_len": seq_len, "batch_windows": batch_windows}
    return run_windows(
        "standard",
        model,
        tokens,
        windows,
        seq_len=seq_len,
        batch_windows=batch_windows,
        luts=luts,
        device=device,
        autocast_dtype=autocast_dtype,
        compliant=True,
        reason=CAUSAL_REASON,
        settings=settings,
        log=log,
    )


def eval_sliding(
    model, tokens, *, seq_len, stride, batch_windows, luts, device, autocast_dtype=None, reference_tail=False, log=None
) -> EvalResult:
    total = tokens.numel() - 1
    windows = sliding_windows(total, seq_len, stride, reference_tail)
    settings = {
        "seq_len": seq_len,
        "stride": stride,
        "batch_windows": batch_windows,
        "reference_tail": reference_tail,
        "windows": len(windows),
    }
    reason = CAUSAL_REASON
    if reference_tail:
        reason += "; reference tail: the final targets are scored repeatedly (token count includes duplicates)"
    return run_windows(
        "sliding",
        model,
        tokens,
        windows,
        seq_len=seq_len,
        batch_windows=batch_windows,
        luts=luts,
        device=device,
        autocast_dtype=autocast_dtype,
        compliant=True,
        reason=reason,
        settings=settings,
        log=log,
    )


def run_mode(
    name: str,
    settings: dict,
    model,
    tokens,
    *,
    luts,
    device,
    autocast_dtype=None,
    batch_windows=32,
    seq_len=None,
    log: TargetLog | None = None,
) -> EvalResult:
    """Dispatch one eval mode by its config (`mode:` names the kind; the other keys are its settings)."""
    s = dict(settings)
    kind = s.pop("mode", name)
    S = int(s.pop("seq_len", None) or seq_len)
    bw = int(s.pop("batch_windows", None) or batch_windows)
    common = dict(seq_len=S, batch_windows=bw, luts=luts, device=device, autocast_dtype=autocast_dtype, log=log)
    if kind == "standard":
        res = eval_standard(model, tokens, **common)
    elif kind == "sliding":
        res = eval_sliding(
            model,
            tokens,
            stride=int(s.pop("stride", 64)),
            reference_tail=bool(s.pop("reference_tail", False)),
            **common,
        )
    else:
        raise ValueError(f"unknown eval mode {kind!r} (standard | sliding)")
    if s:
        raise ValueError(f"eval mode {name}: unknown settings {sorted(s)}")
    res.mode = name
    return res
