"""Applies the pure schedules of `pgolf.optim.schedule` to the one optimizer before every step
(docs/techniques.md#lr-schedule-and-warmdown), and switches progressive depth recurrence on at its training
fraction (PR #1611: `model.enable_looping_at` 0.35).

The wallclock warmdown reads the challenge clock handed in at construction (its time at the latest step
boundary: the time the step started, as the reference's `lr_mul(step, elapsed_ms)`, the same on every rank); the
step's LR scale goes to `pl_module.state.lr_scale` for late QAT, SWA and the clock's metrics. The looping switch
runs at the top of each training step (`on_train_batch_start`) with the fraction of `train_fraction` (elapsed /
(cap - reserve), or step / iterations without a cap); it never switches off, and at the start of training (also
after a resume) it sets the state the fraction calls for: a GPT starts looped, as export and evaluation want it."""

from __future__ import annotations

import lightning as L

from callbacks.wallclock import ChallengeClock
from pgolf.optim.schedule import lr_scale, muon_momentum, train_fraction
from pgolf.runlog import log0


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
        warmdown_frac: float = 0.0,
        min_lr: float = 0.0,
        reserve_seconds: float = 0.0,
    ):
        self.iterations, self.warmdown_iters = int(iterations), int(warmdown_iters)
        self.warmdown_frac, self.min_lr, self.reserve_ms = (
            float(warmdown_frac),
            float(min_lr),
            1000.0 * float(reserve_seconds),
        )
        self.max_ms = 1000.0 * float(max_wallclock_seconds or 0)
        self.m0, self.m1, self.mw = float(momentum_start), float(momentum_end), int(momentum_warmup_steps)
        self.clock = clock

    def scale(self, step: int) -> float:
        """LR multiplier before optimizer step `step + 1` (`step` steps done), at the time the step started:
        the clock's time at the latest step boundary (the reference's `lr_mul(step, elapsed_ms)` at the top of
        the step), the same on every rank."""
        return lr_scale(
            step,
            self.clock.step_ms,
            iterations=self.iterations,
            warmdown_iters=self.warmdown_iters,
            max_wallclock_ms=self.max_ms,
            warmdown_frac=self.warmdown_frac,
            min_lr=self.min_lr,
            reserve_ms=self.reserve_ms,
        )

    def fraction(self, step: int) -> float:
        """The training fraction before optimizer step `step + 1`, at the time the step started (`scale`)."""
        return train_fraction(
            step,
            self.clock.step_ms,
            iterations=self.iterations,
            max_wallclock_ms=self.max_ms,
            reserve_ms=self.reserve_ms,
        )

    def on_train_start(self, trainer, pl_module):
        gpt = pl_module.gpt
        if gpt.cfg.num_loops > 0:
            frac = self.fraction(trainer.global_step)
            gpt.set_looping(gpt.cfg.looping_at(frac))
            log0(f"layer_loop:{'enabled' if gpt.looping_active else 'off'} step:{trainer.global_step} frac:{frac:.3f}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        gpt = pl_module.gpt
        if gpt.cfg.num_loops > 0 and not gpt.looping_active:
            frac = self.fraction(trainer.global_step)
            if gpt.cfg.looping_at(frac):
                gpt.set_looping(True)
                log0(f"layer_loop:enabled step:{trainer.global_step} frac:{frac:.3f}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step  # steps completed before this one
        s = self.scale(step)
        mu = muon_momentum(step, start=self.m0, end=self.m1, warmup_steps=self.mw)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * s
            if g["kind"] == "muon":
                g["momentum"] = mu
        pl_module.state.lr_scale = s
