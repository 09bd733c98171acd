"""The `sliding` eval mode: windows every `stride` tokens, each target scored once with at least
S - stride tokens of context (records/track_10min_16mb/2026-03-19_SlidingWindowEval; the form of PR #549
and the records after it, which print `final_int8_zlib_sliding_window`). Config: conf/eval/sliding.yaml.

`windows` picks the plan (pgolf/eval/windows.py): `once` (default, pgolf's: every target exactly once),
`reference` (PR #549's: the tail windows re-score the final targets) or `v5` (the 1.1556 record's: the
first S - stride targets never scored). With `reference` or `v5` the metric is the record's, and the
result also carries pgolf's each-target-once figure, from the same forwards: for `reference` each
target's first scoring, for `v5` the `once` windows' scores (the record's windows are among them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.eval.core import CAUSAL_REASON, EvalContext, Scored, score_share
from pgolf.eval.registry import Mode, register
from pgolf.eval.windows import WINDOW_PLANS, plan_windows


@dataclass
class SlidingSettings:
    seq_len: int
    batch_windows: int = 32
    stride: int = 64
    windows: str = "once"  # once | reference (PR #549's tail) | v5 (the 1.1556 record's)

    def __post_init__(self):
        self.stride = int(self.stride)
        if not 0 < self.stride <= self.seq_len:
            raise ValueError(f"stride {self.stride} must be in 1..{self.seq_len}")
        if self.batch_windows <= 0:
            raise ValueError(f"batch_windows {self.batch_windows} must be > 0")
        if self.windows not in WINDOW_PLANS:
            raise ValueError(f"windows {self.windows!r} not in {WINDOW_PLANS}")


def run_sliding(model, tokens: torch.Tensor, st: SlidingSettings, ctx: EvalContext) -> Scored:
    windows = plan_windows(st.windows, tokens.numel() - 1, st.seq_len, st.stride)
    kw = dict(seq_len=st.seq_len, batch_windows=st.batch_windows, tail=st.stride, once=st.windows != "once")
    s = score_share(model, tokens, windows, ctx, **kw)
    return Scored(s.sums, s.windows, {"windows": len(windows)}, s.once, rescores=st.windows == "reference")


WINDOW_REASONS = {
    "once": CAUSAL_REASON,
    "reference": "every score depends on its target's prefix only; no weights or state adapt to validation "
    "tokens. The record's windows (PR #549): the tail windows score the final targets again",
    "v5": "every score depends on its target's prefix only; no weights or state adapt to validation tokens. "
    "The 1.1556 record's windows: the first seq_len - stride targets are never scored",
}


def sliding_rule(st: SlidingSettings) -> tuple[bool, str]:
    return True, WINDOW_REASONS[st.windows]


register(Mode("sliding", SlidingSettings, run_sliding, sliding_rule))
