"""End to end through the entry points: configs compose, train.py -> artifact -> eval.py, multirun seeds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pgolf.model.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def experiments() -> list[str]:
    return sorted(
        str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml")
    )


@pytest.mark.parametrize("exp", experiments())
def test_every_experiment_composes_and_instantiates(exp):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={exp}"], return_hydra_config=True)
    from omegaconf import OmegaConf

    m = OmegaConf.to_container(cfg.model, resolve=True)
    GPTConfig.from_dict(m)
    assert cfg.name and cfg.train.batch_tokens > 0


@pytest.mark.parametrize("group", ["model", "data", "optim", "trainer", "logger", "export", "eval"])
def test_every_group_option_composes(group):
    root = "eval" if group == "eval" else "train"
    for p in sorted((CONF / group).glob("*.yaml")):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            overrides = [f"{group}={p.stem}"] + (["artifact=x"] if root == "eval" else [])
            cfg = compose(config_name=root, overrides=overrides, return_hydra_config=True)
        if group == "model":
            from omegaconf import OmegaConf

            with torch.device("meta"):  # every option builds; the records' full-size inits: tests/test_model.py
                GPT(GPTConfig.from_dict({**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": 64}))


def test_typo_override_fails():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="nm_layers"):
            compose(config_name="train", overrides=["model.nm_layers=3"])


def run(args: list[str], cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.iterations=6",
    "train.max_wallclock_seconds=0",
    "train.warmdown_iters=3",
    "train.log_every=2",
    "final_eval.batch_windows=8",
    "final_eval.seq_len=24",  # the round trip's windows, not the training length: eval.py defaults to them
    "final_eval.stride=16",
    "callbacks.progress=line",
    "callbacks.progress_every_seconds=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dir):
    d = tmp_path_factory.mktemp("run")
    r = run(["train.py", *TINY, f"data.root={synth_dir.parent}", f"hydra.run.dir={d}", "seed=0"])
    return d, r.stdout


def test_train_writes_artifact_logs_and_results(trained):
    d, out = trained
    for line in [
        "model_params:",
        "step:6/6 train_loss:",
        "DIAGNOSTIC pre_quant",
        "Serialized model int8+zlib:",
        "Code size:",
        "Total submission size int8+zlib:",
        "final_int8_zlib_roundtrip_exact val_loss:",
        "final_int8_zlib_sliding_window_exact",
        "seed:0",
        "progress: step 6/6 (100.0%)",
    ]:
        assert line in out, line
    res = json.loads((d / "results.json").read_text())
    assert res["size_ok"] and res["export"]["model_bytes"] == (d / "final_model.int8_zlib.ptz").stat().st_size
    assert (d / "final_model.float.ptz").is_file() and res["export"]["calibration"]["source"] == "none"
    assert res["compliance"] == {"calibration_ok": True, "size_ok": True, "full_validation": True, "reasons": []}
    assert (d / "train.log").read_text().count("step:") >= 3
    assert (d / ".hydra" / "config.yaml").is_file() and (d / "csv" / "metrics.csv").is_file()


def test_eval_reproduces_the_roundtrip(trained, synth_dir, tmp_path):
    d, _ = trained
    res = json.loads((d / "results.json").read_text())["roundtrip"]
    run(
        [
            "eval.py",
            f"artifact={d / 'final_model.int8_zlib.ptz'}",
            "data=synthetic",
            f"data.root={synth_dir.parent}",
            "eval=[standard,sliding]",
            "eval.sliding.stride=16",
            "batch_windows=8",
            f"out_dir={tmp_path}",
            f"hydra.run.dir={tmp_path}/h",
            "audit=true",
        ]
    )
    ev = json.loads((tmp_path / "eval_result.json").read_text())
    assert (tmp_path / "h" / ".hydra" / "config.yaml").is_file()  # rank 0 writes Hydra's files (output_subdir null)
    for mode in ("standard", "sliding"):
        assert abs(ev["results"][mode]["val_bpb"] - res[mode]["val_bpb"]) < 1e-6
        assert ev["results"][mode]["tokens"] == res[mode]["tokens"]
        assert ev["results"][mode]["compliant"] is True
    assert ev["mode"] == "standard" and {"val_loss", "val_bpb", "tokens", "bytes", "seconds"} <= set(ev)
    import numpy as np

    a = np.load(tmp_path / "audit.npz")
    assert a["sliding.nll"].size == ev["results"]["sliding"]["tokens"]


def test_eval_py_leaves_one_directory_under_torchrun(tmp_path):
    """torchrun's processes resolve the time in hydra.run.dir each on its own: a process other than rank 0
    removes its (empty) directory (each used to leave a directory of Hydra files); rank 0 keeps its `.hydra/`
    (test_eval_reproduces_the_roundtrip)."""
    r = subprocess.run(
        [sys.executable, "eval.py", f"artifact={tmp_path / 'missing.ptz'}", f"hydra.run.dir={tmp_path / '1'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RANK": "1"},
    )
    assert r.returncode == 2 and "artifact not found" in r.stderr and not (tmp_path / "1").exists()


def test_eval_refuses_a_different_tokenizer(trained, tmp_path, sp1024_path):
    d, _ = trained
    r = run(
        [
            "eval.py",
            f"artifact={d / 'final_model.int8_zlib.ptz'}",
            "data=fineweb_sp1024",
            f"data.tokenizer_path={sp1024_path}",
            f"hydra.run.dir={tmp_path}",
        ],
        check=False,
    )
    assert r.returncode != 0
    assert "vocab size 1024" in r.stderr and "differs" in r.stderr


def test_over_budget_is_a_failure(tmp_path, synth_dir):
    r = run(
        [
            "train.py",
            *TINY,
            "train.iterations=2",
            f"data.root={synth_dir.parent}",
            f"hydra.run.dir={tmp_path}",
            "export.limit_bytes=1000",
            "final_eval.modes=[standard]",
        ],
        check=False,
    )
    assert r.returncode == 3
    assert "FAIL" in r.stdout and "over the size limit" in r.stdout


def test_gptq_export_at_the_end_of_training_records_calibration(tmp_path, synth_dir):
    """The callback path: GPTQ calibrated on the training stream right after a run that ended inside its
    600 s cap is compliant, and the log, results.json and the artifact say so (PRs #535/#569/#593/#609)."""
    r = run(
        [
            "train.py",
            *TINY,
            "train.iterations=2",
            "train.max_wallclock_seconds=600",
            f"data.root={synth_dir.parent}",
            f"hydra.run.dir={tmp_path}",
            "export=int6_gptq_zstd",
            "export.rules.1.max_numel=64",  # so the tiny model's matrices are int6/int8
            "export.calibration.count=2",
            "export.calibration.length=32",
            "final_eval.modes=[standard]",
        ]
    )
    assert "gptq:calibrating source:train count:2 length:32" in r.stdout and "gptq:hessians layers:12" in r.stdout
    assert "calibration: source:train inside_training_budget:True compliant:true" in r.stdout
    stamp = re.search(r"gptq:challenge_clock start:([\d.]+)s end:([\d.]+)s cap:600.0s \(challenge\)", r.stdout)
    assert stamp and 0 < float(stamp[1]) <= float(stamp[2]) < 600
    res = json.loads((tmp_path / "results.json").read_text())
    cal = res["export"]["calibration"]
    assert cal["compliant"] and cal["inside_training_budget"] and res["export"]["timings"]["gptq"] >= 0
    assert res["compliance"]["calibration_ok"] and res["roundtrip"]["standard"]["compliant"]
    assert "compliance: calibration_ok:true size_ok:true full_validation:true" in r.stdout
    from pgolf.quant.artifact import read_artifact

    entries, meta = read_artifact(tmp_path / "final_model.int6_gptq_zstd.ptz")
    assert meta["calibration"] == cal and entries["blocks.0.attn.c_q.weight"].info["method"] == "gptq"
    assert "final_int6_gptq_zstd_roundtrip_exact" in r.stdout


def test_multirun_gives_one_dir_per_seed_and_honours_seed_0(tmp_path, synth_dir):
    run(
        [
            "train.py",
            "-m",
            *TINY,
            "train.iterations=3",
            f"data.root={synth_dir.parent}",
            "seed=0,1,0",
            f"hydra.sweep.dir={tmp_path}",
            "final_eval.modes=[standard]",
        ]
    )
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in dirs] == ["0_seed0", "1_seed1", "2_seed0"]
    bpb = [json.loads((p / "results.json").read_text())["roundtrip"]["standard"]["val_bpb"] for p in dirs]
    assert bpb[0] == bpb[2] != bpb[1]  # seed 0 reproduces itself and differs from seed 1
    assert "seed:0" in (dirs[0] / "train.log").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.matrix_lr=-0.1", "config error: optim.matrix_lr must be a number >= 0, got -0.1"),
        ("final_eval.modes=[bogus]", "config error: final_eval.modes[0] = 'bogus' is not an eval mode"),
    ],
)
def test_a_config_error_stops_the_run_before_it_leaves_anything(tmp_path, override, message):
    """Refused at start-up (status 2, one line naming the key): no training, no run directory, no artifact."""
    r = run(["train.py", *TINY, override, f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr
    assert "step:" not in r.stdout and list(tmp_path.iterdir()) == []


def test_a_second_run_into_a_finished_run_directory_is_refused(tmp_path):
    """A finished run's directory (artifact, results.json, checkpoints, metrics, log): a second run into it is
    refused at start-up and changes nothing there."""
    d = tmp_path / "run"
    for name in ("final_model.int8_zlib.ptz", "results.json", "train.log", "csv/metrics.csv", "checkpoints/last.ckpt"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(f"the first run's {name}")
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    r = run(["train.py", *TINY, f"hydra.run.dir={d}"], check=False)
    assert r.returncode == 2 and "step:" not in r.stdout
    line = r.stderr.strip()
    assert line.startswith("config error: run directory ") and "already holds another run's outputs" in line
    assert "(checkpoints, csv, final_model.int8_zlib.ptz, results.json, train.log)" in line and "resume=" in line
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before  # nothing written, .hydra/ included


def test_reexport_counts_the_code_a_script_making_its_artifact_holds(trained, synth_dir, tmp_path, capsys):
    """The run's train_gpt.py (int8_zlib: no GPTQ part) is beside its float weights: the re-export counts its
    config packed with the GPTQ export; weights without it keep the run's bytes and say which parts lack."""
    import shutil

    from pgolf.quant.artifact import read_artifact
    from pgolf.tools.reexport import main as reexport_main

    d, _ = trained
    trained_code = json.loads((d / "results.json").read_text())["export"]["code_bytes"]
    common = ["--export", "int6_gptq_zstd", "data=synthetic", f"data.root={synth_dir.parent}", "eval.enabled=false"]
    common += ["export.calibration.count=2", "export.calibration.length=32"]
    assert reexport_main([str(d / "final_model.float.ptz"), *common, f"out_dir={tmp_path / 'a'}"]) == 0
    res = json.loads((tmp_path / "a" / "reexport_int6_gptq_zstd.json").read_text())
    code = res["code"]
    assert code["source"] == "packed" and code["training_bytes"] == trained_code
    assert {"gptq", "gptq_calibration"} <= set(code["added_parts"]) and code["bytes"] > trained_code + 1000
    assert res["export"]["code_bytes"] == code["bytes"]
    meta = read_artifact(tmp_path / "a" / "final_model.int6_gptq_zstd.ptz")[1]
    assert meta["code"] == {"bytes": code["bytes"], "sha256": code["sha256"]}  # what eval.py counts
    out = capsys.readouterr().out
    assert f"reexport: code_bytes:{code['bytes']}: the training run's train_gpt.py config" in out
    assert f"Code size: {code['bytes']} bytes" in out

    (tmp_path / "w").mkdir()
    shutil.copy(d / "final_model.float.ptz", tmp_path / "w")  # no train_gpt.py beside it
    assert reexport_main([str(tmp_path / "w" / "final_model.float.ptz"), *common]) == 0
    res = json.loads((tmp_path / "w" / "reexport" / "reexport_int6_gptq_zstd.json").read_text())
    assert res["code"]["source"] == "training" and res["export"]["code_bytes"] == trained_code
    out = capsys.readouterr().out
    assert f"WARNING: code bytes {trained_code} are the training run's train_gpt.py (no train_gpt.py beside" in out
    assert "optional parts this export needs, ['gptq', 'gptq_calibration'" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval.sliding.stride=16"], "eval.sliding.stride: mode sliding is not selected (eval=[standard]): "),
        (["eval=sliding", "eval.sliding.foo=1"], "eval.sliding.foo: sliding has no setting foo (one of stride, "),
        (["eval=[standard,ttt]", "eval.ttt.seq_len=8"], "a per-mode seq_len is added: +eval.ttt.seq_len=..."),
    ],
)
def test_eval_mode_overrides_are_one_config_error_line(args, message):
    """A setting of a mode that is not selected, or that the mode lacks: one line before Hydra composes (Hydra's
    multi-line 'Could not override' error, exit 1, before)."""
    r = run(["eval.py", "artifact=x.ptz", *args], check=False)
    assert r.returncode == 2 and r.stderr.startswith("config error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_eval_mode_overrides_of_selected_modes_pass():
    import importlib

    check = importlib.import_module("eval").check_mode_overrides
    check(["eval=[standard,sliding]", "eval.sliding.stride=16", "+eval.ttt.seq_len=8"])
    check(["eval=sliding,ttt", "eval.ttt.lr=1"])  # a sweep: left to Hydra
    check(["+eval.mine={mode: ttt}", "eval.standard={}"])
