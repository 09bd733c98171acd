"""PR #1611's per-group container (pgolf/quant/pergroup.py) and the brotli codec: routing, the L1 chain, the
transposed serialisation, bit-exact round trips, and a missing lrzip as an error. Forged containers are in
tests/test_hostile_artifacts.py."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import brotli
import numpy as np
import pytest
import torch

import pgolf.quant.artifact as art
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant import pergroup
from pgolf.quant.artifact import ArtifactError
from pgolf.quant.pergroup import GROUPS, PERMS, STREAM_NAMES, decode_matrix, encode_matrix, group_of, nn_chain, route
from pgolf.quant.rules import dequantize_state, quantize_state, rules_from_config

HAS_LRZIP = shutil.which("lrzip") is not None
needs_lrzip = pytest.mark.skipif(not HAS_LRZIP, reason="lrzip is not installed (apt-get install lrzip)")
CODECS = ["pergroup_brotli", pytest.param("pergroup", marks=needs_lrzip)]
CFG = GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
RULES = [{"name": "matrix", "ndim": 2, "store": "int", "bits": 6}, {"name": "rest", "store": "fp16"}]


def payload(rules=RULES) -> tuple[bytes, dict]:
    torch.manual_seed(0)
    sd = {k: v + 0.05 * torch.randn_like(v) if v.ndim == 2 else v for k, v in GPT(CFG).state_dict().items()}
    entries = quantize_state(sd, rules_from_config(rules))
    return art.pack(entries, {"model": CFG.to_dict()}), entries


@pytest.fixture(scope="module")
def raw_entries():
    return payload()


def streams_of(data: bytes) -> list[memoryview]:
    return pergroup.split_container(memoryview(data)[art.PREFIX.size :])


# ---- routing ----------------------------------------------------------------------------------------------
def test_routing_groups_layers_and_what_stays_out():
    fields = [
        ("blocks.10.mlp.fc.weight", "int8", [4, 3], 100),
        ("blocks.2.mlp.fc.weight", "int8", [4, 3], 0),
        ("blocks.0.attn.c_k.weight", "int8", [2, 3], 30),
        ("tok_emb.weight", "int8", [5, 3], 50),
        ("blocks.0.attn.attn_gate_w", "int8", [4, 12], 200),  # an int8 gate: not a routed role
        ("lm_head.weight", "int8", [4, 4], 300),
        ("blocks.0.mlp.proj.weight", "int16", [4, 4], 400),  # not int8 codes
        ("blocks.0.attn.c_v.weight", "int8", [0, 4], 500),  # empty
        ("blocks.0.attn.proj.weight", "int8", [16], 600),  # not 2-D
    ]
    got = route(fields)
    assert [(r.name, GROUPS[r.group], r.layer, r.hot) for r in got] == [
        ("tok_emb.weight", "tok_emb", 0, True),
        ("blocks.0.attn.c_k.weight", "c_k", 0, False),
        ("blocks.2.mlp.fc.weight", "mlp.fc", 2, True),
        ("blocks.10.mlp.fc.weight", "mlp.fc", 10, True),  # layer order, not name order
    ]
    assert got[0].offset == 50 and got[0].nbytes == 15


def test_every_block_matrix_of_the_model_is_routed():
    names = list(GPT(CFG).state_dict())
    routed = {n: GROUPS[group_of(n)[0]] for n in names if group_of(n)}
    roles = ("attn.c_k", "attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")
    assert set(routed) == {"tok_emb.weight"} | {f"blocks.{i}.{r}.weight" for i in range(2) for r in roles}
    assert routed["blocks.1.attn.proj.weight"] == "attn.proj" and routed["blocks.0.mlp.proj.weight"] == "mlp.proj"


# ---- the chain and the serialisation ------------------------------------------------------------------------
def chain_reference(m: np.ndarray) -> list[int]:
    m = m.astype(np.int64)
    order, used = [0], {0}
    while len(order) < len(m):
        d = np.abs(m - m[order[-1]]).sum(1)
        order.append(min((int(d[i]), i) for i in range(len(m)) if i not in used)[1])
        used.add(order[-1])
    return order


def test_nn_chain_is_the_greedy_l1_chain_with_ties_to_the_lowest_index():
    m = np.array([[0, 0], [5, 5], [1, 1], [1, 1], [0, 0]], dtype=np.int8)
    assert nn_chain(m).tolist() == [0, 4, 2, 3, 1]
    rng = np.random.default_rng(0)
    for rows, lo, hi in [(1, -3, 3), (2, -3, 3), (40, -3, 3), (40, -32, 31), (40, -128, 127)]:  # last: int16 path
        m = rng.integers(lo, hi + 1, (rows, 6)).astype(np.int8)
        assert nn_chain(m).tolist() == chain_reference(m), (rows, lo, hi)


def test_matrices_are_stored_column_major_after_the_row_order():
    m = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int8)
    assert encode_matrix(m, np.array([1, 0])) == bytes([4, 1, 5, 2, 6, 3])
    assert encode_matrix(m, None) == bytes([1, 4, 2, 5, 3, 6])
    assert np.array_equal(decode_matrix(bytes([4, 1, 5, 2, 6, 3]), 2, 3, np.array([1, 0])), m)
    assert np.array_equal(decode_matrix(bytes([1, 4, 2, 5, 3, 6]), 2, 3, None), m)


# ---- round trips -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_pergroup_round_trip_is_bit_exact(tmp_path, raw_entries, codec):
    raw, entries = raw_entries
    data = art.encode_artifact(raw, codec, 1)  # lrzip -z -L 1: the fastest ZPAQ level (tests stay fast)
    assert art.decode_artifact(data) == (raw, codec)
    path = tmp_path / "a.ptz"
    path.write_bytes(data)
    got, meta = art.read_artifact(path)
    assert meta == {"model": CFG.to_dict()} and list(got) == list(entries)
    a, b = dequantize_state(entries), dequantize_state(got)
    assert all(torch.equal(a[k], b[k]) for k in a)
    streams = streams_of(data)
    assert [n for n, s in zip(STREAM_NAMES, streams) if not s] == []  # every group holds a matrix here
    hot = ["tok_emb.weight"] + [f"blocks.{i}.{r}.weight" for i in range(2) for r in ("attn.c_q", "mlp.fc")]
    rows = sum(entries[n].shape[0] for n in hot)
    perms = pergroup.brotli_decompress(streams[PERMS], 2 * rows, "permutations")
    assert len(perms) == 2 * rows
    assert bytes(streams[PERMS]) == brotli.compress(perms, quality=11)  # the record's call: the default window


def test_a_group_without_tensors_is_an_empty_stream_and_the_remainder_keeps_the_rest():
    rules = [{"name": "ck", "pattern": r"\.c_k\.", "store": "fp16"}, *RULES]
    raw, _ = payload(rules)
    data = art.encode_artifact(raw, "pergroup_brotli", 5)
    streams = streams_of(data)
    assert len(streams[GROUPS.index("c_k")]) == 0 and all(len(s) for i, s in enumerate(streams) if i != 1)
    assert art.PREFIX.unpack_from(data)[3] == 5  # the level byte: the groups' brotli quality
    assert art.decode_artifact(data)[0] == raw


def test_a_group_that_does_not_shrink_is_named(capsys):
    """Codes that look random (lrzip's LZ4 pre-test then stores the group as it is, as in the record) get a
    line naming the group; codes that compress do not."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(-128, 128, size=(64, 64), dtype=np.int8).tobytes()
    flat = bytes(64 * 64)
    routed = [pergroup.Routed("blocks.0.attn.c_k.weight.q", GROUPS.index("c_k"), 0, 64, 64, 0, False)]
    routed.append(pergroup.Routed("blocks.0.attn.c_v.weight.q", GROUPS.index("c_v"), 0, 64, 64, 4096, False))
    pergroup.encode(noisy + flat, routed, "brotli", 11)
    out = capsys.readouterr().out
    assert "pergroup: group(s) c_k did not shrink under brotli (stored as they are)" in out
    pergroup.encode(flat + flat, routed, "brotli", 11)
    assert "did not shrink" not in capsys.readouterr().out


def test_a_payload_without_a_valid_header_is_refused_by_pergroup():
    with pytest.raises(ArtifactError, match=r"pergroup codec compresses a pgolf payload .*header length"):
        art.compress(struct.pack("<I", 99) + b"{}", "pergroup_brotli")


# ---- brotli ----------------------------------------------------------------------------------------------
def test_brotli_codec_round_trips_and_checks_its_level(raw_entries):
    raw, _ = raw_entries
    for level in (0, 11):
        data = art.encode_artifact(raw, "brotli", level)
        assert art.decode_artifact(data) == (raw, "brotli")
    assert art.PREFIX.unpack_from(art.encode_artifact(raw, "brotli"))[3] == 11  # default quality 11
    with pytest.raises(ArtifactError, match=r"codec level 12 is out of range for brotli \(0\.\.11\)"):
        art.encode_artifact(raw, "brotli", 12)
    with pytest.raises(ArtifactError, match=r"codec level 0 is out of range for pergroup \(1\.\.9\)"):
        art.encode_artifact(raw, "pergroup", 0)


def test_the_brotli_reader_drains_the_decoder_after_the_input_is_taken():
    """brotli 1.2.1 accepts input again before its output is drained: a stream fed whole in one chunk must
    still come out whole through small reads."""
    data = np.random.default_rng(0).integers(0, 4, 300_000, dtype=np.uint8).tobytes()
    z = pergroup.brotli_compress(data, 1)
    for in_chunk, n in [(len(z), 1000), (7, 4096), (1 << 20, 1 << 16)]:
        r, out = pergroup.BrotliReader(z, in_chunk), bytearray()
        while chunk := r.read(n):
            assert len(chunk) <= n
            out += chunk
        assert bytes(out) == data, (in_chunk, n)
    r = pergroup.BrotliReader(z[:-50])
    while r.read(1 << 16):
        pass  # a truncated stream ends early (the caller's length check names it)


def test_brotli_decompression_is_bounded():
    bomb = pergroup.brotli_compress(b"\0" * (8 << 20), 1)  # 8 MiB of zeros: a few hundred bytes
    with pytest.raises(ArtifactError, match="more bytes than the declared 1000"):
        art.decompress(bomb, "brotli", 1000)
    with pytest.raises(pergroup.PerGroupError, match="stream c_q decompresses to more bytes than the 10"):
        pergroup.brotli_decompress(bomb, 10, "c_q")
    with pytest.raises(pergroup.PerGroupError, match="corrupt brotli data"):
        pergroup.brotli_decompress(pergroup.brotli_compress(b"abc") + b"junk", 3, "c_q")


# ---- lrzip -----------------------------------------------------------------------------------------------
def test_a_missing_lrzip_is_an_error_when_writing_and_when_reading(tmp_path, raw_entries, monkeypatch):
    raw, _ = raw_entries
    data = art.encode_artifact(raw, "pergroup", 1) if HAS_LRZIP else None
    monkeypatch.setenv("PATH", str(tmp_path))  # no lrzip here
    for call in (lambda: art.check_codec("pergroup"), lambda: art.encode_artifact(raw, "pergroup")):
        with pytest.raises(ArtifactError, match=r"needs the external program `lrzip`.*apt-get install lrzip"):
            call()
    art.encode_artifact(raw, "pergroup_brotli")  # needs no external program
    # a run whose export needs it (experiment=record_1611) stops at its start, one config error line, before
    # any data is prepared (a traceback after the data download before)
    from test_training import compose_cfg

    from pgolf.config.typed import ConfigError
    from pgolf.train.build import check_export_codec

    with pytest.raises(ConfigError, match=r"^export: codec pergroup needs the external program `lrzip`"):
        check_export_codec(compose_cfg(["experiment=record_1611"]))
    check_export_codec(compose_cfg(["experiment=record_1611", "export=sdclip_gptq_record_1611"]))  # lzma
    if data is not None:
        path = tmp_path / "a.ptz"
        path.write_bytes(data)
        with pytest.raises(ArtifactError, match=r"a\.ptz: codec pergroup needs the external program `lrzip`"):
            art.read_artifact(path)


@needs_lrzip
def test_lrzip_streams_declare_their_size_and_are_bounded():
    data = bytes(range(256)) * 8
    z = pergroup.lrzip_compress(data, 9)
    assert pergroup.lrzip_declared_len(z, "c_q") == len(data)
    assert pergroup.lrzip_decompress(z, len(data), "c_q") == data
    with pytest.raises(pergroup.PerGroupError, match="stream c_q: lrzip declares 2048 bytes, the header's tensors"):
        pergroup.lrzip_decompress(z, 100, "c_q")
    forged = z[:6] + struct.pack("<Q", 100) + z[14:]  # declares 100, holds 2048
    with pytest.raises(pergroup.PerGroupError, match="stream c_q decompresses to more bytes than the 100"):
        pergroup.lrzip_decompress(forged, 100, "c_q")
    with pytest.raises(pergroup.PerGroupError, match="stream c_q: lrzip -d failed"):
        pergroup.lrzip_decompress(z[:-20], len(data), "c_q")
    with pytest.raises(pergroup.PerGroupError, match="not an lrzip 0.6 stream"):
        pergroup.lrzip_declared_len(b"LRZX" + z[4:], "c_q")


@needs_lrzip
def test_lrzip_decoding_runs_within_memory_and_file_limits(monkeypatch):
    """`lrzip -d` runs with an address-space limit (lrzip decodes a whole chunk in memory before it writes
    any: a forged stream declaring 4 KB may hold gigabytes): with the limit set too low for lrzip, the stream
    fails with one line naming it, and at the default it decodes."""
    data = bytes(range(256)) * 64
    z = pergroup.lrzip_compress(data, 9)
    monkeypatch.setattr(pergroup, "LRZIP_DECODE_AS", 16 << 20)  # too little for lrzip to run
    with pytest.raises(pergroup.PerGroupError, match="stream c_q: lrzip -d needed more memory or temporary file"):
        pergroup.lrzip_decompress(z, len(data), "c_q")
    monkeypatch.undo()
    assert pergroup.lrzip_decompress(z, len(data), "c_q") == data


def test_the_first_failing_stream_stops_the_others(monkeypatch):
    """Decoding the groups in threads: the first job that fails has the others' processes stopped
    (`on_error`) and its own error raised, not the stopped ones'."""
    monkeypatch.setattr(pergroup.os, "cpu_count", lambda: 3)
    running: set = set()

    def slow():
        proc = subprocess.Popen([shutil.which("sleep"), "30"])
        running.add(proc)
        if proc.wait() != 0:
            raise RuntimeError("stopped")
        return b"done"

    def bad():
        time.sleep(0.3)
        raise pergroup.PerGroupError("stream mlp.fc is broken")

    t0 = time.perf_counter()
    with pytest.raises(pergroup.PerGroupError, match="mlp.fc is broken"):
        pergroup._pool([slow, bad, slow], on_error=lambda: [p.kill() for p in list(running)])
    assert time.perf_counter() - t0 < 10
    assert pergroup._pool([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
    procs = pergroup.Running()
    first = subprocess.Popen([shutil.which("sleep"), "30"])
    procs.add(first)
    procs.stop()
    late = subprocess.Popen([shutil.which("sleep"), "30"])
    procs.add(late)  # one that starts after the stop is stopped as it registers
    assert first.wait(timeout=5) < 0 and late.wait(timeout=5) < 0


def test_a_hanging_lrzip_is_stopped_by_its_timeout(tmp_path, monkeypatch):
    """A stand-in `lrzip` that never finishes: both directions give up after their timeout."""
    fake = tmp_path / "lrzip"
    fake.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pergroup.PerGroupError, match=r"lrzip -z ran past its 0\.2 s timeout"):
        pergroup.lrzip_compress(b"abc", 9, timeout=0.2)
    header = b"LRZI\x00\x06" + struct.pack("<Q", 3) + bytes(10)
    with pytest.raises(pergroup.PerGroupError, match=r"stream c_q: lrzip -d ran past its 0\.2 s timeout"):
        pergroup.lrzip_decompress(header, 3, "c_q", timeout=0.2)
