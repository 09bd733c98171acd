"""Applies the pure schedules of `pgolf.optim.schedule` to the one optimizer before every step
(docs/techniques.md#lr-schedule-and-warmdown).

The wallclock warmdown reads the challenge clock handed in at construction; the step's LR scale goes to
`pl_module.state.lr_scale` for late QAT, SWA and the clock's metrics."""

from __future__ import annotations

import lightning as L

from callbacks.wallclock import ChallengeClock
from pgolf.optim.schedule import lr_scale, muon_momentum


class LRSchedule(L.Callback):
    def __init__(
        self,
        clock: ChallengeClock,
        iterations: int,
        warmdown_iters: int,
        max_wallclock_seconds: float,
        momentum_start: float,
        momentum_end: float,
        momentum_warmup_steps: int,
    ):
        self.iterations, self.warmdown_iters = int(iterations), int(warmdown_iters)
        self.max_ms = 1000.0 * float(max_wallclock_seconds or 0)
        self.m0, self.m1, self.mw = float(momentum_start), float(momentum_end), int(momentum_warmup_steps)
        self.clock = clock

    def scale(self, step: int) -> float:
        """LR multiplier before optimizer step `step + 1` (`step` steps done), at the clock's current time."""
        return lr_scale(
            step,
            self.clock.elapsed_ms(),
            iterations=self.iterations,
            warmdown_iters=self.warmdown_iters,
            max_wallclock_ms=self.max_ms,
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step  # steps completed before this one
        s = self.scale(step)
        mu = muon_momentum(step, start=self.m0, end=self.m1, warmup_steps=self.mw)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * s
            if g["kind"] == "muon":
                g["momentum"] = mu
        pl_module.state.lr_scale = s
