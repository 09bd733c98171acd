"""The baseline train_gpt.py's `key:value` log lines: printed by rank 0 and appended to the run's log file;
the progress lines of long phases (`Progress`), and the name of the phase the run is in (`set_phase`), which
a SIGTERM after training names when it stops the run (callbacks/checkpoint.py)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

_log_file: Path | None = None
_phase = "start-up"


def global_rank() -> int:
    # A process group exists only once torch.distributed is loaded: asking never imports torch (train.py
    # claims its run directory before it imports torch).
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    # Before the process group exists: torchrun's RANK, Lightning's LOCAL_RANK for the processes it starts,
    # SLURM's task id for `srun` tasks (hydra/launcher=slurm), as Lightning's rank_zero_only does.
    env = os.environ
    return int(env.get("RANK", env.get("LOCAL_RANK", env.get("SLURM_PROCID", 0))))


def set_log_file(path: str | os.PathLike | None) -> None:
    global _log_file
    _log_file = Path(path) if path else None
    if _log_file is not None and global_rank() == 0:
        _log_file.parent.mkdir(parents=True, exist_ok=True)


def log0(msg: str, console: bool = True, file: bool = True) -> None:
    """Print on rank 0 (flushed, so SLURM logs stay current) and append to the log file (`file=False`: the
    console only, for lines that depend on timing, such as progress lines)."""
    if global_rank() != 0:
        return
    if console:
        print(msg, flush=True, file=sys.stdout)
    if file and _log_file is not None:
        with open(_log_file, "a", encoding="utf-8") as f:
            f.write(msg + "\n")


def set_phase(name: str) -> None:
    """Name the phase the run is in (`the round trip (sliding)`): what a SIGTERM after training reports."""
    global _phase
    _phase = name


def current_phase() -> str:
    return _phase


class Progress:
    """Progress lines of one long phase, e.g. an evaluation pass over the validation set.

    One self-contained line (no carriage return, so it reads in a log file or a SLURM log) at most every
    `every_seconds` of wall time, on rank 0, on the console only (train.log stays comparable line for line
    with the reference logs): `progress: <phase> 41.3% (81,920 of 198,400 targets) elapsed 9s eta 13s`.
    `every_seconds` 0: a line at every `advance`; None: no lines. `total` <= 0: no percentage or ETA.
    `clock` returns seconds (time.monotonic; a test hands in its own)."""

    def __init__(
        self,
        phase: str,
        total: int,
        unit: str,
        every_seconds: float | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.phase, self.total, self.unit = phase, int(total), unit
        self.every = None if every_seconds is None else float(every_seconds)
        self.clock = clock
        self.done = 0
        self.lines = 0  # progress lines printed
        self._t0 = self._last = clock()

    def advance(self, n: int) -> None:
        """`n` more units done; print a line when `every_seconds` have passed since the last one."""
        self.done += int(n)
        if self.every is None:
            return
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self.lines += 1
            log0(self.line(now - self._t0), file=False)

    def line(self, elapsed: float) -> str:
        """The progress line after `elapsed` seconds."""
        if self.total <= 0:
            return f"progress: {self.phase} {self.done:,} {self.unit} elapsed {elapsed:.0f}s"
        frac = min(self.done / self.total, 1.0)
        eta = f"{elapsed / frac - elapsed:.0f}s" if frac > 0 else "?"
        return (
            f"progress: {self.phase} {100 * frac:.1f}% ({self.done:,} of {self.total:,} {self.unit}) "
            f"elapsed {elapsed:.0f}s eta {eta}"
        )
