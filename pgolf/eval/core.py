"""The shared machinery of every eval mode: results, the per-target audit log, the context every mode is
handed, fixed-shape batches of windows, and scoring.

Windows (`(start, length, score_from[, first_from])`, pgolf/eval/windows.py) are split contiguously across
ranks and scored in fixed-shape batches (the last batch is padded with empty windows), so a compiled model
sees one shape. Scoring runs the backbone once per batch (`forward_hidden`) and applies the output head
only at the positions a batch scores (the last `stride` of each window, or all of them when a batch holds
window 0).

Sums are float64 `[loss_sum, tokens, bytes]`, reduced across ranks; BPB is a ratio of sums
(pgolf/data/tokenizer.py). A mode whose metric is not each-target-once (the records' windows re-score the
final targets, the 1.1556 record's skip the first ones, PR #1090's LoRA TTT skips each document's last
target) also returns the sums of pgolf's each-target-once figure, taken from the same forwards. The modes
themselves live one family per module (standard, sliding, ttt, lora_ttt, slot), registered by name in
pgolf/eval/registry.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pgolf.data.stream import rank_slice
from pgolf.data.tokenizer import BOS_ID, ByteLUTs
from pgolf.eval.windows import Window
from pgolf.model.varlen import document_cu_seqlens

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
    targets: int = 0  # targets of the validation stream (tokens - 1)
    distinct: int = 0  # distinct targets the metric scored (`tokens` counts a target scored twice twice)
    scoring: str = ""  # what the metric counts: "each target once", or which targets it skips / re-scores
    once: dict | None = None  # pgolf's each-target-once figure from the same pass (val_loss, val_bpb, tokens,
    # bytes), when the mode's metric is the record's and not each-target-once

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self, key: str | None = None) -> str:
        ms = 1000 * self.seconds
        return f"{key or self.mode} val_loss:{self.val_loss:.8f} val_bpb:{self.val_bpb:.8f} eval_time:{ms:.0f}ms"


def mark_non_finite(results: Iterable[dict]) -> list[str]:
    """Every mode result of `results` (`EvalResult.to_dict()`s) whose val_loss or val_bpb is NaN or infinite
    (NaN/inf weights, an overflow) marked `compliant: false`, the reason in front of its own; returns the
    reasons, one a mode."""
    reasons = []
    for r in results:
        if not (math.isfinite(r["val_loss"]) and math.isfinite(r["val_bpb"])):
            why = f"score: {r['mode']}: val_loss {r['val_loss']} val_bpb {r['val_bpb']} is not finite"
            r["compliant"], r["reason"] = False, f"{why}; {r['reason']}"
            reasons.append(why)
    return reasons


def json_safe(obj):
    """`obj` (dicts, lists, scalars) with every NaN or infinite float as None: JSON has no NaN, and strict
    parsers refuse Python's bare `NaN` (write it with `json.dumps(..., allow_nan=False)`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


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


@dataclass(frozen=True)
class Scored:
    """What a mode's run function returns: this rank's float64 [loss_sum, tokens, bytes] (not reduced), the
    number of windows scored by all ranks, and figures added to the result's settings. A mode whose metric
    re-scores or skips targets also returns `once`, this rank's sums of pgolf's each-target-once figure
    (not reduced). `rescores`: the metric may score a target more than once, and the targets it scores are
    exactly those `once` counts (the records' windows: `once` holds each target's first scoring); else
    every scoring of the metric is of a distinct target."""

    sums: torch.Tensor
    windows: int
    info: dict = field(default_factory=dict)
    once: torch.Tensor | None = None
    rescores: bool = False


# ---- processes, devices, the model -----------------------------------------------------------------------
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
    """`model.forward_hidden`, compiled for fixed shapes when asked (dynamic=False, fullgraph, as the records
    compile their eval forward)."""
    if compile:
        return torch.compile(model.forward_hidden, dynamic=False, fullgraph=True)
    return model.forward_hidden


# ---- batches of windows ----------------------------------------------------------------------------------
@dataclass
class Batch:
    """Fixed-shape batch of windows on the device. Rows past `real` are empty windows (length 0).

    x, y [B,S] inputs/targets (zero past each window's length); start, n [B] window start and length; rec,
    first [B] the window's `score_from` and `first_from` (pgolf/eval/windows.py); lo = min(rec, first), the
    first position the batch scores at all; `span` = the most positions one window of the batch scores
    (n - lo)."""

    x: torch.Tensor
    y: torch.Tensor
    start: torch.Tensor
    n: torch.Tensor
    lo: torch.Tensor
    real: int
    span: int
    rec: torch.Tensor
    first: torch.Tensor

    def select(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last k positions of every window (ending at its length) [B,k], and which of them are scored."""
        pos = self.n[:, None] - k + torch.arange(k, device=self.n.device)
        mask = (pos >= self.lo[:, None]) & (pos >= 0)
        return pos.clamp_min(0), mask

    def all_positions(self) -> torch.Tensor:
        return torch.arange(self.x.size(1), device=self.x.device).expand_as(self.x)


def window_table(windows: list[Window]) -> torch.Tensor:
    """[k,4] long: start, length, score_from, first_from (= score_from for 3-tuples)."""
    return torch.tensor([(*w, w[2]) if len(w) == 3 else w for w in windows], dtype=torch.long).view(-1, 4)


def make_batch(tokens: torch.Tensor, table: torch.Tensor, seq_len: int, batch_windows: int) -> Batch:
    """Gather a batch of windows (`table` [k,3] or [k,4] on CPU, see `window_table`) from `tokens` (on the
    target device)."""
    k = table.size(0)
    if table.size(1) == 3:
        table = torch.cat([table, table[:, 2:]], 1)
    device = tokens.device
    meta = torch.zeros(batch_windows, 4, dtype=torch.long)
    meta[:k] = table
    start, n, rec, first = meta.to(device, non_blocking=True).unbind(1)
    lo = torch.minimum(rec, first)
    pos = torch.arange(seq_len, device=device)
    idx = (start[:, None] + pos).clamp(max=tokens.numel() - 2)
    valid = pos[None, :] < n[:, None]
    x = torch.where(valid, tokens[idx], 0)
    y = torch.where(valid, tokens[idx + 1], 0)
    span = int((table[:, 1] - table[:, 2:].min(1).values).max()) if k else 0
    return Batch(x, y, start, n, lo, k, span, rec, first)


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


def score_positions(b: Batch, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions to run the head on: the last `tail` of every window, or all when a window scores more."""
    return b.select(tail if b.span <= tail else b.x.size(1))


# ---- the context every mode is handed --------------------------------------------------------------------
@dataclass(frozen=True)
class EvalContext:
    """Everything an eval mode is handed besides its own settings, the model and the validation tokens.

    luts: the tokenizer's byte tables (on `device`); autocast_dtype: None or fp32 = full precision, else
    the autocast dtype of the forward (bf16 on CUDA); compile: torch.compile the backbone forward with fixed
    shapes (also implied by a model that comes wrapped by torch.compile); log: where per-target NLL and
    bytes go (None = not kept); seq_len, batch_windows: the values of a mode's `seq_len` and
    `batch_windows` settings when its config does not set them; val_bytes: None (bytes from `luts`), or a
    CaseOps dataset's byte sidecar [>= N+1] (integer, on `device`) aligned with the validation tokens the
    modes are handed: val_bytes[i] = the original UTF-8 bytes of token i (pgolf/data/stream.py
    `load_val_data`), which every scored target is charged instead of the tables' bytes (the final #1
    record's `eval_val`, PR #1611: BPB = Σ nll / (ln 2 · Σ val_bytes[target])). ValueError for a sidecar
    that is not 1-D integer. doc_max_seg_len: None (plain causal windows), or document-bounded attention in
    the modes that score windows (standard, sliding, ttt): `attention_kwargs`."""

    luts: ByteLUTs
    device: torch.device
    seq_len: int
    batch_windows: int = 32
    autocast_dtype: torch.dtype | None = None
    compile: bool = False
    log: TargetLog | None = None
    val_bytes: torch.Tensor | None = None
    doc_max_seg_len: int | None = None

    def __post_init__(self):
        vb = self.val_bytes
        if vb is not None and (vb.dim() != 1 or vb.is_floating_point() or vb.is_complex() or vb.dtype == torch.bool):
            raise ValueError(f"val_bytes must be a 1-D integer tensor, got {vb.dtype} of shape {tuple(vb.shape)}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise ValueError unless the sidecar (if any) covers every token of `tokens` (1-D, the stream the
        modes score): a sidecar shorter than the stream cannot be the one aligned with it."""
        if self.val_bytes is not None and self.val_bytes.numel() < tokens.numel():
            raise ValueError(
                f"val_bytes holds {self.val_bytes.numel()} entries for {tokens.numel()} validation tokens: the byte "
                "sidecar is not aligned with these tokens"
            )

    def target_bytes(self, b: Batch, pos: torch.Tensor) -> torch.Tensor:
        """float64 [B,k]: the bytes of the targets at positions pos [B,k] of batch `b`: the sidecar's entry at
        each target's index in the stream (`b.start + pos + 1`; positions past a window's end are clamped
        into the stream, and masked by the caller), else the byte tables' count from (input, target)."""
        if self.val_bytes is None:
            return self.luts.target_bytes(gather_pos(b.x, pos), gather_pos(b.y, pos))
        idx = (b.start[:, None] + pos + 1).clamp(0, self.val_bytes.numel() - 1)
        return self.val_bytes[idx].to(torch.float64)

    def autocast(self):
        return autocast_ctx(self.device, self.autocast_dtype)

    def attention_kwargs(self, x: torch.Tensor) -> dict:
        """The backbone's keyword arguments for the windows x [B,S]: with `doc_max_seg_len`, document-bounded
        attention (PR #1530 / #1611's eval batches: a window's attention stops at every BOS and every
        `doc_max_seg_len` tokens of a document, `cu_seqlens` built on the host); else none (plain causal)."""
        if not self.doc_max_seg_len:
            return {}
        return {"cu_seqlens": document_cu_seqlens(x.cpu(), BOS_ID, self.doc_max_seg_len).to(x.device)}

    def zeros(self) -> torch.Tensor:
        """Empty float64 [loss_sum, tokens, bytes] on the device."""
        return torch.zeros(3, dtype=torch.float64, device=self.device)

    def record(
        self,
        sums: torch.Tensor,
        b: Batch,
        pos: torch.Tensor,
        mask: torch.Tensor,
        nll: torch.Tensor,
        once: torch.Tensor | None = None,
        once_mask: torch.Tensor | None = None,
    ) -> None:
        """Add the scored targets (mask [B,k] over positions pos [B,k], NLL nll [B,k]) from each window's
        `score_from` on to `sums` and the log, each charged `target_bytes` (the sidecar's when there is one).
        With `once` (float64 [3]), also add to it the targets of `once_mask` (default: those of `mask` from
        each window's `first_from` on: first scorings)."""
        nb = self.target_bytes(b, pos)
        rec = mask & (pos >= b.rec[:, None])
        sums += _sums(nll, rec, nb)
        if once is not None:
            once += _sums(nll, once_mask if once_mask is not None else mask & (pos >= b.first[:, None]), nb)
        if self.log is not None:
            self.log.add((b.start[:, None] + pos)[rec], nll[rec], nb[rec])


def _sums(nll: torch.Tensor, mask: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """float64 [loss_sum, tokens, bytes] of the targets of `mask`."""
    return torch.stack((nll.detach().double()[mask].sum(), mask.sum().double(), nbytes[mask].sum()))


@torch.inference_mode()
def score_windows(
    model,
    tokens: torch.Tensor,
    windows: list[Window],
    ctx: EvalContext,
    *,
    seq_len: int,
    batch_windows: int,
    tail: int | None = None,
    hidden: Callable | None = None,
    once: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 [loss_sum, tokens, bytes] over these windows (not reduced), batches of `batch_windows`
    windows of length `seq_len`, the head run on the last `tail` positions (None: all). `tokens` may be on
    any device; `hidden` replaces `model.forward_hidden` (a compiled one); `once` (float64 [3]) receives
    the sums of the first scorings (see `EvalContext.record`)."""
    model, _ = unwrap(model)
    hidden = hidden or model.forward_hidden
    tokens = tokens.to(ctx.device)
    sums = ctx.zeros()
    for b in batches(tokens, windows, seq_len, batch_windows):
        pos, mask = score_positions(b, tail or seq_len)
        with ctx.autocast():
            h = gather_pos(hidden(b.x, **ctx.attention_kwargs(b.x)), pos)
            logits = model.logits_from_hidden(h)
        ctx.record(sums, b, pos, mask, nll_from_logits(logits, gather_pos(b.y, pos)), once)
    return sums


def score_share(
    model,
    tokens: torch.Tensor,
    windows: list[Window],
    ctx: EvalContext,
    *,
    seq_len: int,
    batch_windows: int,
    tail=None,
    once: bool = False,
) -> Scored:
    """This rank's contiguous share of `windows` scored by the frozen model (see `score_windows`); with
    `once`, also the sums of pgolf's each-target-once figure (the windows' first scorings)."""
    rank, world = dist_info()
    a, b = rank_slice(len(windows), rank, world)
    gpt, wrapped = unwrap(model)
    hidden = hidden_fn(gpt, ctx.compile or wrapped)
    first = ctx.zeros() if once else None
    kw = dict(seq_len=seq_len, batch_windows=batch_windows, tail=tail, hidden=hidden, once=first)
    return Scored(score_windows(gpt, tokens, windows[a:b], ctx, **kw), len(windows), once=first)
