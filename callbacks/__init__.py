"""Thin Lightning adapters over pgolf: challenge clock, LR schedule, compile warm-up, late QAT, weight
averaging, checkpoints/preemption, export, progress bar.

`build_callbacks` orders them so that everything that changes the weights at the end of training runs
before the export callback (Lightning calls callbacks in list order)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from callbacks.averaging import build_averaging
from callbacks.checkpoint import Checkpointing
from callbacks.export import QuantizeExport
from callbacks.progress import make_progress_bar
from callbacks.qat import LateQAT
from callbacks.schedule import LRSchedule
from callbacks.wallclock import ChallengeClock
from callbacks.warmup import CompileWarmup
from pgolf.export.config import ExportConfig


def build_callbacks(cfg: DictConfig, run_dir: str | Path, meta: dict) -> list:
    """The warm-up restores the initial state before the clock starts; the schedule sets this step's LR
    scale before late QAT reads it; weight averaging updates before a checkpoint is taken and swaps in its
    weights before the export, which comes last."""
    t, o, c = cfg.train, cfg.optim, cfg.callbacks
    cbs = [
        CompileWarmup(steps=t.warmup_steps),
        ChallengeClock(t.max_wallclock_seconds, t.iterations, t.log_every),
        LRSchedule(
            t.iterations,
            t.warmdown_iters,
            t.max_wallclock_seconds,
            o.momentum_start,
            o.muon_momentum,
            o.momentum_warmup_steps,
        ),
        LateQAT(c.late_qat_threshold),
    ]
    bar = make_progress_bar(c.progress, c.progress_every_seconds, t.iterations, t.max_wallclock_seconds)
    if bar is not None:
        cbs.append(bar)
    cbs += build_averaging(c.averaging)
    ck = c.checkpoint
    cbs.append(Checkpointing(Path(run_dir) / "checkpoints", ck.every_steps, ck.keep, ck.on_sigterm))
    export_cfg = ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))
    eval_cfg = OmegaConf.to_container(cfg.final_eval, resolve=True)
    cbs.append(QuantizeExport(export_cfg, run_dir, meta, eval_cfg))
    return cbs
