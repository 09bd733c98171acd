"""Challenge shard format, the deterministic rank-sliced training stream, validation tokens, DataModule.

Shard format (SPEC §2.2): 256 little-endian int32 header (magic 20240520, version 1, num_tokens, zeros),
then `num_tokens` little-endian uint16 token ids. Every problem with a shard raises `ShardError` naming
the file.

Training stream (SPEC §2.3): shards in sorted order form one endless stream (wrapping to the first). On
every micro-step every rank takes the same next `(local+1)*world` tokens and uses its own slice
`[r*(local+1), (r+1)*(local+1))`; `local = batch_tokens / (world*grad_accum)`. Because the stream is a
pure function of the micro-step index, the position is one integer and resuming is a seek.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from pgolf.io import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 10**8  # tokens per shard in the published export


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
    files = sorted(Path(p) for p in glob.glob(str(pattern)))
    if not files:
        raise FileNotFoundError(f"no shard files match {pattern!r}")
    return files


def load_val_tokens(pattern: str, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """All validation shards concatenated in sorted order, truncated to `floor((N-1)/S)*S` targets plus
    one token (SPEC §2.2). Returned as an int64 tensor of length usable+1."""
    parts = [np.asarray(open_shard(p, vocab_size)) for p in list_shards(pattern)]
    tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"{pattern}: validation split has {tokens.size} tokens, fewer than one sequence of {seq_len}")
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


class TokenStream:
    """The endless concatenation of training shards; any span is addressable by absolute position."""

    def __init__(self, files: list[Path], vocab_size: int | None = None):
        self.files = [Path(f) for f in files]
        self.vocab_size = vocab_size
        self.sizes = [read_shard_header(f) for f in self.files]
        if sum(self.sizes) == 0:
            raise ShardError(f"training shards hold no tokens: {[str(f) for f in self.files]}")
        self.offsets = np.cumsum([0] + self.sizes)
        self.total = int(self.offsets[-1])
        self._cache: dict[int, np.ndarray] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = open_shard(self.files[i], self.vocab_size)  # validated on first use
        return self._cache[i]

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled, pos = 0, start % self.total
        while filled < n:
            i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            local = pos - int(self.offsets[i])
            k = min(n - filled, self.sizes[i] - local)  # > 0: 'right' search skips empty shards
            out[filled : filled + k] = self._shard(i)[local : local + k]
            filled += k
            pos = (pos + k) % self.total
        return out


@dataclass(frozen=True)
class StreamLayout:
    batch_tokens: int  # tokens per optimizer step, all ranks together
    seq_len: int
    world_size: int
    grad_accum: int

    def __post_init__(self):
        per = self.world_size * self.grad_accum
        if self.batch_tokens % per or (self.batch_tokens // per) % self.seq_len:
            raise ValueError(
                f"batch_tokens={self.batch_tokens} must split into world_size={self.world_size} x "
                f"grad_accum={self.grad_accum} micro-batches of whole {self.seq_len}-token sequences"
            )

    @property
    def local(self) -> int:  # tokens per rank per micro-step
        return self.batch_tokens // (self.world_size * self.grad_accum)

    @property
    def chunk(self) -> int:  # stream advance per micro-step
        return (self.local + 1) * self.world_size


def default_grad_accum(world_size: int, base: int = 8) -> int:
    """The reference's `grad_accum = 8 / world_size` (SPEC §2.3)."""
    if world_size <= 0 or base % world_size:
        raise ValueError(f"world size {world_size} must divide {base} (grad_accum = {base}/world_size)")
    return base // world_size


class TrainStream(IterableDataset):
    """Yields this rank's `(x, y)` micro-batches, each `[local/T, T]` int64, from micro-step `start` on."""

    def __init__(self, stream: TokenStream, layout: StreamLayout, rank: int, start_micro_step: int = 0):
        super().__init__()
        self.stream, self.layout, self.rank = stream, layout, rank
        self.start_micro_step = start_micro_step

    def batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lay = self.layout
        span = self.stream.read(micro_step * lay.chunk + self.rank * (lay.local + 1), lay.local + 1)
        t = torch.from_numpy(span)
        return t[:-1].view(-1, lay.seq_len), t[1:].view(-1, lay.seq_len)

    def __iter__(self):
        step = self.start_micro_step
        while True:
            yield self.batch(step)
            step += 1


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous split of n items across ranks (the reference's window split)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ValWindows(Dataset):
    """Non-overlapping `[k*S, (k+1)*S)` windows of the validation stream for one rank, in batches."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_windows: int, rank: int = 0, world_size: int = 1):
        n = (tokens.numel() - 1) // seq_len
        self.first, self.last = rank_slice(n, rank, world_size)
        self.tokens, self.seq_len, self.batch_windows = tokens, seq_len, batch_windows

    def __len__(self) -> int:
        return -(-(self.last - self.first) // self.batch_windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.first + i * self.batch_windows
        b = min(a + self.batch_windows, self.last)
        span = self.tokens[a * self.seq_len : b * self.seq_len + 1]
        return span[:-1].view(-1, self.seq_len), span[1:].view(-1, self.seq_len)


class GolfDataModule(L.LightningDataModule):
    """Training stream + validation windows from challenge shards that already exist (the entry point runs
    the data-preparation step first: pgolf/tools/datasets.py)."""

    def __init__(
        self,
        train_pattern: str,
        val_pattern: str,
        tokenizer_path: str,
        vocab_size: int,
        batch_tokens: int,
        seq_len: int,
        eval_seq_len: int | None = None,
        val_batch_tokens: int = 524_288,
        grad_accum: int | str = "auto",
    ):
        super().__init__()
        self.train_pattern, self.val_pattern = train_pattern, val_pattern
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size
        self.batch_tokens, self.seq_len = batch_tokens, seq_len
        self.eval_seq_len = eval_seq_len or seq_len
        self.val_batch_tokens = val_batch_tokens
        self.grad_accum_cfg = grad_accum
        self.val_tokens: torch.Tensor | None = None
        self.layout: StreamLayout | None = None
        self._start_micro_step = 0

    # ---- preparation and set-up ---------------------------------------------------------------
    def world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return 1, 0

    def grad_accum(self, world_size: int) -> int:
        if self.grad_accum_cfg in (None, "auto"):
            return default_grad_accum(world_size)
        return int(self.grad_accum_cfg)

    def setup(self, stage: str | None = None) -> None:
        world, _ = self.world()
        self.layout = StreamLayout(self.batch_tokens, self.seq_len, world, self.grad_accum(world))
        if self.val_tokens is None:
            self.val_tokens = load_val_tokens(self.val_pattern, max(self.seq_len, self.eval_seq_len), self.vocab_size)

    # ---- loaders --------------------------------------------------------------------------------
    def train_stream(self, start_micro_step: int | None = None) -> TrainStream:
        world, rank = self.world()
        stream = TokenStream(list_shards(self.train_pattern), self.vocab_size)
        start = self._start_micro_step if start_micro_step is None else start_micro_step
        return TrainStream(stream, self.layout, rank, start)

    def train_dataloader(self) -> DataLoader:
        pin = self.trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"
        return DataLoader(self.train_stream(), batch_size=None, num_workers=0, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        world, rank = self.world()
        batch_windows = max(1, self.val_batch_tokens // (world * self.eval_seq_len))
        ds = ValWindows(self.val_tokens, self.eval_seq_len, batch_windows, rank, world)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    # ---- exact resume: the stream position is the number of micro-steps taken --------------------
    def state_dict(self) -> dict:
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"micro_step": step * self.layout.grad_accum if self.layout else 0}

    def load_state_dict(self, state: dict) -> None:
        self._start_micro_step = int(state.get("micro_step", 0))
