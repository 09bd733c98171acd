"""BPB byte tables (docs/techniques.md#bits-per-byte) against the real sp1024 model and a hand-computed example."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SP8192, need

from pgolf.data.tokenizer import BOS_ID, TokenizerError, TokenizerInfo, bpb, build_byte_luts, load_tokenizer


@pytest.fixture(scope="module")
def sp(sp1024_path):
    return load_tokenizer(sp1024_path)


@pytest.fixture(scope="module")
def luts(sp):
    return build_byte_luts(sp, 1024)


def test_sp1024_quirks(sp, luts):
    assert sp.vocab_size() == 1024
    assert sum(sp.IsByte(i) for i in range(1024)) == 0  # no byte fallback in the published sp1024 model
    assert luts.is_boundary[:4].tolist() == [True, True, True, True]  # pad, bos, eos, unk
    assert not luts.is_boundary[4:].any()
    assert int(luts.base_bytes[3]) == 0  # <unk> counts 0 bytes
    assert int(luts.has_leading_space.sum()) == 476
    lone = sp.PieceToId("\u2581")
    assert lone == 940 and int(luts.base_bytes[lone]) == 0 and bool(luts.has_leading_space[lone])


def test_hand_computed_bytes(sp, luts):
    """'Hello world' after BOS -> H|ell|o|▁world: 1+3+1+(5+1) = 11 bytes; the space of a word right
    after BOS is not counted; the lone ▁ counts 1 byte after a normal token, 0 after BOS; <unk> 0."""
    ids = sp.EncodeAsIds("Hello world")
    assert [sp.IdToPiece(i) for i in ids] == ["H", "ell", "o", "\u2581world"]
    x = torch.tensor([BOS_ID] + ids[:-1])
    y = torch.tensor(ids)
    assert luts.target_bytes(x, y).tolist() == [1.0, 3.0, 1.0, 6.0]
    w = sp.PieceToId("\u2581world")
    assert luts.target_bytes(torch.tensor([BOS_ID]), torch.tensor([w])).item() == 5.0  # after BOS: no space
    assert luts.target_bytes(torch.tensor([3]), torch.tensor([w])).item() == 5.0  # after <unk>: no space
    lone = sp.PieceToId("\u2581")
    assert luts.target_bytes(torch.tensor([ids[0], BOS_ID]), torch.tensor([lone, lone])).tolist() == [1.0, 0.0]
    assert luts.target_bytes(torch.tensor([ids[0]]), torch.tensor([3])).item() == 0.0  # <unk> target
    # BPB from sums: loss 2 nats/token over 4 tokens and 11 bytes
    val_loss, val_bpb = bpb(8.0, 4.0, 11.0)
    assert val_loss == 2.0 and val_bpb == pytest.approx(8.0 / (11 * math.log(2)), rel=1e-15)


def test_table_bytes_equal_utf8_bytes_of_decoded_documents(sp, luts, fineweb_sample):
    """Where the byte tables must be exact: a document encoded [BOS]+pieces, without <unk> and not starting with
    whitespace, has exactly as many table bytes as its decoded (normalised) text has UTF-8 bytes."""
    checked = 0
    with open(fineweb_sample, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"][:4000]
            ids = sp.EncodeAsIds(text)
            if not ids or 3 in ids:
                continue
            decoded = sp.DecodeIds(ids)
            if decoded[:1].isspace():
                continue
            x = torch.tensor([BOS_ID] + ids[:-1])
            y = torch.tensor(ids)
            assert luts.target_bytes(x, y).sum().item() == len(decoded.encode("utf-8"))
            checked += 1
            if checked >= 100:
                break
    assert checked >= 50


def test_byte_fallback_pieces_count_one_byte():
    sp = load_tokenizer(need(SP8192))
    luts = build_byte_luts(sp, 8192)
    byte_ids = [i for i in range(sp.vocab_size()) if sp.IsByte(i)]
    assert len(byte_ids) == 256
    assert all(int(luts.base_bytes[i]) == 1 for i in byte_ids)
    ids = sp.EncodeAsIds("é😀")  # characters outside the pieces fall back to bytes
    x = torch.tensor([BOS_ID] + ids[:-1])
    assert luts.target_bytes(x, torch.tensor(ids)).sum().item() == len("é😀".encode())


def test_tokenizer_identity_checks(tmp_path, sp1024_path):
    info = TokenizerInfo.from_path(sp1024_path)
    assert info.vocab_size == 1024 and len(info.sha256) == 64
    info.check_matches(info.__dict__)
    with pytest.raises(TokenizerError, match="vocab size"):
        info.check_matches({**info.__dict__, "vocab_size": 8192})
    with pytest.raises(TokenizerError, match="not the one"):
        info.check_matches({**info.__dict__, "sha256": "0" * 64})
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match=r"\.model"):
        load_tokenizer(tmp_path / "x.vocab")
