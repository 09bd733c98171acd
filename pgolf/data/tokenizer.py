"""SentencePiece loading, tokenizer identity, and the byte look-up tables behind BPB (training a tokenizer
and encoding documents are data preparation: pgolf/tools/prepare.py).

BPB (the baseline train_gpt.py's byte tables): for a scored target `y` with previous token `x`,
`bytes = base_bytes[y] + (has_leading_space[y] and not is_boundary[x])`, where control, unknown and unused
pieces are boundaries with 0 bytes, byte pieces count 1 byte, and other pieces count the UTF-8 bytes of
the piece without its leading "▁" (any other "▁" in a piece is one space byte). `val_bpb = sum(nll) /
(ln 2 * sum(bytes))`, all sums in float64. The tables count the text the tokenizer sees (after its
normalizer: NFKC, whitespace runs collapsed) and are checked on probe texts when built: a tokenizer they
cannot count exactly is refused (`check_byte_counting`).

Shards written by pgolf/tools/prepare.py carry a `manifest.json` with the hash of the tokenizer that made
them; `check_shards_tokenizer` compares it wherever shards and a tokenizer meet.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards
from pgolf.io import sha256_file
from pgolf.runlog import log0

BOS_ID = 1
WS = "\u2581"  # SentencePiece's escaped whitespace
MANIFEST = "manifest.json"  # written next to the shards by pgolf/tools/prepare.py
# The CaseOps control pieces (PR #1729): pgolf/data/caseops.py's CONTROL_PIECE_IDS, which the runtime does not
# import (the transform itself is data preparation); tests/test_caseops_data.py checks that the two agree.
CASEOPS_PIECES = {4: "\ue001", 5: "\ue002", 6: "\ue003", 7: "\ue004"}


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or does not match what the data or artifact expects."""


def load_tokenizer(path: str | os.PathLike):
    """The SentencePiece processor of a `.model` file. Raises TokenizerError when the file is missing or
    unreadable, or when the BPB byte tables cannot count its pieces exactly (`check_byte_counting`)."""
    import sentencepiece as spm

    path = Path(path)
    if path.suffix != ".model":
        raise TokenizerError(f"{path}: tokenizer must be a SentencePiece .model file")
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with terse messages
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from e
    build_byte_luts(sp, name=str(path))  # refuses, naming the file, before any long work
    return sp


@dataclass(frozen=True)
class TokenizerInfo:
    """The identity an artifact carries: a model is only valid with the tokenizer it was trained on."""

    name: str
    vocab_size: int
    sha256: str

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> TokenizerInfo:
        sp = load_tokenizer(path)
        return cls(name=Path(path).name, vocab_size=int(sp.vocab_size()), sha256=sha256_file(path))

    def check_matches(self, other: TokenizerInfo | dict, what: str = "artifact") -> None:
        o = other if isinstance(other, TokenizerInfo) else TokenizerInfo(**other)
        if o.vocab_size != self.vocab_size:
            raise TokenizerError(
                f"tokenizer vocab size {self.vocab_size} ({self.name}) differs from the {what}'s "
                f"{o.vocab_size} ({o.name})"
            )
        if o.sha256 != self.sha256:
            raise TokenizerError(
                f"tokenizer {self.name} (sha256 {self.sha256[:12]}…) is not the one the {what} was built with "
                f"({o.name}, sha256 {o.sha256[:12]}…)"
            )


@dataclass
class ByteLUTs:
    base_bytes: torch.Tensor  # int16 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor  # bool [V]

    def to(self, device) -> ByteLUTs:
        return ByteLUTs(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

    def target_bytes(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bytes of each target y given its input token x (same shape), as float64."""
        b = self.base_bytes[y].to(torch.float64)
        return b + (self.has_leading_space[y] & ~self.is_boundary[x]).to(torch.float64)


def build_byte_luts(sp, vocab_size: int | None = None, name: str = "tokenizer") -> ByteLUTs:
    """The byte tables [max(V, vocab_size)] of processor `sp` (rows past V are boundaries with 0 bytes).
    Raises TokenizerError (naming `name`) when they cannot count `sp`'s text exactly."""
    n = max(int(sp.vocab_size()), int(vocab_size or 0))
    base = np.zeros(n, dtype=np.int16)
    space = np.zeros(n, dtype=bool)
    boundary = np.ones(n, dtype=bool)
    for i in range(int(sp.vocab_size())):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            continue
        boundary[i] = False
        if sp.IsByte(i):
            base[i] = 1
            continue
        piece = sp.IdToPiece(i)
        if piece.startswith(WS):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.replace(WS, " ").encode("utf-8"))  # "e▁", "▁▁": every other ▁ is one space byte
    luts = ByteLUTs(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))
    check_byte_counting(sp, luts, name)
    return luts


PROBE_CHARS = "12ab.,"  # probes use those of these the tokenizer does not encode as <unk>


def _normalized_bytes(sp, text: str) -> int:
    """UTF-8 bytes of `text` as the tokenizer sees it (normalized, "▁" as a space), without a dummy prefix."""
    dummy = len(sp.normalize("a").replace(WS, " ").encode("utf-8")) - 1
    return len(sp.normalize(text).replace(WS, " ").encode("utf-8")) - dummy


def check_byte_counting(sp, luts: ByteLUTs, name: str = "tokenizer") -> None:
    """Raise TokenizerError unless `luts` count exactly the bytes of short probe texts (digits, letters and
    punctuation between single, double and leading spaces) encoded `[BOS] + pieces`, as the text the
    tokenizer sees (normalized, without a dummy prefix). What it catches: a tokenizer whose lone "▁" piece is
    missing or unused spells a space that cannot join the next piece as the byte pieces <0xE2><0x96><0x81>
    (3 bytes counted for 1; no per-token table can tell them from another character's bytes) or as <unk>
    (0 counted; openai/parameter-golf issue #897); a dummy whitespace suffix; a leading space kept without a
    dummy prefix. Not an error: characters a tokenizer without byte fallback encodes as <unk> count 0 bytes
    (the records' convention; the published sp1024 model is such a tokenizer)."""
    unk = sp.unk_id()
    chars = [c for c in PROBE_CHARS if unk not in sp.EncodeAsIds(c)]
    if not chars:
        return
    a, b = chars[0], chars[-1]
    for text in (f"{a} {chars[min(1, len(chars) - 1)]}", " ".join(chars), f" {a}  {b}", f"{a}{b} {b}"):
        ids = sp.EncodeAsIds(text)
        counted = int(luts.target_bytes(torch.tensor([BOS_ID, *ids[:-1]]), torch.tensor(ids)).sum().item())
        want = _normalized_bytes(sp, text)
        if counted == want:
            continue
        lone = sp.PieceToId(WS)
        if WS in sp.normalize(f"{a} {b}") and (lone == unk or sp.IsUnused(lone) or sp.IsControl(lone)):
            if sp.IsByte(sp.PieceToId("<0xE2>")):
                how = "the byte pieces <0xE2><0x96><0x81> (3 bytes counted for 1)"
            else:
                how = "<unk> (0 bytes counted)"
            why = (
                f"it has no usable lone '{WS}' piece, so a space that cannot join the next piece is spelled as {how}; "
                f"keep the '{WS}' piece (tokenizers trained by pgolf.tools.prepare have it)"
            )
        else:
            why = "its whitespace handling (dummy prefix/suffix, leading spaces kept) is not the tables' convention"
        raise TokenizerError(
            f"{name}: the BPB byte tables cannot count this tokenizer exactly: {text!r} ({want} bytes) encodes as "
            f"{[sp.IdToPiece(i) for i in ids]} and counts {counted}; {why}"
        )


def is_caseops_tokenizer(sp) -> bool:
    """Whether processor `sp` holds the CaseOps control characters as pieces 4-7 (`CASEOPS_PIECES`): its text
    is CaseOps-transformed, and BPB must count the original bytes from a byte sidecar, not the byte tables."""
    n = int(sp.get_piece_size())
    return all(i < n and sp.id_to_piece(i) == ch for i, ch in CASEOPS_PIECES.items())


def check_shards_tokenizer(pattern: str | os.PathLike, tokenizer: str | os.PathLike) -> list[Path]:
    """Check that `tokenizer` (a .model file) made the shards matching the glob `pattern`: the SHA-256 recorded
    in each shard folder's manifest.json (pgolf/tools/prepare.py) must be the file's. Shards without a
    manifest (the challenge's published export has none) are accepted with a log line saying that they
    were not checked. Returns the manifests checked. Raises TokenizerError naming both tokenizer files and
    both hashes, or a malformed manifest; ShardError (pgolf/data/shards.py) when no shard matches."""
    tok = Path(tokenizer)
    folders = sorted({p.parent for p in list_shards(str(pattern))})
    checked, sha = [], None
    for folder in folders:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            log0(f"data_check: {folder} has no {MANIFEST}: tokenizer {tok.name} not checked against these shards")
            continue
        try:
            rec = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]
            want, made_by = str(rec["sha256"]), folder / str(rec["file"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TokenizerError(f"{manifest}: unreadable or without tokenizer.file/sha256 ({e!r})") from e
        if not tok.is_file():
            raise TokenizerError(f"{tok}: tokenizer file not found")
        sha = sha or sha256_file(tok)
        if sha != want:
            raise TokenizerError(
                f"{tok}: this tokenizer (sha256 {sha[:16]}) did not make the shards {pattern}: their {manifest} names "
                f"{made_by} (sha256 {want[:16]}); use that tokenizer (data.tokenizer_path) or prepare the shards again"
            )
        checked.append(manifest)
    return checked


def bpb(loss_sum: float, token_count: float, byte_count: float) -> tuple[float, float]:
    """(val_loss, val_bpb) from float64 sums."""
    val_loss = loss_sum / max(token_count, 1.0)
    return val_loss, loss_sum / (math.log(2.0) * max(byte_count, 1.0))
