"""A plain-text progress bar for output that is not a terminal (SLURM logs, pipes, CI).

Lightning's rich bar prints nothing to a file and tqdm's carriage returns turn into one endless line; this
bar prints one self-contained line every `every_seconds`: step, percent of the step or time budget,
elapsed training time (the challenge clock's, handed in at construction) and an ETA."""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

from callbacks.wallclock import ChallengeClock


class LineProgressBar(ProgressBar):
    def __init__(
        self, clock: ChallengeClock, every_seconds: float = 30.0, max_steps: int = -1, max_seconds: float = 0.0
    ):
        super().__init__()
        self.clock = clock
        self.every, self.max_steps, self.max_seconds = float(every_seconds), int(max_steps), float(max_seconds)
        self._enabled = True
        self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module):
        self._last = time.monotonic()

    def line(self, step: int, elapsed_s: float) -> str:
        fracs = []
        if self.max_steps > 0:
            fracs.append(step / self.max_steps)
        if self.max_seconds > 0:
            fracs.append(elapsed_s / self.max_seconds)
        frac = min(max(fracs), 1.0) if fracs else 0.0
        eta = (elapsed_s / frac - elapsed_s) if frac > 0 else float("nan")
        total = f"/{self.max_steps}" if self.max_steps > 0 else ""
        return f"progress: step {step}{total} ({100 * frac:5.1f}%) train_time {elapsed_s:7.1f}s eta {eta:7.1f}s"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._enabled or not trainer.is_global_zero:
            return
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        elapsed = self.clock.elapsed_ms() / 1000.0
        print(self.line(trainer.global_step, elapsed), flush=True)


def make_progress_bar(
    kind: str, clock: ChallengeClock, every_seconds: float, max_steps: int, max_seconds: float
) -> ProgressBar | None:
    """`auto`: tqdm on a terminal, the line bar otherwise; `tqdm`, `line`, or `none` (None).

    Raises ValueError for another kind."""
    if kind == "auto":
        kind = "tqdm" if sys.stdout.isatty() else "line"
    if kind == "tqdm":
        return TQDMProgressBar(refresh_rate=10)
    if kind == "line":
        return LineProgressBar(clock, every_seconds, max_steps, max_seconds)
    if kind == "none":
        return None
    raise ValueError(f"unknown progress bar {kind!r} (auto | tqdm | line | none)")
