"""The challenge callbacks' wiring: one clock, built first and handed to every callback that reads it; the
bundle `build_callbacks` returns for each config; and the hook order contract of `callbacks/__init__.py`,
recorded over a tiny fit on the synthetic corpus."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir

from callbacks import build_callbacks
from callbacks.averaging import EMA, SWA
from callbacks.progress import LineProgressBar
from callbacks.wallclock import ChallengeClock
from pgolf.tools.datasets import ensure_dataset
from pgolf.train.build import build_datamodule, build_module, build_trainer, run_meta

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.grad_accum=1",  # one micro-batch per step: one on_train_batch_end per optimizer step
    "train.max_wallclock_seconds=0",
    "train.log_every=1",
    "final_eval.modes=[standard]",
    "final_eval.batch_windows=8",
    "export.rules=[{name: all, store: fp32}]",
    "export.label=fp32",
    "logger=csv",
]
HOOKS = (
    "on_train_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_end",
    "on_train_end",
)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


@pytest.mark.parametrize(
    ("progress", "averaging", "bar", "avg"),
    [("line", "ema", LineProgressBar, EMA), ("none", "swa", None, SWA), ("none", "none", None, None)],
)
def test_the_clock_is_built_once_and_handed_to_its_readers(tmp_path, progress, averaging, bar, avg):
    cfg = compose_cfg([f"callbacks.progress={progress}", f"callbacks.averaging.kind={averaging}"])
    cbs = build_callbacks(cfg, tmp_path, {})
    assert cbs.schedule.clock is cbs.clock and cbs.export.clock is cbs.clock
    if bar is None:
        assert cbs.progress is None
    else:
        assert type(cbs.progress) is bar and cbs.progress.clock is cbs.clock
    assert (cbs.averaging is None) if avg is None else (type(cbs.averaging) is avg)
    present = [getattr(cbs, f.name) for f in fields(cbs) if getattr(cbs, f.name) is not None]
    assert cbs.all == present  # the field order, without the absent ones
    assert [cb for cb in cbs.all if isinstance(cb, ChallengeClock)] == [cbs.clock]
    assert cbs.all[-1] is cbs.export


def logged(run, hook: str, role: str, log: list):
    def wrapped(trainer, *args, **kwargs):
        log.append((hook, role, trainer.global_step))
        return run(trainer, *args, **kwargs)

    return wrapped


def record_hooks(cbs, log: list) -> None:
    """Make every hook of HOOKS that a challenge callback's class overrides append (hook, role, global_step)
    to `log` before it runs."""
    for f in fields(cbs):
        cb = getattr(cbs, f.name)
        for hook in HOOKS if cb is not None else ():
            if getattr(type(cb), hook) is not getattr(L.Callback, hook):
                setattr(cb, hook, logged(getattr(cb, hook), hook, f.name, log))


def test_hook_order_contract(tmp_path, synth_dir):
    """4 steps, validation every 2, EMA, the line bar, a checkpoint every 2 steps: the hooks fire in the
    order the module docstring of `callbacks` states, and the export sees the clock's last step time."""
    cfg = compose_cfg(
        [
            f"data.root={synth_dir.parent}",
            "train.iterations=4",
            "train.val_every=2",
            "callbacks.averaging.kind=ema",
            "callbacks.progress=line",
            "callbacks.progress_every_seconds=0",
            "callbacks.checkpoint.every_steps=2",
            "model.qat=late",
        ]
    )
    ensure_dataset(cfg.data.prepare, cfg.data.root)
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, tmp_path, run_meta(cfg, tok))
    log: list = []
    record_hooks(cbs, log)
    L.seed_everything(int(cfg.seed), verbose=False)
    build_trainer(cfg, cbs.all, False).fit(module, datamodule=dm)

    start = [("on_train_start", r, 0) for r in ("warmup", "clock", "qat", "progress", "averaging", "checkpoint")]

    def step(s: int) -> list:  # optimizer step s (1-based): global_step is s - 1 before it, s after it
        before = [("on_before_optimizer_step", r, s - 1) for r in ("schedule", "qat")]
        return before + [("on_train_batch_end", r, s) for r in ("clock", "progress", "averaging", "checkpoint")]

    def val(s: int) -> list:
        return [
            ("on_validation_start", "clock", s),
            ("on_validation_epoch_start", "averaging", s),
            ("on_validation_epoch_end", "averaging", s),
            ("on_validation_end", "clock", s),
        ]

    end = [("on_train_end", r, 4) for r in ("clock", "averaging", "checkpoint", "export")]
    assert log == start + step(1) + step(2) + val(2) + step(3) + step(4) + val(4) + end
    assert module.state.last_val is not None and not module.state.preempted
    assert cbs.export.results["training"] == {"steps": 4, "train_time_ms": round(module.state.train_time_ms, 1)}
    assert 0 < module.state.train_time_ms <= cbs.clock.elapsed_ms()
