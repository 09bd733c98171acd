"""Train a Parameter Golf model: `python train.py [experiment=NAME] [key=value ...]` (Hydra).

compose config -> seed -> data, module, callbacks, trainer -> fit (training, export, round trip) -> metric.
With no arguments it trains the demo model on the Shakespeare demo corpus (prepared on first use).
`python train.py -m seed=1,2,3 ...` runs a sweep (one directory per job); a multirun job that needs several
local processes runs as its own torchrun (pgolf/sweep.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from callbacks import build_callbacks
from callbacks.header import RunHeader
from pgolf.runlog import log0, set_log_file
from pgolf.tools.datasets import ensure_dataset
from pgolf.tools.sweep import relaunch_command, run_relaunched
from pgolf.train.build import (
    build_datamodule,
    build_logger,
    build_module,
    build_trainer,
    finish_logger,
    log_header,
    run_meta,
    save_resolved_config,
)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    relaunch = relaunch_command(cfg, hc, __file__)
    if relaunch is not None:
        return run_relaunched(relaunch, run_dir, hc.runtime.cwd)
    set_log_file(run_dir / "train.log")
    save_resolved_config(cfg, run_dir, hc.output_subdir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    ensure_dataset(cfg.data.prepare, cfg.data.get("root"))
    dm = build_datamodule(cfg)
    module, tokenizer = build_module(cfg, cfg.data.tokenizer_path)
    meta = run_meta(cfg, tokenizer)
    loggers = build_logger(cfg, run_dir)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    header = RunHeader(lambda tr, pl: log_header(cfg, pl, tr.datamodule, tokenizer, tr.world_size))
    trainer = build_trainer(cfg, [header, *build_callbacks(cfg, run_dir, meta)], loggers)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.resume)
    except BaseException:
        finish_logger(loggers, {}, exit_code=1)  # one finished run per job, also when it fails
        raise
    if module.preempted:
        finish_logger(loggers, {"preempted": True})
        log0("exiting cleanly after preemption (no export)")
        return None

    export = next((cb for cb in trainer.callbacks if cb.__class__.__name__ == "QuantizeExport"), None)
    results = export.results if export is not None else {}
    finish_logger(loggers, results)
    if results and not results.get("size_ok", True) and cfg.export.fail_over_limit:
        log0("error: the artifact is over the size limit (export.fail_over_limit=true)")
        sys.exit(3)
    final = results.get("roundtrip", {}).get("standard")
    return final["val_bpb"] if final else None


if __name__ == "__main__":
    main()
