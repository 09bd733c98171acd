"""Exact-resume checkpoints, preemption, and SIGTERM after training.

A checkpoint is Lightning's (weights, the one optimizer's state — every rank holds all Muon momentum, so
rank 0's copy is complete —, loop counters, callback states: clock offset, averaging, late-QAT switch; the
DataModule's stream position) plus the RNG states (GolfModule adds them) and the run's resolved config
(`config`): a resume whose config trains otherwise is refused (`check_resume_config`).
`pgolf.train.build.AtomicCheckpointIO` writes it to a temporary file, fsyncs and renames,
so a crash mid-write never leaves a truncated checkpoint.

`Checkpointing` saves every `every_steps` optimizer steps (at step boundaries only, after the challenge
clock has checked the step's loss, so a non-finite step is never saved) and keeps the newest `keep`. On
SIGTERM (preemption) it saves at the next step boundary — the decision is reduced across ranks, so all
stop on the same step — marks the run preempted (the export is skipped) and stops training cleanly. One
that arrives after the last step boundary's check saves `last.ckpt` at the end of training and stops the
run as below. With `on_sigterm: false` nothing is saved: the run stops at that step boundary with
`Terminated`. Its handler replaces Lightning's in either case: Lightning 2.6's broadcasts from inside the
signal handler (Lightning PR #20825), a collective out of order with the step's own, so a DDP run under
torchrun hung until torchrun killed it (seen with two CPU ranks). One during the compile warm-up
(callbacks/warmup.py, which installs the handler first) stops the run at the next warm-up step boundary with
`Terminated`: nothing has trained, the same command starts again.

From the end of training on (export, round trip, final evaluations: minutes of work that no checkpoint can
resume), SIGTERM stops the run at once, with or without `on_sigterm`: the handler raises `Terminated` (a
`SystemExit` with status 143, as a shell reports a process ended by SIGTERM), which unwinds through
Lightning; pgolf/train/run.py logs one line naming the phase and what was already written. Files are only
ever written whole (pgolf/io.py's atomic writes remove their temporary file when interrupted), so an
artifact written before the signal stays, and `results.json` is not written. Lightning restores the
handlers it found before `fit` when `fit` returns.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from pgolf.config.typed import ConfigError
from pgolf.io import atomic_path
from pgolf.runlog import current_phase, log0, set_phase

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: the status a shell reports for a process ended by SIGTERM
# Config keys (prefixes) a resume may change: what a run logs (its own lines and Lightning's), validates, exports
# and evaluates, where its data is (another machine's DATA_PATH; the shards' manifest names their tokenizer), how
# its steps are compiled. The others define its training: a run resumed with other values is reproduced by no one
# command.
RESUME_MAY_CHANGE = (
    "name",
    "resume",
    "variant",
    "logger",
    "final_eval",
    "export",
    "data",
    "callbacks.progress",
    "callbacks.checkpoint",
    "callbacks.extra",
    "callbacks.averaging.validate",
    "train.log_every",
    "train.val_every",
    "train.compile",
    "train.warmup_steps",
    "trainer.log_every_n_steps",
    "trainer.profiler",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)


class Terminated(SystemExit):
    """SIGTERM after training: raised by the handler `Checkpointing` installs at the end of training, so the
    export or evaluation in progress stops at once; or during the compile warm-up (callbacks/warmup.py).
    `phase` names it (pgolf.runlog.set_phase); the exit status is EXIT_TERMINATED."""

    def __init__(self, phase: str):
        super().__init__(EXIT_TERMINATED)
        self.phase = phase


def install_sigterm(handler) -> bool:
    """Install `handler` for SIGTERM; False (nothing installed) outside the main thread."""
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # signal handlers can only be set from the main thread
        return False
    return True


class Checkpointing(L.Callback):
    def __init__(self, dirpath: str | Path, every_steps: int = 0, keep: int = 2, on_sigterm: bool = True, config=None):
        self.dirpath = Path(dirpath)
        self.config = config  # the run's resolved config (a plain dict), recorded in every checkpoint
        self.every, self.keep, self.on_sigterm = int(every_steps), int(keep), on_sigterm
        self._last_step = -1
        self._sigterm = False
        self._launcher = None
        self.saved: list[Path] = []

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        self.arm()

    def arm(self) -> None:
        """Install the SIGTERM flag handler over Lightning's own (which broadcasts from inside the handler,
        raises mid-accumulation and ends a run with status 0), with or without on_sigterm: the compile warm-up
        calls it first, as it runs before this callback's `on_train_start` (Lightning installs its handler just
        before that hook)."""
        install_sigterm(self._handle)

    def _handle(self, signum, frame) -> None:
        self._sigterm = True

    def sigterm(self, trainer) -> bool:
        """Whether SIGTERM reached any rank (ours, or Lightning's handler before ours): a collective, called
        by every rank at the same step boundary."""
        return trainer.strategy.reduce_boolean_decision(self._sigterm or trainer.received_sigterm, all=False)

    def on_train_end(self, trainer, pl_module):
        set_phase("the end of training")
        self._launcher = trainer.strategy.launcher
        # A SIGTERM after the last step boundary's check (ours, or Lightning's flag before ours was installed).
        late = not pl_module.state.preempted and self.sigterm(trainer)
        install_sigterm(self._terminate)
        if late:
            if self.on_sigterm:
                path = self.save(trainer, "last.ckpt")
                log0(
                    f"SIGTERM received at the end of training; checkpoint of step {trainer.global_step} saved to "
                    f"checkpoints/{path.name}; the export does not run"
                )
            raise Terminated(current_phase())

    def _terminate(self, signum, frame) -> None:
        # Lightning's own handler forwards the signal to the processes its launcher started (DDP on one
        # machine); ours replaces it, so it forwards too, then unwinds the export or evaluation in progress.
        kill = getattr(self._launcher, "kill", None)
        if kill is not None:
            kill(signum)
        raise Terminated(current_phase())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.config is not None:
            checkpoint["config"] = self.config

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = step
        if self.sigterm(trainer):
            if not self.on_sigterm:
                raise Terminated(f"training, after step {step} (callbacks.checkpoint.on_sigterm=false: no checkpoint)")
            self.preempt(trainer, pl_module, step)
        elif self.every > 0 and step % self.every == 0:
            self.save(trainer, f"step{step:06d}.ckpt")

    def preempt(self, trainer, pl_module, step: int) -> None:
        """Save `checkpoints/last.ckpt`, mark the run preempted (no export) and stop training."""
        path = self.save(trainer, "last.ckpt")
        pl_module.state.preempted = True
        log0(f"preempted: SIGTERM received; checkpoint of step {step} saved to checkpoints/{path.name}")
        log0(resume_hint(path, self.dirpath.parent))
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates after a stop request: the grace period is not for that

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


def check_resume_config(cfg: DictConfig) -> None:
    """A resume (`cfg.resume`) trains on as the checkpoint's run did: its config, which the checkpoint records,
    and `cfg` agree but in RESUME_MAY_CHANGE (a checkpoint without the record is not compared). Raises
    ConfigError naming the keys that differ (old -> new), or a file that is not a checkpoint."""
    if cfg.get("resume") is None:
        return
    try:
        old = torch.load(cfg.resume, map_location="cpu", weights_only=True, mmap=True).get("config")
    except Exception as e:
        raise ConfigError(f"resume={cfg.resume}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if old is None:
        return
    old, new = _flat(old), _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in old.keys() | new.keys() if not k.startswith(RESUME_MAY_CHANGE))
    diff = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]
    if diff:
        raise ConfigError(
            f"resume={cfg.resume}: the checkpoint's run trained another config ({'; '.join(diff)}); resume with "
            "its values, or start a new run"
        )


def _flat(d: dict, pre: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{pre}{k}.") if isinstance(v, dict) and v else {f"{pre}{k}": v})
    return out


def resume_hint(path: Path, run_dir: Path | None = None) -> str:
    """`resume with: <command> resume=<checkpoint>`: paths relative to where the run started, or absolute
    when that path would climb out of it (a run directory elsewhere). Given the run's directory `run_dir`,
    `train.py`'s command names it (`hydra.run.dir=`), so that the resume continues in place
    (pgolf/tools/rundir.py) instead of in a new time-stamped directory; the packed train_gpt.py's run
    directory is the current folder, so its command is run from there (a shell comment says so)."""
    command = resume_command()
    if run_dir is None:
        return f"resume with: {command} resume={_shown(path)}"
    if _program() == "train.py":
        return f"resume with: {command} hydra.run.dir={_shown(run_dir)} resume={_shown(path)}"
    return f"resume with: {command} resume={_shown(path)}  # from this folder"


def _shown(path: Path) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(Path(path).absolute())


def resume_command() -> str:
    """How the run was started, for the resume hint: `train.py`'s overrides, or the packed train_gpt.py's
    environment variables (the same `RUN_ID`, named when it is set: the resumed run appends to the log
    `logs/<RUN_ID>.txt`) and overrides."""
    prog = _program()
    if prog == "train.py":
        return "python train.py <same overrides>"
    n = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    launch = f"torchrun --standalone --nproc_per_node={n}" if n > 1 else "python"
    run_id = os.environ.get("RUN_ID")
    env = f"<same environment> RUN_ID={run_id}" if run_id else "<same environment, RUN_ID included>"
    return f"{env} {launch} {prog} <same overrides>"


def _program() -> str:
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "train.py"
