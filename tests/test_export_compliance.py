"""The artifact's GPTQ calibration in the verdicts (eval.py's eval_result.json and the training run's
results.json), and the training-data calibration checked before training (callbacks/export.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks.export import artifact_compliance, check_calibration_source
from pgolf.config.typed import ConfigError
from pgolf.data.shards import list_shards
from pgolf.data.tokenizer import TokenizerInfo
from pgolf.eval.run import MAX_TOKENS_REASON, evaluate_artifact
from pgolf.export.roundtrip import VAL_MAX_TOKENS_REASON
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import encode_artifact, pack
from pgolf.quant.rules import quantize_state, rules_from_config
from pgolf.quant.settings import CalibrationConfig, calibration_ok, compliance

RULES = [{"name": "matrix", "ndim": 2, "store": "int", "bits": 6}, {"name": "rest", "store": "fp16"}]
# the record gptq_stage.py writes for training data read after the deadline (pgolf/quant/settings.py)
LATE = {
    "source": "train",
    "count": 2,
    "length": 32,
    "seconds": 0.5,
    "clock_start_ms": 599_900.0,
    "clock_end_ms": 600_400.0,
    "clock": "derived",
    **compliance("train", 0.5, 599_900.0, 600_000.0),
}


def tiny_artifact(tmp_path, synth_dir, calibration: dict | None):
    """A 1-layer model's artifact for the synthetic tokenizer, with `calibration` as its record (None: no GPTQ)."""
    tok = TokenizerInfo.from_path(next(synth_dir.glob("*.model")))
    cfg = GPTConfig(vocab_size=tok.vocab_size, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    entries = quantize_state(GPT(cfg).state_dict(), rules_from_config(RULES))
    meta = {"model": cfg.to_dict(), "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256}}
    meta |= {"train": {"seq_len": 32}, "code": {"bytes": 1000, "sha256": "cd" * 32}}
    if calibration is not None:
        meta["calibration"] = calibration
    path = tmp_path / "a.ptz"
    path.write_bytes(encode_artifact(pack(entries, meta), "zlib"))
    return path


def evaluate(path, synth_dir, out):
    data = {"tokenizer_path": str(next(synth_dir.glob("*.model"))), "val_pattern": str(synth_dir / "synth_val_*.bin")}
    return evaluate_artifact(artifact=path, modes={"standard": {}}, data=data, max_tokens=64, out_dir=out)


# ---- eval.py: the artifact's calibration record -------------------------------------------------------------
def test_eval_is_not_compliant_when_the_artifacts_calibration_is_not(tmp_path, synth_dir, capsys):
    assert LATE["compliant"] is False and "after the training deadline" in LATE["reason"]
    res = evaluate(tiny_artifact(tmp_path, synth_dir, LATE), synth_dir, tmp_path / "o")
    c = res["compliance"]
    assert res["compliant"] is False and c["calibration_ok"] is False and c["score_before_adapt"] is True
    assert f"calibration: {LATE['reason']}" in c["reasons"]
    assert res["calibration"] == LATE  # the record, copied
    mode = res["results"]["standard"]  # every mode scored the artifact: none is compliant
    assert mode["compliant"] is False and mode["reason"].startswith(f"calibration: {LATE['reason']}; ")
    assert json.loads((tmp_path / "o" / "eval_result.json").read_text())["calibration"] == LATE
    out = capsys.readouterr().out
    assert "calibration: source:train compliant:false inside_training_budget:false" in out
    assert "clock_start_ms:599900.0 clock_end_ms:600400.0" in out
    assert f"compliant:false | {MAX_TOKENS_REASON} | calibration: {LATE['reason']}" in out


def test_eval_of_an_artifact_without_calibration_or_with_a_compliant_one(tmp_path, synth_dir):
    ok = {**LATE, **compliance("train", 0.05, 1000.0, 600_000.0)}
    for name, record in (("none", None), ("ok", ok)):
        res = evaluate(tiny_artifact(tmp_path, synth_dir, record), synth_dir, tmp_path / name)
        assert res["compliance"]["calibration_ok"] is True and res["calibration"] == record
        assert res["compliance"]["reasons"] == [MAX_TOKENS_REASON]  # max_tokens only
        mode = res["results"]["standard"]  # scored on a prefix: its own rule holds, the verdict is not compliant
        assert mode["compliant"] is False and mode["reason"].startswith(f"{MAX_TOKENS_REASON}; each target")


def test_calibration_ok_reads_the_record_strictly():
    assert calibration_ok(None) == (True, "no calibration record")
    assert calibration_ok({"compliant": True, "reason": "r"}) == (True, "r")
    assert calibration_ok({"compliant": "yes", "reason": "r"})[0] is False  # only a true bool is compliant
    assert calibration_ok([1])[0] is False


# ---- train.py: results.json says the same -------------------------------------------------------------------
def results(calibration, size_ok=True):
    export = {"calibration": calibration, "size_ok": size_ok, "total_bytes": 17_000_000, "limit_bytes": 16_000_000}
    modes = {
        m: {"mode": m, "val_loss": 2.0, "val_bpb": 1.2, "compliant": True, "reason": "causal"}
        for m in ("standard", "sliding")
    }
    return {"export": export, "roundtrip": modes}


def test_results_json_states_the_artifacts_compliance(capsys):
    r = results(LATE)
    v = artifact_compliance(r, None)
    assert v == {
        "calibration_ok": False,
        "size_ok": True,
        "full_validation": True,
        "reasons": [f"calibration: {LATE['reason']}"],
    }
    for mode in r["roundtrip"].values():  # compare.py and submission.py read these
        assert mode["compliant"] is False and mode["reason"] == f"calibration: {LATE['reason']}; causal"
    line = capsys.readouterr().out.strip()
    assert line.startswith("compliance: calibration_ok:false size_ok:true full_validation:true | calibration: ")
    r = results({"source": "ar", "compliant": True, "reason": "self-generated"}, size_ok=False)
    v = artifact_compliance(r, VAL_MAX_TOKENS_REASON)
    assert v["calibration_ok"] and not v["size_ok"] and not v["full_validation"] and len(v["reasons"]) == 2
    assert v["reasons"][1] == "data.val_max_tokens: not the full validation set"
    assert all(m["compliant"] for m in r["roundtrip"].values())
    assert artifact_compliance(results(None), None)["reasons"] == []  # no record: no GPTQ


def test_results_json_marks_a_non_finite_round_trip_score(capsys):
    """Weights that overflow the artifact's fp16 storage (optim.matrix_lr=1e30) scored `val_loss:nan` in the round
    trip with every verdict flag true; results.json then held a bare NaN."""
    r = results(None)
    r["roundtrip"]["sliding"] |= {"val_loss": float("nan"), "val_bpb": float("inf")}
    v = artifact_compliance(r, None)
    assert v["reasons"] == ["score: sliding: val_loss nan val_bpb inf is not finite"]
    assert r["roundtrip"]["sliding"]["compliant"] is False and r["roundtrip"]["sliding"]["reason"].endswith("; causal")
    assert r["roundtrip"]["standard"] == results(None)["roundtrip"]["standard"]  # a finite score: untouched
    assert "| score: sliding: val_loss nan val_bpb inf is not finite" in capsys.readouterr().out


def test_train_writes_a_non_finite_round_trip_score_as_null(tmp_path, synth_dir):
    """The reviewer's run: train.py with optim.matrix_lr=1e30 (finite float weights, an artifact that is not)."""
    root = Path(__file__).resolve().parent.parent
    args = ["data=synthetic", f"data.root={synth_dir.parent}", f"data.dir={synth_dir}", "model=tiny"]
    args += ["train.seq_len=32", "train.batch_tokens=1024", "train.iterations=4", "train.max_wallclock_seconds=0"]
    args += ["train.warmdown_iters=2", "final_eval.modes=[standard]", "final_eval.batch_windows=8"]
    args += ["callbacks.progress=none", "optim.matrix_lr=1e30", f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    def strict(c):
        raise ValueError(f"not JSON: {c}")

    res = json.loads((tmp_path / "run" / "results.json").read_text(), parse_constant=strict)
    std = res["roundtrip"]["standard"]
    assert std["val_loss"] is None and std["compliant"] is False and std["reason"].startswith("score: standard: ")
    assert res["compliance"]["reasons"] == ["score: standard: val_loss nan val_bpb nan is not finite"]


# ---- the training-data calibration, checked before training -------------------------------------------------
def datamodule(local: int = 1024):
    """What check_calibration_source reads of GolfDataModule: the batch layout and the vocabulary size."""
    return SimpleNamespace(layout=SimpleNamespace(local=local), vocab_size=256)


def test_a_train_shuffled_calibration_that_cannot_draw_a_window_is_refused(synth_dir):
    files = list_shards(str(synth_dir / "synth_train_*.bin"))
    c = CalibrationConfig(source="train_shuffled", count=2, length=50_000)
    with pytest.raises(ConfigError, match=r"train_shuffled \(length=50000, world_size=1\).* hold no 50001-token"):
        check_calibration_source(c, files, datamodule(), 1)
    c = CalibrationConfig(source="train_shuffled", count=2, length=32, world_size=len(files) + 1)
    check_calibration_source(c, files, datamodule(), 1)  # rank 0 owns files[0::world]: still one file
    with pytest.raises(ConfigError, match="owns none"):
        check_calibration_source(c, [], datamodule(), 1)
    # a `train` calibration longer than a micro-batch: a config error (one line at set-up, not a traceback)
    with pytest.raises(ConfigError, match="micro-batch of 128 tokens per rank: export.calibration.length=2048"):
        check_calibration_source(CalibrationConfig(source="train", count=2, length=2048), files, datamodule(128), 1)


def test_more_windows_than_one_pass_holds_is_a_warning(synth_dir, capsys):
    files = list_shards(str(synth_dir / "synth_train_*.bin"))
    n = sum(len(f.read_bytes()) for f in files) // 2  # an upper bound on the tokens (uint16 shards)
    length = 4096
    check_calibration_source(CalibrationConfig("train_shuffled", 2, length), files, datamodule(), 1)
    assert capsys.readouterr().out == ""
    many = n // length + 1
    check_calibration_source(CalibrationConfig("train_shuffled", many, length), files, datamodule(), 1)
    out = capsys.readouterr().out
    assert out.startswith(f"WARNING: export.calibration.count={many} is more than the ") and "repeat" in out


def test_a_train_calibration_longer_than_a_micro_batch_is_refused(synth_dir):
    c = CalibrationConfig(source="train", count=2, length=2048)
    with pytest.raises(ValueError, match="micro-batch of 1024 tokens per rank: export.calibration.length=2048"):
        check_calibration_source(c, [], datamodule(local=1024), 1)
    check_calibration_source(c, [], datamodule(local=2048), 1)
    check_calibration_source(CalibrationConfig(source="ar", length=10**6), [], datamodule(), 1)
