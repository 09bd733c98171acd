"""The challenge clock (the baseline train_gpt.py's MAX_WALLCLOCK_SECONDS; STYLE 6): training time only, device-
synchronised, one stop step for all.

Not Lightning's Timer: the clock starts after the compile warm-up, pauses during validation, synchronises the
device at every optimizer-step boundary, and every rank reads the slowest rank's time (an all-reduce max at each
step boundary): the LR schedule's time fraction and the stop step are the same on every rank, so the replicas
stay identical (with a rank's own clock, their learning rates drifted apart in the warmdown). It also prints the
reference's step lines (steps 1-`log_first`, every `log_every`-th, and always the last step, whatever ended
training: the step budget, the clock, or preemption) with the same metrics to the loggers, and checks the
training loss of every step: a non-finite loss stops the run with an error before anything is saved. With
periodic validation (`train.val_every` > 0, the reference's VAL_LOSS_EVERY) it prints the reference's validation
lines: step 0 (Lightning's sanity check over the whole validation set, before the clock starts), every
`val_every`-th step and the last step."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from pgolf.runlog import log0


def device_sync(pl_module) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class ChallengeClock(L.Callback):
    def __init__(
        self,
        max_wallclock_seconds: float = 600.0,
        iterations: int = 20000,
        log_every: int = 200,
        log_first: int = 10,
        reserve_seconds: float = 0.0,
    ):
        self.cap_ms = 1000.0 * float(max_wallclock_seconds or 0)
        # training stops `reserve_seconds` before the cap, so that what reads training data after the last step
        # (GPTQ calibration) fits the budget: PR #1611's `max_wallclock_ms -= gptq_reserve_seconds * 1e3`
        self.stop_ms = max(self.cap_ms - 1000.0 * float(reserve_seconds or 0), 0.0)
        self.iterations = int(iterations)
        self.log_every, self.log_first = int(log_every), int(log_first)
        self.offset_ms = 0.0  # training time carried over from before a resume
        self._acc_ms = 0.0
        self._t0: float | None = None
        self._last_step = -1
        self.step_ms = 0.0  # the time at the latest step boundary, the same on every rank (what the schedule reads)
        self._unlogged: tuple | None = None  # (step, loss, time, lr scale) of the latest step not logged yet
        self.stopped_early = False

    # ---- time ------------------------------------------------------------------------------------------
    def elapsed_ms(self) -> float:
        run = 1000.0 * (time.perf_counter() - self._t0) if self._t0 is not None else 0.0
        return self.offset_ms + self._acc_ms + run

    def _pause(self, pl_module) -> None:
        if self._t0 is not None:
            device_sync(pl_module)
            self._acc_ms += 1000.0 * (time.perf_counter() - self._t0)
            self._t0 = None

    def _resume(self, pl_module) -> None:
        if self._t0 is None:
            device_sync(pl_module)
            self._t0 = time.perf_counter()

    @contextmanager
    def running(self, pl_module):
        """Run the clock over a block after training: work that reads training data once the last step is
        done (GPTQ calibration, PR #1611's `gptq_reserve_seconds`) is counted on the clock that timed
        training, so the artifact can record when it started and ended on it. The stop decision is not
        re-made (no steps run); the caller compares against `cap_ms`."""
        self._resume(pl_module)
        try:
            yield self
        finally:
            self._pause(pl_module)

    def ended_by(self, step: int) -> str | None:
        """What ended training at `step` for a run resumed there (its checkpoint's step and time): the step
        budget or the clock; None when steps are left."""
        if 0 < self.iterations <= step:
            return "the step budget"
        if self.cap_ms > 0 and self.stop_ms <= self.offset_ms:
            return "the clock"
        return None

    def on_train_start(self, trainer, pl_module):
        self._last_step = step = trainer.global_step
        self.step_ms = pl_module.state.train_time_ms = self.offset_ms  # 0, or the resumed checkpoint's time
        self._resume(pl_module)
        # a run resumed from a checkpoint of the step where training ended takes no step (no step past the cap)
        why = self.ended_by(step)
        if why is not None:
            log0(f"resume: the checkpoint is of step {step}, where {why} ended training: no step is left; exporting")
            trainer.should_stop = True

    @staticmethod
    def _in_fit(trainer) -> bool:
        # Validation inside fit: the stage is VALIDATING there, so `trainer.training` is False (it would
        # neither pause the clock nor print the val line); the function being run is still FITTING.
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer, pl_module):
        if self._in_fit(trainer):
            self._pause(pl_module)

    def on_validation_end(self, trainer, pl_module):
        step0 = trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING  # before the clock starts
        if not (step0 or self._in_fit(trainer)):
            return
        step = trainer.global_step
        v = pl_module.state.last_val
        if v is not None and v["step"] == step:
            t = self.elapsed_ms()
            log0(
                f"step:{step}/{self.iterations} val_loss:{v['val_loss']:.4f} val_bpb:{v['val_bpb']:.4f} "
                f"train_time:{t:.0f}ms step_avg:{t / max(step, 1):.2f}ms"
            )
            for lg in trainer.loggers:  # at this optimizer step, next to its training metrics
                lg.log_metrics({"val_loss": v["val_loss"], "val_bpb": v["val_bpb"]}, step=step)
        if not step0:
            self._resume(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._pause(pl_module)
        if self._unlogged is not None:  # training stopped for another reason (preemption) on a step not yet logged
            self._log_step(trainer, *self._unlogged)
        if pl_module.device.type == "cuda":
            log0(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
            )

    # ---- per optimizer step ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = step
        device_sync(pl_module)
        elapsed = self.elapsed_ms()
        if trainer.world_size > 1:  # every rank reads the slowest rank's time: one LR scale, one stop step for all
            t = torch.tensor(elapsed, dtype=torch.float64, device=pl_module.device)
            elapsed = float(trainer.strategy.reduce(t, reduce_op="max"))
        loss_t = pl_module.state.pop_loss()
        # the mean over all ranks' micro-batches (rank 0 alone saw only its share of the step's tokens)
        loss = float(trainer.strategy.reduce(loss_t, reduce_op="mean")) if loss_t is not None else None
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss}) at step {step}: stopping without writing a checkpoint or "
                "artifact (lower the learning rates, enable clipping, or check the data)"
            )
        self.step_ms = pl_module.state.train_time_ms = elapsed
        reached = self.cap_ms > 0 and elapsed >= self.stop_ms  # the same on every rank
        last = reached or step >= self.iterations  # the step budget or the clock ends training here
        record = (step, loss, elapsed, pl_module.state.lr_scale)
        if step <= self.log_first or step % self.log_every == 0 or last:
            self._log_step(trainer, *record)
        else:
            self._unlogged = record
        if reached and not trainer.should_stop:
            self.stopped_early = True
            log0(f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms step:{step}/{self.iterations}")
            trainer.should_stop = True
        elif last and trainer.limit_val_batches:
            # periodic validation is on: like the reference, validate at the last step whatever ended training
            # (Lightning validates after a batch whose hooks set `should_stop`, once even on a val_every step)
            trainer.should_stop = True

    def _log_step(self, trainer, step: int, loss: float | None, elapsed: float, lr_scale: float) -> None:
        """The reference's step line, and the step's metrics to every logger (CSV and W&B alike)."""
        self._unlogged = None
        shown = "nan" if loss is None else f"{loss:.4f}"
        log0(
            f"step:{step}/{self.iterations} train_loss:{shown} train_time:{elapsed:.0f}ms "
            f"step_avg:{elapsed / max(step, 1):.2f}ms"
        )
        if trainer.loggers and loss is not None:
            metrics = {"train_loss": loss, "train_time_ms": elapsed, "lr_scale": lr_scale}
            for lg in trainer.loggers:  # logger=wandb keeps csv/metrics.csv too
                lg.log_metrics(metrics, step=step)

    # ---- exact resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # never below the all-reduced time of the step saved (another rank may have been the slower one)
        return {"elapsed_ms": max(self.elapsed_ms(), self.step_ms)}

    def load_state_dict(self, state: dict) -> None:
        self.offset_ms = float(state.get("elapsed_ms", 0.0))
        self._acc_ms, self._t0 = 0.0, None
