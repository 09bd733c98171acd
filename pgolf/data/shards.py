"""The challenge's shard format: write, validate, memory-map and list shard files.

Shard format (the baseline train_gpt.py's loader): 256 little-endian int32 header (magic 20240520, version
1, num_tokens, zeros), then `num_tokens` little-endian uint16 token ids. Every problem with a shard raises
`ShardError` naming the file.

A CaseOps dataset (PR #1729; the final #1 record PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) also has per-token
byte sidecar shards `<prefix>_val_bytes_NNNNNN.bin` in the same format, one uint16 per validation token (the
original UTF-8 bytes it stands for). A pattern such as `fineweb_val_*.bin` matches them too: token loaders
drop them by name (`is_byte_sidecar`), as the records' loaders do.

Needs numpy only, so the data tools (pgolf/tools/fineweb.py) read shards without torch.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np

from pgolf.io import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 10**8  # tokens per shard in the published export
BYTE_SIDECAR = re.compile(r"_val_bytes_\d+\.bin$")  # fineweb_val_bytes_000000.bin (PR #1729's sidecar name)


class ShardError(ValueError):
    """A shard file is missing, malformed, truncated, or holds token ids outside the vocabulary."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write `tokens` as a challenge shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    atomic_write_bytes(path, header.tobytes() + tokens.astype("<u2").tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"{path}: wrong magic number {int(header[0])} (expected {SHARD_MAGIC}); not a challenge shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"{path}: unsupported shard version {int(header[1])} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(f"{path}: negative token count {num_tokens} in header")
    expected = HEADER_BYTES + 2 * num_tokens
    if size < expected:
        raise ShardError(
            f"{path}: truncated shard: header promises {num_tokens} tokens ({expected} bytes) but the file has {size}"
        )
    if size != expected:
        raise ShardError(f"{path}: size mismatch: expected {expected} bytes for {num_tokens} tokens, found {size}")
    return num_tokens


def check_token_range(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise ShardError at the first id >= `vocab_size` in tokens [N] (read `chunk` ids at a time; `path` names
    the shard in the message)."""
    for start in range(0, tokens.size, chunk):
        part = tokens[start : start + chunk]
        hi = int(part.max()) if part.size else 0
        if hi >= vocab_size:
            pos = start + int(np.argmax(part >= vocab_size))
            raise ShardError(
                f"{path}: token id {int(tokens[pos])} at position {pos} is >= vocab size {vocab_size} "
                "(shards and tokenizer do not match)"
            )


def open_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a validated shard's tokens (uint16). With `vocab_size`, every id is checked."""
    num_tokens = read_shard_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        check_token_range(path, tokens, vocab_size)
    return tokens


def list_shards(pattern: str) -> list[Path]:
    """The files matching the glob `pattern`, sorted; ShardError when none does."""
    files = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not files:
        raise ShardError(f"{pattern}: no shard files match")
    return files


def is_byte_sidecar(path: str | os.PathLike) -> bool:
    """Whether `path` is named as a per-token byte sidecar shard (`*_val_bytes_NNNNNN.bin`), not a token shard."""
    return BYTE_SIDECAR.search(Path(path).name) is not None


def sidecar_name(token_shard: str | os.PathLike) -> str:
    """The sidecar file name of a validation token shard: `fineweb_val_000003.bin` -> `fineweb_val_bytes_000003.bin`.
    ValueError for a name without `_val_NNNNNN.bin`."""
    name = Path(token_shard).name
    m = re.search(r"_val_(\d+)\.bin$", name)
    if m is None:
        raise ValueError(f"{name}: not a validation shard name (<prefix>_val_NNNNNN.bin)")
    return f"{name[: m.start()]}_val_bytes_{m.group(1)}.bin"
