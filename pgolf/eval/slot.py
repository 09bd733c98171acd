"""The SLOT eval modes: eval-time optimisation of a per-window hidden delta (and logit bias) on the frozen
model (arXiv:2505.12392; PRs #1263, #1298).

One loop, three forms, each a registered mode with its own defaults and config (conf/eval/<name>.yaml):
* `slot_1263` (PR #1263): δ [B,1,d] and logit bias β [B,1,V], zero-initialised, AdamW (betas 0.9/0.999,
  eps 1e-8, weight decay 0.01), 16 steps, cosine lr 0.008 -> 0.0008, loss = Σ(CE ⊙ M)/ΣM over the batch's
  scored positions M, fp32. **Not compliant**: fitted on the very targets it then scores.
* `slot_1298` (PR #1298): δ only, AdamW without weight decay, 8 steps, constant lr 0.005, loss = mean CE
  over all positions of the batch's windows (zero-padded tail positions included), in the hidden states'
  dtype (bf16 under CUDA autocast). **Not compliant** for the same reason.
* `causal_slot` (Issue #1336's question): δ and β fitted only on a window's context positions
  [0, score_from) — targets that earlier windows already scored — then the window's new positions are
  scored with them. Window 0 has no context and is scored unchanged. **Compliant**: every score depends on
  the prefix only (the flip test in tests/test_causality.py checks it).

`windows: reference` runs the records' windows (PR #1263 and #1298 both use PR #549's list), whose tail
windows re-score the final targets; the result then also carries pgolf's each-target-once figure, each
target's first scoring in the same pass. The seed forms fit every delta on a loss over the whole batch
(`normalize: batch`), so the tail windows change the fits of the last batch: that figure differs slightly
from a `windows: once` run's.

Speed: the backbone runs once per batch of windows (`forward_hidden` under no_grad, compiled when asked);
the optimisation steps never re-run it. Because δ is shared by all positions of its window,
(H+δ)Wᵀ + β = HWᵀ + (δWᵀ + β): the base logits HWᵀ are computed once per batch, and a step only adds a
[B,1,V] row, applies the softcap and the cross-entropy (the same function as the seeds' up to float
rounding), with its gradient written out rather than taken by autograd. For `fit: scored` the head runs
only at the scored positions (the loss touches no others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgolf.data.stream import rank_slice
from pgolf.eval.core import (
    Batch,
    EvalContext,
    Scored,
    batches,
    dist_info,
    gather_pos,
    hidden_fn,
    nll_from_logits,
    score_positions,
    unwrap,
)
from pgolf.eval.registry import Mode, register
from pgolf.eval.windows import plan_windows

FITS = ("scored", "all", "context")
NON_COMPLIANT = (
    "SLOT fits its delta{bias} on the targets it then scores, so a target's own value (and later targets) "
    "change its score (PR #1240 flip test; legality of SLOT pending Issue #1336)"
)
CAUSAL_REASON = (
    "causal SLOT: the delta is fitted only on context targets that earlier windows already scored, then the "
    "window's new targets are scored; each score depends on the prefix only (Issue #1336)"
)


@dataclass
class SlotSettings:
    seq_len: int
    batch_windows: int = 32
    stride: int = 64
    steps: int = 16
    lr: float = 0.008
    lr_min: float = 0.0008  # cosine schedule's final value
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    logit_bias: bool = True  # also fit a per-window logit bias β [B,1,V] (PR #1263)
    fit: str = "scored"  # scored (PR #1263) | all (PR #1298) | context (causal)
    normalize: str = "batch"  # batch: the seeds' batch-mean loss | window: sum over windows of each one's mean
    dtype: str = "fp32"  # fp32 (PR #1263) | hidden: the hidden states' dtype (PR #1298: bf16 under autocast)
    windows: str = "once"  # once | reference (the records' windows: the tail re-scores the final targets)

    def __post_init__(self):
        checks = [
            (self.windows in ("once", "reference"), f"windows {self.windows!r} not in (once, reference)"),
            (self.fit in FITS, f"fit {self.fit!r} not in {FITS}"),
            (self.schedule in ("cosine", "constant"), f"schedule {self.schedule!r} not in (cosine, constant)"),
            (self.normalize in ("batch", "window"), f"normalize {self.normalize!r} not in (batch, window)"),
            (self.dtype in ("fp32", "hidden"), f"dtype {self.dtype!r} not in (fp32, hidden)"),
            (self.steps >= 0, f"steps {self.steps} must be >= 0"),
            (0 < self.stride <= self.seq_len, f"stride {self.stride} must be in 1..{self.seq_len}"),
            (self.batch_windows > 0, f"batch_windows {self.batch_windows} must be > 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))  # the caller names the mode
        self.logit_bias = bool(self.logit_bias)

    @property
    def compliant(self) -> bool:
        return self.fit == "context"

    def lr_at(self, k: int) -> float:
        if self.schedule == "constant":
            return self.lr
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * k / self.steps))


def softcap(z: torch.Tensor, c: float) -> torch.Tensor:
    """The model's logit softcap (GPT.logits_from_hidden): c·tanh(z/c), or z when c is 0."""
    return c * torch.tanh(z / c) if c > 0 else z


def slot_grads(z: torch.Tensor, ys: torch.Tensor, weight: torch.Tensor, cap: float) -> torch.Tensor:
    """d/dz of Σ weight·CE(softcap(z), y) for pre-softcap logits z [B,k,V] (consumed in place), summed over
    positions: [B,1,V]. Written out (softmax - onehot, times the softcap's 1 - tanh²) instead of autograd:
    half the passes over [B,k,V] (tests/test_eval_modes.py checks the result against autograd)."""
    if cap > 0:
        t = z.mul_(1.0 / cap).tanh_()
        logits = t.float() * cap
        dcap = t.float().square_().neg_().add_(1.0)  # (in place when z is fp32: t is not used again)
    else:
        logits, dcap = z.float(), None
    g = logits.sub_(torch.logsumexp(logits, -1, keepdim=True)).exp_()  # softmax [B,k,V]
    g.scatter_add_(-1, ys[..., None], torch.full_like(g[..., :1], -1.0))
    g.mul_(weight[..., None])
    if dcap is not None:
        g.mul_(dcap)
    return g.sum(1, keepdim=True)


def slot_batch(
    st: SlotSettings, h: torch.Tensor, b: Batch, W: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit δ (and β) for every window of the batch on its fit positions, then score. h [B,S,d] hidden states
    (no grad); W [V,d] output weight. Returns (nll [B,k], positions [B,k], scored mask [B,k])."""
    if st.fit == "scored":
        pos, scored = score_positions(b, st.stride)
        fit = scored
    else:
        pos = b.all_positions()
        scored = (pos >= b.lo[:, None]) & (pos < b.n[:, None])
        if st.fit == "all":  # every position of the real windows, zero-padded tail included (PR #1298)
            fit = torch.zeros_like(scored)
            fit[: b.real] = True
        else:  # context: targets that earlier windows scored
            fit = pos < b.lo[:, None]
    dt = h.dtype if st.dtype == "hidden" else torch.float32
    W = W.detach().to(dt)
    ys = gather_pos(b.y, pos)
    base = gather_pos(h, pos).to(dt) @ W.T  # [B,k,V], once per batch
    B, _, d = h.shape
    delta = torch.zeros(B, 1, d, dtype=dt, device=h.device, requires_grad=True)
    bias = torch.zeros(B, 1, W.size(0), dtype=dt, device=h.device, requires_grad=True) if st.logit_bias else None
    params = [delta] + ([bias] if bias is not None else [])

    def pre_softcap() -> torch.Tensor:  # (H+δ)Wᵀ + β = HWᵀ + (δWᵀ + β): one [B,1,V] row per window
        row = delta.detach() @ W.T
        return base + (row + bias.detach() if bias is not None else row)

    fm = fit.float()
    if st.normalize == "window":  # each window's own mean: its δ never depends on the other windows
        weight = fm / fm.sum(1, keepdim=True).clamp_min(1.0)
    else:
        weight = fm / fm.sum().clamp_min(1.0)
    if st.steps > 0 and bool(fit.any()):
        opt = torch.optim.AdamW(params, lr=st.lr, betas=(st.beta1, st.beta2), eps=st.eps, weight_decay=st.weight_decay)
        for k in range(st.steps):
            for g in opt.param_groups:
                g["lr"] = st.lr_at(k)
            with torch.no_grad():
                gz = slot_grads(pre_softcap(), ys, weight, cap)  # [B,1,V]
                delta.grad = (gz.to(dt) @ W).to(dt)
                if bias is not None:
                    bias.grad = gz.to(dt)
            opt.step()
    with torch.no_grad():
        nll = nll_from_logits(softcap(pre_softcap(), cap), ys)
    return nll, pos, scored


TAIL_REASON = "; the records' windows: the tail windows score the final targets again"


def slot_rule(st: SlotSettings) -> tuple[bool, str]:
    tail = TAIL_REASON if st.windows == "reference" else ""
    if st.compliant:
        return True, CAUSAL_REASON + tail
    return False, NON_COMPLIANT.format(bias=" and logit bias" if st.logit_bias else "") + tail


def run_slot(model, tokens: torch.Tensor, st: SlotSettings, ctx: EvalContext) -> Scored:
    """SLOT over the sliding windows (pgolf/eval/windows.py: `once`, every target scored exactly once, or the
    records' `reference` windows, whose tail re-scores the final targets), split across ranks."""
    model, wrapped = unwrap(model)
    hidden = hidden_fn(model, ctx.compile or wrapped)
    reference = st.windows == "reference"
    windows = plan_windows(st.windows, tokens.numel() - 1, st.seq_len, st.stride)
    rank, world = dist_info()
    a, z = rank_slice(len(windows), rank, world)
    W = model.output_weight()
    cap = model.cfg.logit_softcap
    sums = ctx.zeros()
    once = ctx.zeros() if reference else None
    toks = tokens.to(ctx.device)
    for b in batches(toks, windows[a:z], st.seq_len, st.batch_windows):
        with torch.no_grad(), ctx.autocast():
            h = hidden(b.x)
        nll, pos, scored = slot_batch(st, h.detach(), b, W, cap)
        ctx.record(sums, b, pos, scored, nll, once)
    return Scored(sums, len(windows), {"windows": len(windows)}, once, rescores=reference)


# The three forms: one loop, one settings dataclass (whose defaults are PR #1263's), each form's own defaults.
SLOT_1298 = {"steps": 8, "lr": 0.005, "lr_min": 0.005, "schedule": "constant", "weight_decay": 0.0}
SLOT_1298 |= {"logit_bias": False, "fit": "all", "dtype": "hidden"}
CAUSAL_SLOT = {"fit": "context", "normalize": "window"}
register(Mode("slot_1263", SlotSettings, run_slot, slot_rule))
register(Mode("slot_1298", SlotSettings, run_slot, slot_rule, SLOT_1298))
register(Mode("causal_slot", SlotSettings, run_slot, slot_rule, CAUSAL_SLOT))
