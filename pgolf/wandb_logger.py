"""The W&B logger: rank 0 only (Lightning's WandbLogger creates its run lazily on global rank 0), names
derived from the experiment and seed, offline unless credentials are configured (`wandb sync` later)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if has_credentials() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode must be auto, online, offline or disabled, got {mode!r}")
    return mode


def make_wandb_logger(cfg: DictConfig, run_dir: Path):
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as e:  # pragma: no cover - lightning always ships it
        raise RuntimeError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from e
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise RuntimeError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from e
    lg = cfg.logger
    mode = resolve_mode(lg.mode)
    tags = [str(t) for t in (lg.tags or [])] + [
        f"seed:{cfg.seed}",
        f"model:{cfg.model.num_layers}L{cfg.model.model_dim}d",
    ]
    return WandbLogger(
        project=lg.project,
        entity=lg.entity,
        group=lg.group,
        name=lg.job_name,
        tags=tags,
        save_dir=str(run_dir),
        offline=mode == "offline",
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
        job_type="train",
    )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def finish_wandb(logger, results: dict) -> None:
    """Put the export sizes and every eval mode's result in the run summary, then finish the run, so the
    next job of a multirun starts its own run (rank 0 only; other ranks never created one)."""
    import wandb
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0 or logger._experiment is None and not results:
        return
    run = logger.experiment
    run.summary.update(flatten(results))
    wandb.finish()
    logger._experiment = None
