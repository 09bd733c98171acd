"""Artifact packing (no pickle), compressors, safety checks on load, size accounting."""

from __future__ import annotations

import struct

import pytest
import torch

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.export.code import code_files
from pgolf.export.config import BASELINE_RULES
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import (
    PREFIX,
    ArtifactError,
    SizeReport,
    compress,
    decode_artifact,
    encode_artifact,
    pack,
    read_artifact,
    unpack,
    write_artifact,
)
from pgolf.quant.rules import dequantize_state, quantize_state, rules_from_config
from pgolf.tools.inspect import inspect, main


@pytest.fixture(scope="module")
def entries():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    sd = m.state_dict()
    sd["blocks.0.mlp.fc.weight"] = torch.randn(300, 256)  # large enough (> 65,536) to be int8
    sd["extra_int"] = torch.arange(10, dtype=torch.int64)
    sd["extra_bf16"] = torch.randn(3, 4).bfloat16()
    return quantize_state(sd, rules_from_config(BASELINE_RULES))


@pytest.fixture(scope="module")
def model_entries():
    """A real model's quantized tensors (its mlp.fc matrix over 65,536 entries, so int8) and its config."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=128, num_layers=1, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=4.5)
    return quantize_state(GPT(cfg).state_dict(), rules_from_config(BASELINE_RULES)), cfg.to_dict()


TOKENIZER = {"name": "fineweb_1024_bpe.model", "vocab_size": 128, "sha256": "ab" * 32}


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma"])
def test_roundtrip_is_exact(tmp_path, entries, codec):
    meta = {"model": {"x": 1}, "tokenizer": {"sha256": "ab"}}
    n = write_artifact(tmp_path / "a.ptz", entries, meta, codec)
    assert n == (tmp_path / "a.ptz").stat().st_size
    got, meta2 = read_artifact(tmp_path / "a.ptz")
    assert meta2 == meta and list(got) == list(entries)
    a, b = dequantize_state(entries), dequantize_state(got)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_no_pickle_in_the_payload(entries):
    raw = pack(entries, {})
    assert b"\x80\x02" not in raw[:2] and b"torch._utils" not in raw and b"PK\x03\x04" not in raw
    hlen = struct.unpack_from("<I", raw)[0]
    assert raw[4 : 4 + hlen].startswith(b"{")  # a JSON header, then plain bytes


def test_tampered_or_truncated_artifacts_are_rejected(tmp_path, entries):
    data = encode_artifact(pack(entries, {}), "zlib")
    with pytest.raises(ArtifactError, match="checksum"):
        decode_artifact(data[:-5])
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    with pytest.raises(ArtifactError, match="checksum"):
        decode_artifact(bytes(flipped))
    with pytest.raises(ArtifactError, match="too short"):
        decode_artifact(data[:20])
    with pytest.raises(ArtifactError, match="bad magic"):
        decode_artifact(b"X" + data[1:])
    (tmp_path / "t.ptz").write_bytes(data[:-5])
    with pytest.raises(ArtifactError, match=r"t\.ptz: checksum"):
        read_artifact(tmp_path / "t.ptz")


def _forge(raw: bytes, declared_len: int, codec="zlib") -> bytes:
    """A well-formed file (valid checksum) whose declared length lies about the payload."""
    from pgolf.quant.artifact import CODECS, MAGIC, VERSION_SINGLE, _digest

    payload = compress(raw, codec)
    cid = CODECS[codec]
    digest = _digest(VERSION_SINGLE, cid, 9, declared_len, payload)
    return PREFIX.pack(MAGIC, VERSION_SINGLE, cid, 9, declared_len, digest) + payload


def test_decompression_bomb_and_oversized_header(entries):
    bomb = b"\0" * (8 << 20)  # 8 MiB of zeros compresses to a few KB
    with pytest.raises(ArtifactError, match="more bytes than the declared"):
        decode_artifact(_forge(bomb, 1000))
    with pytest.raises(ArtifactError, match="exceeds the .* limit"):
        decode_artifact(_forge(b"x", 1 << 40))
    raw = struct.pack("<I", 1 << 30) + b"{}"
    with pytest.raises(ArtifactError, match="header length .* oversized"):
        unpack(raw)
    with pytest.raises(ArtifactError, match="not valid JSON"):
        unpack(struct.pack("<I", 3) + b"{x}")


def test_unknown_codec_is_an_error_not_a_fallback():
    """zstandard and brotli are dependencies (imported with pgolf.quant.artifact); an unknown codec name or
    id fails."""
    with pytest.raises(ArtifactError, match="unknown codec"):
        compress(b"abc", "bzip2")
    with pytest.raises(ArtifactError, match="unknown codec"):
        encode_artifact(b"abc", "bzip2")
    data = bytearray(encode_artifact(b"abc", "zstd"))
    data[10] = 9  # the codec id byte (after the 8-byte magic and the u16 version)
    with pytest.raises(ArtifactError, match="unknown codec id 9"):
        decode_artifact(bytes(data))


def test_size_report_is_decimal_and_flags_over_budget():
    assert ARTIFACT_LIMIT_BYTES == 16_000_000
    ok = SizeReport(15_900_000, 100_000)
    assert ok.ok and ok.margin == 0 and "OK" in ok.lines()[-1]
    bad = SizeReport(15_900_001, 100_000)
    assert not bad.ok and "FAIL" in bad.lines()[-1] and "by 1 bytes" in bad.lines()[-1]


def test_code_files_cover_the_package():
    names = {p.name for p in code_files()}
    assert {"train.py", "eval.py", "gpt.py", "artifact.py", "wallclock.py"} <= names
    assert not {"compare.py", "submission.py", "prepare.py", "fineweb.py"} & names  # tooling is not counted


@pytest.mark.parametrize("codec", ["zlib", "zstd", "lzma", "brotli"])
def test_the_tensor_bytes_compress_the_same_whatever_the_metadata(model_entries, codec):
    """Version 2 compresses the header and the tensor bytes as two streams: two artifacts of the same tensors
    whose metadata differ (a date) hold the same compressed tensor stream, byte for byte, so their sizes differ
    only by the header's. In one stream, one bit of the date moved lzma-9's size of a 36 MB record_1611 payload
    by 206 KB."""
    import struct as st

    from pgolf.quant.artifact import PREFIX as P
    from pgolf.quant.artifact import VERSION

    entries, model = model_entries
    files = [
        encode_artifact(pack(entries, {"model": model, "tokenizer": TOKENIZER, "date": d}), codec, 1)
        for d in ("2026-12-02T15:21:40", "2026-12-02T15:31:40", "2026-12-02T15:31:40 and some more")
    ]
    streams = []
    for f in files:
        assert P.unpack_from(f)[1] == VERSION == 2
        (n,) = st.unpack_from("<I", f, P.size)
        streams.append(f[P.size + 4 + n :])
    assert streams[0] == streams[1] == streams[2] and len(streams[0]) > 1000
    assert abs(len(files[0]) - len(files[1])) <= 2
    want = dequantize_state(entries)
    for f in files:
        got = dequantize_state(unpack(decode_artifact(f)[0])[0])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_inspect_prints_tensors_and_margin(tmp_path, model_entries):
    entries, model = model_entries
    meta = {"model": model, "tokenizer": TOKENIZER, "code_bytes": 1000}
    write_artifact(tmp_path / "a.ptz", entries, meta, "lzma")
    out = inspect(tmp_path / "a.ptz")
    assert "blocks.0.mlp.fc.weight" in out and "int8" in out and "margin" in out and "lzma-9" in out


def test_forged_headers_are_rejected(entries):
    """A well-formed, checksummed file whose JSON header lies about a tensor's shape or storage kind."""
    import json

    raw = pack(entries, {})
    hlen = struct.unpack_from("<I", raw)[0]
    header = json.loads(raw[4 : 4 + hlen])

    def repack(h):
        hb = json.dumps(h).encode()
        return struct.pack("<I", len(hb)) + hb + raw[4 + hlen :]

    bad_shape = json.loads(json.dumps(header))
    bad_shape["tensors"][0]["fields"]["data"]["shape"] = [10**6]
    with pytest.raises(ArtifactError, match="does not fit its"):
        unpack(repack(bad_shape))
    bad_kind = json.loads(json.dumps(header))
    bad_kind["tensors"][0]["kind"] = "pickle"
    with pytest.raises(ArtifactError, match="unknown storage kind"):
        unpack(repack(bad_kind))
    outside = json.loads(json.dumps(header))
    outside["tensors"][0]["fields"]["data"]["offset"] = 10**9
    with pytest.raises(ArtifactError, match="outside the payload"):
        unpack(repack(outside))
    with pytest.raises(ArtifactError, match="checksum"):  # and any edit of a written file breaks the checksum
        decode_artifact(encode_artifact(raw, "zstd")[:-1] + b"\0")


def test_inspect_shows_identity_provenance_calibration_and_codecs(tmp_path, model_entries):
    entries, model = model_entries
    meta = {
        "model": model,
        "code_bytes": 1000,
        "tokenizer": TOKENIZER,
        "provenance": {"git_sha": "deadbeef", "git_dirty": True, "torch": "2.13.0", "device": "cpu"},
        "calibration": {"source": "train", "count": 32, "length": 2048, "compliant": False, "reason": "late"},
        "reexport": {"weights": "final_model.float.ptz", "provenance": {"git_sha": "cafe", "device": "cpu"}},
    }
    write_artifact(tmp_path / "a.ptz", entries, meta, "zstd")
    out = inspect(tmp_path / "a.ptz", codecs=True)
    assert "tokenizer: fineweb_1024_bpe.model vocab_size:128 sha256:abab" in out
    assert "provenance: git deadbeef (dirty) torch 2.13.0" in out
    assert "calibration: source:train count:32 length:2048 compliant:False" in out and "reason: late" in out
    assert "config: {" in out and "bits" in out and "total" in out
    assert "re-exported: from final_model.float.ptz with git cafe on cpu" in out
    size = (tmp_path / "a.ptz").stat().st_size
    assert f"codec zstd-22: model {size} bytes" in out and "codec lzma-9:" in out and "codec zlib-9:" in out
    assert f"margin {16_000_000 - size - 1000}" in out


def test_inspect_against_counts_what_differs_between_two_artifacts(tmp_path, model_entries, capsys):
    """B is A with 5 codes of the int8 matrix moved by 1 and 2 (one of them twice), one of its scales and one
    fp16 value changed: the comparison counts exactly those, and the de-quantized difference of the rest is 0."""
    import copy

    from pgolf.tools.inspect import diff

    entries, model = model_entries
    meta = {"model": model, "tokenizer": TOKENIZER, "code_bytes": 1000}
    write_artifact(tmp_path / "a.ptz", entries, meta, "zstd")
    b = copy.deepcopy(entries)
    fc = b["blocks.0.mlp.fc.weight"]
    q = fc.q.view(-1)
    for i, step in ((0, 1), (7, -1), (100, 2), (4000, 1), (4001, -2)):
        q[i] = q[i] + step if abs(int(q[i]) + step) <= 127 else q[i] - step
    fc.scale[3] = fc.scale[3] * 2
    b["blocks.0.attn_scale"].data[5] += 1.0
    write_artifact(tmp_path / "b.ptz", b, meta, "zstd")
    out = diff(tmp_path / "a.ptz", tmp_path / "b.ptz")
    n = fc.q.numel()
    row = next(x for x in out.splitlines() if x.startswith("blocks.0.mlp.fc.weight"))
    assert f"5 ({100 * 5 / n:.2f}%)" in row and "int8/int8" in row and row.split()[4] == "2" and row.split()[5] == "1"
    assert f"codes: 5 of {sum(e.q.numel() for e in entries.values() if e.kind == 'int')} differ" in out
    assert "float tensors that differ: 1;" in out and "LQER: none" in out
    same = next(x for x in out.splitlines() if x.startswith("blocks.0.attn.c_q.weight"))
    assert same.split()[-1] == "0.00e+00"
    zero = next(x for x in out.splitlines() if x.startswith("blocks.0.attn.proj.weight"))  # zero-init: all 0 in A
    assert zero.split()[-2:] == ["abs", "0.00e+00"]
    assert main([str(tmp_path / "a.ptz"), "--against", str(tmp_path / "a.ptz")]) == 0
    assert "codes: 0 of" in capsys.readouterr().out
    cfg = GPTConfig(vocab_size=128, num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2)  # another model
    other = quantize_state(GPT(cfg).state_dict(), rules_from_config(BASELINE_RULES))
    write_artifact(tmp_path / "c.ptz", other, {**meta, "model": cfg.to_dict()}, "zstd")
    assert main([str(tmp_path / "a.ptz"), "--against", str(tmp_path / "c.ptz")]) == 2
    assert "do not hold the same tensors (first difference: " in capsys.readouterr().err


def test_inspect_cli_errors_cleanly(tmp_path):
    assert main([str(tmp_path / "missing.ptz")]) == 2
    (tmp_path / "junk.ptz").write_bytes(b"not an artifact at all, not even close to one")
    assert main([str(tmp_path / "junk.ptz")]) == 2
