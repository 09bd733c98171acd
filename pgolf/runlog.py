"""The baseline train_gpt.py's `key:value` log lines: printed by rank 0 and appended to the run's log file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_log_file: Path | None = None


def global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
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


def log0(msg: str, console: bool = True) -> None:
    """Print on rank 0 (flushed, so SLURM logs stay current) and append to the log file."""
    if global_rank() != 0:
        return
    if console:
        print(msg, flush=True, file=sys.stdout)
    if _log_file is not None:
        with open(_log_file, "a", encoding="utf-8") as f:
            f.write(msg + "\n")
