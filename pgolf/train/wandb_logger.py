"""The W&B logger (`logger=wandb`): one run per job, created and finished on global rank 0 only.

Lightning's WandbLogger creates its run lazily and only where `rank_zero_only.rank == 0` (torchrun, SLURM
tasks and Lightning's own child processes all get their rank from the environment before any run exists),
so ranks > 0 never start one. Project/group/name/tags come from the experiment, its variant and the
seed (`pgolf.train.identity.RunIdentity`), the config is the resolved one, the train curves are the clock
callback's `log_metrics` calls (x-axis `trainer/global_step`), and at the end of the job the export sizes
and every eval mode's result go into the run summary before the run is finished (also when the job
fails), so the next job of a multirun starts its own run. Offline unless credentials are configured;
offline runs are uploaded later with `wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pgolf.config.schema import WANDB_MODES
from pgolf.optional import register
from pgolf.train.identity import identity_of_job


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto`: WANDB_MODE when it is set, else online with credentials and offline without."""
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "")
        if env in WANDB_MODES:
            return env
        if env == "dryrun":
            return "offline"
        return "online" if has_credentials() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be auto, online, offline or disabled, got {mode!r}")
    return mode


@register("wandb")
def make_wandb_logger(cfg: DictConfig, run_dir: Path):
    try:
        import wandb
        from lightning.pytorch.loggers import WandbLogger
        from lightning.pytorch.utilities import rank_zero_only
    except ImportError as e:
        raise RuntimeError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from e

    lg = cfg.logger
    mode = resolve_mode(lg.mode)
    ident = identity_of_job(cfg, run_dir)
    if rank_zero_only.rank == 0 and wandb.run is not None:
        # A run left open in this process by an earlier job that died before finishing it: close it
        # as failed, so that this job does not log into it (WandbLogger would silently reuse it).
        wandb.run.finish(exit_code=1)
    tags = list(dict.fromkeys([*(str(t) for t in lg.tags or []), *ident.tags(), model_tag(cfg)]))
    config = OmegaConf.to_container(cfg, resolve=True)
    config["identity"] = {"group": ident.group, "variant": ident.variant, "run_dir": Path(run_dir).name}
    # `mode` goes to wandb.init; WandbLogger's own `offline=True` would set WANDB_MODE in os.environ,
    # which then leaks into every later job of the same multirun process.
    return WandbLogger(
        project=lg.project,
        entity=lg.entity,
        group=lg.group or ident.group,
        name=lg.job_name or ident.job_name,
        tags=tags,
        save_dir=str(run_dir),
        mode=mode,
        config=config,
        job_type="train",
    )


def model_tag(cfg: DictConfig) -> str:
    return f"model:{cfg.model.num_layers}L{cfg.model.model_dim}d"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def summary_of(results: dict) -> dict:
    """The run summary: every scalar of the job's results (export sizes, `roundtrip/<mode>/...` for every
    eval mode, training steps and time), file paths reduced to their names."""
    flat = flatten(results)
    return {k: Path(v).name if k.endswith("path") and isinstance(v, str) else v for k, v in flat.items()}


@register("wandb_finish")
def finish_wandb(logger, results: dict, exit_code: int = 0) -> None:
    """Put the results in the run summary and finish the run (rank 0; other ranks never created one)."""
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    if logger._experiment is None and not results:
        return
    run = logger.experiment
    if results:
        run.summary.update(summary_of(results))
    run.finish(exit_code=exit_code)
    logger._experiment = None
