"""Training dynamics through the real Lightning stack (in-process, tiny synthetic runs): weight averaging
applied before export, late QAT, exact resume, preemption, compile warm-up restore, DDP on CPU; the last step
logged whatever ends training, SIGTERM after training, Lightning's tips silenced."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities._pytree import _tree_flatten

from callbacks import build_callbacks
from pgolf.config.typed import ConfigError
from pgolf.export import roundtrip, stages
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import read_artifact
from pgolf.quant.numerics import fake_quant_rows
from pgolf.quant.rules import dequantize_state
from pgolf.runlog import set_log_file
from pgolf.tools.datasets import ensure_dataset
from pgolf.train import module as module_mod
from pgolf.train import run
from pgolf.train.build import build_datamodule, build_module, build_trainer, quiet_lightning, run_meta
from pgolf.train.module import check_checkpoint_momentum, check_checkpoint_tensors, clip_local_then_average

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
FP32_EXPORT = ["export.rules=[{name: all, store: fp32}]", "export.label=fp32"]  # exact weights in the artifact
TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.grad_accum=auto",
    "train.max_wallclock_seconds=0",
    "train.log_every=1",
    "final_eval.modes=[standard]",
    "final_eval.batch_windows=8",
    "callbacks.progress=none",
    "logger=csv",
]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class Recorder(L.Callback):
    """Weights after every optimizer step, and the weights the export sees at the end."""

    def __init__(self):
        self.steps: list[dict] = []
        self.lr_scales: list[float] = []
        self._last = 0

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.steps.append({k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()})
            self.lr_scales.append(pl_module.state.lr_scale)


def fit(tmp_path, overrides, extra_callbacks=()):
    cfg = compose_cfg([*TINY, f"data.root={tmp_path / 'synthetic'}", *FP32_EXPORT, *overrides])
    ensure_dataset(cfg.data.prepare, cfg.data.root)
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, tmp_path / "run", run_meta(cfg, tok))
    order = cbs.all
    i = order.index(cbs.checkpoint)
    order[i:i] = extra_callbacks  # after the averaging update, before checkpoint and export
    L.seed_everything(int(cfg.seed), verbose=False)
    trainer = build_trainer(cfg, order, False)
    trainer.fit(module, datamodule=dm)
    entries, meta = read_artifact(tmp_path / "run" / "final_model.fp32.ptz")
    return module, dequantize_state(entries), cbs


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory, synth_dir):
    return synth_dir.parent


def test_ema_weights_are_what_gets_exported(tmp_path, synth_root):
    (tmp_path / "synthetic").symlink_to(synth_root)
    rec = Recorder()
    _, exported, _ = fit(
        tmp_path, ["train.iterations=6", "callbacks.averaging.kind=ema", "callbacks.averaging.ema_decay=0.9"], [rec]
    )
    ema = {k: v.clone() for k, v in rec.initial.items()}
    for w in rec.steps:  # from step 1, starting at the initial weights (PR #287's EMA)
        for k in ema:
            ema[k] = 0.9 * ema[k] + 0.1 * w[k]
    final = rec.steps[-1]
    for k in ema:
        if torch.is_floating_point(ema[k]):
            assert torch.allclose(exported[k], ema[k], atol=1e-6), k
    assert any(not torch.allclose(exported[k], final[k]) for k in ema if "weight" in k)  # not the raw weights


def test_swa_is_really_applied(tmp_path, synth_root):
    (tmp_path / "synthetic").symlink_to(synth_root)
    rec = Recorder()
    _, exported, _ = fit(
        tmp_path,
        [
            "train.iterations=8",
            "train.warmdown_iters=8",
            "callbacks.averaging.kind=swa",
            "callbacks.averaging.swa_every=2",
            "callbacks.averaging.swa_threshold=0.6",
        ],
        [rec],
    )
    # iteration warmdown: the scale before step s (1-based) is (8-(s-1))/8; < 0.6 from step 5 on; every 2: 6, 8
    picked = [rec.steps[s - 1] for s in (6, 8)]
    for k, v in exported.items():
        if "weight" in k:
            assert torch.allclose(v, (picked[0][k] + picked[1][k]) / 2, atol=1e-6), k


def test_late_qat_switches_on_below_threshold(tmp_path, synth_root, capsys):
    (tmp_path / "synthetic").symlink_to(synth_root)
    module, _, cbs = fit(
        tmp_path,
        ["train.iterations=10", "train.warmdown_iters=10", "model.qat=late", "callbacks.late_qat_threshold=0.35"],
    )
    assert cbs.qat.enabled_at == 7  # scale before step 8 is (10-7)/10 = 0.3 < 0.35
    assert module.gpt.qat_enabled and all(m.qat for m in module.gpt.quantized_linears())
    assert "late_qat:enabled step:7 scale:0.3000" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["late", "always"])
def test_qat_forward_uses_quantized_weights_and_gradients_reach_full_precision(mode):
    """Under torch.compile (fullgraph, aot_eager on CPU): the training forward equals a model whose weights
    were quantized by hand, and the gradient w.r.t. the full-precision weights is the STE gradient. Late
    QAT's switch (a Python flag) costs exactly one recompilation, and none before or after it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, qat=mode, qat_bits=4)
    m = GPT(cfg).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hand = GPT(GPTConfig(**{**cfg.to_dict(), "qat": "off"})).train()
    hand.load_state_dict(m.state_dict())
    with torch.no_grad():
        for lin in hand.quantized_linears():
            lin.weight.copy_(fake_quant_rows(lin.weight, 4))
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, fullgraph=True, dynamic=False, backend=counter)
    if mode == "late":
        plain = GPT(GPTConfig(**{**cfg.to_dict(), "qat": "off"})).train()
        plain.load_state_dict(m.state_dict())
        assert torch.allclose(cm(x, x), plain(x, x), atol=1e-6)  # inactive before the switch
        assert torch.allclose(cm(x, x), plain(x, x), atol=1e-6) and counter.frame_count == 1
        m.set_qat("late", enabled=True)  # flips a Python flag: the guards fail once
    loss = cm(x, x)
    assert counter.frame_count == (2 if mode == "late" else 1)
    ref = hand(x, x)
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    ref.backward()
    for a, b in zip(m.quantized_linears(), hand.quantized_linears()):
        assert a.weight.grad is not None and torch.allclose(a.weight.grad, b.weight.grad, atol=1e-5)
    cm(x, x)
    assert counter.frame_count == (2 if mode == "late" else 1)  # no further recompilation


def test_late_qat_switch_acts_in_the_compiled_training_step(tmp_path, synth_root):
    """Training with the inner GPT compiled (dynamo with the eager backend: eager numerics, real guards) and
    late QAT switching on after step 5 ends on exactly the weights of the uncompiled run, and not on those of a
    run without QAT: the switch recompiled the step instead of being constant-folded away."""
    late = ["train.iterations=8", "train.warmdown_iters=8", "model.qat=late", "callbacks.late_qat_threshold=0.5"]
    finals = {}
    for name, extra in (
        ("compiled", ["train.compile=true", "train.compile_backend=eager", "train.warmup_steps=0"]),
        ("eager", []),
        ("off", ["model.qat=off"]),
    ):
        run = tmp_path / name
        run.mkdir()
        (run / "synthetic").symlink_to(synth_root)
        torch.manual_seed(0)  # fit seeds after building the model: the same initial weights in every run
        module, _, cbs = fit(run, [*late, *extra])
        assert cbs.qat.enabled_at == (None if name == "off" else 5)  # scale (8-5)/8 < 0.5
        finals[name] = {k: v.detach().clone() for k, v in module.gpt.state_dict().items()}
    assert all(torch.equal(finals["compiled"][k], v) for k, v in finals["eager"].items())
    assert not all(torch.equal(finals["off"][k], v) for k, v in finals["eager"].items())


def run_cli(args, **kw):
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw
    )


def step_lines(out: str) -> list[str]:
    return [
        " ".join(w for w in line.split() if not w.startswith(("train_time", "step_avg")))
        for line in out.splitlines()
        if line.startswith("step:") and "train_loss" in line
    ]


def val_lines(out: str) -> list[str]:
    return [
        " ".join(w for w in line.split() if not w.startswith(("train_time", "step_avg")))
        for line in out.splitlines()
        if line.startswith("step:") and "val_loss" in line
    ]


def test_resume_is_bit_identical(tmp_path, synth_root):
    """8 steps straight vs 4 steps + resume from the step-4 checkpoint (EMA, late QAT switching at step 6,
    bf16 Muon momentum and Adam moments, data position, a bf16 embedding table, validation every 3 steps):
    identical losses, validations and final weights; the resumed run does not validate step 0 again. A config
    whose model differs from the checkpoint's (an fp32 table) is refused."""
    common = [
        *TINY,
        "model.embed_dtype=bf16",
        "optim.muon_momentum_dtype=bf16",
        f"data.root={synth_root}",
        *FP32_EXPORT,
        "train.iterations=8",
        "train.warmdown_iters=8",
        "callbacks.averaging.kind=ema",
        "model.qat=late",
        "callbacks.late_qat_threshold=0.5",
        "train.val_every=3",
    ]
    a = run_cli(
        [
            *common,
            f"hydra.run.dir={tmp_path / 'a'}",
            "callbacks.checkpoint.every_steps=4",
            "callbacks.checkpoint.keep=0",
        ]
    )
    assert a.returncode == 0, a.stderr[-3000:]
    ck = tmp_path / "a" / "checkpoints" / "step000004.ckpt"
    assert ck.is_file() and (tmp_path / "a" / "checkpoints" / "last.ckpt").is_file()
    b = run_cli([*common, f"hydra.run.dir={tmp_path / 'b'}", f"resume={ck}"])
    assert b.returncode == 0, b.stderr[-3000:]
    sa, sb = step_lines(a.stdout), step_lines(b.stdout)
    assert len(sa) == 8 and sb == sa[4:]
    va, vb = val_lines(a.stdout), val_lines(b.stdout)
    assert [v.split("/")[0] for v in va] == ["step:0", "step:3", "step:6", "step:8"] and vb == va[2:]
    wa = dequantize_state(read_artifact(tmp_path / "a" / "final_model.fp32.ptz")[0])
    wb = dequantize_state(read_artifact(tmp_path / "b" / "final_model.fp32.ptz")[0])
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())["roundtrip"]["standard"]["val_bpb"]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())["roundtrip"]["standard"]["val_bpb"]
    assert ra == rb
    state = torch.load(ck, map_location="cpu", weights_only=True)["state_dict"]
    assert state["gpt.tok_emb.weight"].dtype == torch.bfloat16
    cfg = compose_cfg(common)
    check_checkpoint_tensors(build_module(cfg, cfg.data.tokenizer_path)[0].state_dict(), state)
    cfg = compose_cfg([*common, "model.embed_dtype=fp32"])
    fp32 = build_module(cfg, cfg.data.tokenizer_path)[0].state_dict()
    whole = torch.load(ck, map_location="cpu", weights_only=True)
    check_checkpoint_momentum({"muon_momentum_dtype": "bf16"}, whole)
    with pytest.raises(ConfigError, match="Muon momentum is bf16 but optim.muon_momentum_dtype=fp32"):
        check_checkpoint_momentum({"muon_momentum_dtype": "fp32"}, whole)
    want = r"gpt\.tok_emb\.weight \(256, 64\) bfloat16 \(the config's model: .* float32\)"
    with pytest.raises(ConfigError, match=want):
        check_checkpoint_tensors(fp32, state)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, synth_root):
    args = [*TINY, f"data.root={synth_root}", "train.iterations=100000", f"hydra.run.dir={tmp_path}"]
    args += ["train.val_every=1000"]  # a stop request makes Lightning validate: never after a preemption
    p = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("step:3/"):
            p.send_signal(signal.SIGTERM)
            break
    rest, err = p.communicate(timeout=120)
    out = "".join(out) + rest
    assert p.returncode == 0, err[-2000:]
    assert "preempted: SIGTERM received" in out and "exiting cleanly" in out
    assert [v.split("/")[0] for v in val_lines(out)] == ["step:0"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob("*.ptz"))  # no artifact from an unfinished run
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert (
        ck["global_step"] >= 3 and "rng" in ck and ck["optimizer_states"] and "ChallengeClock" in str(ck["callbacks"])
    )


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, synth_root):
    r = run_cli(
        [
            *TINY,
            f"data.root={synth_root}",
            "train.iterations=50",
            f"hydra.run.dir={tmp_path}",
            "optim.embed_lr=1e38",
            "optim.scalar_lr=1e38",
            "model.logit_softcap=0",
            "callbacks.checkpoint.every_steps=1",
        ]
    )
    assert r.returncode != 0
    assert "non-finite training loss" in r.stderr
    bad = int(r.stderr.split("non-finite training loss")[1].split("at step ")[1].split(":")[0])
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert all(int(n[4:10]) < bad for n in saved)  # the bad step was never checkpointed
    assert not list(tmp_path.glob("*.ptz"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, synth_root):
    """A 3-step run in one process with gradient clipping (the reference of the compile and DDP tests)."""
    base = [*TINY, f"data.root={synth_root}", "optim.grad_clip=0.05", "train.iterations=3"]
    base += ["final_eval.modes=[standard,sliding]", "final_eval.stride=16"]
    d = tmp_path_factory.mktemp("one") / "run"
    one = run_cli([*base, f"hydra.run.dir={d}"])
    assert one.returncode == 0, one.stderr[-2000:]
    return base, d, one


def test_compile_warmup_restores_everything(tmp_path, one_process):
    """With compile on (eager backend, so the numerics are the eager ones) the 3 warm-up steps must leave
    no trace: weights, optimizer state, data position and RNG are restored before the clock starts (a resumed
    run's warm-up: tests/test_resume_flow.py)."""
    base, _, plain = one_process
    over = ["train.compile=true", "train.compile_backend=eager", "train.warmup_steps=3", "final_eval.modes=[standard]"]
    comp = run_cli([*base, f"hydra.run.dir={tmp_path / 'c'}", *over])
    assert comp.returncode == 0, comp.stderr[-2000:]
    assert "warmup_step:3/3" in comp.stdout
    assert step_lines(plain.stdout) == step_lines(comp.stdout)


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, one_process):
    """trainer=ddp_cpu: 2 gloo ranks, grad accumulation 4 each (8/world), the reference's rank slicing:
    the same tokens per step as 1 process with accumulation 8, so the losses agree to float rounding. The 2
    ranks clip as the banked records (`optim.grad_clip_scope=local`: each rank's own gradients, then pgolf's
    average instead of DDP's); with Muon and Adam nearly scale-invariant the clip's place moves the losses
    far less than the tolerance, a missing or doubled average would not (test_local_clipping_* checks the
    arithmetic)."""
    base, one_dir, one = one_process
    two = run_cli([*base, f"hydra.run.dir={tmp_path / 'two'}", "trainer=ddp_cpu", "optim.grad_clip_scope=local"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:4" in two.stdout
    assert "grad_clip: each rank's local gradients are clipped, then averaged" in two.stdout
    assert "grad_clip:" not in one.stdout  # one process: the scopes are one
    l1 = [float(s.split("train_loss:")[1].split()[0]) for s in step_lines(one.stdout)]
    l2 = [float(s.split("train_loss:")[1].split()[0]) for s in step_lines(two.stdout)]
    assert l1 == pytest.approx(l2, abs=2e-4)
    r1 = json.loads((one_dir / "results.json").read_text())["roundtrip"]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())["roundtrip"]
    for mode in ("standard", "sliding"):
        assert r1[mode]["tokens"] == r2[mode]["tokens"]
        assert r1[mode]["val_bpb"] == pytest.approx(r2[mode]["val_bpb"], abs=1e-3)


def _local_grads(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(6, 4, generator=g) * (rank + 1), torch.randn(5, generator=g).bfloat16() * (rank + 1)]


def _clipped(gs: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).float() for g in gs]))  # as torch
    return [g * min(1.0, max_norm / (float(norm) + 1e-6)) for g in gs]


def test_local_clipping_clips_each_ranks_gradients_before_the_average(monkeypatch):
    """optim.grad_clip_scope=local (the banked records, no DDP): rank 0 clips its own gradients to the global
    norm, then they are averaged with rank 1's (clipped on rank 1: the all-reduce is simulated); each gradient
    keeps its dtype, a missing one stays missing."""
    other = _clipped(_local_grads(1), 0.5)
    sums = iter([other[0].reshape(-1), other[1].reshape(-1)])  # by dtype, in first-seen order: fp32, bf16

    def all_reduce(flat, op):
        flat.add_(next(sums))

    monkeypatch.setattr(module_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(module_mod.dist, "all_reduce", all_reduce)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _local_grads(0)] + [torch.nn.Parameter(torch.zeros(3))]
    for p, g in zip(params, _local_grads(0)):
        p.grad = g.clone()
    clip_local_then_average(params, 0.5)
    assert params[2].grad is None and [p.grad.dtype for p in params[:2]] == [torch.float32, torch.bfloat16]
    mine = _clipped(_local_grads(0), 0.5)
    for i in range(2):
        want = (mine[i].float() + other[i].float()) / 2
        assert torch.allclose(params[i].grad.float(), want, rtol=1e-2 if i else 1e-5, atol=1e-6), i
    averaged = [(a.float() + b.float()) / 2 for a, b in zip(_local_grads(0), _local_grads(1))]  # clip after: other
    assert not torch.allclose(params[0].grad, _clipped(averaged, 0.5)[0], rtol=1e-3)


# ---- the last step is logged; SIGTERM after training; Lightning's tips -------------------------------------
class StopAt(L.Callback):
    """Stops training at step `step` (after the clock's hook): a stop that is neither the step budget nor the
    clock, as preemption is."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def clock_fit(cfg, tmp_path: Path, stop: str, log_first: int | None = None):
    """A fit with the challenge clock and the LR schedule only, metrics to `tmp_path/csv/metrics.csv`; `stop`
    "other": another callback asks Lightning to stop at step 2. Returns the module."""
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, tmp_path, run_meta(cfg, tok))
    if log_first is not None:
        cbs.clock.log_first = log_first
    csv = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    extra = [StopAt(2)] if stop == "other" else []
    build_trainer(cfg, [cbs.clock, cbs.schedule, *extra], [csv]).fit(module, datamodule=dm)
    return module


@pytest.mark.parametrize(
    ("stop", "overrides", "logged"),
    [
        ("iterations", ["train.iterations=3"], [2, 3]),
        ("wallclock", ["train.iterations=3", "train.max_wallclock_seconds=1e-9"], [1]),
        ("other", ["train.iterations=4"], [2]),
    ],
)
def test_the_last_step_is_logged_whatever_ends_training(tmp_path, synth_root, capsys, stop, overrides, logged):
    """log_every=2 and no first-steps lines: the step lines and metrics.csv still end at the last step."""
    cfg = compose_cfg([*TINY, f"data.root={synth_root}", "train.log_every=2", "train.grad_accum=1", *overrides])
    clock_fit(cfg, tmp_path, stop, log_first=0)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step:") and "train_loss" in ln]
    assert [int(ln.split("/")[0][5:]) for ln in lines] == logged
    assert lines[-1].startswith(f"step:{logged[-1]}/{cfg.train.iterations} train_loss:")
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:]] == logged
    if stop == "wallclock":
        assert out.index(lines[-1]) < out.index("stopping_early: wallclock_cap")


@pytest.mark.parametrize(
    ("stop", "overrides", "validated"),
    [
        ("iterations", ["train.iterations=3"], [0, 2, 3]),
        ("on a val step", ["train.iterations=4"], [0, 2, 4]),
        ("wallclock", ["train.iterations=3", "train.max_wallclock_seconds=1e-9"], [0, 1]),
        ("other", ["train.iterations=4"], [0, 2]),
    ],
)
def test_validation_follows_the_reference_cadence(tmp_path, synth_root, capsys, stop, overrides, validated):
    """val_every=2 (the reference's VAL_LOSS_EVERY): the whole validation set is scored at step 0, at every
    second step and once at the last step, whatever ended training, with the reference's line; step 0's
    figures reach the loggers too."""
    cfg = compose_cfg([*TINY, f"data.root={synth_root}", "train.val_every=2", "train.grad_accum=1", *overrides])
    module = clock_fit(cfg, tmp_path, stop)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("step:") and "val_loss" in ln]
    assert [int(ln.split("/")[0][5:]) for ln in lines] == validated
    assert lines[0].endswith("train_time:0ms step_avg:0.00ms")
    assert float(lines[-1].split("val_bpb:")[1].split()[0]) == pytest.approx(module.state.last_val["val_bpb"], abs=5e-5)
    assert module.state.last_val["step"] == validated[-1] and module.state.last_val["val_tokens"] > 0
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    val_steps = [int(r.split(",")[head.index("step")]) for r in rows[1:] if r.split(",")[head.index("val_bpb")]]
    assert val_steps == validated


@pytest.mark.parametrize(
    ("where", "phase", "kept"),
    [
        (stages, "the pre-quantization evaluation", []),
        (roundtrip, "the round trip (standard)", ["final_model.float.ptz", "final_model.int8_zlib.ptz"]),
    ],
    ids=["pre_quant", "roundtrip"],
)
def test_sigterm_after_training_stops_the_run_at_once(tmp_path, synth_root, monkeypatch, where, phase, kept):
    """A SIGTERM while an evaluation runs after training ends the run right there (the pass it interrupts does
    not run), with exit status 143 and one line naming the phase; what was written stays, whole."""
    cfg = compose_cfg([*TINY, f"data.root={synth_root}", "train.iterations=2"])  # int8: a lossy round trip
    calls = []

    def sigterm(*args, **kwargs):
        calls.append("signalled")
        os.kill(os.getpid(), signal.SIGTERM)
        calls.append("went on")  # never: the handler raises as soon as os.kill returns

    monkeypatch.setattr(where, "run_mode", sigterm)
    before = signal.getsignal(signal.SIGTERM)
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    try:
        with pytest.raises(SystemExit) as e:
            run.fit(cfg, run_dir, run.Extras([], []), {"bytes": 0, "sha256": None}, log)
    finally:
        set_log_file(None)
    assert e.value.code == 143 and calls == ["signalled"]
    last = log.read_text().splitlines()[-1]
    assert last.startswith(f"terminated: SIGTERM during {phase}; stopping with exit status 143.")
    assert sorted(p.name for p in run_dir.glob("*.ptz")) == kept and not list(run_dir.rglob("*.tmp"))
    assert not (run_dir / "results.json").exists() and "No results.json." in last
    if kept:
        assert f"Written whole and kept: {', '.join(kept)}." in last
        read_artifact(run_dir / kept[1])  # complete
    else:
        assert "No artifact was written." in last
    assert signal.getsignal(signal.SIGTERM) == before  # Lightning restores the handler it found


def test_lightning_tips_and_its_leafspec_warning_are_silenced_and_nothing_else():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_lightning()
            L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
            _tree_flatten({"x": (torch.zeros(1), 2)})  # builds torch's deprecated LeafSpec
            pytree = "lightning.pytorch.utilities._pytree"
            warnings.warn_explicit("another FutureWarning", FutureWarning, "_pytree.py", 1, module=pytree)
    finally:
        lg.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("GPU available:") for m in messages)  # Lightning's other lines still come
    assert not any("Tip:" in m for m in messages)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]


class SigtermAtTrainEnd(L.Callback):
    """Sends SIGTERM at the end of training, after the last step boundary's check (listed before checkpointing)."""

    def on_train_end(self, trainer, pl_module):
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_after_the_last_step_saves_the_final_weights_and_stops_before_the_export(tmp_path, synth_root):
    cfg = compose_cfg([*TINY, f"data.root={synth_root}", "train.iterations=2"])
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, tmp_path, run_meta(cfg, tok))
    order = cbs.all
    order.insert(order.index(cbs.checkpoint), SigtermAtTrainEnd())
    with pytest.raises(SystemExit) as e:
        build_trainer(cfg, order, False).fit(module, datamodule=dm)
    assert e.value.code == 143 and e.value.phase == "the end of training"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not list(tmp_path.glob("*.ptz")) and not (tmp_path / "results.json").exists()
