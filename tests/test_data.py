"""Shard format validation, the deterministic rank-sliced stream of the baseline train_gpt.py, validation truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.data.shards import HEADER_BYTES, ShardError, open_shard, read_shard_header, write_shard
from pgolf.data.stream import StreamLayout, TokenStream, TrainStream, ValWindows, default_grad_accum, load_val_tokens


def test_shard_roundtrip(tmp_path):
    toks = np.arange(1000, dtype=np.uint16) % 1024
    p = tmp_path / "a_train_000000.bin"
    write_shard(p, toks)
    assert p.stat().st_size == HEADER_BYTES + 2 * 1000
    assert read_shard_header(p) == 1000
    np.testing.assert_array_equal(np.asarray(open_shard(p, 1024)), toks)


def _corrupt(tmp_path, fn):
    p = tmp_path / "bad.bin"
    write_shard(p, np.arange(100, dtype=np.uint16))
    raw = bytearray(p.read_bytes())
    p.write_bytes(bytes(fn(raw)))
    return p


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: b[:500], "truncated"),
        (lambda b: b + b"\0\0", "size mismatch"),
        (lambda b: np.frombuffer(b"\x01\x00\x00\x00", np.uint8).tobytes() + b[4:], "wrong magic"),
        (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
    ],
)
def test_corrupt_shards_name_the_file(tmp_path, mutate, message):
    p = _corrupt(tmp_path, mutate)
    with pytest.raises(ShardError, match=message) as e:
        open_shard(p)
    assert str(p) in str(e.value)


def test_token_id_out_of_vocab(tmp_path):
    p = tmp_path / "x.bin"
    toks = np.zeros(50, dtype=np.uint16)
    toks[37] = 1500
    write_shard(p, toks)
    with pytest.raises(ShardError, match=r"token id 1500 at position 37 is >= vocab size 1024") as e:
        open_shard(p, vocab_size=1024)
    assert str(p) in str(e.value)
    open_shard(p, vocab_size=2048)  # fine for a larger vocabulary


def test_missing_shard(tmp_path):
    with pytest.raises(ShardError, match="not found"):
        read_shard_header(tmp_path / "nope.bin")


def reference_batches(tokens: np.ndarray, batch_tokens, seq_len, world, accum, steps):
    """The baseline train_gpt.py's loader written directly: every rank takes the same chunk of
    (local+1)*world tokens from its own copy of the stream and keeps its slice."""
    local = batch_tokens // (world * accum)
    pos, out = 0, []
    for _ in range(steps * accum):
        n = (local + 1) * world
        idx = (pos + np.arange(n)) % tokens.size
        chunk = tokens[idx]
        pos += n
        per_rank = []
        for r in range(world):
            s = chunk[r * (local + 1) : (r + 1) * (local + 1)]
            per_rank.append((s[:-1].reshape(-1, seq_len), s[1:].reshape(-1, seq_len)))
        out.append(per_rank)
    return out


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_stream_matches_reference_for_world_sizes_dividing_8(tmp_path, world):
    rng = np.random.default_rng(0)
    sizes = [3000, 0, 1700, 2500]  # includes an empty shard; the stream wraps around several times
    files, all_toks = [], []
    for i, n in enumerate(sizes):
        t = rng.integers(0, 1024, n).astype(np.uint16)
        f = tmp_path / f"d_train_{i:06d}.bin"
        write_shard(f, t)
        files.append(f)
        all_toks.append(t)
    tokens = np.concatenate(all_toks).astype(np.int64)
    batch_tokens, seq_len = 8 * 2 * 64, 64
    accum = default_grad_accum(world)
    assert accum * world == 8
    lay = StreamLayout(batch_tokens, seq_len, world, accum)
    assert lay.local == batch_tokens // 8  # the micro-batch per rank is always batch/8
    steps = 12
    ref = reference_batches(tokens, batch_tokens, seq_len, world, accum, steps)
    stream = TokenStream(files, 1024)
    for r in range(world):
        it = iter(TrainStream(stream, lay, r))
        for m in range(steps * accum):
            x, y = next(it)
            np.testing.assert_array_equal(x.numpy(), ref[m][r][0])
            np.testing.assert_array_equal(y.numpy(), ref[m][r][1])
    # resuming at a micro-step is a seek: identical batches
    x5, _ = next(iter(TrainStream(stream, lay, world - 1, start_micro_step=5)))
    np.testing.assert_array_equal(x5.numpy(), ref[5][world - 1][0])


def test_world_size_must_divide_8():
    with pytest.raises(ValueError, match="must divide 8"):
        default_grad_accum(3)
    with pytest.raises(ValueError, match="whole 64-token sequences"):
        StreamLayout(1000, 64, 1, 8)


def test_val_truncation(tmp_path):
    t = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "v_val_000000.bin", t[:400])
    write_shard(tmp_path / "v_val_000001.bin", t[400:])
    val = load_val_tokens(str(tmp_path / "v_val_*.bin"), seq_len=128)
    usable = ((1000 - 1) // 128) * 128
    assert val.numel() == usable + 1 == 897
    assert torch.equal(val, torch.arange(897))  # sorted shard order, concatenated


def test_val_windows_split_contiguously_and_cover_everything():
    tokens = torch.arange(10 * 16 + 1)
    seen = []
    for rank in range(3):
        ds = ValWindows(tokens, 16, batch_windows=2, rank=rank, world_size=3)
        for i in range(len(ds)):
            x, y = ds[i]
            assert torch.equal(y, x + 1)
            seen += x[:, 0].tolist()
    assert seen == [16 * k for k in range(10)]
