"""Train a Parameter Golf model: `python train.py [experiment=NAME] [debug=smoke] [key=value ...]` (Hydra).

compose config -> validate it -> seed -> data, module, callbacks, trainer -> fit (training, export, round
trip) -> metric. Every config group is typed (pgolf/config/): a key a group lacks, a wrong type or a value
out of range stops the run with `config error: <key> ...` and exit status 2, before any data is prepared.
The validation needs neither torch nor Lightning, so `--help` and a bad override answer in about a second;
the runtime is imported after it. With no arguments it trains the demo model on the Shakespeare demo corpus
(prepared on first use). `python train.py -m seed=1,2,3 ...` runs a sweep (one directory per job); a
multirun job that needs several local processes runs as its own torchrun (pgolf/tools/sweep.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pgolf.config.schema import TrainRun
from pgolf.config.validate import check_overrides, exit_on_config_error, validate_train
from pgolf.runlog import log0, set_log_file

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_config_error():
        validate_train(cfg, CONF)
        # Deferred on purpose: ExportConfig and the Newton-Schulz table come with torch (~2 s), imported once the
        # torch-free checks above have passed.
        from pgolf.config.runtime import check_runtime

        check_runtime(cfg)
    return fit(cfg)


def fit(cfg: DictConfig) -> float | None:
    """Train, export and round-trip a validated config; the final standard round-trip val_bpb."""
    # Deferred on purpose: Lightning and the training runtime (several seconds of imports) load only after
    # the config is valid (STYLE: thin entry points, validate first), so `--help` and config errors skip them.
    import lightning as L

    from callbacks import build_callbacks
    from callbacks.header import RunHeader
    from pgolf.tools.datasets import ensure_dataset
    from pgolf.tools.sweep import relaunch_command, run_relaunched
    from pgolf.train import build

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    relaunch = relaunch_command(cfg, hc, __file__)
    if relaunch is not None:
        return run_relaunched(relaunch, run_dir, hc.runtime.cwd)
    with exit_on_config_error():  # the checks that need Lightning, and the extra callbacks and loggers
        build.check_lightning_config(cfg)
        extra_callbacks = build.build_extra_callbacks(cfg)
        loggers = build.build_logger(cfg, run_dir)
    set_log_file(run_dir / "train.log")
    build.save_resolved_config(cfg, run_dir, hc.output_subdir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    ensure_dataset(cfg.data.prepare, cfg.data.get("root"))
    dm = build.build_datamodule(cfg)
    module, tokenizer = build.build_module(cfg, cfg.data.tokenizer_path)
    meta = build.run_meta(cfg, tokenizer)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    header = RunHeader(lambda tr, pl: build.log_header(cfg, pl, tr.datamodule, tokenizer, tr.world_size))
    challenge = build_callbacks(cfg, run_dir, meta)
    trainer = build.build_trainer(cfg, [header, *challenge.all, *extra_callbacks], loggers)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.resume)
    except BaseException:
        build.finish_logger(loggers, {}, exit_code=1)  # one finished run per job, also when it fails
        raise
    if module.state.preempted:
        build.finish_logger(loggers, {"preempted": True})
        log0("exiting cleanly after preemption (no export)")
        return None

    results = challenge.export.results
    build.finish_logger(loggers, results)
    if results and not results.get("size_ok", True) and cfg.export.fail_over_limit:
        log0("error: the artifact is over the size limit (export.fail_over_limit=true)")
        sys.exit(3)
    final = results.get("roundtrip", {}).get("standard")
    return final["val_bpb"] if final else None


if __name__ == "__main__":
    with exit_on_config_error():  # a misspelled key on the command line, named before Hydra composes
        check_overrides(sys.argv[1:], TrainRun, CONF)
    main()
