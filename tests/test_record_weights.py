"""A record's own weights into pgolf's export: `python -m pgolf.tools.reexport final_model.pt model=NAME`
reads the file a record's `torch.save(base_model.state_dict(), "final_model.pt")` writes (PR #1611's banked
layout mapped to pgolf's names), checked as a Lightning `.ckpt` is, so pgolf's quantizer can be compared with
the record's on the same weights. The record's files are written here by `to_record_1611` (its layout:
pgolf/model/banks.py, checked against the record's forward in tests/test_model_1611.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pgolf.tools.record_weights as rw
import pgolf.tools.reexport as rx
from pgolf.export.weights import save_float_weights
from pgolf.model.banks import to_record_1611
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import ArtifactError, read_artifact
from pgolf.tools.pack import conf_dir
from pgolf.tools.record_weights import load_input_weights as load_weights

V = 256  # conf/data/synthetic.yaml's vocabulary


def tiny_1611_dict() -> dict:
    """conf/model/tiny_1611.yaml as `model=tiny_1611 data=synthetic` composes it (reexport's config)."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="reexport", overrides=["weights=x", "model=tiny_1611", "data=synthetic"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def record_file(path, model: dict, seed: int = 0) -> tuple[str, dict[str, torch.Tensor]]:
    """A random tiny_1611 model saved as PR #1611 saves its own (banks, its SmearGate names, bf16 tok_emb);
    returns (path, pgolf's state dict of the same weights)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig.from_dict(model))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p.float()).to(p.dtype) * 0.05)
        m.tok_emb.weight.copy_(m.tok_emb.weight.bfloat16().float())  # values the record's bf16 table holds
    state = {k: v.clone() for k, v in m.state_dict().items()}
    rec = to_record_1611(state, model["num_layers"])
    rec["tok_emb.weight"] = rec["tok_emb.weight"].bfloat16()  # the record builds the model bf16, table kept
    torch.save(rec, path)
    return str(path), state


def test_a_records_banked_state_dict_loads_as_pgolf_weights(tmp_path):
    model = tiny_1611_dict()
    path, state = record_file(tmp_path / "final_model.pt", model)
    assert {"qo_bank", "smear_gate.weight"} <= set(torch.load(path, weights_only=True))  # the record's names
    got, meta = load_weights(path, model)
    assert meta == {"model": model, "source": "state_dict"}
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k].float(), v) for k, v in state.items())
    assert got["tok_emb.weight"].dtype == torch.bfloat16  # the record's table dtype: loading converts it
    flat = tmp_path / "flat.pt"  # the earlier records' layout: pgolf's own names
    torch.save(state, flat)
    assert all(torch.equal(load_weights(flat, model)[0][k].float(), v) for k, v in state.items())


def test_bad_state_dict_files_are_one_error_each(tmp_path):
    model = tiny_1611_dict()
    path, state = record_file(tmp_path / "final_model.pt", model)
    with pytest.raises(ArtifactError, match="holds no model config: name the model it was trained with, model="):
        load_weights(path)
    save_float_weights(tmp_path / "f.ptz", state, {"model": model})
    with pytest.raises(ArtifactError, match="carry their own model config; model= is for a bare state dict"):
        load_weights(tmp_path / "f.ptz", model)
    with pytest.raises(ArtifactError, match=r"qo_bank: expected 6 rows"):  # trained with 3 layers, named 5
        load_weights(path, {**model, "num_layers": 3, "xsa_last_n": 3, "parallel_start_layer": 2})
    rec = torch.load(path, weights_only=True)
    cases = {
        "list": ([rec["qo_bank"]], "not a state dict: it holds list"),
        "no_qo": ({k: v for k, v in rec.items() if k != "qo_bank"}, r"no qo_bank beside \['kv_bank'"),
        "extra": ({**rec, "blocks.0.attn.rotary.inv_freq": torch.ones(8)}, "'blocks.0.attn.rotary.inv_freq' is not a"),
        "shape": ({**rec, "skip_gates": rec["skip_gates"][:1]}, "tensor 'skip_gates' has shape"),
        "int": ({**rec, "smear_lambda": torch.zeros(1, dtype=torch.int64)}, "'smear.lam': dtype must be the model's"),
        "key": ({**rec, 3: torch.zeros(1)}, "entry '3' is not a named tensor"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(ArtifactError, match=message):
            load_weights(tmp_path / f"{name}.pt", model)

    torch.save(rec, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch.save before 1.6
    with pytest.raises(ArtifactError, match="not a zip-format torch.save file"):
        load_weights(tmp_path / "legacy.pt", model)
    nan = {**rec, "qo_bank": rec["qo_bank"].clone()}
    nan["qo_bank"][1, 2, :3] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(ArtifactError, match=r"tensor 'blocks.1.attn.c_q.weight' holds 3 non-finite values"):
        load_weights(tmp_path / "nan.pt", model)

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"tok_emb.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="refused by weights-only loading"):
        load_weights(tmp_path / "evil.pt", model)


def test_reexport_of_a_records_file_equals_the_same_weights_from_pgolf(tmp_path, synth_dir, capsys):
    """The record's file and pgolf's float weights of the same model give the same artifact tensors (PR #1611's
    SDClip GPTQ + LQER, its shuffled-window calibration and bf16 calibration forward) and the same round trip."""
    model = tiny_1611_dict()
    path, state = record_file(tmp_path / "final_model.pt", model)
    save_float_weights(tmp_path / "pg" / "final_model.float.ptz", state, {"model": model, "seed": 0})
    common = ["--export", "sdclip_gptq_record_1611", "data=synthetic", f"data.root={synth_dir.parent}"]
    common += ["export.calibration.count=4", "export.calibration.length=16", "export.gptq.batch=2"]
    common += ["export.codec=zstd", "export.level=3", "export.report_codecs=[]", "eval.seq_len=32"]
    common += ["eval.max_tokens=256", "seed=0", "export.rules.2.max_numel=64"]  # every matrix through GPTQ
    assert rx.main([path, "model=tiny_1611", *common, f"out_dir={tmp_path / 'rec'}"]) == 0
    assert rx.main([str(tmp_path / "pg" / "final_model.float.ptz"), *common, f"out_dir={tmp_path / 'pgo'}"]) == 0
    out = capsys.readouterr().out
    assert "forward:bf16" in out
    name = "final_model.sdclip_gptq_record_1611.ptz"
    a, b = read_artifact(tmp_path / "rec" / name), read_artifact(tmp_path / "pgo" / name)
    ea, eb = a[0], b[0]
    assert ea.keys() == eb.keys() and sum(e.lqer is not None for e in ea.values()) == 3  # LQER's top 3

    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    for k in ea:
        x, y = ea[k], eb[k]
        assert (x.kind, x.bits) == (y.kind, y.bits) and same(x.data, y.data) and same(x.q, y.q), k
        assert same(x.scale, y.scale) and (x.lqer is None) == (y.lqer is None), k
        if x.lqer is not None:
            assert all(same(getattr(x.lqer, f), getattr(y.lqer, f)) for f in ("qa", "sa", "qb", "sb")), k
    assert ea["tok_emb.weight"].bits == 7 and ea["blocks.0.mlp.fc.weight"].bits == 6
    from pgolf.tools.inspect import diff

    summary = diff(tmp_path / "rec" / name, tmp_path / "pgo" / name).splitlines()[-1]
    assert summary.startswith("codes: 0 of ") and summary.count(": same") == 3  # the 3 LQER tensors, equal
    ra = json.loads((tmp_path / "rec" / "reexport_sdclip_gptq_record_1611.json").read_text())
    rb = json.loads((tmp_path / "pgo" / "reexport_sdclip_gptq_record_1611.json").read_text())
    assert ra["roundtrip"]["standard"]["val_bpb"] == rb["roundtrip"]["standard"]["val_bpb"]
    assert ra["export"]["calibration"]["hessian_forward"] == "bf16"


@pytest.mark.parametrize("layout", ["flat", "pr1611"])
def test_pgolf_weights_written_as_a_records_file_and_back(tmp_path, capsys, layout):
    """`python -m pgolf.tools.record_weights W --out final_model.pt` writes the file the record's own export
    loads (PR #1611's banks with --layout pr1611), which reexport's reader maps back to the same weights."""
    model = tiny_1611_dict()
    _, state = record_file(tmp_path / "x.pt", model)
    save_float_weights(tmp_path / "w.ptz", state, {"model": model})
    out = tmp_path / "final_model.pt"
    assert rw.main([str(tmp_path / "w.ptz"), "--out", str(out), "--layout", layout]) == 0
    assert f"layout:{layout} tensors:" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    assert ("qo_bank" in sd and "smear_gate.weight" in sd) == (layout == "pr1611")
    assert ("blocks.0.attn.c_q.weight" in sd) == (layout == "flat")
    got, _ = load_weights(out, model)
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert rw.main([str(tmp_path / "w.ptz"), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert rw.main([str(tmp_path / "missing.ptz"), "--out", str(tmp_path / "y.pt")]) == 2
    assert not (tmp_path / "y.pt").exists()
