"""CaseOps (pgolf/data/caseops.py): the lossless case transform of PR #1729 / #1611, its inverse, and the
per-token byte sidecar that charges every token the ORIGINAL bytes it stands for."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import sentencepiece as spm
from conftest import SHARED, need

from pgolf.data import caseops as co
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, TITLE

CASEOPS_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
T, A, C, E = TITLE, ALLCAPS, CAPNEXT, ESC


@pytest.fixture(scope="module")
def caseops_sp():
    return spm.SentencePieceProcessor(model_file=str(need(CASEOPS_MODEL)))


@pytest.fixture(scope="module")
def sample_docs(fineweb_sample):
    with open(fineweb_sample, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(300), f)]


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("The NASA Launch of iPhone costs $5.", f"{T}the {A}nasa {T}launch of i{C}phone costs $5."),  # the record's
        ("I a", f"{T}i a"),  # a single capital is TITLE, a single lowercase letter is copied
        ("McDonald", f"{T}mc{C}donald"),  # mixed, first capital: TITLE then CAPNEXT for later capitals
        ("hELLO", f"h{C}e{C}l{C}l{C}o"),  # mixed, first lowercase: no TITLE
        ("ABc", f"{T}a{C}bc"),
        ("Café NAÏVE", f"{T}café {A}na\u00cf{A}ve"),  # non-ASCII letters are never changed and end a word
        (f"x{T}y{E}", f"x{E}{T}y{E}{E}"),  # control characters in the text are escaped
        ("", ""),
    ],
)
def test_encode_follows_the_rules_and_decode_inverts_it(text, encoded):
    assert co.encode(text) == encoded
    assert co.decode(encoded) == text


@pytest.mark.parametrize(
    "bad",
    [f"{T}", f"{T} a", f"a{C}1", f"{C}{C}a", f"{E}a", f"{T}{A}a", f"x{E}", f"{A}"],
)
def test_decode_refuses_a_malformed_string(bad):
    with pytest.raises(co.CaseOpsError):
        co.decode(bad)


def test_round_trip_on_random_strings():
    alphabet = "aAbBzZ é\u00c9\n.1" + T + A + C + E
    rng = random.Random(0)
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        enc = co.encode(s)
        assert co.decode(enc) == s, (s, enc)
        assert co.char_bytes(enc).sum() == len(s.encode())  # markers 0, escaped controls 3, the rest their bytes


def test_char_bytes_counts_original_bytes():
    assert co.char_bytes(E + E).tolist() == [0, 3]  # ESC ESC: a literal ESC
    assert co.char_bytes(E + E + E + T).tolist() == [0, 3, 0, 3]
    assert co.char_bytes(T + "a" + C + "b").tolist() == [0, 1, 0, 1]
    assert co.char_bytes("é😀\n").tolist() == [2, 4, 1]


def test_round_trip_on_the_fineweb_sample(sample_docs):
    for doc in sample_docs:
        assert co.decode(co.encode(doc)) == doc


def test_sidecar_sums_to_the_original_bytes(caseops_sp, sample_docs):
    """Every document's sidecar sums to its UTF-8 length, though the tokenizer's NFKC normalizer folds and
    collapses characters (its piece spans align tokens to the text)."""
    co.check_tokenizer(caseops_sp)
    total = counted = tokens = 0
    for doc in sample_docs[:100]:
        ids, b = co.token_bytes(caseops_sp, doc)
        assert len(ids) == len(b) and (b >= 0).all()
        assert int(b.sum()) == len(doc.encode())
        total, counted, tokens = total + len(doc.encode()), counted + int(b.sum()), tokens + len(ids)
    assert counted == total and 2.5 < total / tokens < 4.0  # about 3 original bytes per token


def test_sidecar_charges_markers_nothing_and_folded_text_to_its_token(caseops_sp):
    doc = "  The  ﬁle\n\nSAYS é😀  "
    ids, b = co.token_bytes(caseops_sp, doc)
    pieces = [caseops_sp.id_to_piece(i) for i in ids]
    assert int(b.sum()) == len(doc.encode())
    assert pieces[0] == T and b[0] == 2  # the 2 leading spaces the normalizer strips go to the first token
    assert all(n == 0 for p, n in zip(pieces[1:], b[1:]) if p in (T, A))  # a marker stands for no original byte
    assert pieces.count(A) == 1 and b[-1] >= 2  # SAYS is ALLCAPS; the trailing spaces go to the last token
    assert co.decode(caseops_sp.decode(ids)) != doc  # the normalizer is lossy, the byte count is not


def test_a_tokenizer_without_the_control_pieces_is_refused(sp1024_path):
    with pytest.raises(co.CaseOpsError, match="not a CaseOps tokenizer"):
        co.check_tokenizer(spm.SentencePieceProcessor(model_file=str(sp1024_path)))


def test_an_empty_document_has_no_tokens(caseops_sp):
    ids, b = co.token_bytes(caseops_sp, "")
    assert ids == [] and b.shape == (0,) and b.dtype == np.int64
