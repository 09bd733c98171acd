"""Train a Parameter Golf model: `python train.py [experiment=NAME] [debug=smoke] [key=value ...]` (Hydra).

compose config -> validate it -> pack it (the counted code: this experiment's `train_gpt.py`, written to the
run directory; pgolf/tools/pack.py) -> prepare the data -> the run of pgolf/train/run.py, which the packed
script runs too (training, export, round trip) -> metric. Every config group is typed (pgolf/config/): a key
a group lacks, a wrong type or a value out of range stops the run with `config error: <key> ...` and exit
status 2, before any data is prepared, and leaves no run directory behind. The validation needs neither torch
nor Lightning, so `--help` and a bad override answer in about a second; the runtime is imported after it.
The run directory is this run's alone: claimed before anything is written into it, refused when it holds
another run's outputs (pgolf/tools/rundir.py). With no arguments it trains the
demo model on the Shakespeare demo corpus (prepared on first use). `python train.py -m seed=1,2,3 ...` runs
a sweep (one directory per job); a multirun job that needs several local processes runs as its own
torchrun (pgolf/tools/sweep.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pgolf.config.schema import TrainRun
from pgolf.config.validate import check_overrides, check_resume, exit_on_config_error, validate_train
from pgolf.io import atomic_write_bytes
from pgolf.runlog import global_rank
from pgolf.tools.rundir import claim, hand_over, release, settle, snapshot

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    how, before = None, None
    try:
        with exit_on_config_error():
            validate_train(cfg, CONF)
            check_resume(cfg.resume)
            # rank 0 claims the run directory before anything is written into it, noting what it held (a
            # config error puts that back); the job's other processes write nothing there (pgolf/tools/rundir.py)
            if global_rank() == 0:
                before = snapshot(run_dir, cfg.resume)
                how = claim(run_dir, cfg.resume, list(hc.overrides.task))
            else:
                how = "none"
            # Deferred on purpose: ExportConfig and the Newton-Schulz table come with torch (~2 s), imported once
            # the torch-free checks above have passed.
            from pgolf.config.runtime import check_runtime

            check_runtime(cfg)
    except SystemExit:
        release(run_dir, how, before)  # a run stopped at start-up leaves no trace (nor changes another run's files)
        raise
    settle(run_dir, how, cfg, HydraConfig.instance().cfg, hc.output_subdir)
    try:
        return train(cfg)
    except SystemExit as e:
        if e.code == 2:  # a config error found by the checks that need Lightning, or a checkpoint of another model
            release(run_dir, how, before)
        raise


def train(cfg: DictConfig) -> float | None:
    """Pack the experiment (its code record), prepare the data, then train, export and round-trip a
    validated config in the run directory rank 0 has claimed (pgolf/train/run.py); the final standard
    round-trip val_bpb."""
    # Deferred on purpose: Lightning and the training runtime (several seconds of imports) load only after
    # the config is valid (STYLE: thin entry points, validate first), so `--help` and config errors skip them.
    from pgolf.tools.datasets import ensure_dataset
    from pgolf.tools.pack import SCRIPT, pack
    from pgolf.tools.sweep import relaunch_command, run_relaunched
    from pgolf.train.run import exit_status, final_bpb, fit, prepare

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    relaunch = relaunch_command(cfg, hc, __file__)
    if relaunch is not None:
        hand_over(run_dir)  # its rank 0 takes over this job's claim
        return run_relaunched(relaunch, run_dir, hc.runtime.cwd)
    with exit_on_config_error():  # the checks that need Lightning, and the extra callbacks and loggers
        extras = prepare(cfg, run_dir)
    packed = pack(cfg)  # the counted code: this experiment's train_gpt.py, kept in the run directory
    if global_rank() == 0:
        atomic_write_bytes(run_dir / SCRIPT, packed.script)
    ensure_dataset(cfg.data.prepare, cfg.data.get("root"))
    config_file = run_dir / (hc.output_subdir or ".hydra") / "resolved.yaml"
    results = fit(cfg, run_dir, extras, packed.code, run_dir / "train.log", config_file, packed.requirements)
    status = exit_status(cfg, results)
    if status:
        sys.exit(status)
    return final_bpb(results)


if __name__ == "__main__":
    with exit_on_config_error():  # a misspelled key on the command line, named before Hydra composes
        check_overrides(sys.argv[1:], TrainRun, CONF)
    main()
