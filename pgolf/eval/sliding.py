"""The `sliding` eval mode: windows every `stride` tokens, each target scored once with at least
S - stride tokens of context (records/track_10min_16mb/2026-03-19_SlidingWindowEval; the form of PR #549
and the records after it, which print `final_int8_zlib_sliding_window`). Config: conf/eval/sliding.yaml."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.eval.core import CAUSAL_REASON, EvalContext, Scored, score_share, sliding_windows
from pgolf.eval.registry import Mode, register


@dataclass
class SlidingSettings:
    seq_len: int
    batch_windows: int = 32
    stride: int = 64
    reference_tail: bool = False  # re-score the final targets, as PR #549's tail windows do

    def __post_init__(self):
        self.stride, self.reference_tail = int(self.stride), bool(self.reference_tail)
        if not 0 < self.stride <= self.seq_len:
            raise ValueError(f"sliding: stride {self.stride} must be in 1..{self.seq_len}")
        if self.batch_windows <= 0:
            raise ValueError(f"sliding: batch_windows {self.batch_windows} must be > 0")


def run_sliding(model, tokens: torch.Tensor, st: SlidingSettings, ctx: EvalContext) -> Scored:
    windows = sliding_windows(tokens.numel() - 1, st.seq_len, st.stride, st.reference_tail)
    s = score_share(model, tokens, windows, ctx, seq_len=st.seq_len, batch_windows=st.batch_windows, tail=st.stride)
    return Scored(s.sums, s.windows, {"windows": len(windows)})


TAIL_REASON = "; reference tail: the final targets are scored repeatedly (token count includes duplicates)"


def sliding_rule(st: SlidingSettings) -> tuple[bool, str]:
    return True, CAUSAL_REASON + (TAIL_REASON if st.reference_tail else "")


register(Mode("sliding", SlidingSettings, run_sliding, sliding_rule))
