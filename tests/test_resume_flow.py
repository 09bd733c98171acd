"""Resuming after a preemption, as a newcomer follows it: the log's `resume with:` hint continues the run in
its own directory, whose `csv/metrics.csv` keeps the preempted attempt's rows; the averaging is not applied
to a preempted run; a resume that cannot work (a checkpoint of another model, a checkpoint that does not
exist) ends in one `config error:` line, exit status 2, and leaves the run directory as it was. Tiny
in-process runs (pgolf/train/run.py's `fit`, as train.py calls it) and two train.py subprocesses that stop
at start-up."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf

import callbacks.warmup
from callbacks.checkpoint import Checkpointing, Terminated, resume_hint
from pgolf.config.typed import ConfigError
from pgolf.config.validate import check_resume
from pgolf.runlog import log0, set_log_file
from pgolf.tools.rundir import CLAIM, claim, read_claim, release, snapshot, write_hydra_files
from pgolf.train import run
from pgolf.train.build import ContinuedCSVLogger, build_logger
from pgolf.train.module import check_checkpoint_tensors

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.max_wallclock_seconds=0",
    "train.iterations=12",
    "train.warmdown_iters=4",
    "train.log_every=1",
    "train.val_every=4",
    "callbacks.averaging.kind=ema",
    "callbacks.checkpoint.every_steps=4",
    "callbacks.checkpoint.keep=0",
    "final_eval.modes=[standard]",
    "final_eval.batch_windows=8",
    "callbacks.progress=none",
    "logger=csv",
]
CODE = {"bytes": 0, "sha256": None}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


class PreemptAt(L.Callback):
    """A SIGTERM at step `step` (Checkpointing's handler, called directly): the preemption at the next step
    boundary. Keeps the GPT's weights at the end of training, after the averaging's hook."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            (ck,) = [cb for cb in trainer.callbacks if isinstance(cb, Checkpointing)]
            ck._handle(signal.SIGTERM, None)

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.gpt.state_dict().items()}
        self.state = pl_module.state.weights


def fit(cfg, run_dir: Path, extra: list[L.Callback] = ()):
    extras = run.prepare(cfg, run_dir)
    try:
        return run.fit(
            cfg, run_dir, run.Extras([*extras.callbacks, *extra], extras.loggers), CODE, run_dir / "train.log"
        )
    finally:
        set_log_file(None)


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def tree(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, synth_dir):
    """A run preempted after step 7 (checkpoints of steps 4 and 7), in `<base>/run`, started from `<base>`
    as train.py would be (the log's paths are relative to it): (base, its log, the `PreemptAt` that stopped
    it, holding the GPT's weights at the end of training)."""
    base = tmp_path_factory.mktemp("preempted")
    stop = PreemptAt(6)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setattr(sys, "argv", ["train.py"])
        cfg = compose_cfg([*TINY, f"data.root={synth_dir.parent}"])
        assert fit(cfg, Path("run"), [stop]) is None
    return base, (base / "run" / "train.log").read_text(), stop


def test_a_preempted_run_saves_the_raw_weights_and_does_not_apply_the_average(preempted):
    base, log, stop = preempted
    ck = torch.load(base / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["global_step"] == 7 and "averaging/ema" in ck
    assert "ema:" not in log.split("preempted: SIGTERM received")[1]  # neither applied nor claimed to be
    assert stop.state == "raw"
    for k, v in stop.weights.items():
        assert torch.equal(v, ck["state_dict"][f"gpt.{k}"]), k
    assert any(not torch.equal(v, ck["averaging/ema"][f"module.{k}"].to(v.dtype)) for k, v in stop.weights.items())


def test_the_hint_followed_verbatim_continues_in_the_run_directory(preempted, monkeypatch):
    base, log, _ = preempted
    (hint,) = [line for line in log.splitlines() if line.startswith("resume with:")]
    assert hint == "resume with: python train.py <same overrides> hydra.run.dir=run resume=run/checkpoints/last.ckpt"
    monkeypatch.chdir(base)
    overrides = hint.split("> ")[1].split()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hcfg = compose("train", overrides=[*TINY, *overrides], return_hydra_config=True)
    assert hcfg.hydra.run.dir == "run" and hcfg.resume == "run/checkpoints/last.ckpt"
    assert claim(Path(hcfg.hydra.run.dir), hcfg.resume, overrides) == "resumed"  # train.py's claim: in place
    # the packed train_gpt.py: its run directory is the folder it runs in, and it has no Hydra
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("RUN_ID", raising=False)
    monkeypatch.chdir(base / "run")
    assert resume_hint(Path("checkpoints/last.ckpt"), Path(".")) == (
        "resume with: <same environment, RUN_ID included> python train_gpt.py <same overrides> "
        "resume=checkpoints/last.ckpt  # from this folder"
    )
    monkeypatch.setenv("RUN_ID", "seed1")  # the resumed run appends to logs/seed1.txt
    assert resume_hint(Path("checkpoints/last.ckpt"), Path(".")).startswith(
        "resume with: <same environment> RUN_ID=seed1 python train_gpt.py"
    )
    monkeypatch.setattr(sys, "argv", ["train.py"])
    elsewhere = base.parent / "elsewhere"  # not ../elsewhere: absolute, as the checkpoint's path
    assert resume_hint(elsewhere / "checkpoints" / "last.ckpt", elsewhere).endswith(
        f"hydra.run.dir={elsewhere} resume={elsewhere / 'checkpoints' / 'last.ckpt'}"
    )


def test_a_resumed_run_keeps_the_preempted_attempts_metrics_once(preempted, synth_dir, monkeypatch, one_thread):
    """Resumed from the step-4 checkpoint in its own directory: the rows up to step 4 (the step-0 and step-4
    validations included) are the preempted attempt's, those of steps 5-7 it logged are replaced by the
    resumed run's, every step is there once. The resumed run is compiled (dynamo, eager backend: the eager
    numerics) and runs its compile warm-up first (it skipped it, so its first steps compiled on the clock)."""
    base, _, _ = preempted
    shutil.copytree(base / "run", base / "again")
    before = read_rows(base / "again")
    assert [r["step"] for r in before if r["val_bpb"]] == ["0", "4"] and before[-1]["step"] == "7"
    monkeypatch.chdir(base)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    compiled = ["train.compile=true", "train.compile_backend=eager", "train.warmup_steps=2"]
    cfg = compose_cfg([*TINY, f"data.root={synth_dir.parent}", "resume=again/checkpoints/step000004.ckpt", *compiled])
    assert isinstance(build_logger(cfg, Path("again"))[0], ContinuedCSVLogger)
    assert fit(cfg, Path("again")) is not None
    assert "warmup_step:2/2" in (base / "again" / "train.log").read_text()
    rows = read_rows(base / "again")
    assert [r["step"] for r in rows if r["train_loss"]] == [str(s) for s in range(1, 13)]
    assert [r["step"] for r in rows if r["val_bpb"]] == ["0", "4", "8", "12"]
    kept = [r for r in before if int(r["step"]) <= 4]
    assert rows[: len(kept)] == kept
    redone = {r["step"]: r["train_loss"] for r in rows if r["train_loss"] and 4 < int(r["step"]) <= 7}
    assert redone == {r["step"]: r["train_loss"] for r in before if int(r["step"]) > 4}  # an exact resume
    # a run in a new directory, or one resumed from elsewhere, gets Lightning's own logger
    assert type(build_logger(compose_cfg(TINY), Path("new"))[0]) is CSVLogger
    assert type(build_logger(cfg, Path("new"))[0]) is CSVLogger


def test_the_metrics_writer_keeps_the_rows_up_to_the_checkpoint_and_adds_columns(tmp_path):
    ck = tmp_path / "last.ckpt"
    torch.save({"global_step": 2}, ck)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train_loss\n0,5.0\n1,4.0\n2,3.0\n3,2.5\n")
    logger = ContinuedCSVLogger(tmp_path, ck)
    logger.log_metrics({"train_loss": 2.0}, step=3)
    logger.save()
    logger.log_metrics({"val_bpb": 1.5}, step=4)  # a new column: the header is rewritten
    logger.save()
    text = (tmp_path / "csv" / "metrics.csv").read_text().replace("\r\n", "\n")
    assert text == "step,train_loss,val_bpb\n0,5.0,\n1,4.0,\n2,3.0,\n3,2.0,\n4,,1.5\n"
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["metrics.csv"]


def test_a_checkpoint_of_another_model_is_named_key_by_key():
    model = {"a": torch.zeros(2), "b": torch.zeros(3), "c": torch.zeros(1)}
    with pytest.raises(ConfigError) as e:
        check_checkpoint_tensors(model, {"a": torch.zeros(2), "d": torch.zeros(1), "c": torch.zeros(2)})
    msg = str(e.value)
    assert "(missing from the checkpoint: b; not in the config's model: d; other shapes or dtypes: c (2,)" in msg
    check_checkpoint_tensors(model, dict(model))


def test_a_resume_of_another_model_stops_before_any_step_and_leaves_the_directory_as_it_was(
    preempted, synth_dir, tmp_path
):
    base, _, _ = preempted
    d = tmp_path / "run"
    shutil.copytree(base / "run", d)
    claim(d, str(d / "checkpoints" / "last.ckpt"), [])  # as train.py's claim of the preempted run
    before = tree(d)
    args = [*TINY, f"data.root={synth_dir.parent}", "model.num_layers=3", f"hydra.run.dir={d}"]
    args += [f"resume={d / 'checkpoints' / 'last.ckpt'}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    (line,) = [x for x in out.splitlines() if x.startswith("config error:")]
    assert "trained another config (model.num_layers: 2 -> 3)" in line and "step:" not in out
    assert tree(d) == before  # its claim, .hydra/, log, metrics and train_gpt.py as they were


def test_a_resume_that_would_train_another_config_is_refused_before_any_work(preempted, synth_dir, tmp_path):
    """The checkpoint records its run's config: a resume that changes what defines the training (the step
    budget, a learning rate, the seed) was accepted, and its run's config then gave a command that does not
    reproduce it; a resume that changes only what is logged, validated or evaluated is accepted."""
    base, _, _ = preempted
    ck = base / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ck, map_location="cpu", weights_only=True)["config"]["train"]["iterations"] == 12
    common = [*TINY, f"data.root={synth_dir.parent}", f"resume={ck}"]
    changed = ["train.iterations=20", "optim.matrix_lr=0.05", "seed=2", "train.log_every=3"]
    with pytest.raises(ConfigError) as e:
        run.prepare(compose_cfg([*common, *changed]), tmp_path)
    assert str(e.value) == (
        f"resume={ck}: the checkpoint's run trained another config (optim.matrix_lr: 0.04 -> 0.05; "
        "seed: 1337 -> 2; train.iterations: 12 -> 20); resume with its values, or start a new run"
    )
    logging = ["train.log_every=3", "train.val_every=0", "data.val_batch_tokens=4096", "callbacks.progress=line"]
    logging += ["final_eval.modes=[standard,sliding]", "train.compile=true", "train.warmup_steps=2"]
    logging += ["+trainer.log_every_n_steps=10", "+trainer.profiler=simple"]  # what Lightning logs and profiles
    run.prepare(compose_cfg([*common, *logging]), tmp_path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"^resume=.*junk\.ckpt: not a readable checkpoint \("):
        run.prepare(compose_cfg([*TINY, f"resume={tmp_path / 'junk.ckpt'}"]), tmp_path)


def test_a_missing_checkpoint_is_refused_before_the_claim(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=nowhere\.ckpt: no such checkpoint file"):
        check_resume("nowhere.ckpt")
    d = tmp_path / "run"  # another run's directory: the claim would refuse it, with another message
    d.mkdir()
    (d / "results.json").write_text("{}")
    args = ["model=tiny", f"hydra.run.dir={d}", f"resume={d / 'checkpoints' / 'last.ckpt'}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"config error: resume={d}/checkpoints/last.ckpt: no such")
    assert [p.name for p in d.iterdir()] == ["results.json"]


def test_release_puts_a_resumed_run_directory_back_and_empties_a_new_one(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["seed=3"])
        hydra_cfg = OmegaConf.create({"hydra": compose("train", ["seed=3"], return_hydra_config=True).hydra})
    d = tmp_path / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (d / "csv").mkdir()
    (d / "csv" / "metrics.csv").write_text("step,train_loss\n0,1\n")
    (d / "train.log").write_text("step:1/2\n")
    (d / CLAIM).write_text(json.dumps({"token": "first"}))
    ck = str(d / "checkpoints" / "last.ckpt")
    assert snapshot(d) is None  # another run's directory: `claim` refuses it, nothing is read
    before_tree, before = tree(d), snapshot(d, ck)
    assert before.files["checkpoints/last.ckpt"] is None  # never read
    assert claim(d, ck, ["model.num_layers=3"]) == "resumed"
    write_hydra_files(d, cfg, hydra_cfg, None)  # what the failed attempt wrote, changed and appended
    (d / "train_gpt.py").write_text("packed")
    (d / "csv" / "metrics.csv").write_text("step,train_loss\n")
    with (d / "train.log").open("a") as f:
        f.write("config error: ...\n")
    release(d, "resumed", before)
    assert tree(d) == before_tree and read_claim(d) == {"token": "first"} and not (d / ".hydra").exists()
    new = tmp_path / "new"
    new.mkdir()
    before = snapshot(new)
    assert claim(new, None, []) == "new"
    write_hydra_files(new, cfg, hydra_cfg, None)
    (new / "train.log").write_text("config error: ...\n")  # a log with lines: another run's, to `claim`
    (new / "csv").mkdir()
    (new / "csv" / "hparams.yaml").write_text("{}")
    release(new, "new", before)
    assert not new.exists()
    assert claim(new, None, []) == "new"  # the corrected command runs there


@pytest.mark.parametrize(
    ("ended_by", "overrides", "step"),
    [
        ("the step budget", ["train.iterations=4", "callbacks.checkpoint.every_steps=4"], 4),
        (
            "the clock",
            ["train.iterations=100", "train.max_wallclock_seconds=1e-9", "callbacks.checkpoint.every_steps=1"],
            1,
        ),
    ],
)
def test_a_resume_from_the_step_where_training_ended_exports_without_a_step(
    tmp_path, synth_dir, monkeypatch, one_thread, ended_by, overrides, step
):
    """A checkpoint of the last step (a preemption or a kill during the export): the resumed run takes no step
    and exports. Lightning skipped the whole fit loop at the step budget (exit 0, no artifact, no results.json),
    and past the clock's cap the resumed run trained one more step."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    common = [*TINY, f"data.root={synth_dir.parent}", "train.val_every=0", *overrides]
    first = fit(compose_cfg(common), Path("first"))
    assert first["training"]["steps"] == step
    ck = Path("again") / "checkpoints" / f"step{step:06d}.ckpt"
    ck.parent.mkdir(parents=True)
    shutil.copy(Path("first") / "checkpoints" / ck.name, ck)
    again = fit(compose_cfg([*common, f"resume={ck}"]), Path("again"))
    assert again is not None and again["training"]["steps"] == step
    # the checkpoint's clock time, not 0 ms (a submission's 600 s check read 0)
    assert again["training"]["train_time_ms"] >= first["training"]["train_time_ms"] > 0
    assert (Path("again") / "results.json").is_file() and list(Path("again").glob("final_model.*.ptz"))
    log = (Path("again") / "train.log").read_text()
    assert f"resume: the checkpoint is of step {step}, where {ended_by} ended training: no step is left" in log
    assert f"step:{step + 1}/" not in log
    assert again["roundtrip"]["standard"]["val_bpb"] == first["roundtrip"]["standard"]["val_bpb"]


def test_a_resume_that_adds_an_average_the_checkpoint_lacks_is_refused(tmp_path, synth_dir, monkeypatch, one_thread):
    """A checkpoint of a run without EMA resumed with callbacks.averaging.kind=ema: the average restarted from
    the initial weights (0 updates) and was exported as the model, silently."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    common = [*TINY, f"data.root={synth_dir.parent}", "train.val_every=0", "train.iterations=4"]
    fit(compose_cfg([*common, "callbacks.averaging.kind=none", "callbacks.checkpoint.every_steps=2"]), Path("a"))
    ck = Path("a") / "checkpoints" / "step000002.ckpt"
    with pytest.raises(ConfigError, match=r"another config \(callbacks\.averaging\.kind: none -> ema\)"):
        fit(compose_cfg([*common, f"resume={ck}"]), Path("b"))
    state = torch.load(ck, map_location="cpu", weights_only=True)
    del state["config"]  # a checkpoint of an earlier pgolf, which did not record its config
    torch.save(state, ck)
    with pytest.raises(SystemExit) as e:
        fit(compose_cfg([*common, f"resume={ck}"]), Path("b"))
    assert e.value.code == 2
    log = (Path("b") / "train.log").read_text()
    assert "config error: resume: the checkpoint holds no EMA average (its run averaged nothing)" in log
    assert not list(Path("b").glob("*.ptz"))


def test_without_on_sigterm_a_sigterm_stops_training_at_the_step_boundary_with_status_143(
    tmp_path, synth_dir, monkeypatch, one_thread
):
    """callbacks.checkpoint.on_sigterm=false: a real SIGTERM during training stops the run at the next step
    boundary (the decision reduced across ranks, as with a preemption), saves nothing and ends with status 143
    and one line. Lightning's own handler stayed in place before: it broadcasts from inside the signal handler,
    which hung a two-rank DDP run under torchrun until torchrun killed it; ours replaces it."""
    import callbacks.wallclock

    handlers = []

    def log_then_sigterm(msg, *args, **kwargs):
        log0(msg, *args, **kwargs)
        if msg.startswith("step:2/"):
            handlers.append(signal.getsignal(signal.SIGTERM))
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(callbacks.wallclock, "log0", log_then_sigterm)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    before = signal.getsignal(signal.SIGTERM)
    over = ["callbacks.checkpoint.on_sigterm=false", "train.iterations=50", "train.val_every=0"]
    with pytest.raises(Terminated) as e:
        fit(compose_cfg([*TINY, f"data.root={synth_dir.parent}", *over]), Path("run"))
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    assert isinstance(getattr(handlers[0], "__self__", None), Checkpointing)  # not Lightning's
    lines = (Path("run") / "train.log").read_text().splitlines()
    assert [x.split(" ")[0] for x in lines if x.startswith("step:")] == ["step:1/50", "step:2/50"]
    assert lines[-1] == (
        "terminated: SIGTERM during training, after step 2 (callbacks.checkpoint.on_sigterm=false: no checkpoint); "
        "stopping with exit status 143. No artifact was written. No results.json."
    )
    assert not (Path("run") / "checkpoints").exists() and not list(Path("run").glob("*.ptz"))


def test_a_sigterm_during_the_compile_warm_up_stops_the_run_with_status_143(
    tmp_path, synth_dir, monkeypatch, one_thread
):
    """A real SIGTERM during the compile warm-up, which runs before Checkpointing's on_train_start: only
    Lightning's handler was in place, so the warm-up ran on, one step was trained and the run ended with status
    0, no checkpoint and no word. The warm-up now stops at its next step boundary, and the run with status 143
    and one line: nothing was trained, the same command starts it again."""

    def log_then_sigterm(msg, *args, **kwargs):
        log0(msg, *args, **kwargs)
        if msg.startswith("warmup_step:1/"):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(callbacks.warmup, "log0", log_then_sigterm)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    before = signal.getsignal(signal.SIGTERM)
    compiled = ["train.compile=true", "train.compile_backend=eager", "train.warmup_steps=3", "train.val_every=0"]
    with pytest.raises(Terminated) as e:
        fit(compose_cfg([*TINY, f"data.root={synth_dir.parent}", *compiled]), Path("run"))
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before  # Lightning put it back
    lines = (Path("run") / "train.log").read_text().splitlines()
    assert "warmup_step:1/3" in lines and "warmup_step:2/3" not in lines
    assert not [x for x in lines if x.startswith("step:")]
    assert lines[-1] == (
        "terminated: SIGTERM during the compile warm-up (no step was trained: run the same command again); "
        "stopping with exit status 143. No artifact was written. No results.json."
    )
    assert not (Path("run") / "checkpoints").exists() and not list(Path("run").glob("*.ptz"))
