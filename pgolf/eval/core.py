"""Scoring the validation stream: the shared machinery of every eval mode, standard and sliding-window
evaluation (SPEC §4.1-4.2), and the `run_mode` dispatch to score-first TTT, LoRA TTT (`pgolf/ttt.py`) and
SLOT (`pgolf/slot.py`).

Every mode returns an `EvalResult` with float64 sums reduced across ranks (loss, tokens, bytes), BPB as a
ratio of sums, the wall time, and whether the mode is compliant with the challenge's rules (SPEC §1:
each prediction may depend only on the prefix; adaptation only on tokens already scored). Windows are
split contiguously across ranks and scored in fixed-shape batches (the last batch is padded with empty
windows), so a compiled model sees one shape.

A window is `(start, length, score_from)`: inputs `val[start : start+length]`, targets shifted by one,
scored positions `[score_from, length)`. Target index t predicts `val[t+1]` from `val[:t+1]`. Scoring
runs the backbone once per batch (`forward_hidden`) and applies the output head only at the positions a
batch scores (the last `stride` of each window, or all of them when a batch holds window 0).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pgolf.data.stream import rank_slice
from pgolf.data.tokenizer import ByteLUTs, bpb

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
    windows: int = 0  # forwards' worth of windows scored (sliding windows, TTT windows, LoRA doc chunks)
    windows_per_second: float = 0.0

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
        self.nll.append(nll.detach().float().cpu().numpy())
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


def unwrap(model):
    """(the GPT, whether it came wrapped by torch.compile): modes need `forward_hidden`, not `forward`."""
    inner = getattr(model, "_orig_mod", None)
    return (inner, True) if inner is not None else (model, False)


def hidden_fn(model, compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.forward_hidden`, compiled for fixed shapes when asked (SPEC §4.2: dynamic=False, fullgraph)."""
    if compile:
        return torch.compile(model.forward_hidden, dynamic=False, fullgraph=True)
    return model.forward_hidden


def take_settings(cls, s: dict, **defaults):
    """The settings dataclass `cls` from the keys of a mode's config `s` it knows (popped from `s`, so that
    what is left over is an unknown key), `defaults` filling the rest."""
    kw = {}
    for f in fields(cls):
        if f.name in s:
            kw[f.name] = s.pop(f.name)
        elif f.name in defaults:
            kw[f.name] = defaults[f.name]
    return cls(**kw)


# ---- batches of windows ----------------------------------------------------------------------------------
@dataclass
class Batch:
    """Fixed-shape batch of windows on the device. Rows past `real` are empty windows (length 0).

    x, y [B,S] inputs/targets (zero past each window's length); start, n, lo [B] window start, length and
    first scored position; `span` = the most targets one window of the batch scores (n - lo)."""

    x: torch.Tensor
    y: torch.Tensor
    start: torch.Tensor
    n: torch.Tensor
    lo: torch.Tensor
    real: int
    span: int

    def select(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last k positions of every window (ending at its length) [B,k], and which of them are scored."""
        pos = self.n[:, None] - k + torch.arange(k, device=self.n.device)
        mask = (pos >= self.lo[:, None]) & (pos >= 0)
        return pos.clamp_min(0), mask

    def all_positions(self) -> torch.Tensor:
        return torch.arange(self.x.size(1), device=self.x.device).expand_as(self.x)


def window_table(windows: list[Window]) -> torch.Tensor:
    return torch.tensor(windows, dtype=torch.long).view(-1, 3)


def make_batch(tokens: torch.Tensor, table: torch.Tensor, seq_len: int, batch_windows: int) -> Batch:
    """Gather a batch of windows (`table` [k,3] on CPU) from `tokens` (on the target device)."""
    k = table.size(0)
    device = tokens.device
    meta = torch.zeros(batch_windows, 3, dtype=torch.long)
    meta[:k] = table
    start, n, lo = meta.to(device, non_blocking=True).unbind(1)
    pos = torch.arange(seq_len, device=device)
    idx = (start[:, None] + pos).clamp(max=tokens.numel() - 2)
    valid = pos[None, :] < n[:, None]
    x = torch.where(valid, tokens[idx], 0)
    y = torch.where(valid, tokens[idx + 1], 0)
    span = int((table[:, 1] - table[:, 2]).max()) if k else 0
    return Batch(x, y, start, n, lo, k, span)


def batches(tokens: torch.Tensor, windows: list[Window], seq_len: int, batch_windows: int) -> Iterator[Batch]:
    table = window_table(windows)
    for i in range(0, table.size(0), batch_windows):
        yield make_batch(tokens, table[i : i + batch_windows], seq_len, batch_windows)


def gather_pos(t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """t [B,S,...] at positions pos [B,k] -> [B,k,...]."""
    rows = torch.arange(t.size(0), device=t.device)[:, None]
    return t[rows, pos]


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target fp32 cross-entropy (natural log) [B,k] of logits [B,k,V]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def record(
    sums: torch.Tensor,
    luts: ByteLUTs,
    b: Batch,
    pos: torch.Tensor,
    mask: torch.Tensor,
    nll: torch.Tensor,
    log: TargetLog | None,
) -> None:
    """Add the scored targets (mask) to float64 [loss_sum, tokens, bytes] and to the audit log."""
    nb = luts.target_bytes(gather_pos(b.x, pos), gather_pos(b.y, pos))
    sums += torch.stack((nll.detach().double()[mask].sum(), mask.sum().double(), nb[mask].sum()))
    if log is not None:
        log.add((b.start[:, None] + pos)[mask], nll[mask], nb[mask])


def score_positions(b: Batch, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions to run the head on: the last `tail` of every window, or all when a window scores more."""
    return b.select(tail if b.span <= tail else b.x.size(1))


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
    tail: int | None = None,
    hidden: Callable | None = None,
) -> torch.Tensor:
    """float64 [loss_sum, tokens, bytes] over these windows (not reduced). `tokens` may be on any device."""
    model, _ = unwrap(model)
    hidden = hidden or model.forward_hidden
    tokens = tokens.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for b in batches(tokens, windows, seq_len, batch_windows):
        pos, mask = score_positions(b, tail or seq_len)
        with autocast_ctx(device, autocast_dtype):
            h = gather_pos(hidden(b.x), pos)
            logits = model.logits_from_hidden(h)
        record(sums, luts, b, pos, mask, nll_from_logits(logits, gather_pos(b.y, pos)), log)
    return sums


def finish(
    mode: str,
    sums: torch.Tensor,
    seconds: float,
    compliant: bool,
    reason: str,
    settings: dict,
    windows: int = 0,
) -> EvalResult:
    loss_sum, n, nbytes = (float(v) for v in reduce_sums(sums).cpu())
    val_loss, val_bpb = bpb(loss_sum, n, nbytes)
    return EvalResult(mode, val_loss, val_bpb, int(n), nbytes, seconds, compliant, reason, settings, windows)


def timed(device: torch.device, fn: Callable[[], EvalResult]) -> EvalResult:
    """Run a mode; its wall time includes the cross-rank reduction. Sets windows per second."""
    sync(device)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    res.seconds = time.perf_counter() - t0
    res.windows_per_second = res.windows / res.seconds if res.seconds > 0 else 0.0
    return res


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
    tail: int | None = None,
    compile: bool = False,
) -> EvalResult:
    rank, world = dist_info()
    a, b = rank_slice(len(windows), rank, world)
    model, wrapped = unwrap(model)
    hidden = hidden_fn(model, compile or wrapped)

    def run() -> EvalResult:
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
            tail=tail,
            hidden=hidden,
        )
        return finish(mode, sums, 0.0, compliant, reason, settings, len(windows))

    return timed(device, run)


def eval_standard(
    model, tokens, *, seq_len, batch_windows, luts, device, autocast_dtype=None, log=None, compile=False
) -> EvalResult:
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
        compile=compile,
    )


def eval_sliding(
    model,
    tokens,
    *,
    seq_len,
    stride,
    batch_windows,
    luts,
    device,
    autocast_dtype=None,
    reference_tail=False,
    log=None,
    compile=False,
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
        tail=stride,
        compile=compile,
    )


MODES = ("standard", "sliding", "ttt", "lora_ttt", "slot")


def parse_mode(name: str, settings: dict, *, seq_len: int, batch_windows: int = 32):
    """(kind, settings object) of a mode's config; every problem (unknown kind or key, bad value) raises here,
    before anything runs. `mode:` names the kind (default: the config's name); the other keys are settings."""
    # Imported here: ttt and slot build on this module's batching and scoring.
    from pgolf.eval.slot import SlotSettings
    from pgolf.eval.ttt import LoraSettings, TTTSettings

    s = dict(settings)
    kind = s.pop("mode", name)
    S = int(s.pop("seq_len", None) or seq_len)
    bw = int(s.pop("batch_windows", None) or batch_windows)
    if kind == "standard":
        parsed = {"seq_len": S, "batch_windows": bw}
    elif kind == "sliding":
        parsed = {"seq_len": S, "batch_windows": bw, "stride": int(s.pop("stride", 64))}
        parsed["reference_tail"] = bool(s.pop("reference_tail", False))
        if not 0 < parsed["stride"] <= S:
            raise ValueError(f"eval mode {name}: stride {parsed['stride']} must be in 1..{S}")
    elif kind == "ttt":
        parsed = TTTSettings.take(s, S, bw)
    elif kind == "lora_ttt":
        parsed = LoraSettings.take(s, S)
    elif kind == "slot":
        parsed = SlotSettings.take(s, S, bw)
    else:
        raise ValueError(f"eval mode {name}: unknown mode {kind!r} (one of {' | '.join(MODES)})")
    if s:
        raise ValueError(f"eval mode {name}: unknown settings {sorted(s)}")
    return kind, parsed


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
    compile: bool = False,
) -> EvalResult:
    """Run one eval mode given its config (see `parse_mode`).

    `model` is a GPT (or a torch.compile wrapper of one, which implies `compile`); modes that adapt weights
    work on a copy, so the model is unchanged afterwards."""
    from pgolf.eval.slot import eval_slot
    from pgolf.eval.ttt import eval_lora_ttt, eval_ttt

    kind, st = parse_mode(name, settings, seq_len=seq_len, batch_windows=batch_windows)
    common = dict(luts=luts, device=device, autocast_dtype=autocast_dtype, log=log, compile=compile)
    if kind == "standard":
        res = eval_standard(model, tokens, **st, **common)
    elif kind == "sliding":
        res = eval_sliding(model, tokens, **st, **common)
    elif kind == "ttt":
        res = eval_ttt(model, tokens, st, **common)
    elif kind == "lora_ttt":
        res = eval_lora_ttt(model, tokens, st, **common)
    else:
        res = eval_slot(model, tokens, st, **common)
    res.mode = name
    return res
