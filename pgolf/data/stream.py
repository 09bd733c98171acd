"""The deterministic rank-sliced training stream and the validation tokens (with their byte sidecar) and windows.

Training stream (the baseline train_gpt.py's token stream): shards in sorted order form one endless stream
(wrapping to the first). On every micro-step every rank takes the same next `(local+1)*world` tokens and
uses its own slice `[r*(local+1), (r+1)*(local+1))`; `local = batch_tokens / (world*grad_accum)`. Because
the stream is a pure function of the micro-step index, the position is one integer and resuming is a seek.

Validation bytes: a CaseOps dataset (PR #1729; the final #1 record PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) scores BPB over the
original text's bytes, which its per-token byte sidecar shards hold (`*_val_bytes_NNNNNN.bin`, one uint16 per
validation token, BOS 0; pgolf/data/caseops.py). `load_val_data` reads them beside the tokens, from
`bytes_pattern` (`data.val_bytes_pattern`) or from the files the shards' manifest.json names
(pgolf/tools/prepare.py --caseops), and checks them; `load_val_tokens` refuses such a dataset, whose BPB the
tokenizer's byte tables would count wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from pgolf.data.shards import ShardError, is_byte_sidecar, list_shards, open_shard, read_shard_header
from pgolf.data.tokenizer import BOS_ID, MANIFEST, TokenizerError, check_shards_tokenizer, is_caseops_tokenizer
from pgolf.model.varlen import document_cu_seqlens


@dataclass(frozen=True)
class ValData:
    """The validation stream cut to whole sequences, and its per-token original bytes when the dataset has a
    byte sidecar.

    tokens: int64 [N+1]; bytes: int32 [N+1] or None, bytes[i] = the original UTF-8 bytes token i stands for
    (the target of input position i-1), BOS 0; sidecar: the sidecar files read (empty without)."""

    tokens: torch.Tensor
    bytes: torch.Tensor | None = None
    sidecar: list[Path] = field(default_factory=list)


def val_token_files(pattern: str) -> list[Path]:
    """The validation token shards matching the glob `pattern`, sorted, without byte sidecar shards (a pattern
    `fineweb_val_*.bin` matches `fineweb_val_bytes_*.bin` too). ShardError when none is left."""
    files = [p for p in list_shards(pattern) if not is_byte_sidecar(p)]
    if not files:
        raise ShardError(f"{pattern}: no validation token shards match (only byte sidecar shards)")
    return files


def _declared_sidecar(files: list[Path]) -> list[Path] | None:
    """The sidecar shards that the manifests beside `files` pair with them (`val.byte_sidecar.files`, parallel
    to `val.files`), in the order of `files`; None when no manifest declares a sidecar. ShardError when some
    folders declare one and others do not, or a shard is not among its manifest's validation files."""
    out, missing = [], []
    for f in files:
        manifest = f.parent / MANIFEST
        try:
            val = (json.loads(manifest.read_text(encoding="utf-8")).get("val") or {}) if manifest.is_file() else {}
            side = (val.get("byte_sidecar") or {}).get("files")
            pairs = dict(zip(val["files"], side, strict=True)) if side else None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ShardError(f"{manifest}: unreadable val.files / val.byte_sidecar.files ({e!r})") from e
        if pairs is None:
            missing.append(f)
        elif f.name not in pairs:
            raise ShardError(f"{f}: not among the validation files of {manifest}, which pairs them with a byte sidecar")
        else:
            out.append(f.parent / pairs[f.name])
    if out and missing:
        raise ShardError(f"validation shards with and without a byte sidecar in their manifests: {missing[0]}")
    return out or None


def val_sidecar_files(pattern: str, bytes_pattern: str | None = None) -> tuple[list[Path], list[Path]]:
    """(validation token shards, their byte sidecar shards or []): the sidecar is `bytes_pattern`'s files
    when given, else the files the shards' manifests name. ShardError when the two disagree, or when
    sidecar shards lie beside the tokens that neither names (a CaseOps export downloaded from the hub has no
    pgolf manifest: set `data.val_bytes_pattern`)."""
    files = val_token_files(pattern)
    declared = _declared_sidecar(files)
    if bytes_pattern is not None:
        sidecar = list_shards(bytes_pattern)
        if declared is not None and sorted(declared) != sidecar:
            raise ShardError(
                f"byte sidecar {bytes_pattern!r} matches {[p.name for p in sidecar]}, but the manifest pairs the "
                f"validation shards with {[p.name for p in declared]}"
            )
        return files, sidecar
    if declared is not None:
        return files, declared
    beside = sorted({p for f in files for p in f.parent.glob("*.bin") if is_byte_sidecar(p)})
    if beside:
        raise ShardError(
            f"{beside[0].parent} holds byte sidecar shards ({beside[0].name}, ...) that neither a manifest nor "
            "data.val_bytes_pattern names: a CaseOps dataset's BPB counts the original bytes they hold; set "
            "data.val_bytes_pattern (e.g. <dir>/fineweb_val_bytes_*.bin)"
        )
    return files, []


def check_sidecar(tokens: np.ndarray, nbytes: np.ndarray, where: str) -> None:
    """Raise ShardError unless the sidecar `nbytes` [N] fits the validation `tokens` [N]: the same length,
    and 0 bytes at every BOS (a document's start stands for no text). `where` names the files."""
    if nbytes.size != tokens.size:
        raise ShardError(f"{where}: the byte sidecar holds {nbytes.size} entries for {tokens.size} validation tokens")
    bad = np.flatnonzero((tokens == BOS_ID) & (nbytes != 0))
    if bad.size:
        i = int(bad[0])
        raise ShardError(
            f"{where}: position {i} is a BOS with {int(nbytes[i])} bytes in the byte sidecar ({bad.size} such); "
            "a BOS stands for no text: the sidecar does not belong to these tokens"
        )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _refuse_caseops_without_sidecar(pattern: str, tokenizer: str | os.PathLike) -> None:
    import sentencepiece as spm

    if not Path(tokenizer).is_file():
        raise TokenizerError(f"{tokenizer}: tokenizer file not found")
    if is_caseops_tokenizer(spm.SentencePieceProcessor(model_file=str(tokenizer))):
        raise ShardError(
            f"{pattern}: tokenizer {Path(tokenizer).name} is a CaseOps tokenizer but the shards have no byte sidecar: "
            "BPB must count the original text's bytes (prepare with --caseops, or set data.val_bytes_pattern)"
        )


def val_seq_len(train_seq_len: int, eval_seq_len: int | None = None, doc_attention: bool = False) -> int:
    """The length S the validation split is cut to a multiple of (`load_val_data`): max(train, eval length), as
    the seed records (`usable = floor((N-1)/S)*S` with S = max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN)); with
    document-bounded training (PR #1611) the training row packs whole documents and is no window, so the eval
    length alone (its `load_validation_tokens(val_files, eval_seq_len)`: 98,304-token rows cut ~79 documents).
    `eval_seq_len` None is the training length. Lengths in tokens."""
    e = eval_seq_len or train_seq_len
    return e if doc_attention else max(train_seq_len, e)


def load_val_data(
    pattern: str,
    seq_len: int,
    vocab_size: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    bytes_pattern: str | None = None,
) -> ValData:
    """All validation shards concatenated in sorted order, truncated to `floor((N-1)/S)*S` targets plus one
    token, as the baseline does, with the byte sidecar (`val_sidecar_files`) cut the same way.

    Raises, before reading any shard body: TokenizerError when `tokenizer` (a .model path) did not make the
    shards (`check_shards_tokenizer`); ShardError for sidecar files nobody names, or a CaseOps `tokenizer`
    without a sidecar (its BPB must count the original bytes). Then ShardError for a malformed shard, fewer
    than S+1 tokens, or a sidecar that does not fit the tokens (`check_sidecar`, shard by shard where the
    manifest pairs them)."""
    if tokenizer is not None:
        check_shards_tokenizer(pattern, tokenizer)
    files, sidecar = val_sidecar_files(pattern, bytes_pattern)
    if tokenizer is not None and not sidecar:
        _refuse_caseops_without_sidecar(pattern, tokenizer)
    parts = [np.asarray(open_shard(p, vocab_size)) for p in files]
    tokens = _concat(parts)
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ShardError(f"{pattern}: validation split has {tokens.size} tokens, fewer than one sequence of {seq_len}")
    nbytes = None
    if sidecar:
        side = [np.asarray(open_shard(p)) for p in sidecar]
        if bytes_pattern is None:  # paired by the manifest: check shard by shard first
            for f, t, b in zip(sidecar, parts, side, strict=True):
                check_sidecar(t, b, str(f))
        full = _concat(side)
        check_sidecar(tokens, full, bytes_pattern or str(sidecar[0].parent))
        nbytes = torch.from_numpy(full[: usable + 1].astype(np.int32))
    return ValData(torch.from_numpy(tokens[: usable + 1].astype(np.int64)), nbytes, sidecar)


def load_val_tokens(
    pattern: str, seq_len: int, vocab_size: int | None = None, tokenizer: str | os.PathLike | None = None
) -> torch.Tensor:
    """All validation shards concatenated in sorted order, truncated to `floor((N-1)/S)*S` targets plus
    one token, as the baseline does. Returned as an int64 tensor of length usable+1. With `tokenizer` (a
    .model path), the shards' manifest must name that tokenizer first (`check_shards_tokenizer`: TokenizerError).
    ShardError for a malformed shard or fewer than S+1 tokens, and for a dataset with a byte sidecar (or a
    CaseOps tokenizer), whose BPB the tokenizer's byte tables cannot count: load it with `load_val_data`."""
    if tokenizer is not None:
        check_shards_tokenizer(pattern, tokenizer)
    _, sidecar = val_sidecar_files(pattern)
    if sidecar:
        raise ShardError(
            f"{pattern}: these validation shards have a byte sidecar ({sidecar[0].name}, ...): their BPB counts its "
            "original bytes, not the tokenizer's byte tables; load them with load_val_data"
        )
    if tokenizer is not None:
        _refuse_caseops_without_sidecar(pattern, tokenizer)
    return load_val_data(pattern, seq_len, vocab_size).tokens


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
    """Yields this rank's `(x, y)` micro-batches, each `[local/T, T]` int64, from micro-step `start` on; with
    `doc_seg_len`, `(x, y, cu_seqlens)`: the document segments of x for document-bounded attention (PR #1530's
    loader: built here on the host, before the batch goes to the device)."""

    def __init__(
        self,
        stream: TokenStream,
        layout: StreamLayout,
        rank: int,
        start_micro_step: int = 0,
        doc_seg_len: int | None = None,
    ):
        super().__init__()
        self.stream, self.layout, self.rank = stream, layout, rank
        self.start_micro_step, self.doc_seg_len = start_micro_step, doc_seg_len

    def batch(self, micro_step: int) -> tuple[torch.Tensor, ...]:
        lay = self.layout
        span = self.stream.read(micro_step * lay.chunk + self.rank * (lay.local + 1), lay.local + 1)
        t = torch.from_numpy(span)
        x, y = t[:-1].view(-1, lay.seq_len), t[1:].view(-1, lay.seq_len)
        if self.doc_seg_len is None:
            return x, y
        return x, y, document_cu_seqlens(x, BOS_ID, self.doc_seg_len)

    def __iter__(self):
        step = self.start_micro_step
        while True:
            yield self.batch(step)
            step += 1


def rank_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous split of n items across ranks (the reference's window split)."""
    return n * rank // world_size, n * (rank + 1) // world_size


class ValWindows(Dataset):
    """Non-overlapping `[k*S, (k+1)*S)` windows of the validation stream for one rank, in batches: `(x, y)`,
    each [B,S] int64, or with `val_bytes` (the sidecar, [>= N+1], aligned with `tokens`) `(x, y, nbytes)`,
    nbytes [B,S] the original bytes of each target y (val_bytes at the target's index)."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_windows: int,
        rank: int = 0,
        world_size: int = 1,
        val_bytes: torch.Tensor | None = None,
    ):
        n = (tokens.numel() - 1) // seq_len
        if val_bytes is not None and val_bytes.numel() < tokens.numel():
            raise ValueError(f"val_bytes has {val_bytes.numel()} entries for {tokens.numel()} validation tokens")
        self.first, self.last = rank_slice(n, rank, world_size)
        self.tokens, self.seq_len, self.batch_windows = tokens, seq_len, batch_windows
        self.val_bytes = val_bytes

    def __len__(self) -> int:
        return -(-(self.last - self.first) // self.batch_windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        a = self.first + i * self.batch_windows
        b = min(a + self.batch_windows, self.last)
        span = self.tokens[a * self.seq_len : b * self.seq_len + 1]
        x, y = span[:-1].view(-1, self.seq_len), span[1:].view(-1, self.seq_len)
        if self.val_bytes is None:
            return x, y
        return x, y, self.val_bytes[a * self.seq_len + 1 : b * self.seq_len + 1].view(-1, self.seq_len)
