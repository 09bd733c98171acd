"""The challenge callbacks' wiring: one clock, built first and handed to every callback that reads it; the
bundle `build_callbacks` returns for each config; and the hook order contract of `callbacks/__init__.py`,
recorded over a tiny fit on the synthetic corpus. Then, over two tiny fits with EMA and a validation at every
step: which weights validation scores (`callbacks.averaging.validate`), which evaluation passes the export
reuses, `final_eval.max_tokens`, results.json's relative paths and the progress lines after training."""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from callbacks import build_callbacks
from callbacks.averaging import EMA, SWA
from callbacks.progress import LineProgressBar
from callbacks.schedule import LRSchedule
from callbacks.wallclock import ChallengeClock
from callbacks.warmup import CompileWarmup
from pgolf.eval.core import EvalContext
from pgolf.export.roundtrip import MAX_TOKENS_REASON
from pgolf.export.stages import pre_quant_diagnostic
from pgolf.optim.schedule import lr_scale
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
    order the module docstring of `callbacks` states (the step-0 validation before training starts; the last
    step's validation once, though the step budget ends training there too), and the export sees the clock's
    last step time."""
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

    start = [("on_train_start", r, 0) for r in ("warmup", "clock", "schedule", "qat", "progress", "averaging")]
    start += [("on_train_start", "checkpoint", 0)]

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
    assert log == val(0) + start + step(1) + step(2) + val(2) + step(3) + step(4) + val(4) + end
    assert module.state.last_val is not None and not module.state.preempted
    assert cbs.export.results["training"] == {"steps": 4, "train_time_ms": round(module.state.train_time_ms, 1)}
    assert 0 < module.state.train_time_ms <= cbs.clock.elapsed_ms()


# ---- which weights validation scores; what the export reuses; max_tokens, paths and progress lines ----------
class WeightRecorder(L.Callback):
    """The GPT's weights at the start of training, after every optimizer step (after the averaging update) and
    at the start of every validation (after the averaging's swap, if any): listed after the averaging."""

    def __init__(self):
        self.steps: list[dict] = []
        self.validated: list[dict] = []
        self._last = 0

    @staticmethod
    def weights(pl_module) -> dict:
        return {k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()}

    def on_train_start(self, trainer, pl_module):
        self.initial = self.weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.steps.append(self.weights(pl_module))

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated.append(self.weights(pl_module))


def fit_captured(run_dir: Path, synth_dir: Path, overrides: list[str], recorder: L.Callback) -> SimpleNamespace:
    """A tiny in-process fit with every challenge callback (the recorder after the averaging), its stdout."""
    cfg = compose_cfg([f"data.root={synth_dir.parent}", *overrides])
    ensure_dataset(cfg.data.prepare, cfg.data.root)
    dm = build_datamodule(cfg)
    torch.manual_seed(0)  # the same initial weights in every run
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, run_dir, run_meta(cfg, tok))
    order = cbs.all
    order.insert(order.index(cbs.averaging) + 1, recorder)
    L.seed_everything(int(cfg.seed), verbose=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        build_trainer(cfg, order, False).fit(module, datamodule=dm)
    results = json.loads((run_dir / "results.json").read_text())
    out = out.getvalue()
    return SimpleNamespace(dir=run_dir, dm=dm, module=module, cbs=cbs, out=out, rec=recorder, results=results)


@pytest.fixture(scope="module")
def validated_runs(tmp_path_factory, synth_dir):
    """2 steps with EMA (decay 0.5) and a validation after each, once per `callbacks.averaging.validate`; the
    raw run also evaluates `sliding` after training, on the first 256 validation targets only. The token
    embedding is a bf16 table (`model.embed_dtype=bf16`, the records' policy): its EMA is kept in fp32."""
    common = [
        "model.embed_dtype=bf16",
        "train.iterations=2",
        "train.val_every=1",
        "callbacks.averaging.kind=ema",
        "callbacks.averaging.ema_decay=0.5",
        "callbacks.progress=line",
        "callbacks.progress_every_seconds=0",
    ]
    raw_only = ["final_eval.modes=[standard,sliding]", "final_eval.stride=16", "final_eval.max_tokens=256"]
    return {
        v: fit_captured(
            tmp_path_factory.mktemp(v),
            synth_dir,
            [*common, f"callbacks.averaging.validate={v}", *(raw_only if v == "raw" else [])],
            WeightRecorder(),
        )
        for v in ("raw", "averaged")
    }


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_validation_scores_the_raw_or_the_averaged_weights(validated_runs):
    """validate=raw (the records' way) scores the training weights; validate=averaged the EMA, swapped in and
    back: training goes on exactly as with raw, and the log says which weights were scored."""
    raw, avg = validated_runs["raw"], validated_runs["averaged"]
    assert len(raw.rec.steps) == len(avg.rec.steps) == 2 and len(raw.rec.validated) == len(avg.rec.validated) == 3
    assert same(raw.rec.initial, avg.rec.initial)
    for run in (raw, avg):  # step 0 (the sanity check, before training) scores the initial weights, never swapped
        assert same(run.rec.validated.pop(0), run.rec.initial)
        assert re.search(r"^step:0/2 val_loss:\S+ val_bpb:\S+ train_time:0ms step_avg:0.00ms$", run.out, re.M)
    assert all(same(a, b) for a, b in zip(raw.rec.steps, avg.rec.steps))  # the swap back restored every bit
    assert all(same(v, w) for v, w in zip(raw.rec.validated, raw.rec.steps))
    assert avg.rec.initial["tok_emb.weight"].dtype == torch.bfloat16
    ema = {k: v.float() if torch.is_floating_point(v) else v for k, v in avg.rec.initial.items()}
    for v, w in zip(avg.rec.validated, avg.rec.steps):  # an fp32 average, swapped in rounded to each dtype
        ema = {k: 0.5 * ema[k] + 0.5 * w[k].float() if torch.is_floating_point(w[k]) else w[k] for k in w}
        assert all(v[k].dtype == w[k].dtype for k in v)
        assert all(torch.allclose(v[k].float(), ema[k].to(v[k].dtype).float(), atol=1e-6) for k in v)
        assert not same(v, w)
    assert raw.module.state.last_val["val_bpb"] != avg.module.state.last_val["val_bpb"]
    said = "ema:validation during training scores the {} (callbacks.averaging.validate={})"
    assert said.format("raw training weights", "raw") in raw.out
    assert said.format("EMA weights", "averaged") in avg.out


def test_the_export_reuses_a_pass_only_where_it_gives_the_same_number(validated_runs):
    """averaged: the last validation (step 2) scored the EMA weights that are exported: it is the pre-quant
    figure, and it equals a fresh standard pass on them. raw: it scored other weights, so the pre-quant pass
    runs; the fp32 export is lossless, so the round trip's standard pass reuses the pre-quant figure."""
    raw, avg = validated_runs["raw"], validated_runs["averaged"]
    pre = avg.results["export"]["pre_quant"]
    assert pre["reused_from"].startswith("the validation at step 2") and pre["seconds"] == 0.0
    assert pre["val_bpb"] == avg.module.state.last_val["val_bpb"] and pre["tokens"] == pre["targets"]
    assert "eval_time:0ms (reused: the validation at step 2 scored these weights on the same windows)" in avg.out
    ctx = EvalContext(avg.module.luts, torch.device("cpu"), 32, 8)
    fresh = pre_quant_diagnostic(avg.module.gpt, avg.dm.val_tokens, ctx)  # the exported (EMA) weights, eagerly
    assert fresh.val_bpb == pytest.approx(pre["val_bpb"], rel=1e-6) and fresh.tokens == pre["tokens"]
    assert "reused_from" not in avg.results["roundtrip"]["standard"]  # a different code path stands in for none
    rpre, rt = raw.results["export"]["pre_quant"], raw.results["roundtrip"]
    assert "reused_from" not in rpre and rpre["seconds"] > 0
    assert rt["standard"]["reused_from"] == "pre_quant" and rt["standard"]["val_bpb"] == rpre["val_bpb"]
    assert "final_eval:standard reused the DIAGNOSTIC pre_quant figure" in raw.out
    assert "reused_from" not in rt["sliding"] and rt["sliding"]["seconds"] > 0


def test_max_tokens_relative_paths_and_progress_lines(validated_runs):
    raw = validated_runs["raw"]
    res, text = raw.results, (raw.dir / "results.json").read_text()
    assert res["final_eval"] == {
        "max_tokens": 256,
        "targets": 256,
        "of_targets": raw.dm.val_tokens.numel() - 1,
        "compliant": False,
        "reason": MAX_TOKENS_REASON,
    }
    assert res["export"]["pre_quant"]["targets"] == 256
    for mode, r in res["roundtrip"].items():
        assert r["targets"] == 256 and not r["compliant"] and r["reason"].startswith(MAX_TOKENS_REASON), mode
    assert "final_eval:max_tokens=256: the first 256 of" in raw.out and "NOT the challenge's metric" in raw.out
    assert res["export"]["path"] == "final_model.fp32.ptz" and res["export"]["float_path"] == "final_model.float.ptz"
    assert str(raw.dir) not in text and '": "/' not in text  # no machine paths
    for phase in ("pre_quant", "final_eval sliding"):
        assert f"progress: {phase} " in raw.out and "eta" in raw.out
    assert "\r" not in raw.out


def test_the_challenge_clock_runs_over_a_block_after_training(monkeypatch):
    """`running` counts the block's time on the clock (GPTQ calibration after the last step) and nothing
    outside it; the clock is paused again afterwards, even when the block fails."""
    ticks = iter([100.0, 103.0, 200.0, 201.5, 300.0, 302.0])
    monkeypatch.setattr("callbacks.wallclock.time.perf_counter", lambda: next(ticks))
    cpu = SimpleNamespace(device=torch.device("cpu"))  # no device sync on CPU
    clock = ChallengeClock(max_wallclock_seconds=600)
    clock._resume(cpu)  # training: 100 s -> 103 s
    clock._pause(cpu)
    assert clock.elapsed_ms() == 3000.0
    with clock.running(cpu):
        pass  # 200 s -> 201.5 s
    assert clock.elapsed_ms() == 4500.0
    with pytest.raises(RuntimeError), clock.running(cpu):
        raise RuntimeError("calibration failed")  # 300 s -> 302 s
    assert clock.elapsed_ms() == 6500.0 and clock._t0 is None


def fake_step(step: int, world: int, reduce):
    """(trainer, module) stand-ins for one ChallengeClock step boundary: a step ending, its loss 2.5."""
    state = SimpleNamespace(train_time_ms=0.0, lr_scale=1.0, pop_loss=lambda: torch.tensor(2.5))
    module = SimpleNamespace(device=torch.device("cpu"), state=state)
    strategy = SimpleNamespace(reduce=reduce)
    trainer = SimpleNamespace(
        global_step=step, world_size=world, should_stop=False, limit_val_batches=0, loggers=[], strategy=strategy
    )
    return trainer, module


def test_every_rank_reads_the_slowest_ranks_time(monkeypatch):
    """Two ranks (a stand-in strategy: rank 1 is 700 ms behind this one): the step's time, which the LR
    schedule reads, and the stop decision are the all-reduced maximum, so every rank uses one LR scale and
    stops on one step (with its own clock each rank's warmdown LR differed and the replicas drifted apart)."""
    ticks = iter([10.0, 10.2])
    monkeypatch.setattr("callbacks.wallclock.time.perf_counter", lambda: next(ticks))
    seen = []

    def reduce(t, reduce_op):
        seen.append(reduce_op)
        return t + 700.0 if reduce_op == "max" else t

    trainer, module = fake_step(1, 2, reduce)
    state = module.state
    clock = ChallengeClock(max_wallclock_seconds=0.5, iterations=100)
    clock._resume(module)  # 10.0 s
    clock.on_train_batch_end(trainer, module, None, None, 0)  # 10.2 s: 200 ms here, 900 ms on the slowest rank
    assert "max" in seen and state.train_time_ms == pytest.approx(900.0)
    assert trainer.should_stop and clock.stopped_early  # over the 500 ms cap on the slowest rank: all stop
    # the next step's LR scale reads that time (the time the step starts), not this rank's live clock
    sched = LRSchedule(clock, 100, 10, 0.5, 0.85, 0.95, 0)
    kw = dict(iterations=100, warmdown_iters=10, max_wallclock_ms=500.0)
    assert sched.scale(1) == lr_scale(1, 900.0, **kw) != lr_scale(1, 200.0, **kw)


@pytest.mark.parametrize("reserve, stops", [(0.0, False), (0.5, True)])
def test_the_gptq_reserve_stops_training_before_the_cap(monkeypatch, reserve, stops):
    """PR #1611 (`max_wallclock_ms -= gptq_reserve_seconds * 1e3`): with a 1 s cap and a 0.5 s reserve, a step
    ending at 0.6 s is the last (the calibration that follows reads training data inside the 1 s); without
    the reserve it is not. The cap itself stays the budget the calibration is checked against, and the
    warmdown by steps ends where training stops."""
    ticks = iter([10.0, 10.6])
    monkeypatch.setattr("callbacks.wallclock.time.perf_counter", lambda: next(ticks))
    trainer, module = fake_step(5, 1, lambda t, reduce_op: t)
    clock = ChallengeClock(max_wallclock_seconds=1.0, iterations=100, reserve_seconds=reserve)
    clock._resume(module)
    clock.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop is stops and clock.stopped_early is stops and clock.cap_ms == 1000.0
    kw = dict(iterations=100, warmdown_iters=5, max_wallclock_ms=1000.0, reserve_ms=1000.0 * reserve)
    assert lr_scale(5, 600.0, **kw) == (0.0 if stops else pytest.approx(400.0 / 600.0))


def test_a_run_resumed_where_training_ended_skips_the_compile_warm_up():
    """A resume from the checkpoint of the step budget's last step, or of a time past the clock's stop: no step
    is left, so no warm-up steps are compiled either (the clock then says why and the run exports)."""
    module = SimpleNamespace(compile=True)
    trainer = SimpleNamespace(global_step=4)  # no optimizers, no data: a warm-up would fail on the first
    CompileWarmup(steps=2, clock=ChallengeClock(0, iterations=4)).on_train_start(trainer, module)
    ended = ChallengeClock(1.0, iterations=100, reserve_seconds=0.5)
    ended.offset_ms = 600.0
    assert ended.ended_by(4) == "the clock" and ChallengeClock(1.0, iterations=100).ended_by(4) is None
    CompileWarmup(steps=2, clock=ended).on_train_start(trainer, module)
    with pytest.raises(AttributeError, match="optimizers"):  # steps are left: it warms up
        CompileWarmup(steps=2, clock=ChallengeClock(0, iterations=5)).on_train_start(trainer, module)
