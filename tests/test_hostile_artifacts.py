"""Hostile artifacts (pgolf issue 14): every forged file is refused with one ArtifactError naming the field,
before anything is allocated; eval.py's arguments are checked before any work; eval_result.json carries the
size and the compliance verdict. Artifacts are built in memory with the project's own pack/encode, then the
header, table or bytes are edited."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import brotli
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pgolf.export.weights as weights
import pgolf.quant.artifact as art
from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.config.schema import EvalRun, FinalEvalConfig
from pgolf.config.typed import ConfigError, load
from pgolf.data.tokenizer import TokenizerError, TokenizerInfo
from pgolf.eval.run import MAX_TOKENS_REASON, check_eval_args, compliance, evaluate_artifact, out_of_memory, pick_device
from pgolf.export.weights import (
    MAX_MODEL_PARAMS,
    MAX_WINDOW_LOGITS,
    check_model_config,
    expected_state,
    load_artifact_model,
    read_model_artifact,
)
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant import pergroup
from pgolf.quant.artifact import (
    CODECS,
    MAGIC,
    MAX_FILE_BYTES,
    PREFIX,
    VERSION,
    VERSION_SINGLE,
    ArtifactError,
    _digest,
    compress,
    encode_artifact,
    load_artifact,
    pack,
    read_artifact,
    unpack,
)
from pgolf.quant.rules import dequantize_state, quantize_state, rules_from_config
from pgolf.tools import inspect as inspect_cli

CFG = GPTConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
HAS_LRZIP = shutil.which("lrzip") is not None
needs_lrzip = pytest.mark.skipif(not HAS_LRZIP, reason="lrzip is not installed (apt-get install lrzip)")
ALL_CODECS = [pytest.param(c, marks=needs_lrzip) if c == "pergroup" else c for c in sorted(CODECS)]
RULES = [{"name": "matrix", "ndim": 2, "store": "int", "bits": 6}, {"name": "rest", "store": "fp16"}]
TOKENIZER = {"name": "t.model", "vocab_size": 64, "sha256": "ab" * 32}


def model_raw(cfg: GPTConfig = CFG, meta: dict | None = None) -> bytes:
    torch.manual_seed(0)
    entries = quantize_state(GPT(cfg).state_dict(), rules_from_config(RULES))
    base = {"model": cfg.to_dict(), "tokenizer": TOKENIZER, "train": {"seq_len": 32}}
    return pack(entries, {**base, "code": {"bytes": 1000, "sha256": "cd" * 32}} if meta is None else meta)


@pytest.fixture(scope="module")
def raw() -> bytes:
    return model_raw()


def split(raw: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", raw)
    return json.loads(raw[4 : 4 + hlen]), raw[4 + hlen :]


def join(header, blob: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<I", len(hb)) + hb + blob


def forge_file(payload_raw: bytes, declared_len: int, codec: str = "zlib") -> bytes:
    """A checksummed file whose prefix declares `declared_len` payload bytes (true or not)."""
    payload = compress(payload_raw, codec, 1)
    cid = CODECS[codec]
    digest = _digest(VERSION_SINGLE, cid, 1, declared_len, payload)
    return PREFIX.pack(MAGIC, VERSION_SINGLE, cid, 1, declared_len, digest) + payload


def write(tmp_path, data: bytes, name: str = "a.ptz"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def edited(raw: bytes, edit) -> bytes:
    header, blob = split(raw)
    header = copy.deepcopy(header)
    edit(header)
    return join(header, blob)


def tensor(header: dict, name: str) -> dict:
    return next(t for t in header["tensors"] if t["name"] == name)


def meta_builds_only(monkeypatch) -> list[str]:
    """Record the device of every GPT built through pgolf.export.weights (meta: the shape check)."""
    devices, real = [], weights.GPT

    def spy(cfg):
        devices.append(torch.empty(0).device.type)
        return real(cfg)

    monkeypatch.setattr(weights, "GPT", spy)
    return devices


# ---- valid artifacts are unchanged -----------------------------------------------------------------------
def test_a_valid_artifact_loads_exactly_as_before(tmp_path, raw):
    """Same tensors as an unchecked unpack, the same weights in the model, the same RNG draws after the
    build (the meta-device shape check draws no random numbers)."""
    path = write(tmp_path, encode_artifact(raw, "zstd", 3))
    entries, meta = read_artifact(path)
    ref, ref_meta = unpack(raw)
    assert meta == ref_meta and list(entries) == list(ref)
    torch.manual_seed(1)
    model, _ = load_artifact_model(path)
    after_load = torch.rand(3)
    torch.manual_seed(1)
    GPT(CFG)
    assert torch.equal(after_load, torch.rand(3))
    deq = dequantize_state(ref)
    assert all(torch.equal(v, deq[k]) for k, v in model.state_dict().items())
    header, none = read_model_artifact(path, tensors=False)
    assert none == {} and header.file_bytes == path.stat().st_size and header.codec == "zstd"


def test_the_streamed_reader_equals_the_in_memory_one_across_chunk_borders(tmp_path, raw, monkeypatch):
    monkeypatch.setattr(art, "IN_CHUNK", 7)
    monkeypatch.setattr(art, "OUT_CHUNK", 13)
    ref, _ = unpack(raw)
    for codec in [c for c in CODECS if HAS_LRZIP or c != "pergroup"]:
        got, _ = read_artifact(write(tmp_path, encode_artifact(raw, codec, 1), f"{codec}.ptz"))
        for k, e in ref.items():
            for f in ("data", "q", "scale"):
                a, b = getattr(e, f), getattr(got[k], f)
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (codec, k, f)


def test_expected_state_is_the_built_models_without_allocating():
    for cfg in (
        CFG,
        GPTConfig(vocab_size=50, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=1, mlp_act="swiglu",
                  swiglu_split=True, bigram="xor", bigram_dim=16, ve_dim=8, ve_layers=(0, 2), smear_gate="record",
                  tie_embeddings=False, recur_start=1, recur_end=2, recur_times=2),
    ):  # fmt: skip
        want = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in GPT(cfg).state_dict().items()}
        assert expected_state(cfg) == want
    big = GPTConfig(vocab_size=1 << 17, num_layers=64, model_dim=8192, num_heads=64, num_kv_heads=8)
    assert sum(s[0] * s[1] for s, _ in expected_state(big).values() if len(s) == 2) > 10**10  # meta: no memory


# ---- item 1: a forged model config ------------------------------------------------------------------------
def test_a_forged_config_is_refused_before_the_model_is_built(tmp_path, raw, monkeypatch):
    devices = meta_builds_only(monkeypatch)
    forged = {**CFG.to_dict(), "vocab_size": 65536, "model_dim": 12288, "num_heads": 96, "num_kv_heads": 96}
    path = write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(model=forged)), "zlib"))
    with pytest.raises(ArtifactError, match=r"a\.ptz: meta\.model\.model_dim must be an integer in \[2, 8192\]"):
        load_artifact_model(path)
    within = {**CFG.to_dict(), "vocab_size": 1 << 17, "model_dim": 8192, "num_heads": 64, "num_kv_heads": 64}
    path = write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(model=within)), "zlib"))
    with pytest.raises(ArtifactError, match=f"parameters, over the limit of {MAX_MODEL_PARAMS:,}"):
        load_artifact_model(path)
    assert devices == ["meta"]  # the second config was built on the meta device only; the first not at all


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("vocab_size", "64", r"meta\.model\.vocab_size must be an integer"),
        ("num_layers", -1, r"meta\.model\.num_layers must be an integer in \[1, 64\]"),
        ("num_heads", True, r"meta\.model\.num_heads must be an integer"),
        ("model_dim", 34, r"meta\.model: model_dim 34 must be divisible by num_heads 4"),
        ("mlp_mult", float("nan"), r"meta\.model\.mlp_mult must be a finite number"),
        ("mlp_mult", 0, r"meta\.model\.mlp_mult must be in \(0, 64\]"),
        ("tie_embeddings", 1, r"meta\.model\.tie_embeddings must be true or false"),
        ("qat", "sometimes", r"meta\.model: qat 'sometimes' not in"),
        ("ve_layers", [5], r"meta\.model: ve_layers \(5,\) out of range"),
        ("bogus", 1, r"meta\.model: unknown fields \['bogus'\]"),
        ("recur_times", 10**6, r"meta\.model\.recur_times must be an integer in \[1, 16\]"),
        # numbers the model holds in float32 (torch.full raised "cannot be converted to type float without overflow")
        (
            "qk_gain_init",
            1e300,
            r"meta\.model\.qk_gain_init must be 0 or a float32 magnitude in \[1\.18e-38, 3\.4e\+38\]",
        ),
        ("smear_init", -1e308, r"meta\.model\.smear_init must be 0 or a float32 magnitude"),
        ("leaky_slope", 1e300, r"meta\.model\.leaky_slope must be 0 or a float32 magnitude"),
        ("logit_softcap", 3.5e38, r"meta\.model\.logit_softcap must be 0 or a float32 magnitude"),  # scored NaN
        ("mlp_mult", 1e-300, r"meta\.model\.mlp_mult must be 0 or a float32 magnitude"),
        ("rope_base", 1e-300, r"meta\.model\.rope_base must be 0 or a float32 magnitude"),  # scored NaN
        ("rope_base", 0.5, r"meta\.model\.rope_base must be >= 1, got 0\.5"),
    ],
)
def test_config_fields_are_typed_and_bounded(key, value, message):
    with pytest.raises(ArtifactError, match=message):
        check_model_config({**CFG.to_dict(), key: value})


def test_every_experiments_artifact_passes_the_bounds():
    """The model config, window and vocabulary every recipe's run records (pgolf/train/build.py `run_meta`) are
    within the artifact checks: PR #1611's 8192-token vocabulary, 2048-token windows and 98,304-token rows."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    for exp in sorted((conf / "experiment").rglob("*.yaml")):
        name = str(exp.relative_to(conf / "experiment").with_suffix(""))
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"experiment={name}"])
        model = GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)).to_dict()
        meta = {"train": {"seq_len": cfg.train.seq_len}, "final_eval": {"seq_len": cfg.final_eval.seq_len}}
        weights._check_meta(meta, check_model_config(model), require_tokenizer=False)
        assert model["vocab_size"] * cfg.final_eval.seq_len <= MAX_WINDOW_LOGITS // 8, name  # 8x headroom


def test_a_config_of_too_many_virtual_layers_is_refused():
    d = {**CFG.to_dict(), "num_layers": 64, "recur_start": 0, "recur_end": 64, "recur_times": 16}
    with pytest.raises(ArtifactError, match="1024 layers per forward, over the limit of 256"):
        check_model_config(d)


# ---- item 2: a huge tensor under an unknown name -------------------------------------------------------------
def test_an_unknown_huge_tensor_is_refused_before_its_bytes_are_decompressed(tmp_path, raw):
    """The header declares an int8 [16384, 16384] tensor (256 Mi entries) the model lacks; the payload
    stops after the real tensors. Refused by name, never decompressed (else: "fewer bytes")."""
    header, blob = split(raw)
    n = 16384
    header["tensors"].append({
        "name": "extra", "kind": "int", "shape": [n, n], "orig_dtype": "float32", "bits": 8, "info": {},
        "fields": {"q": {"dtype": "int8", "shape": [n, n], "offset": len(blob), "nbytes": n * n},
                   "scale": {"dtype": "float16", "shape": [n], "offset": len(blob) + n * n, "nbytes": 2 * n}},
    })  # fmt: skip
    real = join(header, blob)
    path = write(tmp_path, forge_file(real, len(real) + n * n + 2 * n))
    assert path.stat().st_size < 100_000
    with pytest.raises(ArtifactError, match="tensor 'extra' is not a parameter of the model config"):
        read_model_artifact(path)
    with pytest.raises(ArtifactError, match="fewer bytes than the declared"):  # the format reader alone
        read_artifact(path)


# ---- item 3: an oversized file --------------------------------------------------------------------------------
def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    assert MAX_FILE_BYTES == 4 * ARTIFACT_LIMIT_BYTES
    path = tmp_path / "sparse.ptz"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: nothing is written
    with pytest.raises(ArtifactError, match=f"sparse.ptz: file of {3 << 30} bytes exceeds the {MAX_FILE_BYTES}-byte"):
        read_model_artifact(path)
    assert inspect_cli.main([str(path)]) == 2
    with pytest.raises(ArtifactError, match="not a regular file"):
        read_artifact(tmp_path)


# ---- item 4: non-positive lengths ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,message",
    [
        ({"seq_len": -7}, "seq_len must be a positive integer"),
        ({"seq_len": 0}, "seq_len must be a positive integer"),
        ({"batch_windows": 0}, "batch_windows must be a positive integer"),
        ({"max_tokens": -1}, "max_tokens must be a positive integer"),
        ({"budget_seconds": -1}, "budget_seconds must be a number >= 0"),
        ({"modes": {"sliding": {"stride": -3}}}, r"eval\.sliding\.stride must be a positive integer"),
        ({"modes": {"standard": {"batch_windows": 0}}}, r"eval\.standard\.batch_windows must be a positive"),
    ],
)
def test_non_positive_lengths_are_refused_before_any_work(tmp_path, kw, message):
    args = {"batch_windows": 8, "seq_len": None, "budget_seconds": 600, "max_tokens": None, "modes": {"standard": {}}}
    args |= kw
    with pytest.raises(ValueError, match=message):
        check_eval_args(**args)
    with pytest.raises(ValueError, match=message):  # before the (missing) artifact is opened
        evaluate_artifact(artifact=tmp_path / "missing.ptz", data={}, out_dir=tmp_path, **args)


@pytest.mark.parametrize("value", [-7, 0, "32", 10**9, 32.0])
def test_a_forged_training_seq_len_is_refused(tmp_path, raw, value):
    path = write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(train={"seq_len": value})), "zlib"))
    with pytest.raises(ArtifactError, match=r"meta\.train\.seq_len must be an integer in \[1, 1048576\]"):
        read_model_artifact(path, tensors=False)


@pytest.mark.parametrize("value", [-7, 0, "32", 98_304, 32.0])
def test_a_forged_final_eval_seq_len_is_refused(tmp_path, raw, value):
    """The round trip's window length (eval.py's default) is a window: at most 16,384 tokens."""
    path = write(
        tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(final_eval={"seq_len": value})), "zlib")
    )
    with pytest.raises(ArtifactError, match=r"meta\.final_eval\.seq_len must be an integer in \[1, 16384\]"):
        read_model_artifact(path, tensors=False)


@pytest.mark.parametrize(
    "meta,message",
    [
        ({"final_eval": {"seq_len": 16384}}, r"vocab_size 131072 x meta\.final_eval\.seq_len 16384 = 2,147,483,648"),
        ({"train": {"seq_len": 2048}}, r"vocab_size 131072 x meta\.train\.seq_len 2048 = 268,435,456"),  # its default
    ],
)
def test_an_eval_window_of_too_many_logits_is_refused_before_the_model_is_built(
    tmp_path, raw, monkeypatch, meta, message
):
    """vocab_size and the eval window were bounded apart (2^17, 16,384): a 142 KB artifact made eval.py allocate
    256 GiB of logits for a batch of 32 windows."""
    devices = meta_builds_only(monkeypatch)
    model = {**CFG.to_dict(), "vocab_size": 1 << 17}
    path = write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(model=model, **meta)), "zlib"))
    with pytest.raises(ArtifactError, match=f"{message} logits a window, over the limit of 134,217,728"):
        load_artifact_model(path)
    assert devices == []  # refused before the model was built, even on the meta device
    assert inspect_cli.main([str(path)]) == 2
    ok = edited(raw, lambda h: h["meta"].update(model=model, train={"seq_len": 1024}))  # 2^27: the limit itself
    with pytest.raises(ArtifactError, match=r"tensor 'tok_emb\.weight' has shape"):  # the next check
        read_model_artifact(write(tmp_path, encode_artifact(ok, "zlib")), tensors=False)


def test_pr1611s_packed_training_rows_are_accepted(tmp_path, raw):
    """PR #1611 trains on rows of 98,304 tokens and scores 2,048-token windows: its artifact is read."""
    meta = {"train": {"seq_len": 98_304}, "final_eval": {"seq_len": 2048}}
    path = write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(meta)), "zlib"))
    header, _ = read_model_artifact(path, tensors=False)
    assert header.meta["train"]["seq_len"] == 98_304 and header.meta["final_eval"]["seq_len"] == 2048


# ---- item 5: a tensor listed twice ------------------------------------------------------------------------
def test_a_tensor_listed_twice_is_refused(raw):
    def twice(h):
        h["tensors"].append(copy.deepcopy(h["tensors"][0]))

    with pytest.raises(ArtifactError, match=r"tensor '[\w.]+' is listed twice"):
        unpack(edited(raw, twice))


# ---- item 6: malformed headers ------------------------------------------------------------------------------
def _set_field(name: str, fld: str, key: str, value):
    return lambda h: tensor(h, name)["fields"][fld].__setitem__(key, value)


MALFORMED = {
    "no tensors": (lambda h: h.pop("tensors"), r"artifact header: missing keys \['tensors'\]"),
    "no model": (lambda h: h["meta"].pop("model"), r"metadata has no model config \(meta\.model\)"),
    "no tokenizer": (lambda h: h["meta"].pop("tokenizer"), r"no tokenizer identity \(meta\.tokenizer\)"),
    "string offset": (
        _set_field("tok_emb.weight", "q", "offset", "0"),
        r"tensor 'tok_emb\.weight'\.fields\.q\.offset must be an integer >= 0, got '0'",
    ),
    "unknown dtype": (
        _set_field("tok_emb.weight", "q", "dtype", "complex64"),
        r"tensor 'tok_emb\.weight'\.fields\.q\.dtype: unsupported tensor dtype 'complex64'",
    ),
    "shape not the config's": (
        lambda h: [
            tensor(h, "blocks.0.attn_scale").update(shape=[2, 16]),
            tensor(h, "blocks.0.attn_scale")["fields"]["data"].update(shape=[2, 16]),
        ],
        r"tensor 'blocks\.0\.attn_scale' has shape \[2, 16\]; the model config implies \[32\]",
    ),
    "bool nbytes": (_set_field("tok_emb.weight", "q", "nbytes", True), r"fields\.q\.nbytes must be an integer"),
    "orig dtype": (
        lambda h: tensor(h, "tok_emb.weight").update(orig_dtype="float64"),
        r"tensor 'tok_emb\.weight': orig_dtype must be the model's float32, got 'float64'",
    ),
    "header is a list": (lambda h: h.clear(), r"artifact header: missing keys"),
    "record not an object": (lambda h: h["tensors"].__setitem__(0, 7), r"tensors\[0\] must be a JSON object"),
    "extra field": (
        _set_field("tok_emb.weight", "q", "extra", 1),
        r"tensor 'tok_emb\.weight'\.fields\.q: unknown keys \['extra'\]",
    ),
    "empty name": (lambda h: h["tensors"][0].update(name=""), r"tensors\[0\]\.name must be a non-empty string"),
    "int bits": (lambda h: tensor(h, "tok_emb.weight").update(bits=9), r"\.bits must be an integer in \[2, 8\]"),
    "scale shape": (
        _set_field("tok_emb.weight", "scale", "shape", [63]),
        r"fields\.scale: tensor of shape \[63\] float16 does not fit its 128 bytes",
    ),
    "kind and dtype disagree": (
        _set_field("blocks.0.attn_scale", "data", "dtype", "int16"),
        r"tensor 'blocks\.0\.attn_scale'\.fields\.data: fp16 storage of a \[32\] float32 tensor must be \[32\] float16",
    ),
    "tokenizer keys": (
        lambda h: h["meta"]["tokenizer"].update(extra=1),
        r"meta\.tokenizer must hold exactly name, vocab_size and sha256",
    ),
    "tokenizer bigger than the model": (
        lambda h: h["meta"]["tokenizer"].update(vocab_size=65),
        r"meta\.tokenizer\.vocab_size 65 exceeds the model's vocab_size 64",
    ),
    "negative code size": (
        lambda h: h["meta"]["code"].update(bytes=-16_000_000),
        r"meta\.code\.bytes must be an integer in \[0, ",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_header_is_one_error_naming_the_field(tmp_path, raw, capsys, case):
    edit, message = MALFORMED[case]
    path = write(tmp_path, encode_artifact(edited(raw, edit), "zlib"))
    with pytest.raises(ArtifactError, match=message):
        read_model_artifact(path)
    assert inspect_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_missing_tensor_is_refused(tmp_path):
    torch.manual_seed(0)
    entries = quantize_state(GPT(CFG).state_dict(), rules_from_config(RULES))
    del entries["blocks.0.attn.q_gain"]
    meta = {"model": CFG.to_dict(), "tokenizer": TOKENIZER}
    with pytest.raises(ArtifactError, match=r"tensors missing for the model config: \['blocks\.0\.attn\.q_gain'\]"):
        read_model_artifact(write(tmp_path, encode_artifact(pack(entries, meta), "zlib")))


def test_codes_beyond_their_declared_bits_are_refused(raw):
    """An int tensor whose codes do not fit its declared bits (int6 codes declared int3: [-4, 3]) is one
    error naming it; int8 takes any int8 code."""
    entries, _ = unpack(raw)
    name = next(n for n, e in entries.items() if e.kind == "int" and int(e.q.abs().max()) > 4)

    def bits(b):
        return lambda h: tensor(h, name).update(bits=b)

    with pytest.raises(ArtifactError, match=re.escape(f"tensor {name!r}: int3 codes must lie in [-4, 3], found [")):
        unpack(edited(raw, bits(3)))
    entries, _ = unpack(edited(raw, bits(8)))
    assert entries[name].bits == 8


def test_tensor_bytes_must_tile_the_payload(raw):
    header, blob = split(raw)
    with pytest.raises(ArtifactError, match="holds 3 bytes after the last tensor"):
        unpack(join(header, blob + b"abc"))
    a, b = header["tensors"][0]["fields"], header["tensors"][1]["fields"]
    next(iter(b.values()))["offset"] = next(iter(a.values()))["offset"]  # two tensors on the same bytes
    with pytest.raises(ArtifactError, match="overlapping or gapped tensor bytes|lie outside the payload"):
        unpack(join(header, blob))


@pytest.mark.parametrize(
    "header_bytes,message",
    [
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"format": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b'{"format": "pgolf-artifact-v1", "meta": {}, "tensors": {}}', "tensors must be a list"),
    ],
)
def test_header_json_attacks_are_refused(header_bytes, message):
    with pytest.raises(ArtifactError, match=message):
        unpack(struct.pack("<I", len(header_bytes)) + header_bytes)


def test_header_length_is_bounded(raw):
    with pytest.raises(ArtifactError, match=r"header length 2097152 is oversized \(limit 1048576\)"):
        unpack(struct.pack("<I", 2 << 20) + raw[4:])


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_declared_lengths_bound_the_stream_for_every_codec(tmp_path, raw, codec):
    with pytest.raises(ArtifactError, match="the tensor payload holds 1 bytes after the last tensor"):
        read_artifact(write(tmp_path, forge_file(raw, len(raw) + 1, codec)))  # the header's table disagrees
    with pytest.raises(ArtifactError, match="more bytes than the declared"):  # a bomb: more than declared
        read_artifact(write(tmp_path, forge_file(raw + b"\0" * 4096, len(raw), codec)))
    payload = compress(raw, codec, 1)[:-40]  # truncated, re-checksummed
    cid = CODECS[codec]
    digest = _digest(VERSION_SINGLE, cid, 1, len(raw), payload)
    data = PREFIX.pack(MAGIC, VERSION_SINGLE, cid, 1, len(raw), digest) + payload
    with pytest.raises(ArtifactError, match="fewer bytes than the declared|corrupt"):
        read_artifact(write(tmp_path, data))
    with pytest.raises(ArtifactError, match="fewer bytes than the declared"):  # a stream that ends early
        read_artifact(write(tmp_path, forge_file(raw[:-5], len(raw), codec)))


def test_a_codec_level_out_of_range_is_refused(tmp_path, raw):
    payload = compress(raw, "lzma", 1)
    cid = CODECS["lzma"]
    digest = _digest(VERSION_SINGLE, cid, 200, len(raw), payload)
    data = PREFIX.pack(MAGIC, VERSION_SINGLE, cid, 200, len(raw), digest) + payload
    with pytest.raises(ArtifactError, match=r"codec level 200 is out of range for lzma \(0\.\.9\)"):
        read_artifact(write(tmp_path, data))


def test_float_weights_are_checked_as_a_model_and_a_quantized_artifact_is_not_float_weights(tmp_path, raw):
    torch.manual_seed(0)
    state = GPT(CFG).state_dict()
    path = weights.save_float_weights(tmp_path / "f.ptz", state, {"model": CFG.to_dict()})
    got, meta = weights.load_weights(path)
    assert meta["kind"] == "float_weights" and all(torch.equal(v, got[k]) for k, v in state.items())
    with pytest.raises(ArtifactError, match="not saved float weights"):
        weights.load_weights(write(tmp_path, encode_artifact(raw, "zlib")))
    forged = edited(unpack_raw(path), lambda h: h["meta"]["model"].update(num_layers=2))
    with pytest.raises(ArtifactError, match=r"tensors missing for the model config: \['skip_weights', 'blocks\.1\."):
        weights.load_weights(write(tmp_path, encode_artifact(forged, "zstd"), "g.ptz"))


def unpack_raw(path) -> bytes:
    return art.decode_artifact(path.read_bytes())[0]


def test_the_check_runs_before_any_tensor_is_read(tmp_path, raw):
    seen = []
    header, entries = load_artifact(write(tmp_path, encode_artifact(raw, "zlib")), check=seen.append, tensors=False)
    assert seen == [header] and entries == {} and header.payload_bytes == len(split(raw)[1])


# ---- item 7 and max_tokens: size and compliance in eval_result.json --------------------------------------------
def test_compliance_names_every_reason():
    """Every mode must score before it adapts, not only the first (the headline): `[standard, slot_1263]`
    was `compliant: true` overall."""
    standard = {"mode": "standard", "compliant": True, "reason": "causal"}
    slot = {"mode": "slot_1263", "compliant": False, "reason": "adapts on the scored targets"}
    ok, reasons = compliance([standard, slot], ARTIFACT_LIMIT_BYTES + 1, 700.0, 600, 1000)
    assert not ok and len(reasons) == 4
    assert reasons[0] == "score-before-adapt: slot_1263: adapts on the scored targets"
    assert "16,000,001 bytes (model + code) is over the 16,000,000-byte limit" in reasons[1]
    assert "700.0s, over the 600s budget" in reasons[2] and reasons[3] == MAX_TOKENS_REASON
    assert compliance([standard, slot], ARTIFACT_LIMIT_BYTES, 600.0, 600, None) == (False, [reasons[0]])
    assert compliance([standard, {**slot, "compliant": True}], ARTIFACT_LIMIT_BYTES, 600.0, 600, None) == (True, [])


def test_an_over_cap_artifact_is_scored_but_not_compliant(tmp_path, synth_dir):
    """The smallest over-cap artifact: a tiny model whose recorded code is 16,000,000 bytes. Scored on the
    first 64 validation targets (max_tokens), so two reasons."""
    tok_path = next(synth_dir.glob("*.model"))
    tok = TokenizerInfo.from_path(tok_path)
    cfg = GPTConfig(vocab_size=tok.vocab_size, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    meta = {"model": cfg.to_dict(), "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256}}
    meta |= {"train": {"seq_len": 32}, "code": {"bytes": ARTIFACT_LIMIT_BYTES, "sha256": "cd" * 32}}
    path = write(tmp_path, encode_artifact(model_raw(cfg, meta), "zlib"))
    data = {"tokenizer_path": str(tok_path), "val_pattern": str(synth_dir / "synth_val_*.bin")}
    res = evaluate_artifact(artifact=path, modes={"standard": {}}, data=data, max_tokens=70, out_dir=tmp_path / "o")
    assert res["tokens"] == 64 and res["max_tokens"] == 70
    # the mode's own rule holds (score_before_adapt), but a prefix is no mode's challenge score
    std = res["results"]["standard"]
    assert std["compliant"] is False and std["reason"].startswith(f"{MAX_TOKENS_REASON}; ")
    assert res["artifact_bytes"] == path.stat().st_size and res["code_bytes"] == ARTIFACT_LIMIT_BYTES
    assert res["total_bytes"] == res["artifact_bytes"] + ARTIFACT_LIMIT_BYTES and res["limit_bytes"] == 16_000_000
    assert res["compliant"] is False and res["compliance"]["size_ok"] is False
    assert res["compliance"]["score_before_adapt"] is True and res["compliance"]["full_validation"] is False
    assert len(res["compliance"]["reasons"]) == 2 and res["compliance"]["reasons"][1] == MAX_TOKENS_REASON
    assert json.loads((tmp_path / "o" / "eval_result.json").read_text())["compliant"] is False


def synth_artifact(tmp_path, synth_dir, edit=None, rules=RULES) -> tuple[Path, dict]:
    """(a 1-layer model's artifact for the synthetic tokenizer, quantized with `rules`, its state edited by
    `edit` first; the data config eval reads)."""
    tok_path = next(synth_dir.glob("*.model"))
    tok = TokenizerInfo.from_path(tok_path)
    cfg = GPTConfig(vocab_size=tok.vocab_size, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
    meta = {"model": cfg.to_dict(), "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256}}
    meta |= {"train": {"seq_len": 32}, "code": {"bytes": 1000, "sha256": "cd" * 32}}
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    if edit is not None:
        edit(state)
    path = write(tmp_path, encode_artifact(pack(quantize_state(state, rules_from_config(rules)), meta), "zlib"))
    return path, {"tokenizer_path": str(tok_path), "val_pattern": str(synth_dir / "synth_val_*.bin")}


def test_a_missing_tokenizer_names_the_artifacts_own(tmp_path, synth_dir):
    """eval.py on another data config than the artifact's (the default demo data): the missing file is
    named with the tokenizer the artifact was built with, before any work."""
    path, data = synth_artifact(tmp_path, synth_dir)
    tok = TokenizerInfo.from_path(data["tokenizer_path"])
    data["tokenizer_path"] = str(tmp_path / "demo_1024_bpe.model")
    want = f"was built with tokenizer {tok.name} (vocab {tok.vocab_size})"
    with pytest.raises(TokenizerError, match=re.escape(want)):
        evaluate_artifact(artifact=path, modes={"standard": {}}, data=data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_non_finite_score_is_not_compliant_and_eval_result_json_stays_json(tmp_path, synth_dir):
    """A NaN in the stored weights scored `val_bpb: NaN` with `compliant: true`, and eval_result.json held a
    bare `NaN`, which strict JSON parsers (jq, parse_constant) refuse."""
    path, data = synth_artifact(tmp_path, synth_dir, lambda sd: sd["tok_emb.weight"].fill_(float("nan")), RULES[1:])
    modes = {"standard": {}, "sliding": {"stride": 16}}
    res = evaluate_artifact(artifact=path, modes=modes, data=data, out_dir=tmp_path / "o", batch_windows=8)
    why = [f"score: {m}: val_loss nan val_bpb nan is not finite" for m in modes]
    assert res["compliant"] is False and res["compliance"]["reasons"] == why
    assert res["compliance"]["score_before_adapt"] is True  # the modes' own rule holds
    for m, w in zip(modes, why, strict=True):
        assert res["results"][m]["compliant"] is False and res["results"][m]["reason"].startswith(f"{w}; ")

    def strict(c):
        raise ValueError(f"not JSON: {c}")

    out = json.loads((tmp_path / "o" / "eval_result.json").read_text(), parse_constant=strict)
    assert out["val_bpb"] is None and out["results"]["sliding"]["val_loss"] is None and out["compliant"] is False
    # a finite score is written as it was
    path, data = synth_artifact(tmp_path, synth_dir)
    res = evaluate_artifact(artifact=path, modes={"standard": {}}, data=data, out_dir=tmp_path / "f", batch_windows=8)
    out = json.loads((tmp_path / "f" / "eval_result.json").read_text(), parse_constant=strict)
    assert res["compliant"] is True and out["val_bpb"] == res["val_bpb"] > 0


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only or impossible out_dir was found after the whole evaluation, in a message naming a temp file."""
    (tmp_path / "file").write_text("hi")
    args = {"artifact": tmp_path / "missing.ptz", "modes": {"standard": {}}, "data": {}}
    with pytest.raises(OSError, match=r"^out_dir \S+/file/sub is not writable \(Not a directory\); choose another"):
        evaluate_artifact(out_dir=tmp_path / "file" / "sub", **args)
    with pytest.raises(ArtifactError, match="missing.ptz"):  # a writable one is probed and left as it was
        evaluate_artifact(out_dir=tmp_path / "new" / "dir", **args)
    assert not (tmp_path / "new").exists()  # an evaluation that stops before writing leaves no empty folders
    (tmp_path / "mine").mkdir()
    with pytest.raises(ArtifactError, match="missing.ptz"):
        evaluate_artifact(out_dir=tmp_path / "mine", **args)
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []  # the user's folder stays
    monkeypatch.setenv("RANK", "1")  # under torchrun, only rank 0 writes (another rank's Hydra directory is gone)
    with pytest.raises(ArtifactError, match="missing.ptz"):
        evaluate_artifact(out_dir=tmp_path / "rank1", **args)
    assert not (tmp_path / "rank1").exists()
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OSError, match=r"^out_dir \S+/ro is not writable \(Permission denied\)"):
            evaluate_artifact(out_dir=tmp_path / "ro", **args)


def test_eval_names_an_allocation_failure_and_only_that(monkeypatch):
    assert out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug keeps its traceback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu, but this machine has no CUDA device"):
        pick_device("gpu")


@pytest.mark.parametrize(
    "override,message",
    [
        # 2^50 windows of 32 tokens a batch: far more than any address space, whatever the overcommit
        ("batch_windows=1125899906842624", r"error: out of memory \(.*can't allocate memory.*\): lower batch_windows="),
        pytest.param(
            "trainer=gpu",
            r"config error: trainer\.accelerator=gpu, but this machine has no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_eval_py_says_out_of_memory_or_no_gpu_in_one_line(tmp_path, synth_dir, override, message):
    """Both were a Hydra traceback (RuntimeError)."""
    path, _ = synth_artifact(tmp_path, synth_dir)
    root = Path(__file__).resolve().parent.parent
    args = [f"artifact={path}", "data=synthetic", f"data.root={synth_dir.parent}", f"data.dir={synth_dir}"]
    args += [f"out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}", override]
    r = subprocess.run([sys.executable, "eval.py", *args], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.fullmatch(message + ".*", r.stderr.strip()), r.stderr[-2000:]


def test_max_tokens_is_in_both_schemas():
    assert "max_tokens" in EvalRun.__dataclass_fields__
    base = {"modes": ["standard"], "seq_len": 32, "batch_windows": 8, "stride": 16, "reference_tail": False}
    assert load(FinalEvalConfig, {**base, "settings": {}, "max_tokens": None}, "final_eval").max_tokens is None
    assert load(FinalEvalConfig, {**base, "settings": {}, "max_tokens": 64}, "final_eval").max_tokens == 64
    with pytest.raises(ConfigError, match=r"final_eval\.max_tokens must be an integer >= 1 or null, got 0"):
        load(FinalEvalConfig, {**base, "settings": {}, "max_tokens": 0}, "final_eval")


@pytest.mark.parametrize(
    "dirty,shown", [(True, " (dirty)"), (False, ""), ([1], " (git_dirty: [1])"), ({"a": 1}, ' (git_dirty: {"a": 1})')]
)
def test_inspect_prints_a_provenance_of_any_shape(tmp_path, raw, dirty, shown):
    """git_dirty of a list or dict was a TypeError traceback (an unhashable dict key); eval accepts the file."""
    prov = {"git_sha": "abc", "git_dirty": dirty}
    out = inspect_cli.inspect(
        write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(provenance=prov)), "zlib"))
    )
    assert f"provenance: git abc{shown} torch ?" in out


def test_inspect_prints_metadata_of_an_odd_shape_as_json(tmp_path, raw):
    odd = {"quant": {"rules": 5}, "provenance": "x", "calibration": [1], "reexport": {"provenance": 2}}
    out = inspect_cli.inspect(write(tmp_path, encode_artifact(edited(raw, lambda h: h["meta"].update(odd)), "zlib")))
    assert 'quant: {"rules": 5}' in out and 'provenance: "x"' in out and "calibration: [1]" in out
    assert 're-exported: {"provenance": 2}' in out


def test_inspect_names_the_tensors_gptq_damped_further(tmp_path, raw):
    entries, _ = unpack(raw)
    name = next(n for n, e in entries.items() if e.kind == "int")
    out = inspect_cli.inspect(write(tmp_path, encode_artifact(raw, "zlib")))
    assert "extra damping" not in out
    bumped = edited(raw, lambda h: tensor(h, name).setdefault("info", {}).update(extra_damp=0.1))
    out = inspect_cli.inspect(write(tmp_path, encode_artifact(bumped, "zlib"), "b.ptz"))
    assert f"gptq extra damping (Hessian not positive definite; x mean diag H): {name} 0.1" in out


# ---- LQER factors in the artifact (PR #1797 / #1611) -------------------------------------------------------
def lqer_raw() -> bytes:
    """The model artifact with asymmetric LQER factors on one int matrix (rank 2, groups of 16)."""
    from pgolf.quant.numerics import LQERFactors, pack_lqer_asym

    torch.manual_seed(0)
    entries = quantize_state(GPT(CFG).state_dict(), rules_from_config(RULES))
    name = next(n for n, e in entries.items() if e.kind == "int" and len(e.shape) == 2)
    rows, cols = entries[name].shape
    qa, sa, qb, sb = pack_lqer_asym(torch.randn(rows, 2), torch.randn(2, cols), 16)
    e = entries[name]
    e.lqer = LQERFactors(mode="asym", group=16, bits=0, qa=qa, sa=sa, qb=qb, sb=sb)
    e.info = {**e.info, "lqer": {"mode": "asym", "rank": 2, "group": 16}}
    base = {"model": CFG.to_dict(), "tokenizer": TOKENIZER, "train": {"seq_len": 32}}
    return pack(entries, {**base, "code": {"bytes": 1000, "sha256": "cd" * 32}}), name, entries


def test_lqer_factors_round_trip_through_the_artifact(tmp_path):
    data, name, entries = lqer_raw()
    path = write(tmp_path, art.encode_artifact(data, "zlib", 9))
    got = art.read_artifact(path)[0]
    f, g = entries[name].lqer, got[name].lqer
    assert g is not None and all(torch.equal(getattr(f, k), getattr(g, k)) for k in ("qa", "sa", "qb", "sb"))
    assert torch.equal(dequantize_state(got)[name], dequantize_state(entries)[name])


def _lqer_case(edit):
    data, name, _ = lqer_raw()

    def apply(h):
        edit(tensor(h, name))

    return edited(data, apply)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["info"].pop("lqer"), "info.lqer must say the factors' mode"),
        (lambda t: t["info"]["lqer"].update(group=7), "group 7 must divide"),
        (lambda t: t["info"]["lqer"].update(group="16"), "info.lqer.group must be an integer"),
        (lambda t: t["fields"]["lqer_sb"].update(shape=[2], nbytes=4), r"lqer_sb must be float16 \[4\]"),
        (lambda t: t["fields"]["lqer_qa"].update(shape=[2, 16], nbytes=32), "lqer_qa must be"),
        (lambda t: t["fields"].pop("lqer_qb"), "fields"),
    ],
)
def test_forged_lqer_fields_are_refused_before_any_tensor_is_read(tmp_path, edit, message):
    path = write(tmp_path, art.encode_artifact(_lqer_case(edit), "zlib", 9))
    with pytest.raises(ArtifactError, match=message):
        art.read_artifact(path)


def test_lqer_codes_out_of_range_are_refused(tmp_path):
    data, name, entries = lqer_raw()
    entries[name].lqer.qa[0, 0] = 5  # INT2 codes lie in [-2, 1]
    base = {"model": CFG.to_dict(), "tokenizer": TOKENIZER, "train": {"seq_len": 32}}
    bad = pack(entries, {**base, "code": {"bytes": 1000, "sha256": "cd" * 32}})
    with pytest.raises(ArtifactError, match=r"qa: codes must lie in \[-2, 1\]"):
        art.read_artifact(write(tmp_path, art.encode_artifact(bad, "zlib", 9)))


# ---- the per-group container (PR #1611; pgolf/quant/pergroup.py) ------------------------------------------
def framed(cid: int, level: int, raw_len: int, payload: bytes) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, cid, level, raw_len, _digest(VERSION, cid, level, raw_len, payload)) + payload


def reframed(data: bytes, edit) -> bytes:
    """A pergroup artifact file with its container's streams edited by `edit(list of bytes)`, re-framed
    and re-checksummed."""
    _, _, cid, level, raw_len, _ = PREFIX.unpack_from(data)
    streams = [bytes(x) for x in pergroup.split_container(memoryview(data)[PREFIX.size :])]
    edit(streams)
    return framed(cid, level, raw_len, pergroup.pack_container(streams))


@pytest.fixture(scope="module")
def pg_file(raw) -> bytes:
    return encode_artifact(raw, "pergroup_brotli", 1)


def _set(i: int, value: bytes):
    return lambda st: st.__setitem__(i, value)


GROUP = {g: i for i, g in enumerate(pergroup.GROUPS)}
FORGED_STREAMS = {
    "group emptied": (_set(GROUP["c_q"], b""), r"stream c_q is empty, but the header routes 1024 bytes to it"),
    "perms emptied": (_set(pergroup.PERMS, b""), r"stream permutations is empty, but the header routes"),
    "group too short": (
        _set(GROUP["tok_emb"], pergroup.brotli_compress(bytes(10))),
        r"stream tok_emb decompresses to fewer bytes than the 2048 its tensors need",
    ),
    "group bomb": (
        _set(GROUP["mlp.fc"], pergroup.brotli_compress(bytes(8 << 20), 1)),
        r"stream mlp\.fc decompresses to more bytes than the 2048 its tensors need",
    ),
    "group corrupt": (_set(GROUP["c_v"], b"\xff" * 40), r"stream c_v: corrupt brotli data"),
    "remainder too short": (
        lambda st: st.__setitem__(pergroup.REMAINDER, brotli.compress(brotli.decompress(st[pergroup.REMAINDER])[:-5])),
        r"pergroup stream remainder: payload decompresses to fewer bytes than the declared",
    ),
    "not a permutation": (
        _set(pergroup.PERMS, pergroup.brotli_compress(bytes(2 * (64 + 32 + 64)))),
        r"permutations: the order of 'tok_emb\.weight' is not a permutation",
    ),
    "remainder corrupt": (_set(pergroup.REMAINDER, b"\x00garbage"), r"stream remainder: corrupt brotli payload"),
}


@pytest.mark.parametrize("case", sorted(FORGED_STREAMS))
def test_a_forged_pergroup_stream_is_refused_naming_it(tmp_path, pg_file, case):
    edit, message = FORGED_STREAMS[case]
    with pytest.raises(ArtifactError, match=message):
        read_artifact(write(tmp_path, reframed(pg_file, edit)))


def test_a_forged_pergroup_framing_is_refused(tmp_path, pg_file):
    _, _, cid, level, raw_len, _ = PREFIX.unpack_from(pg_file)
    payload = pg_file[PREFIX.size :]
    count8 = payload[:4] + struct.pack("<I", 8) + payload[8:]
    with pytest.raises(ArtifactError, match="pergroup container: stream count 8, expected 9"):
        read_artifact(write(tmp_path, framed(cid, level, raw_len, count8)))
    longer = bytearray(payload)
    struct.pack_into("<I", longer, 8, struct.unpack_from("<I", payload, 8)[0] + 1)  # tok_emb's length + 1
    with pytest.raises(ArtifactError, match="corrupt pergroup container: stream lengths add up to"):
        read_artifact(write(tmp_path, framed(cid, level, raw_len, bytes(longer))))
    with pytest.raises(ArtifactError, match=r"not a pergroup container \(bad magic bytes\)"):
        read_artifact(write(tmp_path, framed(cid, level, raw_len, b"XXXX" + payload[4:])))


def test_a_stream_for_a_group_the_header_leaves_empty_is_refused(tmp_path):
    rules = [{"name": "ck", "pattern": r"\.c_k\.", "store": "fp16"}, *RULES]
    torch.manual_seed(0)
    entries = quantize_state(GPT(CFG).state_dict(), rules_from_config(rules))
    data = encode_artifact(pack(entries, {"model": CFG.to_dict(), "tokenizer": TOKENIZER}), "pergroup_brotli", 1)
    extra = pergroup.brotli_compress(b"x")
    forged = reframed(data, _set(GROUP["c_k"], extra))
    with pytest.raises(ArtifactError, match=f"stream c_k holds {len(extra)} bytes, but the header routes nothing"):
        read_artifact(write(tmp_path, forged))


def test_no_pergroup_stream_is_decompressed_before_the_check(tmp_path, pg_file, monkeypatch):
    decoded = []
    real = pergroup.Decoder.decode
    monkeypatch.setattr(pergroup.Decoder, "decode", lambda self: decoded.append(1) or real(self))
    path = write(tmp_path, pg_file)

    def refuse(header):
        raise ArtifactError("refused by the check")

    with pytest.raises(ArtifactError, match="refused by the check"):
        load_artifact(path, check=refuse)
    header, entries = load_artifact(path, tensors=False)
    assert decoded == [] and entries == {} and header.codec == "pergroup_brotli"
    read_model_artifact(path)
    assert decoded == [1]


@needs_lrzip
def test_a_forged_lrzip_size_is_refused_before_lrzip_runs(tmp_path, raw, monkeypatch):
    data = encode_artifact(raw, "pergroup", 1)

    def declare(st):
        st[GROUP["c_q"]] = st[GROUP["c_q"]][:6] + struct.pack("<Q", 1 << 40) + st[GROUP["c_q"]][14:]

    ran = []
    monkeypatch.setattr(pergroup, "lrzip_decompress", lambda *a, **k: ran.append(a))
    with pytest.raises(ArtifactError, match=r"stream c_q: lrzip declares 1099511627776 bytes, the header's tensors"):
        read_artifact(write(tmp_path, reframed(data, declare)))
    assert ran == []
