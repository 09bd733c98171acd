"""Thin Lightning adapters over pgolf: challenge clock, LR schedule, compile warm-up, late QAT, weight
averaging, checkpoints/preemption, export, progress bar.

`build_callbacks` builds the challenge clock first and hands it to the callbacks that read it (LR schedule,
line progress bar, export). The values that change every step and pass between the module and the
callbacks (the step's loss, LR scale, clock time, latest validation metrics, preemption flag) live in one
`pgolf.train.state.StepState`, `pl_module.state`. It returns a `ChallengeCallbacks`: the callbacks by role,
and `.all`, the list for the Trainer. Lightning calls each hook on the callbacks in list order, then on
the LightningModule, so the list order is the hook order.

Hook order contract (asserted by tests/test_callbacks.py):

- With periodic validation (`train.val_every` > 0), the step-0 validation comes first, before
  `on_train_start` (Lightning's sanity check over the whole validation set, skipped on resume): the clock has
  not started and prints the reference's `step:0/N val_loss:...` line; the averaging leaves it alone.
- `on_train_start`: the compile warm-up installs checkpointing's SIGTERM handler (a SIGTERM stops it at a
  warm-up step boundary: `Terminated`) and runs its steps (in both looping states for a model with progressive
  depth recurrence) and restores the weights, optimizer, RNG and data position first; then the clock starts;
  the LR schedule sets the looping state the training fraction calls for; late QAT re-applies a switch
  restored from a checkpoint; the line progress bar starts its timer; EMA copies the restored initial
  weights into its shadow; checkpointing installs its SIGTERM handler.
- Each training step, `on_train_batch_start`: the LR schedule switches depth recurrence on once the
  training fraction reaches `model.enable_looping_at` (never off).
- Each optimizer step, `on_before_optimizer_step`: the LR schedule sets the LRs, the Muon momentum and
  `state.lr_scale`, then late QAT reads that scale.
- Each optimizer-step boundary, `on_train_batch_end`: the clock first (device sync, reduces the step's loss,
  raises on a non-finite loss, sets `state.train_time_ms`, prints the step line, makes the stop decision),
  then the progress bar, then the averaging update (SWA reads this step's `state.lr_scale`), then
  checkpointing: a checkpoint is only written for a step whose loss was checked, and holds the updated
  average.
- Validation inside fit (after the step's `on_train_batch_end`): the clock pauses (`on_validation_start`);
  with `callbacks.averaging.validate=averaged` the averaging swaps its weights in (`on_validation_epoch_start`)
  and back (`on_validation_epoch_end`, before the module's own hook reduces the sums into `state.last_val`),
  so both swaps are off the clock; by default (`validate=raw`, as the records) it leaves the raw weights in
  place; the clock resumes and prints the validation line from `state.last_val` (`on_validation_end`).
  The last step is validated too, whatever ended training (the clock asks Lightning to stop there); a
  preempted run is not.
- `on_train_end`: the clock stops (and logs the last step if it was not logged yet); the averaging applies
  its weights (not when the run was preempted); checkpointing acts on a SIGTERM that came after the last
  step boundary and installs the handler that stops the run at once on a later one; the export runs last,
  on the averaged weights, reading the stopped clock.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from callbacks import averaging as _averaging  # noqa: F401  (registers the optional part `averaging`)
from callbacks.checkpoint import Checkpointing
from callbacks.export import QuantizeExport
from callbacks.progress import make_progress_bar
from callbacks.qat import LateQAT
from callbacks.schedule import LRSchedule
from callbacks.wallclock import ChallengeClock
from callbacks.warmup import CompileWarmup
from pgolf import optional
from pgolf.export.config import ExportConfig


@dataclass(frozen=True)
class ChallengeCallbacks:
    """The challenge's callbacks by role. The field order is the hook order (see the module docstring)."""

    warmup: CompileWarmup
    clock: ChallengeClock
    schedule: LRSchedule
    qat: LateQAT
    progress: ProgressBar | None  # None with callbacks.progress=none
    averaging: L.Callback | None  # callbacks/averaging.py's GPTAveraging; None with callbacks.averaging.kind=none
    checkpoint: Checkpointing
    export: QuantizeExport

    @property
    def all(self) -> list[L.Callback]:
        """The present callbacks in hook order: the list to give `L.Trainer(callbacks=...)`."""
        return [cb for f in fields(self) if (cb := getattr(self, f.name)) is not None]


def build_callbacks(cfg: DictConfig, run_dir: str | Path, meta: dict) -> ChallengeCallbacks:
    """The challenge callbacks for a composed `train` config; the clock is built first and shared.

    `run_dir` receives `checkpoints/`, the artifact and `results.json`; `meta` is what the artifact records
    about the run (`pgolf.train.build.run_meta`). Raises ValueError for an unknown progress bar or averaging
    kind, or a sliding-window stride outside 1..final_eval.seq_len."""
    t, o, c = cfg.train, cfg.optim, cfg.callbacks
    clock = ChallengeClock(t.max_wallclock_seconds, t.iterations, t.log_every, reserve_seconds=t.gptq_reserve_seconds)
    schedule = LRSchedule(
        clock,
        t.iterations,
        t.warmdown_iters,
        t.max_wallclock_seconds,
        o.momentum_start,
        o.muon_momentum,
        o.momentum_warmup_steps,
        warmdown_frac=t.warmdown_frac,
        min_lr=t.min_lr,
        reserve_seconds=t.gptq_reserve_seconds,
    )
    ck = c.checkpoint
    export_cfg = ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))
    eval_cfg = OmegaConf.to_container(cfg.final_eval, resolve=True)
    progress_every = None if c.progress == "none" else float(c.progress_every_seconds)  # also after training
    config = OmegaConf.to_container(cfg, resolve=True)  # recorded in every checkpoint: what a resume must train
    checkpoint = Checkpointing(Path(run_dir) / "checkpoints", ck.every_steps, ck.keep, ck.on_sigterm, config)
    return ChallengeCallbacks(
        warmup=CompileWarmup(steps=t.warmup_steps, clock=clock, checkpoint=checkpoint),
        clock=clock,
        schedule=schedule,
        qat=LateQAT(c.late_qat_threshold),
        progress=make_progress_bar(c.progress, clock, c.progress_every_seconds, t.iterations, t.max_wallclock_seconds),
        averaging=None if c.averaging.kind == "none" else optional.get("averaging")(c.averaging),
        checkpoint=checkpoint,
        export=QuantizeExport(clock, export_cfg, run_dir, meta, eval_cfg, progress_every),
    )
