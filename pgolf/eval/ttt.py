"""The `ttt` eval mode: legal score-first test-time training on the validation stream (PR #549,
records/track_10min_16mb/2026-03-23_LeakyReLU_LegalTTT_ParallelMuon; recipe of PR #461). Compliant: every
target is scored before any update that uses it, so the weights that score a target depend only on tokens
before it. Config: conf/eval/ttt.yaml.

The target stream is cut into chunks; each sliding window (pgolf/eval/windows.py: `once`, every target once,
or with `windows: reference` the record's, whose tail windows re-score the final targets and which keeps
only windows of at least `stride` targets) belongs to the chunk of its first scored target. For chunk c:
score its windows (eval mode, no grad), then, unless c is the last chunk, train a copy of the model on the
chunk's non-overlapping sequences (aligned at the chunk start) for `epochs` epochs with SGD + momentum, lr
cosine across chunks (η_c = lr·½(1 + cos(π c/(C-1)))), global-norm clipping, optional frozen first blocks.
Under several processes each global batch of sequences is split across ranks and the gradients are summed
with one all-reduce and divided by the global target count: the update is the single-process update at any
world size. The optimizer state persists across chunks. With `windows: reference` the result also carries
pgolf's each-target-once figure: each target's first scoring in the same pass.

`qat`: `off` (default, pgolf's choice: TTT adapts the de-quantized weights in full precision) or `keep`:
the model's QAT stays on in TTT's training forwards, as in PR #549, whose late QAT flag stays set after
training so its eager TTT fake-quantizes the casted linears (there only `bigram.proj` and `ve_shared.proj`;
in pgolf every quantized matrix). With `keep`, a model trained with `qat: late` adapts with the int6
straight-through fake quant switched on (the switch fires during the warmdown of every record run), one
with `qat: always` as in training, one with `qat: off` without.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pgolf.data.stream import rank_slice
from pgolf.eval.core import EvalContext, Scored, dist_info, hidden_fn, score_windows, unwrap
from pgolf.eval.registry import Mode, register
from pgolf.eval.windows import plan_windows

TTT_REASON = (
    "score-first TTT: each chunk is scored before the model trains on it; the weights that score chunk c were "
    "trained on chunks before c only (PR #549)"
)


@dataclass
class TTTSettings:
    seq_len: int
    batch_windows: int = 32
    stride: int = 64
    chunk_tokens: int = 32768
    lr: float = 0.002
    momentum: float = 0.9
    epochs: int = 3
    batch_seqs: int = 32
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    freeze_blocks: int = 0  # freeze blocks.0 .. blocks.{n-1}
    windows: str = "once"  # once | reference (PR #549's windows: the tail re-scores the final targets)
    qat: str = "off"  # off | keep (the model's QAT on in TTT's training forwards, as PR #549)

    def __post_init__(self):
        checks = [
            (self.windows in ("once", "reference"), f"windows {self.windows!r} not in (once, reference)"),
            (
                self.qat in ("off", "keep"),
                f"qat {self.qat!r} not in (off, keep) (YAML reads a bare off as false: quote it)",
            ),
            (0 < self.stride <= self.seq_len, f"stride {self.stride} must be in 1..{self.seq_len}"),
            (self.chunk_tokens > 0, f"chunk_tokens {self.chunk_tokens} must be > 0"),
            (self.epochs >= 0, f"epochs {self.epochs} must be >= 0"),
            (self.batch_seqs > 0 and self.batch_windows > 0, "batch_seqs and batch_windows must be > 0"),
            (self.freeze_blocks >= 0, f"freeze_blocks {self.freeze_blocks} must be >= 0"),
            (self.lr >= 0 and self.grad_clip >= 0, "lr and grad_clip must be >= 0"),
            (0 <= self.momentum < 1, f"momentum {self.momentum} must be in [0, 1)"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))  # the caller names the mode

    def lr_at(self, c: int, chunks: int) -> float:
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * c / max(chunks - 1, 1)))


def chunk_windows(windows, chunk_tokens: int, chunks: int) -> list[list]:
    """Each window goes to the chunk of its first scored target (as PR #549 does)."""
    out: list[list] = [[] for _ in range(chunks)]
    for w in windows:
        out[(w[0] + w[2]) // chunk_tokens].append(w)
    return out


def all_reduce_grads(params: list[nn.Parameter], scale: float) -> None:
    """Sum every rank's gradient (one flat all-reduce) and scale; a missing gradient counts as zero. The flat
    buffer has the widest dtype of the gradients (fp32 beside a bf16 table's gradient, `embed_dtype: bf16`);
    each gradient comes back in its parameter's dtype."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _, world = dist_info()
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.mul_(scale)
    i = 0
    for p in params:
        g = flat[i : i + p.numel()].view_as(p)
        p.grad = g.to(p.dtype) if g.dtype != p.dtype else g.clone()
        i += p.numel()


def ttt_params(model, freeze_blocks: int) -> list[nn.Parameter]:
    """Mark blocks.0 .. blocks.{freeze_blocks-1} frozen, everything else trainable; the trainable list."""
    frozen = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    return [p for p in model.parameters() if p.requires_grad]


def train_chunk(
    model, opt: torch.optim.Optimizer, tokens: torch.Tensor, start: int, end: int, st: TTTSettings, ctx: EvalContext
) -> int:
    """Train `model` (the parameters of `opt`'s one group, at the group's lr) on the chunk's targets
    [start, end): `epochs` passes over its sequences of seq_len aligned at `start`. Returns the steps taken."""
    S = st.seq_len
    nseq = (end - start) // S
    if nseq == 0 or st.epochs == 0:
        return 0
    params = opt.param_groups[0]["params"]
    rank, world = dist_info()
    offs = torch.arange(S + 1, device=ctx.device)
    model.train()
    steps = 0
    for _ in range(st.epochs):
        for b0 in range(0, nseq, st.batch_seqs):
            b1 = min(b0 + st.batch_seqs, nseq)
            r0, r1 = rank_slice(b1 - b0, rank, world)
            opt.zero_grad(set_to_none=True)
            if r1 > r0:
                seqs = start + torch.arange(b0 + r0, b0 + r1, device=ctx.device)[:, None] * S + offs
                seq = tokens[seqs]  # [n, S+1]
                with ctx.autocast():
                    loss = model(seq[:, :-1], seq[:, 1:], reduction="sum")
                loss.backward()
            all_reduce_grads(params, 1.0 / ((b1 - b0) * S))  # global mean CE (PR #549 averages across ranks)
            if st.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
            opt.step()
            steps += 1
    model.eval()
    return steps


def ttt_model(model, qat: str):
    """The copy of the GPT `model` that TTT adapts, in eval mode, with its QAT for TTT's training forwards:
    `off`, or `keep` (the model config's QAT mode, late QAT switched on: see the module docstring)."""
    m = copy.deepcopy(model)
    mode = m.cfg.qat if qat == "keep" else "off"
    m.set_qat(mode, enabled=True if mode == "late" else None)
    return m.eval()


def run_ttt(model, tokens: torch.Tensor, st: TTTSettings, ctx: EvalContext) -> Scored:
    """Score-first TTT on a copy of `model` (the model itself is not changed)."""
    base, wrapped = unwrap(model)
    m = ttt_model(base, st.qat)
    opt = torch.optim.SGD(ttt_params(m, st.freeze_blocks), lr=st.lr, momentum=st.momentum)
    hidden = hidden_fn(m, ctx.compile or wrapped)
    total = tokens.numel() - 1
    reference = st.windows == "reference"
    windows = plan_windows(st.windows, total, st.seq_len, st.stride, min_len=st.stride)
    chunks = -(-total // st.chunk_tokens)
    per_chunk = chunk_windows(windows, st.chunk_tokens, chunks)
    rank, world = dist_info()
    toks = tokens.to(ctx.device)
    sums = ctx.zeros()
    once = ctx.zeros() if reference else None
    steps = 0
    for c in range(chunks):
        a, b = rank_slice(len(per_chunk[c]), rank, world)
        kw = dict(seq_len=st.seq_len, batch_windows=st.batch_windows, tail=st.stride, hidden=hidden, once=once)
        sums += score_windows(m, toks, per_chunk[c][a:b], ctx, **kw)
        if c < chunks - 1:
            opt.param_groups[0]["lr"] = st.lr_at(c, chunks)
            start, end = c * st.chunk_tokens, min((c + 1) * st.chunk_tokens, total)
            steps += train_chunk(m, opt, toks, start, end, st, ctx)
    info = {"windows": len(windows), "chunks": chunks, "train_steps": steps}
    return Scored(sums, len(windows), info, once, rescores=reference)


def ttt_rule(st: TTTSettings) -> tuple[bool, str]:
    tail = (
        "; the record's windows (PR #549): the tail windows score the final targets again"
        if (st.windows == "reference")
        else ""
    )
    qat = "; the model's QAT fake quant is on in TTT's training forwards (PR #549)" if st.qat == "keep" else ""
    return True, TTT_REASON + tail + qat


register(Mode("ttt", TTTSettings, run_ttt, ttt_rule))
