"""Exact-resume checkpoints and preemption.

A checkpoint is Lightning's (weights, the one optimizer's state — every rank holds all Muon momentum, so
rank 0's copy is complete —, loop counters, callback states: clock offset, averaging, late-QAT switch; the
DataModule's stream position) plus the RNG states (GolfModule adds them).
`pgolf.train.build.AtomicCheckpointIO` writes it to a temporary file, fsyncs and renames,
so a crash mid-write never leaves a truncated checkpoint.

`Checkpointing` saves every `every_steps` optimizer steps (at step boundaries only, after the challenge
clock has checked the step's loss, so a non-finite step is never saved) and keeps the newest `keep`. On
SIGTERM (preemption) it saves at the next step boundary — the decision is reduced across ranks, so all
stop on the same step — marks the run preempted (the export is skipped) and stops training cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import lightning as L

from pgolf.io import atomic_path
from pgolf.runlog import log0


class Checkpointing(L.Callback):
    def __init__(self, dirpath: str | Path, every_steps: int = 0, keep: int = 2, on_sigterm: bool = True):
        self.dirpath = Path(dirpath)
        self.every, self.keep, self.on_sigterm = int(every_steps), int(keep), on_sigterm
        self._last_step = -1
        self._sigterm = False
        self._prev_handler = None
        self.saved: list[Path] = []

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        # installed after Lightning's own handler (which would raise mid-accumulation): ours only sets a flag
        if self.on_sigterm:
            try:
                self._prev_handler = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._prev_handler = None

    def _handle(self, signum, frame) -> None:
        self._sigterm = True

    def on_train_end(self, trainer, pl_module):
        if self._prev_handler is not None:
            signal.signal(signal.SIGTERM, self._prev_handler)
            self._prev_handler = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = step
        preempt = trainer.strategy.reduce_boolean_decision(self._sigterm, all=False) if self.on_sigterm else False
        if preempt:
            path = self.save(trainer, "last.ckpt")
            pl_module.state.preempted = True
            log0(f"preempted: SIGTERM received; checkpoint of step {step} saved to checkpoints/{path.name}")
            log0(f"resume with: python train.py <same overrides> resume={os.path.relpath(path)}")
            trainer.should_stop = True
        elif self.every > 0 and step % self.every == 0:
            self.save(trainer, f"step{step:06d}.ckpt")

    def save(self, trainer, name: str) -> Path:
        path = self.dirpath / name
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            if name != "last.ckpt":
                with atomic_path(self.dirpath / "last.ckpt") as tmp:
                    shutil.copyfile(path, tmp)
                self.saved.append(path)
                while self.keep > 0 and len(self.saved) > self.keep:
                    old = self.saved.pop(0)
                    if old.exists():
                        os.unlink(old)
        return path
