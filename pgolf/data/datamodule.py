"""`GolfDataModule`: the Lightning face of the training stream and the validation windows (the only data
module that imports Lightning). With a byte sidecar (a CaseOps dataset, pgolf/data/stream.py) the validation
batches are `(x, y, nbytes)`: nbytes [B,S] the original bytes of each target, which BPB counts instead of the
tokenizer's byte tables."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader

from pgolf.data.shards import list_shards, open_shard
from pgolf.data.stream import (
    StreamLayout,
    TokenStream,
    TrainStream,
    ValWindows,
    default_grad_accum,
    load_val_data,
    val_seq_len,
    val_sidecar_files,
)
from pgolf.data.tokenizer import TokenizerInfo, check_shards_tokenizer


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
        val_bytes_pattern: str | None = None,
        doc_seg_len: int | None = None,
    ):
        super().__init__()
        self.train_pattern, self.val_pattern = train_pattern, val_pattern
        self.tokenizer_path, self.vocab_size = tokenizer_path, vocab_size
        self.batch_tokens, self.seq_len = batch_tokens, seq_len
        self.eval_seq_len = eval_seq_len or seq_len
        self.val_batch_tokens = val_batch_tokens
        self.grad_accum_cfg = grad_accum
        self.val_bytes_pattern = val_bytes_pattern  # the byte sidecar's shards (null: those the manifest names)
        self.doc_seg_len = doc_seg_len  # train batches carry cu_seqlens (document-bounded attention); None: not
        self.val_tokens: torch.Tensor | None = None
        self.val_bytes: torch.Tensor | None = None  # int32 [len(val_tokens)]: the sidecar, aligned with val_tokens
        self.val_cut_from: int | None = None  # the split's target count when val_tokens is a prefix of it
        self.layout: StreamLayout | None = None
        self._start_micro_step = 0
        self._shards_checked = False

    @property
    def val_seq_len(self) -> int:
        """The validation split is cut to a multiple of this many tokens (`pgolf.data.stream.val_seq_len`)."""
        return val_seq_len(self.seq_len, self.eval_seq_len, self.doc_seg_len is not None)

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
        """The batch layout and the validation tokens (with their byte sidecar, if the dataset has one:
        `val_bytes_pattern` or the manifest's, `load_val_data`), once the tokenizer is checked against the
        shards' manifests (TokenizerError before any training step: a same-size tokenizer would give a wrong
        BPB) and every training shard's ids against its vocabulary (ShardError: not minutes into training).
        Validation tokens set from outside (a truncated split) get the sidecar's same prefix; ValueError
        when they are not a prefix of the split."""
        if not self._shards_checked:
            for pattern in (self.train_pattern, self.val_pattern):
                check_shards_tokenizer(pattern, self.tokenizer_path)
            # token ids are checked against the tokenizer's vocabulary (a model's may be larger): shards of
            # another tokenizer, without a manifest to say so, stop here instead of giving a wrong BPB
            self.vocab_size = min(self.vocab_size, TokenizerInfo.from_path(self.tokenizer_path).vocab_size)
            for f in list_shards(self.train_pattern):  # every training id now, not when the stream reaches it
                open_shard(f, self.vocab_size)
            self._shards_checked = True
        world, _ = self.world()
        self.layout = StreamLayout(self.batch_tokens, self.seq_len, world, self.grad_accum(world))
        seq = self.val_seq_len
        if self.val_tokens is None:
            val = load_val_data(self.val_pattern, seq, self.vocab_size, self.tokenizer_path, self.val_bytes_pattern)
            self.val_tokens, self.val_bytes = val.tokens, val.bytes
        elif self.val_bytes is None and val_sidecar_files(self.val_pattern, self.val_bytes_pattern)[1]:
            # val_tokens set from outside (a truncated split, pgolf/train/build.py): the sidecar's same prefix
            val = load_val_data(self.val_pattern, seq, self.vocab_size, self.tokenizer_path, self.val_bytes_pattern)
            n = self.val_tokens.numel()
            if n > val.tokens.numel() or not torch.equal(self.val_tokens, val.tokens[:n]):
                raise ValueError("the validation tokens set on the DataModule are not a prefix of its validation split")
            self.val_bytes = val.bytes[:n]

    # ---- loaders --------------------------------------------------------------------------------
    def train_stream(self, start_micro_step: int | None = None) -> TrainStream:
        world, rank = self.world()
        # set-up checked every id: the stream need not scan a shard again when it reaches it (on the clock)
        stream = TokenStream(list_shards(self.train_pattern), None if self._shards_checked else self.vocab_size)
        start = self._start_micro_step if start_micro_step is None else start_micro_step
        return TrainStream(stream, self.layout, rank, start, self.doc_seg_len)

    def train_dataloader(self) -> DataLoader:
        pin = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(self.train_stream(), batch_size=None, num_workers=0, pin_memory=pin)

    def val_dataloader(self) -> DataLoader:
        world, rank = self.world()
        batch_windows = max(1, self.val_batch_tokens // (world * self.eval_seq_len))
        ds = ValWindows(self.val_tokens, self.eval_seq_len, batch_windows, rank, world, self.val_bytes)
        return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)

    # ---- exact resume: the stream position is the number of micro-steps taken --------------------
    def state_dict(self) -> dict:
        step = self.trainer.global_step if self.trainer is not None else 0
        return {"micro_step": step * self.layout.grad_accum if self.layout else 0}

    def load_state_dict(self, state: dict) -> None:
        self._start_micro_step = int(state.get("micro_step", 0))
