"""`python -m pgolf.tools.reexport` on bad input: a Lightning `.ckpt` gets the float weights' artifact checks
(bounded model config, at most MAX_MODEL_PARAMS parameters, its tensors against the config on the meta device)
before anything is allocated, its zip container is checked before torch reads it, and every bad file is one
`error: <path>: ...` line, exit 2; the data config's tokenizer is compared with the weights' before any data
is prepared or the model built. No test here builds a model on the CPU from a forged config: the guard
`no_cpu_model` fails the test first (the unfixed code would allocate gigabytes)."""

from __future__ import annotations

import os
import struct
import zipfile

import pytest
import torch

import pgolf.export.weights as weights
import pgolf.tools.reexport as rx
from pgolf.data.tokenizer import TokenizerError, TokenizerInfo
from pgolf.export.weights import MAX_MODEL_PARAMS, load_weights, save_float_weights
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import ArtifactError

CFG = GPTConfig(vocab_size=256, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
HUGE = {"vocab_size": 256, "model_dim": 65536, "num_layers": 64}  # the reviewer's file: 1.5 KB, 24 GB RSS


@pytest.fixture
def no_cpu_model(monkeypatch) -> list[str]:
    """GPTs built through pgolf.export.weights: only on the meta device (the shape check); a CPU build fails."""
    devices, real = [], weights.GPT

    def guard(cfg):
        devices.append(torch.empty(0).device.type)
        if devices[-1] != "meta":
            raise AssertionError(f"a {cfg.num_layers}-layer width-{cfg.model_dim} GPT was built on the CPU")
        return real(cfg)

    monkeypatch.setattr(weights, "GPT", guard)
    return devices


def ckpt(path, state=None, model=None, **extra):
    """A Lightning-style checkpoint: `gpt.*` state and `hyper_parameters.model` (torch.save, zip format)."""
    state = GPT(CFG).state_dict() if state is None else state
    body = {"state_dict": {f"gpt.{k}": v for k, v in state.items()}, "hyper_parameters": {"model": model}}
    body["hyper_parameters"]["model"] = CFG.to_dict() if model is None else model
    torch.save({**body, **extra}, path)
    return path


def cli_error(path, capsys, *args, named: bool = True) -> str:
    """The one stderr line of `reexport PATH` (exit 2): `error: PATH: ...` when `named`."""
    assert rx.main([str(path), "--export", "int6_rtn_zstd", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {path}: " if named else "error: "), err
    return err


# ---- finding 1: a checkpoint's config and tensors are checked before anything is allocated ---------------
def test_the_reviewers_huge_config_is_refused_in_one_line(tmp_path, capsys, no_cpu_model):
    path = tmp_path / "BIG.ckpt"
    torch.save({"state_dict": {"gpt.x": torch.zeros(1)}, "hyper_parameters": {"model": HUGE}}, path)
    assert path.stat().st_size < 4096
    with pytest.raises(ArtifactError, match=r"BIG\.ckpt: hyper_parameters\.model\.model_dim must be an integer in"):
        load_weights(path)
    assert "model_dim must be an integer in [2, 8192], got 65536" in cli_error(path, capsys)
    assert "cpu" not in no_cpu_model


def test_a_config_over_the_parameter_cap_is_refused_on_the_meta_device(tmp_path, no_cpu_model):
    model = {**CFG.to_dict(), "vocab_size": 1024, "model_dim": 8192, "num_heads": 64, "num_kv_heads": 8}
    model["num_layers"] = 64  # every field in its bounds; ~51e9 parameters together
    with pytest.raises(
        ArtifactError,
        match=rf"hyper_parameters\.model implies [\d,]+ parameters, over the limit of {MAX_MODEL_PARAMS:,}",
    ):  # noqa: E501
        load_weights(ckpt(tmp_path / "w.ckpt", {"x": torch.zeros(1)}, model))
    assert no_cpu_model == ["meta"]


def _reshaped(state):
    return {**state, "tok_emb.weight": state["tok_emb.weight"][:128]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_reshaped, r"tensor 'tok_emb\.weight' has shape \[128, 32\]; the model config implies \[256, 32\]"),
        (lambda s: {**s, "extra.weight": torch.zeros(3)}, r"tensor 'extra\.weight' is not a parameter of the model"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("blocks.0.mlp.")}, r"tensors missing .*mlp"),
        (
            lambda s: {**s, "blocks.0.attn_scale": torch.zeros(32, dtype=torch.int64)},
            r"dtype must be the model's float32",
        ),
        (lambda s: {**s, "tok_emb.weight": [1.0]}, r"gpt\.tok_emb\.weight is not a tensor"),
        (lambda s: {}, r"state_dict has no gpt\.\* weights"),
    ],
    ids=["shape", "extra", "missing", "dtype", "not-a-tensor", "empty"],
)
def test_checkpoint_tensors_must_fit_the_config(tmp_path, no_cpu_model, edit, message):
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    no_cpu_model.clear()
    with pytest.raises(ArtifactError, match=message):
        load_weights(ckpt(tmp_path / "w.ckpt", edit(state)))
    assert "cpu" not in no_cpu_model


def test_a_valid_checkpoint_loads_as_before(tmp_path):
    """The tensors are the saved ones (mapped from the file), a floating dtype other than the model's is
    accepted (loading converts it), and the recorded document-bounded attention reaches the meta."""
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    state16 = {**state, "blocks.0.attn_scale": state["blocks.0.attn_scale"].to(torch.bfloat16)}
    got, meta = load_weights(ckpt(tmp_path / "w.ckpt", state16))
    assert meta == {"model": CFG.to_dict(), "source": "lightning_checkpoint"}
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state16.items())
    assert torch.equal(weights.model_from_weights(got, meta).tok_emb.weight, state["tok_emb.weight"])
    torch.save(
        {
            "state_dict": {f"gpt.{k}": v for k, v in state.items()},
            "hyper_parameters": {"model": CFG.to_dict(), "doc_attention": True, "max_seg_len": 8},
        },
        tmp_path / "d.ckpt",
    )
    assert load_weights(tmp_path / "d.ckpt")[1]["train"] == {"doc_attention": True, "max_seg_len": 8}


class Shell:
    """Pickled as a call of os.system: weights-only loading must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_files(tmp_path) -> dict:
    marker = tmp_path / "ran"
    files = {}
    torch.save({"state_dict": Shell(marker), "hyper_parameters": {}}, p := tmp_path / "shell.ckpt")
    files[p] = r"refused by weights-only loading: .*GLOBAL posix\.system"
    torch.save({"model": GPT(CFG).state_dict()}, p := tmp_path / "plain.ckpt")
    files[p] = r"not a Lightning checkpoint of pgolf's GPT: it needs a dict `state_dict` .*\['model'\]"
    torch.save([1, 2], p := tmp_path / "list.ckpt")
    files[p] = r"not a Lightning checkpoint: it holds a list"
    torch.save({"state_dict": {}, "hyper_parameters": ["model"]}, p := tmp_path / "hp.ckpt")
    files[p] = r"needs a dict `state_dict` and a dict `hyper_parameters\.model`"
    ckpt(p := tmp_path / "extra_field.ckpt", model={**CFG.to_dict(), "vocab": 3})
    files[p] = r"hyper_parameters\.model: unknown fields \['vocab'\]"
    torch.save({"a": 1}, p := tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    files[p] = r"not a zip-format PyTorch checkpoint"
    (p := tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    files[p] = r"not a zip-format PyTorch checkpoint"
    return files


def test_bad_checkpoints_are_one_error_line_each(tmp_path, capsys, no_cpu_model):
    for path, message in _bad_files(tmp_path).items():
        with pytest.raises(ArtifactError, match=message):
            load_weights(path)
        cli_error(path, capsys)
    assert not (tmp_path / "ran").exists() and "cpu" not in no_cpu_model


def test_the_zip_container_is_checked_before_torch_reads_it(tmp_path):
    """A compressed record (which could inflate to any size) and a directory that declares too many records
    are refused from the zip's own records."""
    good = ckpt(tmp_path / "w.ckpt")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "z.ckpt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(ArtifactError, match=r"checkpoint record '.*' is compressed"):
        load_weights(tmp_path / "z.ckpt")
    data = bytearray(good.read_bytes())
    i = data.rfind(b"PK\x06\x06")  # the zip64 end record torch writes: total records at +32
    struct.pack_into("<Q", data, i + 32, weights.MAX_CKPT_RECORDS + 1)
    (tmp_path / "n.ckpt").write_bytes(data)
    with pytest.raises(ArtifactError, match=rf"declares {weights.MAX_CKPT_RECORDS + 1} records"):
        load_weights(tmp_path / "n.ckpt")


# ---- finding 2: the tokenizer is compared before any data is prepared -----------------------------------
@pytest.fixture
def no_prepare(monkeypatch):
    def refuse(prepare, root):
        raise AssertionError(f"data.prepare={prepare} ran before the tokenizer check")

    monkeypatch.setattr(rx, "ensure_dataset", refuse)


def synth_weights(tmp_path, synth_dir, tokenizer: dict | None = None):
    tok = TokenizerInfo.from_path(synth_dir / "synth_256_bpe_selftrained.model")
    meta = {"model": CFG.to_dict(), "tokenizer": tokenizer or vars(tok), "train": {"seq_len": 32}}
    return save_float_weights(tmp_path / "final_model.float.ptz", GPT(CFG).state_dict(), meta)


def test_an_unprepared_tokenizer_of_another_vocab_is_refused_before_preparing(tmp_path, synth_dir, no_prepare):
    """The reviewer's case: vocab-256 weights with the default data (demo, vocab 1024, not prepared yet)."""
    w = synth_weights(tmp_path, synth_dir)
    cfg = rx.compose_config(str(w), ["export=int6_rtn_zstd", "data=demo", f"data.root={tmp_path / 'demo'}"])
    with pytest.raises(TokenizerError) as e:
        rx.reexport(cfg)
    msg = str(e.value)
    assert "demo_1024_bpe_selftrained.model (vocab size 1024; data.prepare=demo would make it)" in msg
    assert "synth_256_bpe_selftrained.model (vocab size 256)" in msg and msg.endswith("tokenizer: data=synthetic")
    assert not (tmp_path / "demo").exists()


def test_a_prepared_tokenizer_is_checked_by_its_hash_before_preparing(tmp_path, synth_dir, no_prepare):
    tok = vars(TokenizerInfo.from_path(synth_dir / "synth_256_bpe_selftrained.model"))
    w = synth_weights(tmp_path, synth_dir, {**tok, "sha256": "0" * 64})
    cfg = rx.compose_config(str(w), ["data=synthetic", f"data.root={synth_dir.parent}"])
    with pytest.raises(TokenizerError, match=r"is not the one the weights final_model\.float\.ptz was built with"):
        rx.reexport(cfg)


def test_a_checkpoint_is_checked_against_the_data_vocab_and_seq_len_before_preparing(
    tmp_path, synth_dir, capsys, no_prepare
):
    """A `.ckpt` records no tokenizer: a configured vocab larger than its model's, or no evaluation length,
    is refused before anything is prepared."""
    small = GPTConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    path = ckpt(tmp_path / "w.ckpt", GPT(small).state_dict(), small.to_dict())
    err = cli_error(path, capsys, "data=synthetic", f"data.root={synth_dir.parent}", "eval.seq_len=32", named=False)
    assert "the data config's tokenizer synth_256_bpe_selftrained.model has vocab size 256, more than" in err
    path = ckpt(tmp_path / "v.ckpt")
    assert rx.main([str(path), "data=synthetic", f"data.root={synth_dir.parent}"]) == 2
    assert "v.ckpt records no training seq_len: set eval.seq_len=" in capsys.readouterr().err
