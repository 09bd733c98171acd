"""PR #1611's `ShuffledSequenceLoader` (records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack
_1.0611): the training-data windows its GPTQ calibration reads (and the loader of its parent lineage's training).

Rank r of `world_size` owns the shard files `files[r::world_size]` (the sorted training shards) and one numpy
`Generator(PCG64(seed))`, seed = r. At construction, and again whenever every owned window has been used, each
owned file in order gets (from that generator):
  - a phase: `integers(max_phase + 1)` with `max_phase = min(seq_len - 1, max(0, n - seq_len - 1))` for a file
    of n tokens; no draw when max_phase is 0 (phase 0);
  - a random order of its `(n - 1 - phase) // seq_len` windows: `permutation(count)`, window k starting at
    `phase + k·seq_len`; the list of starts is consumed from its end.
Each window then picks a file by `choice(files, p = remaining windows / all remaining windows)` and takes the
last start left in that file's list: `seq_len + 1` tokens, inputs = the first `seq_len`, targets = the last
`seq_len` (a file never gives more windows than its count). A batch is `batch` such windows, [batch, seq_len]
each, for a dense causal forward (no document boundaries). The record draws 48 windows per batch
(786,432 tokens / 8 ranks / 2,048) and calibrates on 16 batches; the draws do not depend on the batch size.

An optional part of the runtime (pgolf/optional.py, `shuffled_calibration`): pgolf/quant/calibrate.py reaches
it through `optional.get`, so a packed train_gpt.py whose export does not calibrate with `train_shuffled`
leaves it out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pgolf import optional
from pgolf.data.shards import ShardError, open_shard


class ShuffledSequenceLoader:
    """Random `seq_len + 1`-token windows of rank `rank`'s shard files (`files[rank::world_size]`), drawn as PR
    #1611 draws them (module docstring). `seed` defaults to the rank, as the record. With `vocab_size`, every
    window read is checked against it (ShardError). ValueError when the rank owns no file or its files hold no
    whole window."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        vocab_size: int | None = None,
    ):
        if seq_len < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need seq_len >= 1 and 0 <= rank < world_size (got {seq_len}, {rank}, {world_size})")
        self.files = [Path(f) for f in files][rank::world_size]
        if not self.files:
            raise ValueError(f"rank {rank} of {world_size} owns none of the {len(files)} training shard files")
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.rng = np.random.Generator(np.random.PCG64(rank if seed is None else seed))
        self.tokens = [open_shard(f) for f in self.files]  # memory-mapped uint16, headers checked
        self.starts: list[list[int]] = [[] for _ in self.files]
        self._reset_all()
        if not any(self.starts):
            raise ValueError(f"the {len(self.files)} shard files of rank {rank} hold no {seq_len + 1}-token window")

    def _reset_all(self) -> None:
        for i in range(len(self.files)):
            self._reset(i)

    def _reset(self, i: int) -> None:
        """File i's phase and the random order of its windows (two draws, or one when the phase is fixed)."""
        n, t = len(self.tokens[i]), self.seq_len
        max_phase = min(t - 1, max(0, n - t - 1))
        phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
        count = max(0, (n - 1 - phase) // t)
        self.starts[i] = (phase + self.rng.permutation(count) * t).tolist()

    def remaining(self) -> list[int]:
        """Windows left per owned file before the next reset."""
        return [len(s) for s in self.starts]

    def draw(self) -> tuple[int, int]:
        """The next window: (index into `self.files`, start token). Resets every file first when all are used."""
        left = np.array(self.remaining(), dtype=np.float64)
        total = left.sum()
        if total <= 0:
            self._reset_all()
            left = np.array(self.remaining(), dtype=np.float64)
            total = left.sum()
        i = int(self.rng.choice(len(self.files), p=left / total))
        return i, self.starts[i].pop()

    def window(self, i: int, start: int) -> np.ndarray:
        """File i's `seq_len + 1` tokens from `start` (int64). ShardError for an id >= `vocab_size`."""
        w = np.array(self.tokens[i][start : start + self.seq_len + 1], dtype=np.int64)
        if self.vocab_size is not None and w.size and int(w.max()) >= self.vocab_size:
            raise ShardError(f"{self.files[i]}: token id {int(w.max())} >= vocab size {self.vocab_size}")
        return w

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` windows as (inputs, targets), int64 [batch, seq_len] each, on the CPU."""
        rows = np.stack([self.window(*self.draw()) for _ in range(batch)])
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        return x, y


optional.register("shuffled_calibration")(sys.modules[__name__])
