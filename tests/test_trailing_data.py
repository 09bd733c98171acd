"""Bytes after the end of an artifact's compressed stream are refused for every codec, naming the count (and a
stream cut before its end marker is refused too), by the validating reader (eval.py, inspect) and by
`decode_artifact`; valid files, multi-block and checksummed zstd frames included, still load. Files are forged
with the project's own pack/compress, then re-framed with a consistent checksum."""

from __future__ import annotations

import lzma
import shutil
import struct
import zlib

import pytest
import torch
import zstandard

import pgolf.quant.artifact as art
from pgolf.export.weights import read_model_artifact
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant import pergroup
from pgolf.quant.artifact import (
    CODECS,
    MAGIC,
    PREFIX,
    VERSION,
    VERSION_SINGLE,
    ArtifactError,
    _digest,
    compress,
    decode_artifact,
    encode_artifact,
    pack,
    read_artifact,
)
from pgolf.quant.rules import quantize_state, rules_from_config
from pgolf.tools import inspect as inspect_cli

CFG = GPTConfig(vocab_size=64, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2)
RULES = [{"name": "matrix", "ndim": 2, "store": "int", "bits": 6}, {"name": "rest", "store": "fp16"}]
META = {"model": CFG.to_dict(), "tokenizer": {"name": "t.model", "vocab_size": 64, "sha256": "ab" * 32}}
needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip is not installed")
PLAIN = ("brotli", "lzma", "zlib", "zstd")
PERGROUP = [pytest.param("pergroup", marks=needs_lrzip), "pergroup_brotli"]
JUNK = [1, 8, 5000]


@pytest.fixture(scope="module")
def raw() -> bytes:
    torch.manual_seed(0)
    return pack(quantize_state(GPT(CFG).state_dict(), rules_from_config(RULES)), META)


def framed(codec: str, raw_len: int, payload: bytes, level: int = 1, version: int = VERSION_SINGLE) -> bytes:
    """An artifact file around `payload` whose prefix and checksum are consistent with it (version 1: one
    stream; 2: `payload` is u32 n + two streams)."""
    cid = CODECS[codec]
    return PREFIX.pack(MAGIC, version, cid, level, raw_len, _digest(version, cid, level, raw_len, payload)) + payload


def write(tmp_path, data: bytes):
    path = tmp_path / "a.ptz"
    path.write_bytes(data)
    return path


def refused(tmp_path, data: bytes, message: str, capsys=None) -> None:
    """`data` refused with `message` by decode_artifact, the validating model reader and inspect."""
    with pytest.raises(ArtifactError, match=message):
        decode_artifact(data)
    path = write(tmp_path, data)
    with pytest.raises(ArtifactError, match=message):
        read_model_artifact(path)
    with pytest.raises(ArtifactError, match=message):
        read_artifact(path, sink=lambda name, entry: None)  # eval.py's streaming reader
    if capsys is not None:
        capsys.readouterr()
        assert inspect_cli.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "bytes of data after the end" in err


@pytest.mark.parametrize("n", JUNK)
@pytest.mark.parametrize("codec", PLAIN)
def test_bytes_after_the_stream_are_refused_naming_the_count(tmp_path, raw, codec, n):
    data = framed(codec, len(raw), compress(raw, codec, 1) + b"JUNK" * (n // 4) + b"J" * (n % 4))
    refused(tmp_path, data, rf"^(.*a\.ptz: )?{n} bytes of data after the end of the {codec} stream")


def two_streams(raw: bytes, codec: str, first_junk: bytes = b"", second_junk: bytes = b"") -> bytes:
    """A version-2 payload of `raw` (u32 n + the header's stream + the tensor bytes' stream), with junk after
    either stream."""
    split = 4 + struct.unpack_from("<I", raw)[0]
    head = compress(raw[:split], codec, 1) + first_junk
    return struct.pack("<I", len(head)) + head + compress(raw[split:], codec, 1) + second_junk


@pytest.mark.parametrize("codec", PLAIN)
def test_version_2_two_streams_are_read_and_junk_after_either_is_refused(tmp_path, raw, codec):
    """The writer's layout (version 2) loads; junk after the first stream (inside its declared bytes) or after
    the second is refused naming the count; a first stream cut short, or declared past the payload, too."""
    good = framed(codec, len(raw), two_streams(raw, codec), version=VERSION)
    assert good == encode_artifact(raw, codec, 1)  # what the writer writes
    assert set(read_artifact(write(tmp_path, good))[0]) == set(GPT(CFG).state_dict())
    assert decode_artifact(good)[0] == raw
    for junk in (b"J", b"JUNK" * 3):
        n = len(junk)
        refused(tmp_path, framed(codec, len(raw), two_streams(raw, codec, first_junk=junk), version=VERSION),
                rf"{n} bytes of data after the end of the {codec} stream")  # fmt: skip
        refused(tmp_path, framed(codec, len(raw), two_streams(raw, codec, second_junk=junk), version=VERSION),
                rf"{n} bytes of data after the end of the {codec} stream")  # fmt: skip
    payload = two_streams(raw, codec)
    (n,) = struct.unpack_from("<I", payload)
    short = struct.pack("<I", n - 3) + payload[4 : 4 + n - 3] + payload[4 + n :]  # the first stream cut short
    with pytest.raises(ArtifactError, match=codec):
        read_artifact(write(tmp_path, framed(codec, len(raw), short, version=VERSION)))
    past = struct.pack("<I", len(payload)) + payload[4:]
    with pytest.raises(ArtifactError, match="first stream's declared .* bytes run past the payload"):
        read_artifact(write(tmp_path, framed(codec, len(raw), past, version=VERSION)))
    with pytest.raises(ArtifactError, match="too short for its two streams"):
        read_artifact(write(tmp_path, framed(codec, len(raw), b"\x01", version=VERSION)))
    # the streams split elsewhere than after the header (together they still give the payload): refused
    split = 4 + struct.unpack_from("<I", raw)[0]
    for cut, what in ((split + 100, "more"), (split - 10, "fewer"), (len(raw), "more"), (0, "fewer")):
        head = compress(raw[:cut], codec, 1)
        moved = struct.pack("<I", len(head)) + head + compress(raw[cut:], codec, 1)
        path = write(tmp_path, framed(codec, len(raw), moved, version=VERSION))
        with pytest.raises(
            ArtifactError, match=f"first stream must hold exactly the header's {split} bytes, it holds {what}"
        ):
            read_artifact(path)
        assert decode_artifact(path.read_bytes())[0] == raw  # the unvalidating decoder joins them


def test_the_reviewers_case_zlib_junk_is_refused_by_inspect(tmp_path, raw, capsys):
    refused(tmp_path, framed("zlib", len(raw), zlib.compress(raw) + b"JUNKJUNK"), "8 bytes of data after", capsys)


@pytest.mark.parametrize("border", [False, True])
@pytest.mark.parametrize("codec", PLAIN)
def test_the_count_is_exact_across_chunk_borders(tmp_path, raw, codec, border, monkeypatch):
    """Small input and output chunks: the stream ends inside an input chunk, or exactly at its border
    (`border`: the junk starts a chunk of its own), and the junk spans one chunk or several."""
    payload = compress(raw, codec, 1)
    monkeypatch.setattr(art, "IN_CHUNK", len(payload) if border else 64)
    monkeypatch.setattr(art, "OUT_CHUNK", 100)
    for n in (1, 63, 300):
        data = framed(codec, len(raw), payload + b"\x00" * n)
        refused(tmp_path, data, rf"{n} bytes of data after the end of the {codec} stream")
    entries, _ = read_artifact(write(tmp_path, framed(codec, len(raw), payload)))  # without junk: loads
    assert set(entries) == set(GPT(CFG).state_dict())


@pytest.mark.parametrize("codec", PERGROUP)
def test_bytes_after_the_pergroup_remainder_are_refused(tmp_path, raw, codec):
    data = encode_artifact(raw, codec, 1)
    _, _, _, level, raw_len, _ = PREFIX.unpack_from(data)
    streams = [bytes(s) for s in pergroup.split_container(memoryview(data)[PREFIX.size :])]
    streams[pergroup.REMAINDER] += b"JUNKJUNK"
    forged = framed(codec, raw_len, pergroup.pack_container(streams), level)
    refused(tmp_path, forged, "pergroup stream remainder: 8 bytes of data after the end of the brotli stream")


@pytest.mark.parametrize(
    ("codec", "cut"),
    [
        ("zlib", lambda raw: (lambda c: c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH))(zlib.compressobj(1))),
        ("lzma", lambda raw: lzma.compress(raw, format=lzma.FORMAT_XZ, preset=1)[:-12]),  # its footer cut off
    ],
)
def test_a_stream_cut_before_its_end_marker_is_refused(tmp_path, raw, codec, cut):
    """Every payload byte is there, the stream's end (zlib: final block and Adler-32; xz: footer) is not."""
    data = framed(codec, len(raw), cut(raw))
    with pytest.raises(ArtifactError, match=f"corrupt {codec} payload: the stream stops before its end marker"):
        decode_artifact(data)
    with pytest.raises(ArtifactError, match=f"corrupt {codec} payload: the stream stops before its end marker"):
        read_artifact(write(tmp_path, data))


def test_a_second_zstd_frame_is_trailing_data(tmp_path, raw):
    empty = zstandard.ZstdCompressor().compress(b"")  # a valid frame of nothing: decoding it adds no byte
    data = framed("zstd", len(raw), compress(raw, "zstd", 1) + empty)
    refused(tmp_path, data, f"{len(empty)} bytes of data after the end of the zstd stream")


def test_zstd_frames_of_many_blocks_and_with_a_checksum_still_load(tmp_path):
    """The frame walk agrees with zstd on real frames: one block per 128 KiB, RLE and raw blocks, a checksum."""
    torch.manual_seed(0)
    big = torch.randint(-128, 128, (300_000,), dtype=torch.int8).numpy().tobytes() + bytes(400_000)
    for payload in (
        zstandard.ZstdCompressor(level=1).compress(big),
        zstandard.ZstdCompressor(level=1, write_checksum=True).compress(big),
    ):
        assert decode_artifact(framed("zstd", len(big), payload)) == (big, "zstd")
        stream = art._Inflate(payload, "zstd", len(big))
        assert stream.read(len(big)) == big
        stream.finish()


def test_a_zstd_frame_of_too_many_blocks_is_refused_before_decoding(raw):
    """Empty raw blocks are valid zstd but never written by pgolf: more than one block per KiB of payload
    (plus ZSTD_BLOCK_SLACK) bounds the walk of a forged file."""
    payload = compress(raw, "zstd", 1)
    head = zstandard.frame_header_size(payload)
    forged = payload[:head] + b"\x00\x00\x00" * (len(raw) // 1024 + art.ZSTD_BLOCK_SLACK) + payload[head:]
    with pytest.raises(ArtifactError, match="corrupt zstd payload: more blocks than"):
        decode_artifact(framed("zstd", len(raw), forged))
    with pytest.raises(ArtifactError, match="corrupt zstd payload: it does not start with a zstd frame"):
        decode_artifact(framed("zstd", len(raw), b"JUNK" + payload))
