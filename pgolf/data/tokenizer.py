"""SentencePiece loading, tokenizer identity, and the byte look-up tables behind BPB (training a tokenizer
and encoding documents are data preparation: pgolf/tools/prepare.py).

BPB (the baseline train_gpt.py's byte tables): for a scored target `y` with previous token `x`,
`bytes = base_bytes[y] + (has_leading_space[y] and not is_boundary[x])`, where control, unknown and unused
pieces are boundaries with 0 bytes, byte pieces count 1 byte, and other pieces count the UTF-8 bytes of
the piece without its leading "▁". `val_bpb = sum(nll) / (ln 2 * sum(bytes))`, all sums in float64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.io import sha256_file

BOS_ID = 1


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or does not match what the data or artifact expects."""


def load_tokenizer(path: str | os.PathLike):
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


def build_byte_luts(sp, vocab_size: int | None = None) -> ByteLUTs:
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
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(torch.from_numpy(base), torch.from_numpy(space), torch.from_numpy(boundary))


def bpb(loss_sum: float, token_count: float, byte_count: float) -> tuple[float, float]:
    """(val_loss, val_bpb) from float64 sums."""
    val_loss = loss_sum / max(token_count, 1.0)
    return val_loss, loss_sum / (math.log(2.0) * max(byte_count, 1.0))
