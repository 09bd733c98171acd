"""Multirun jobs with several local processes.

Lightning launches the ranks of a multi-device job by re-running the command line of the
parent. Under a Hydra multirun that command line is the whole sweep, so each child runs every job of the
sweep itself, in a sweep directory of its own (a hang or stray directories; Lightning PR #18175 is
still open). A multirun job that needs several local processes and was not started by a launcher that
creates them (torchrun, SLURM tasks) is therefore run as one `torchrun --standalone` of this job's own
overrides into this job's directory, and the parent job waits for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra.types import RunMode

from pgolf.train.build import world_size_of


# ---- multirun jobs with several local processes ----------------------------------------------------------
def externally_launched(env: dict | None = None) -> bool:
    """True when the processes of this job already exist (torchrun, SLURM tasks, a Lightning child)."""
    env = os.environ if env is None else env
    return any(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))


def relaunch_command(cfg, hydra_cfg, script: str | Path, env: dict | None = None) -> list[str] | None:
    """The torchrun command that runs this multirun job on its own, or None when no relaunch is needed."""
    if hydra_cfg.mode != RunMode.MULTIRUN or externally_launched(env):
        return None
    nodes = int(cfg.trainer.get("num_nodes", 1))
    world = world_size_of(cfg.trainer)
    if world <= 1:
        return None
    if nodes != 1:
        raise ValueError(
            f"trainer.num_nodes={nodes}: a multi-node multirun needs a launcher that starts the processes "
            "(hydra/launcher=slurm), not the local one"
        )
    run_dir = Path(hydra_cfg.runtime.output_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd += [str(Path(script).resolve())]
    if hydra_cfg.job.config_name and hydra_cfg.job.config_name != "train":
        cmd += [f"--config-name={hydra_cfg.job.config_name}"]
    for src in hydra_cfg.runtime.config_sources:
        if src.provider == "command-line" and src.schema == "file":
            cmd += [f"--config-dir={src.path}"]
    cmd += list(hydra_cfg.overrides.task)
    # The job's directory and config files already exist (written by this parent job).
    cmd += [f'hydra.run.dir="{run_dir}"', "hydra.output_subdir=null"]
    return cmd


def run_relaunched(cmd: list[str], run_dir: str | Path, cwd: str | Path) -> float | None:
    """Run the job under torchrun, wait for it, and return its final standard round-trip val_bpb."""
    r = subprocess.run(cmd, cwd=cwd)
    if r.returncode != 0:
        name = Path(run_dir).name
        raise RuntimeError(f"the job in {name} failed under torchrun (exit {r.returncode}); see its train.log")
    res = Path(run_dir) / "results.json"
    if not res.is_file():
        return None
    final = json.loads(res.read_text()).get("roundtrip", {}).get("standard")
    return final["val_bpb"] if final else None
