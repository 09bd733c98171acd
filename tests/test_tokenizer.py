"""BPB byte tables (docs/techniques.md#bits-per-byte) against the real sp1024 model, a hand-computed example,
the records' tables, the UTF-8 length of the text itself, and tiny tokenizers trained here with the settings
the tables must count exactly or refuse (openai/parameter-golf issue #897: no lone "▁" piece)."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import SHARED, SP8192, need

from pgolf.data.tokenizer import BOS_ID, TokenizerError, TokenizerInfo, bpb, build_byte_luts, load_tokenizer
from pgolf.tools.prepare import CHALLENGE_SPM_SETTINGS
from pgolf.tools.synthetic import make_documents

SP8192_CASEOPS = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
WS = "\u2581"
# a small corpus with digits, punctuation and words, for the tiny tokenizers below (each trains in ~10 ms)
TINY_LINES = make_documents(60) + [f"Item {i} costs {i * 7} dollars, 1 2 3." for i in range(50)]


def train_tiny(vocab_size: int = 340, **overrides):
    """A SentencePiece BPE with the challenge's settings (+ `overrides`) trained in memory on TINY_LINES."""
    buf = io.BytesIO()
    settings = {**CHALLENGE_SPM_SETTINGS, **overrides}
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(TINY_LINES),
        model_writer=buf,
        vocab_size=vocab_size,
        num_threads=1,
        minloglevel=2,
        **settings,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()), buf.getvalue()


def counted(sp, luts, text: str) -> int:
    """Table bytes of `text` encoded as a document, [BOS] + pieces."""
    ids = sp.EncodeAsIds(text)
    return int(luts.target_bytes(torch.tensor([BOS_ID, *ids[:-1]]), torch.tensor(ids)).sum().item())


def records_luts(sp, vocab_size: int):
    """The records' `build_sentencepiece_luts` (the baseline train_gpt.py of openai/parameter-golf, the same in
    every record), numpy only."""
    table_size = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros((table_size,), dtype=np.int16)
    space = np.zeros((table_size,), dtype=np.bool_)
    boundary = np.ones((table_size,), dtype=np.bool_)
    for token_id in range(int(sp.vocab_size())):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        boundary[token_id] = False
        if sp.is_byte(token_id):
            base[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(WS):
            space[token_id] = True
            piece = piece[1:]
        base[token_id] = len(piece.encode("utf-8"))
    return base, space, boundary


def fineweb_lines(fineweb_sample, n_docs: int = 60):
    """The lines of the first `n_docs` sample documents: text with no newline, what one document can hold."""
    with open(fineweb_sample, encoding="utf-8") as f:
        for _, line in zip(range(n_docs), f):
            yield from (ln for ln in json.loads(line)["text"].splitlines() if ln.strip())


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


@pytest.mark.parametrize("path", [SP8192, SP8192_CASEOPS, SHARED / "tokenizers" / "fineweb_1024_bpe.model"])
def test_challenge_tables_are_the_records_tables(path):
    """The tables of the challenge tokenizers stay identical to the records' `build_sentencepiece_luts`."""
    sp = load_tokenizer(need(path))
    luts = build_byte_luts(sp, 8192)
    base, space, boundary = records_luts(sp, 8192)
    assert np.array_equal(luts.base_bytes.numpy(), base) and np.array_equal(luts.has_leading_space.numpy(), space)
    assert np.array_equal(luts.is_boundary.numpy(), boundary)


@pytest.mark.parametrize("path", [SHARED / "tokenizers" / "fineweb_1024_bpe.model", SP8192])
def test_table_bytes_equal_utf8_bytes_of_the_text_itself(path, fineweb_sample):
    """Where the byte tables must be exact: FineWeb text that the tokenizer's normalizer leaves as it is,
    encoded [BOS]+pieces without <unk>, has exactly as many table bytes as the TEXT ITSELF has UTF-8 bytes
    (not its decoding, which spells a byte-fallback '▁' as the 3-byte '▁')."""
    sp = load_tokenizer(need(path))
    luts = build_byte_luts(sp)
    total = want = lines = 0
    for text in fineweb_lines(fineweb_sample):
        if sp.normalize(text).replace(WS, " ") != text or sp.unk_id() in sp.EncodeAsIds(text):
            continue
        total += counted(sp, luts, text)
        want += len(text.encode("utf-8"))
        lines += 1
    assert lines >= 100 and total == want


def test_tiny_byte_fallback_tokenizer_counts_the_text_exactly(fineweb_sample):
    """A tokenizer trained here with byte fallback and a lone '▁': '1 2' counts 3 bytes, and FineWeb text
    (mostly outside its 340 pieces, so mostly byte pieces) counts its UTF-8 bytes."""
    sp, _ = train_tiny()
    luts = build_byte_luts(sp)
    assert [sp.IdToPiece(i) for i in sp.EncodeAsIds("1 2")] == ["1", WS, "2"] and counted(sp, luts, "1 2") == 3
    texts = [t for t in fineweb_lines(fineweb_sample, 20) if sp.normalize(t).replace(WS, " ") == t]
    assert len(texts) >= 20
    assert sum(counted(sp, luts, t) for t in texts) == sum(len(t.encode("utf-8")) for t in texts)


def test_tokenizer_without_a_lone_space_piece_is_refused(tmp_path):
    """openai/parameter-golf issue #897: without a usable lone '▁' piece, '1 2' encodes as 1 <0xE2><0x96><0x81> 2
    and the tables count 5 bytes for 3 (with byte fallback) or 2 (<unk>, without); no per-token table can
    count the byte-fallback space exactly, so the tokenizer is refused, naming its file, when loaded."""
    sp, proto = train_tiny(control_symbols=[WS])
    assert [sp.IdToPiece(i) for i in sp.EncodeAsIds("1 2")] == ["1", "<0xE2>", "<0x96>", "<0x81>", "2"]
    with pytest.raises(TokenizerError, match=r"'1 2' \(3 bytes\) encodes as .* and counts 5; .*<0xE2><0x96><0x81>"):
        build_byte_luts(sp)
    path = tmp_path / "nolone.model"
    path.write_bytes(proto)
    with pytest.raises(TokenizerError, match=f"^{re.escape(str(path))}: the BPB byte tables cannot count"):
        load_tokenizer(path)
    sp, _ = train_tiny(vocab_size=120, byte_fallback=False, control_symbols=[WS])
    with pytest.raises(TokenizerError, match=r"counts 2; .*spelled as <unk> \(0 bytes counted\)"):
        build_byte_luts(sp)


def test_sp8192_with_its_lone_space_piece_unused_is_refused():
    """The case measured on the FineWeb sample (+0.85% bytes, BPB 0.84% too low before): the sp8192 model with
    its lone '▁' marked unused."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")  # needs protobuf
    m = pb.ModelProto()
    m.ParseFromString(need(SP8192).read_bytes())
    lone = next(p for p in m.pieces if p.piece == WS)
    lone.type = pb.ModelProto.SentencePiece.UNUSED
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    with pytest.raises(TokenizerError, match=r"'1 2' \(3 bytes\) .* counts 5; it has no usable lone"):
        build_byte_luts(sp)


def test_whitespace_inside_pieces_counts_one_byte_each():
    """Pieces with a '▁' past the first character ('▁▁' user symbol, 'e▁' suffix pieces) count 1 byte for it."""
    sp, _ = train_tiny(remove_extra_whitespaces=False, add_dummy_prefix=True, user_defined_symbols=[WS + WS])
    luts = build_byte_luts(sp)
    i = sp.PieceToId(WS + WS)
    assert int(luts.base_bytes[i]) == 1 and bool(luts.has_leading_space[i])
    for text in ("a  b", "the  dog    sees 1  2", "x,  y"):
        assert counted(sp, luts, text) == len(text.encode()), text
    sp, _ = train_tiny(treat_whitespace_as_suffix=True)
    luts = build_byte_luts(sp)
    suffixed = [i for i in range(sp.vocab_size()) if sp.IdToPiece(i).endswith(WS) and len(sp.IdToPiece(i)) > 1]
    assert suffixed and all(int(luts.base_bytes[i]) == len(sp.IdToPiece(i)) for i in suffixed)  # ASCII + 1 space
    text = "the dog sees the cat, 12 birds."
    assert counted(sp, luts, text) == len(text.encode())


@pytest.mark.parametrize(
    "settings",
    [dict(treat_whitespace_as_suffix=True, add_dummy_prefix=True), dict(remove_extra_whitespaces=False)],
    ids=["dummy_suffix", "leading_space_kept"],
)
def test_whitespace_conventions_the_tables_cannot_count_are_refused(settings):
    """A dummy whitespace suffix is a real '▁' to the tables; a kept leading space after BOS is real text that
    the tables' convention (no space counted after a boundary) drops."""
    sp, _ = train_tiny(**settings)
    with pytest.raises(TokenizerError, match="whitespace handling"):
        build_byte_luts(sp)


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
