"""The deterministic rank-sliced training stream and the validation tokens and windows.

Training stream (the baseline train_gpt.py's token stream): shards in sorted order form one endless stream
(wrapping to the first). On every micro-step every rank takes the same next `(local+1)*world` tokens and
uses its own slice `[r*(local+1), (r+1)*(local+1))`; `local = batch_tokens / (world*grad_accum)`. Because
the stream is a pure function of the micro-step index, the position is one integer and resuming is a seek.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from pgolf.data.shards import ShardError, list_shards, open_shard, read_shard_header
from pgolf.data.tokenizer import check_shards_tokenizer


def load_val_tokens(
    pattern: str, seq_len: int, vocab_size: int | None = None, tokenizer: str | os.PathLike | None = None
) -> torch.Tensor:
    """All validation shards concatenated in sorted order, truncated to `floor((N-1)/S)*S` targets plus
    one token, as the baseline does. Returned as an int64 tensor of length usable+1. With `tokenizer` (a
    .model path), the shards' manifest must name that tokenizer first (`check_shards_tokenizer`: TokenizerError).
    ShardError for a malformed shard or fewer than S+1 tokens."""
    if tokenizer is not None:
        check_shards_tokenizer(pattern, tokenizer)
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
        """The n tokens [n] (int64) from absolute position `start`, wrapping around the end of the stream."""
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
    """How one optimizer step's tokens split into ranks and micro-steps; ValueError unless they split into whole
    sequences."""

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
    """The baseline train_gpt.py's `grad_accum = 8 / world_size`."""
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
