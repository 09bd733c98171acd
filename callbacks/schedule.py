"""Applies the pure schedules of `pgolf.optim.schedule` to the one optimizer before every step (SPEC §7.2-7.3)."""

from __future__ import annotations

import lightning as L

from callbacks.wallclock import ChallengeClock
from pgolf.optim.schedule import lr_scale, muon_momentum


class LRSchedule(L.Callback):
    def __init__(
        self,
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
        self.clock: ChallengeClock | None = None

    def on_fit_start(self, trainer, pl_module):
        self.clock = next((cb for cb in trainer.callbacks if isinstance(cb, ChallengeClock)), None)

    def scale(self, step: int) -> float:
        elapsed = self.clock.elapsed_ms() if self.clock is not None else 0.0
        return lr_scale(
            step,
            elapsed,
            iterations=self.iterations,
            warmdown_iters=self.warmdown_iters,
            max_wallclock_ms=self.max_ms if self.clock is not None else 0.0,
        )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step  # steps completed before this one
        s = self.scale(step)
        mu = muon_momentum(step, start=self.m0, end=self.m1, warmup_steps=self.mw)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * s
            if g["kind"] == "muon":
                g["momentum"] = mu
        pl_module.lr_scale = s
