"""Typed config groups (pgolf/config/): misspelled keys and bad values refused with one line naming the key,
from the command line and from experiment files; YAML and dataclass defaults agree; every shipped config
validates; extra Lightning callbacks and loggers by `_target_`; the entry points answer before Lightning."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.config.runtime import check_runtime
from pgolf.config.schema import PREPARE_STEPS, RESERVED_TRAINER_KEYS, EvalRun, TrainRun
from pgolf.config.typed import ConfigError, Range, convert, load
from pgolf.config.validate import check_overrides, eval_modes, validate_eval, validate_train

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str], root: str = "train", searchpath: Path | None = None):
    if searchpath is not None:
        overrides = [f"hydra.searchpath=[file://{searchpath}]", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=root, overrides=overrides)


def validate(overrides: list[str], searchpath: Path | None = None) -> None:
    """Every check train.py runs before Lightning: the torch-free ones, then export/optim."""
    cfg = compose_cfg(overrides, searchpath=searchpath)
    validate_train(cfg, CONF)
    check_runtime(cfg)


def config_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


# ---- misspelled keys: (override key, expected message) for each group --------------------------------------
TYPOS = [
    ("train.warmdown_iter", "train.warmdown_iter is not a key of group train (did you mean warmdown_iters?)"),
    ("optim.muon_wdd", "optim.muon_wdd is not a key of group optim (did you mean muon_wd?)"),
    ("data.val_patern", "data.val_patern is not a key of group data (did you mean val_pattern?)"),
    ("final_eval.mode", "final_eval.mode is not a key of group final_eval (did you mean modes?)"),
    ("callbacks.progres", "callbacks.progres is not a key of group callbacks (did you mean progress?)"),
    ("callbacks.averaging.ema_decai", "not a key of group callbacks.averaging (did you mean ema_decay?)"),
    ("callbacks.checkpoint.kep", "callbacks.checkpoint.kep is not a key of group callbacks.checkpoint"),
    ("logger.knd", "logger.knd is not a key of group logger (did you mean kind?)"),
    ("seeed", "seeed is not a key of the root config (did you mean seed?)"),
    ("model.nm_layers", "model.nm_layers is not a key of group model (did you mean num_layers?)"),
]
RUNTIME_TYPOS = [  # export is read into ExportConfig after the torch-free checks
    ("export.codek", "export.codek is not a key of group export (did you mean codec?)"),
    ("export.prune.enabld", "export.prune.enabld is not a key of group export.prune (did you mean enabled?)"),
]


@pytest.mark.parametrize(("key", "expected"), TYPOS)
def test_misspelled_key_on_the_command_line_is_named_before_composing(key, expected):
    for arg in (f"{key}=5", f"+{key}=5", f"~{key}"):
        assert expected in config_error(check_overrides, [arg], TrainRun, CONF)


@pytest.mark.parametrize(("key", "expected"), TYPOS + RUNTIME_TYPOS)
def test_misspelled_key_added_with_plus_fails_after_composing(key, expected):
    assert expected in config_error(validate, [f"+{key}=5"])


def nested(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize(("key", "expected"), TYPOS + RUNTIME_TYPOS)
def test_misspelled_key_in_an_experiment_file_fails(tmp_path, key, expected):
    (tmp_path / "experiment").mkdir()
    exp = OmegaConf.create(nested(key, 5))
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(exp))
    assert expected in config_error(validate, ["experiment=typo"], tmp_path)


def test_wandb_keys_belong_to_logger_wandb_only():
    msg = config_error(validate, ["+logger.project=x"])
    assert msg.startswith("logger.project is not a key of group logger")
    validate(["logger=wandb", "logger.project=x"])
    assert "logger.kind must be one of csv | none | wandb" in config_error(validate, ["logger.kind=tensorboard"])


def test_group_selections_and_hydra_overrides_pass_the_command_line_check():
    check_overrides(
        ["-m", "model=tiny", "experiment=record_1263", "debug=smoke", "hydra/launcher=joblib", "hydra.run.dir=x"]
        + ["seed=1,2", "model.num_layers=3", "+trainer.fast_dev_run=true", "--cfg", "job"],
        TrainRun,
        CONF,
    )
    check_overrides(["artifact=x.ptz", "eval=[standard,sliding]", "eval.sliding.stride=32"], EvalRun, CONF)
    assert "modle is not a key of the root config (did you mean model?)" in config_error(
        check_overrides, ["modle=tiny"], TrainRun, CONF
    )
    check_overrides(["experiment=ablation/no_ema", "eval=[standard]", "model=${oc.env:M}"], TrainRun, CONF)
    check_overrides(["hydra.searchpath=[file:///elsewhere]", "experiment=mine"], TrainRun, CONF)  # Hydra looks


@pytest.mark.parametrize(
    "args, root, expected",
    [
        (["experiment=record1263"], TrainRun, "experiment=record1263: no such option of experiment (one of "),
        (["-m", "model=tiny,tiy"], TrainRun, "model=tiy: no such option of model (one of baseline | "),
        (["eval=[standard,slidng]"], EvalRun, "eval=slidng: no such option of eval ("),
        (["model=null"], TrainRun, "model=null: a group selection names an option (one of baseline | "),
    ],
)
def test_a_group_option_that_does_not_exist_is_one_line(args, root, expected):
    msg = config_error(check_overrides, args, root, CONF)
    assert msg.startswith(expected) and "\n" not in msg
    assert "did you mean" in msg or "null" in msg


# ---- values: one line naming the key and its allowed range ----------------------------------------------------
BAD_VALUES = [
    (["optim.matrix_lr=-0.01"], "optim.matrix_lr must be a number >= 0, got -0.01"),
    (["optim.embed_lr=-1"], "optim.embed_lr must be a number >= 0, got -1"),
    (["optim.muon_momentum=1.0"], "optim.muon_momentum must be a number in [0, 1), got 1.0"),
    (["optim.betas=[0.9]"], "optim.betas must be a list of 2 values, got [0.9]"),
    (["optim=record_1298", "optim.ns_steps=6"], "optim.ns_steps: polar_express supports 1..5 steps, got 6"),
    (["final_eval.modes=[standard,slidin]"], "final_eval.modes[1] = 'slidin' is not an eval mode (one of "),
    (["final_eval.batch_windows=0"], "final_eval.batch_windows must be an integer >= 1, got 0"),
    (["final_eval.stride=512"], "final_eval.stride must be in [1, seq_len=256] for the sliding mode, got 512"),
    (["train.seq_len=0"], "train.seq_len must be an integer >= 1, got 0"),
    (["train.seq_len=-5"], "train.seq_len must be an integer >= 1, got -5"),
    (["train.grad_accum=0"], "train.grad_accum must be an integer >= 1 or one of auto, got 0"),
    (["train.iterations=ten"], "train.iterations must be an integer >= 1, got 'ten'"),
    (["train.compile=1"], "train.compile must be true or false, got 1"),
    (
        ["train.max_wallclock_seconds=1", "train.gptq_reserve_seconds=1"],
        "train.gptq_reserve_seconds=1.0 leaves no training time under max_wallclock_seconds=1.0",
    ),
    (["model.num_heads=0"], "model.num_heads must be an integer >= 1, got 0"),
    (["model.num_heads=5"], "model.model_dim 192 must be divisible by num_heads 5"),
    (["model.mlp_act=gelu"], "model.mlp_act 'gelu' not in ('relu2', 'leaky_relu2', 'swiglu')"),
    (["callbacks.averaging.kind=emma"], "callbacks.averaging.kind must be one of none | ema | swa, got 'emma'"),
    (["callbacks.averaging.ema_decay=1"], "callbacks.averaging.ema_decay must be a number in (0, 1), got 1"),
    (["data.prepare=fineweb"], "data.prepare must be one of demo | synthetic | none | null, got 'fineweb'"),
    (["data.val_max_tokens=0"], "data.val_max_tokens must be an integer >= 1 or null, got 0"),
    (["trainer.devices=0"], "trainer.devices must be an integer >= 1, got 0"),
    (["seed=-1"], "seed must be an integer in [0, 4294967295], got -1"),
    (["logger=wandb", "logger.mode=online2"], "logger.mode must be one of auto | online | offline | disabled"),
    (["+callbacks.extra.lr.logging_interval=step"], "callbacks.extra.lr needs a _target_ (the callback class"),
    (["export.codec=rar"], "export: export codec 'rar' is not one of ['brotli', 'lzma', 'pergroup', "),
    (["export.rules=[]"], "export: export.rules is empty: a quantization scheme needs at least one rule"),
    (["optim.matrix_lr=inf"], "optim.matrix_lr must be a number >= 0, got inf (not a finite number)"),
    (["model.rope_base=nan"], "model.rope_base must be a number, got nan (not a finite number)"),
    # these passed and crashed at the first step: an MLP of width <= 0, a float beyond fp32's range
    (["model.mlp_mult=0"], "model.mlp_mult 0.0 must make the MLP width mlp_mult * model_dim >= 1"),
    (["model.mlp_mult=-2"], "model.mlp_mult -2.0 must make the MLP width mlp_mult * model_dim >= 1"),
    (["model.mlp_mult=0.001"], "model.mlp_mult 0.001 must make the MLP width mlp_mult * model_dim >= 1"),
    (["model.qk_gain_init=1e300"], "model.qk_gain_init must be a number, got 1e+300 (beyond fp32's range, 3.4e38)"),
    (["model.leaky_slope=-1e39"], "model.leaky_slope must be a number, got -1e+39 (beyond fp32's range, 3.4e38)"),
    (["optim.matrix_lr=1e300"], "optim.matrix_lr must be a number >= 0, got 1e+300 (beyond fp32's range, 3.4e38)"),
    (["model.rope_base=" + "9" * 400], "model.rope_base must be a number, got 9999"),
    (["model.qat_bits=${oops}"], "Interpolation key 'oops' not found"),
    # what eval.py's artifact check refuses is refused before training (an artifact no eval.py would read)
    (["model.rope_base=0.5"], "model.rope_base 0.5 must be >= 1"),
    (
        ["model.vocab_size=16896", "final_eval.seq_len=8192"],
        "model.vocab_size x final_eval.seq_len = 138,412,032 logits a window, over 134,217,728 (eval memory)",
    ),
    (["model.vocab_size=16896", "train.seq_len=8192"], "model.vocab_size x final_eval.seq_len = 138,412,032 logits"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES, ids=[" ".join(o)[:50] for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key_and_its_range(overrides, expected):
    assert expected in config_error(validate, overrides)


def test_missing_key_and_mandatory_value():
    assert "train.log_every is missing from group train" in config_error(validate, ["~train.log_every"])
    assert "name must be set (it is ??? in the config)" in config_error(validate, ["name=???"])


def test_eval_config():
    assert "artifact must be set: python eval.py artifact=PATH" in config_error(
        validate_eval, compose_cfg([], "eval"), CONF
    )
    run = validate_eval(compose_cfg(["artifact=a.ptz", "eval=[standard,sliding,ttt]"], "eval"), CONF)
    assert list(run.eval) == ["standard", "sliding", "ttt"] and run.data.vocab_size == 1024
    for overrides, expected in [
        (["+eval.mine.mode=slot"], "eval.mine: 'slot' is not an eval mode (one of "),
        (["batch_windows=0"], "batch_windows must be an integer >= 1, got 0"),
        (["compile=maybe"], "compile must be true or false or one of auto, got 'maybe'"),
        (["data.val_max_tokens=100"], "data.val_max_tokens must be null: eval.py always scores the whole"),
        (["+trainer.max_steps=3"], "trainer.max_steps is set by pgolf: use train.iterations"),
    ]:
        assert expected in config_error(validate_eval, compose_cfg(["artifact=a.ptz", *overrides], "eval"), CONF)


# ---- defaults in one place ---------------------------------------------------------------------------------------
def test_model_yaml_repeats_the_gptconfig_defaults():
    from pgolf.model.config import GPTConfig

    y = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "baseline.yaml"))
    assert y.pop("vocab_size") == "${data.vocab_size}"
    assert set(y) | {"vocab_size"} == {f.name for f in dataclasses.fields(GPTConfig)}
    assert GPTConfig.from_dict(y) == GPTConfig()


def test_export_yaml_repeats_the_exportconfig_defaults():
    """conf/export/int8_zlib.yaml, the base of every export config, sets every key of ExportConfig and of each
    of its sections (gptq, calibration, prune, lqer) to the dataclass default: a field added to a dataclass
    but not to the YAML cannot be overridden from the command line (`Key 'device' is not in struct`)."""
    from pgolf.export.config import ExportConfig
    from pgolf.quant.rules import rules_from_config

    raw = OmegaConf.to_container(OmegaConf.load(CONF / "export" / "int8_zlib.yaml"))
    assert set(raw) == {f.name for f in dataclasses.fields(ExportConfig)}
    d = ExportConfig()
    sections = [f.name for f in dataclasses.fields(ExportConfig) if dataclasses.is_dataclass(getattr(d, f.name))]
    assert {"gptq", "calibration", "prune", "lqer"} <= set(sections)
    for name in sections:
        keys = {f.name for f in dataclasses.fields(getattr(d, name))}
        assert set(raw[name]) == keys, f"export.{name}: missing {sorted(keys - set(raw[name]))}"
    y = ExportConfig.from_dict(raw)
    for f in dataclasses.fields(ExportConfig):
        if f.name != "rules":  # the YAML spells the rules' scale_floor default out
            assert getattr(y, f.name) == getattr(d, f.name), f.name
    assert rules_from_config(y.rules) == rules_from_config(d.rules)


def test_the_newer_gptq_and_calibration_keys_override_in_every_export_config():
    over = ["export.gptq.device=model", "export.gptq.hessian_norm=batches", "export.calibration.world_size=8"]
    for name in ("int8_zlib", "int6_gptq_zstd", "int6_gptq_lzma"):
        e = compose_cfg([f"export={name}", *over]).export
        assert (e.gptq.device, e.gptq.hessian_norm, e.calibration.world_size) == ("model", "batches", 8), name


def test_schema_constants_match_the_runtime():
    from pgolf.tools.datasets import PREPARE_STEPS as STEPS

    assert PREPARE_STEPS == STEPS
    assert eval_modes(CONF) == sorted(p.stem for p in (CONF / "eval").glob("*.yaml")) and "standard" in eval_modes(CONF)


def test_reserved_trainer_keys_are_the_ones_build_trainer_sets(monkeypatch):
    import lightning as L

    from pgolf.train import build

    assert set(RESERVED_TRAINER_KEYS) <= set(inspect.signature(L.Trainer).parameters)
    seen = {}
    monkeypatch.setattr(build.L, "Trainer", lambda **kw: seen.update(kw))
    build.build_trainer(compose_cfg([]), [], [])
    trainer_yaml = set(OmegaConf.load(CONF / "trainer" / "cpu.yaml"))
    # and max_time: Lightning's Timer counts validation and compile time, the challenge clock does not
    assert set(seen) - trainer_yaml == set(RESERVED_TRAINER_KEYS) - {"max_time"}


# ---- every shipped config validates ------------------------------------------------------------------------------
def shipped() -> list[list[str]]:
    exps = sorted(
        p.relative_to(CONF / "experiment").with_suffix("").as_posix() for p in CONF.glob("experiment/**/*.yaml")
    )
    debugs = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
    runs = [[f"experiment={e}"] for e in exps] + [[f"debug={d}"] for d in debugs]
    for group in ("model", "data", "optim", "trainer", "logger", "callbacks", "export"):
        runs += [[f"{group}={p.stem}"] for p in sorted((CONF / group).glob("*.yaml"))]
    return runs + [[f"experiment={e}", f"debug={d}"] for e in exps[:1] for d in debugs]


@pytest.mark.parametrize("overrides", shipped(), ids=lambda o: " ".join(o))
def test_every_shipped_config_validates(overrides):
    from pgolf.train.build import check_lightning_config

    cfg = compose_cfg(overrides)
    run = validate_train(cfg, CONF)
    export = check_runtime(cfg)
    check_lightning_config(cfg)
    assert run.train.batch_tokens > 0 and run.model.vocab_size == run.data.vocab_size and export.label


def test_debug_smoke_is_a_few_steps_of_the_tiny_model_on_a_truncated_val_set():
    run = validate_train(compose_cfg(["experiment=record_1263", "debug=smoke"]), CONF)
    assert run.name == "record_1263" and run.train.iterations == 5 and run.train.max_wallclock_seconds == 0
    assert run.data.val_max_tokens == 32768 and run.final_eval.modes == ["standard"]
    assert compose_cfg(["debug=smoke"]).model.num_layers == 2


def test_truncated_val_tokens(synth_dir):
    from pgolf.data.stream import load_val_tokens
    from pgolf.train.build import truncated_val_tokens

    pattern = str(synth_dir / "synth_val_*.bin")
    full = load_val_tokens(pattern, 32, 256)
    cut, of = truncated_val_tokens(pattern, 32, 256, 100)
    assert cut.numel() == 3 * 32 + 1 and (cut == full[: cut.numel()]).all() and of == full.numel() - 1
    assert truncated_val_tokens(pattern, 32, 256, 10)[0].numel() == 33  # at least one sequence
    assert truncated_val_tokens(pattern, 32, 256, 10**9)[0].numel() == full.numel()


# ---- Lightning conventions: trainer pass-through, max_steps, extra callbacks and loggers by _target_ ---------------
def test_trainer_max_steps_points_to_train_iterations():
    expected = "trainer.max_steps is set by pgolf: use train.iterations"
    assert expected in config_error(check_overrides, ["trainer.max_steps=10"], TrainRun, CONF)
    assert expected in config_error(validate, ["+trainer.max_steps=10"])


def test_other_trainer_keys_go_to_lightning_and_are_checked_against_its_signature(tmp_path):
    from pgolf.train.build import build_trainer, check_lightning_config

    cfg = compose_cfg(["+trainer.detect_anomaly=true", "+trainer.log_every_n_steps=7"])
    validate_train(cfg, CONF)
    check_lightning_config(cfg)
    trainer = build_trainer(cfg, [], [])
    assert trainer.log_every_n_steps == 7
    bad = compose_cfg(["+trainer.detect_anomali=true"])
    validate_train(bad, CONF)
    assert "trainer.detect_anomali is not an argument of lightning.Trainer" in config_error(check_lightning_config, bad)
    assert "train.batch_tokens=8000 must split into" in config_error(
        check_lightning_config, compose_cfg(["train.batch_tokens=8000"])
    )


def test_extra_callback_and_logger_by_target(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from pgolf.train.build import build_extra_callbacks, build_logger, build_trainer

    cfg = compose_cfg(
        [
            "+callbacks.extra.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
            "+callbacks.extra.lr_monitor.logging_interval=step",
            "+logger.extra.csv2._target_=lightning.pytorch.loggers.CSVLogger",
            f"+logger.extra.csv2.save_dir={tmp_path}",
        ]
    )
    validate_train(cfg, CONF)
    extra = build_extra_callbacks(cfg)
    loggers = build_logger(cfg, tmp_path)
    trainer = build_trainer(cfg, extra, loggers)
    (mon,) = [cb for cb in trainer.callbacks if isinstance(cb, LearningRateMonitor)]
    assert mon.logging_interval == "step"
    assert [type(lg) for lg in loggers] == [CSVLogger, CSVLogger] and loggers[1].save_dir == str(tmp_path)

    bad = compose_cfg(["+callbacks.extra.x._target_=lightning.pytorch.callbacks.NoSuchCallback"])
    assert config_error(build_extra_callbacks, bad).startswith("callbacks.extra.x: Error locating target")
    wrong = compose_cfg(
        ["+callbacks.extra.x._target_=lightning.pytorch.loggers.CSVLogger", f"+callbacks.extra.x.save_dir={tmp_path}"]
    )
    assert (
        "callbacks.extra.x: lightning.pytorch.loggers.CSVLogger is not a lightning.pytorch.callbacks.callback.Callback"
        in config_error(build_extra_callbacks, wrong)
    )


# ---- the typed reader itself -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Inner:
    k: Literal["a", "b"]


@dataclasses.dataclass(frozen=True)
class Outer:
    n: Annotated[int, Range(gt=0, le=4)]
    x: float
    inner: Inner
    pair: tuple[int, int]
    names: list[str]
    opt: str | None = None


def test_typed_reader():
    o = load(Outer, {"n": 4, "x": 1, "inner": {"k": "a"}, "pair": [1, 2], "names": ["u", 3]}, "g")
    assert o == Outer(4, 1.0, Inner("a"), (1, 2), ["u", "3"]) and isinstance(o.x, float)
    assert "g.n must be an integer in (0, 4], got 5" in config_error(load, Outer, {"n": 5}, "g")
    assert "g.inner.k must be one of a | b, got 'c'" in config_error(
        load, Outer, {"n": 1, "x": 1, "inner": {"k": "c"}}, "g"
    )
    assert "g.names[1] must be a string, got True" in config_error(
        load, Outer, {"n": 1, "x": 1, "inner": {"k": "a"}, "pair": [1, 2], "names": ["u", True]}, "g"
    )
    assert convert(True, bool, "b") is True and convert(2, float, "f") == 2.0
    assert "flag must be an integer, got True" in config_error(convert, True, int, "flag")


# ---- the entry points: validate before importing Lightning --------------------------------------------------------
def entry(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_help_lists_the_groups():
    r = entry(["train.py", "--help"])
    assert r.returncode == 0, r.stderr
    assert "debug: smoke" in r.stdout and "experiment: " in r.stdout and "warmdown_iters: 300" in r.stdout


def test_train_bad_override_is_a_config_error_with_status_2(tmp_path):
    r = entry(["train.py", "train.warmdown_iter=5", f"hydra.run.dir={tmp_path}/run"])
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "config error: train.warmdown_iter is not a key of group train (did you mean warmdown_iters?)"
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\noptim:\n  muon_wdd: 0.1\n")
    r = entry(["train.py", f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo", f"hydra.run.dir={tmp_path}/r2"])
    assert (
        r.returncode == 2
        and "config error: optim.muon_wdd is not a key of group optim (did you mean muon_wd?)" in r.stderr
    )
    assert "Traceback" not in r.stderr
    r = entry(["train.py", "model.num_heads=0", f"hydra.run.dir={tmp_path}/r3"])
    assert r.returncode == 2 and "config error: model.num_heads must be an integer >= 1, got 0" in r.stderr


def test_eval_without_artifact_is_a_config_error_with_status_2(tmp_path):
    r = entry(["eval.py", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2
    assert "config error: artifact must be set: python eval.py artifact=PATH" in r.stderr


@pytest.mark.slow
def test_debug_smoke_runs_on_a_truncated_val_set(tmp_path, synth_dir):
    args = ["debug=smoke", "data=synthetic", f"data.root={synth_dir.parent}", "data.val_max_tokens=1000"]
    r = entry(["train.py", *args, f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "val_loader:pattern=synth_val_*.bin tokens:768" in r.stdout  # 3 whole sequences of 256
    assert "step:5/5 train_loss:" in r.stdout and "model_params:74312" in r.stdout  # the tiny model
    res = json.loads((tmp_path / "results.json").read_text())
    assert list(res["roundtrip"]) == ["standard"] and res["roundtrip"]["standard"]["tokens"] == 768
    # a cut split is not the challenge's metric: results.json and the log say so (they said full_validation:true)
    assert res["compliance"]["full_validation"] is False and not res["roundtrip"]["standard"]["compliant"]
    assert "compliance: calibration_ok:true size_ok:true full_validation:false | data.val_max_tokens" in r.stdout


def test_the_readme_lists_every_config_of_every_group():
    """README's Configuration table names every YAML of every group under conf/ (it went stale once)."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| group | options |") :].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        group = line.split("|")[1].strip().split()[0].strip("`")
        rows[group] = set(re.findall(r"`([\w/*]+)`", line.split("|")[2]))
    for group, listed in rows.items():
        folder = root / "conf" / group
        if not folder.is_dir():
            continue  # hydra/launcher: Hydra's own plugins besides conf/hydra/launcher
        names = {p.stem for p in folder.glob("*.yaml")} | {f"{p.name}/*" for p in folder.iterdir() if p.is_dir()}
        assert names <= listed, f"README's {group} row lacks {sorted(names - listed)}"
    assert {"model", "data", "optim", "export", "eval", "experiment"} <= set(rows)


def test_a_document_start_token_outside_the_vocabulary_is_refused_before_training():
    """`bos_id` of a TTT mode is where its documents start: an id the model's vocabulary lacks would leave one
    document and run for minutes; refused at start-up naming the mode (model.vocab_size 1024 here)."""
    over = ["final_eval.modes=[standard,lora_ttt]"]
    validate(over + ["+final_eval.settings.lora_ttt.bos_id=1023"])
    msg = config_error(validate, over + ["+final_eval.settings.lora_ttt.bos_id=1024"])
    assert "final_eval.settings.lora_ttt.bos_id=1024 is not a token id" in msg and "vocab_size=1024" in msg


def test_an_eval_window_is_capped_and_must_fit_the_validation_split():
    """final_eval.seq_len and a mode's own seq_len stop at eval.py's 16384; a window longer than the run's
    validation targets is refused when the data is set up, before training (it scored nothing and reported
    val_bpb 0.0 as compliant)."""
    from callbacks.export import check_eval_windows

    assert "final_eval.seq_len must be an integer in [1, 16384], got 16385" in config_error(
        validate, ["final_eval.seq_len=16385"]
    )
    msg = config_error(validate, ["+final_eval.settings.standard.seq_len=250000"])
    assert "eval mode standard: seq_len must be at most 16384" in msg
    ev = {"modes": ["standard", "sliding"], "seq_len": 64, "batch_windows": 4, "stride": 32, "reference_tail": False}
    check_eval_windows(ev, torch.zeros(65))
    with pytest.raises(ConfigError, match="mode standard scores windows of seq_len=64 tokens, longer than the 63 "):
        check_eval_windows(ev, torch.zeros(64))
    with pytest.raises(ConfigError, match="mode sliding scores windows of seq_len=128"):
        check_eval_windows({**ev, "settings": {"sliding": {"seq_len": 128}}}, torch.zeros(101))
    # final_eval.max_tokens keeps whole windows of final_eval.seq_len: one of 64 here, too few for 128
    with pytest.raises(ConfigError, match="mode sliding scores windows of seq_len=128 tokens, longer than the 64 "):
        check_eval_windows({**ev, "max_tokens": 10, "settings": {"sliding": {"seq_len": 128}}}, torch.zeros(1001))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a machine without CUDA")
def test_a_gpu_config_on_a_machine_without_cuda_is_a_config_error(tmp_path):
    """The records' experiments ask for a GPU; on a CPU machine one line says how to run there (Lightning's
    MisconfigurationException traceback before)."""
    from pgolf.train.run import prepare

    msg = config_error(prepare, compose_cfg(["experiment=baseline"]), tmp_path)
    assert msg.startswith("trainer.accelerator=gpu, but this machine has no CUDA device: run on the CPU with")
    assert msg.endswith("trainer.accelerator=cpu trainer.precision=32-true train.compile=false (a packed train_gpt.py)")
    prepare(compose_cfg(["experiment=baseline", "trainer=cpu"]), tmp_path)


def test_local_clipping_refuses_fp16_mixed_precision():
    """optim.grad_clip_scope=local averages after clipping; fp16's loss scaler would check each rank's local
    gradients, so that pair is refused before anything runs; bf16-mixed (the records') is fine."""
    msg = config_error(validate, ["optim.grad_clip_scope=local", "trainer.precision=16-mixed"])
    assert "optim.grad_clip_scope=local cannot run with trainer.precision=16-mixed" in msg
    validate(["optim.grad_clip_scope=local", "trainer.precision=bf16-mixed"])
