"""eval.py counts the code an artifact records (its packed train_gpt.py); an artifact that records no code size
is scored but never compliant: zero counted code bytes would pass the 16,000,000-byte cap unseen."""

from __future__ import annotations

import json

import pytest
import torch

from pgolf.data.tokenizer import TokenizerInfo
from pgolf.eval.run import NO_CODE_REASON, evaluate_artifact
from pgolf.export.code import recorded_code_bytes
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import encode_artifact, pack
from pgolf.quant.rules import quantize_state, rules_from_config
from pgolf.tools.inspect import inspect

RULES = [{"name": "matrix", "ndim": 2, "store": "int", "bits": 6}, {"name": "rest", "store": "fp16"}]
SHA = "cd" * 32


def artifact(tmp_path, synth_dir, code: dict):
    """A 1-layer model's artifact for the synthetic tokenizer whose metadata holds `code` (the code record keys:
    `code`, `code_bytes`, or neither)."""
    tok = TokenizerInfo.from_path(next(synth_dir.glob("*.model")))
    cfg = GPTConfig(vocab_size=tok.vocab_size, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    entries = quantize_state(GPT(cfg).state_dict(), rules_from_config(RULES))
    meta = {"model": cfg.to_dict(), "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256}}
    path = tmp_path / "a.ptz"
    path.write_bytes(encode_artifact(pack(entries, {**meta, "train": {"seq_len": 32}, **code}), "zlib"))
    return path


def evaluate(path, synth_dir, out):
    data = {"tokenizer_path": str(next(synth_dir.glob("*.model"))), "val_pattern": str(synth_dir / "synth_val_*.bin")}
    return evaluate_artifact(artifact=path, modes={"standard": {}}, data=data, batch_windows=64, out_dir=out)


def test_an_artifact_without_a_code_record_is_scored_but_not_compliant(tmp_path, synth_dir, capsys):
    path = artifact(tmp_path, synth_dir, {})  # meta.code and meta.code_bytes removed
    res = evaluate(path, synth_dir, tmp_path / "o")
    assert res["val_bpb"] > 0 and res["results"]["standard"]["compliant"] is True  # the mode's own rule holds
    assert res["code_bytes"] is None and res["total_bytes"] is None and res["code_sha256"] is None
    assert res["artifact_bytes"] == path.stat().st_size
    assert res["compliant"] is False and res["compliance"]["size_ok"] is False
    assert res["compliance"]["reasons"] == [NO_CODE_REASON] and "records no code size" in NO_CODE_REASON
    assert json.loads((tmp_path / "o" / "eval_result.json").read_text())["compliance"]["reasons"] == [NO_CODE_REASON]
    out = capsys.readouterr().out
    assert "code_bytes:none total_bytes:unknown" in out and "size_ok:false" in out
    assert "compliant:false | size: the artifact records no code size" in out


@pytest.mark.parametrize(
    "code, n, sha",
    [
        ({"code": {"bytes": 1000, "sha256": SHA}, "code_bytes": 1000}, 1000, SHA),  # what the export writes
        ({"code": {"bytes": 700}}, 700, None),  # a record without its hash still gives the length
        ({"code_bytes": 900}, 900, None),  # an older artifact
    ],
)
def test_the_recorded_code_is_counted(tmp_path, synth_dir, code, n, sha):
    assert recorded_code_bytes(code) == n
    path = artifact(tmp_path, synth_dir, code)
    res = evaluate(path, synth_dir, tmp_path / "o")
    assert res["code_bytes"] == n and res["code_sha256"] == sha
    assert res["total_bytes"] == path.stat().st_size + n
    assert res["compliant"] is True and res["compliance"]["reasons"] == [] and res["compliance"]["size_ok"] is True


def test_no_record_is_not_zero_bytes():
    assert recorded_code_bytes({}) is None
    # zero bytes: no code was handed to the export (a bare library export, a re-export of a .ckpt): not a record
    assert recorded_code_bytes({"code_bytes": 0}) is None
    assert recorded_code_bytes({"code": {"bytes": 0, "sha256": None}, "code_bytes": 0}) is None


def test_inspect_says_when_no_code_size_is_recorded(tmp_path, synth_dir):
    """inspect printed `code: train_gpt.py 0 bytes` for an artifact without a code record, and a record without
    its hash counted 0 bytes."""
    text = inspect(artifact(tmp_path, synth_dir, {}))
    assert "code: not recorded (no meta.code or meta.code_bytes, or 0 bytes)" in text and "0 bytes sha256" not in text
    text = inspect(artifact(tmp_path, synth_dir, {"code": {"bytes": 700}}))
    assert "code: train_gpt.py 700 bytes sha256:not recorded" in text
