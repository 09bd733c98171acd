"""The `standard` eval mode: non-overlapping windows `[kS, (k+1)S)`, every position scored (the baseline
train_gpt.py's `eval_val`, which prints `final_int8_zlib_roundtrip`). Config: conf/eval/standard.yaml."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pgolf.eval.core import CAUSAL_REASON, EvalContext, Scored, Window, score_share
from pgolf.eval.registry import Mode, register


@dataclass
class StandardSettings:
    seq_len: int
    batch_windows: int = 32

    def __post_init__(self):
        if self.seq_len <= 0 or self.batch_windows <= 0:
            raise ValueError(f"standard: seq_len {self.seq_len} and batch_windows {self.batch_windows} must be > 0")


def standard_windows(total_targets: int, seq_len: int) -> list[Window]:
    """Whole windows of `seq_len` targets; a remainder shorter than one window is not scored."""
    return [(k * seq_len, seq_len, 0) for k in range(total_targets // seq_len)]


def run_standard(model, tokens: torch.Tensor, st: StandardSettings, ctx: EvalContext) -> Scored:
    windows = standard_windows(tokens.numel() - 1, st.seq_len)
    return score_share(model, tokens, windows, ctx, seq_len=st.seq_len, batch_windows=st.batch_windows)


register(Mode("standard", StandardSettings, run_standard, rule=lambda st: (True, CAUSAL_REASON)))
