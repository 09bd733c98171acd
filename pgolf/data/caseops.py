"""CaseOps: the lossless case transform of the final leaderboard's tokenizer, and the per-token byte sidecar.

The transform (`lossless_caps_caseops_v1`, PR #1729, used by the final #1 record PR #1611,
records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) lowercases ASCII
words and marks their case with four private-use control characters, which the SentencePiece model
`fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model` holds as user-defined pieces 4-7:

    TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004

`encode`, left to right: a control character already in the text is escaped (ESC, then the character);
a maximal run of ASCII letters (a word) that is all lowercase is copied; all uppercase with at least two
letters becomes ALLCAPS + the word lowercased; a capital then lowercase letters (a single capital too)
becomes TITLE + the word lowercased; any other mix becomes TITLE if its first letter is a capital, then
the first letter lowercased, then each later letter lowercased with CAPNEXT before each that was a
capital. Every other character (non-ASCII letters included) is copied. `decode` inverts it with a
left-to-right state machine and raises `CaseOpsError` on a malformed string; decode(encode(s)) == s.

The byte sidecar: BPB over the ORIGINAL text's bytes, not the transformed text's. `token_bytes` gives, for
each token of a document, the number of original UTF-8 bytes it stands for: a marker counts 0, an escaped
control character 3 (its own bytes; the ESC before it 0), a letter 1 (lowercasing keeps its length), any
other character its UTF-8 length. Tokens are aligned to the text through SentencePiece's own piece spans
(`encode(..., return_type="proto")`: begin/end byte offsets of each piece in the input), so characters the
tokenizer's normalizer folds or drops (NFKC, repeated whitespace) are still charged to the token that
absorbed them, and whitespace it strips at the ends to the first or last token: the sidecar of a document
sums to exactly `len(original.encode())`. BOS and other tokens with no text count 0.
"""

from __future__ import annotations

import re

import numpy as np

TRANSFORM = "lossless_caps_caseops_v1"  # the transform's name in the record's lossless_caps.py
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
CONTROL_PIECE_IDS = {TITLE: 4, ALLCAPS: 5, CAPNEXT: 6, ESC: 7}  # in the record's tokenizer
_TOKEN = re.compile(r"[A-Za-z]+|[\ue001-\ue004]|[^A-Za-z\ue001-\ue004]+")


class CaseOpsError(ValueError):
    """A string that `decode` cannot invert (a marker with no letter after it, a dangling ESC), or a
    tokenizer that does not hold the CaseOps control pieces."""


def _encode_word(w: str) -> str:
    if w.islower():
        return w
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + w.lower()
    out = [TITLE if w[0].isupper() else "", w[0].lower()]
    for c in w[1:]:
        out.append(CAPNEXT + c.lower() if c.isupper() else c)
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps form of `text` (see the module docstring). Lengths: every letter keeps its place, one
    marker per marked word or capital, one ESC per control character already in `text`."""
    out = []
    for m in _TOKEN.finditer(text):
        s = m.group()
        if s in CONTROLS:
            out.append(ESC + s)
        elif s[0].isascii() and s[0].isalpha():
            out.append(_encode_word(s))
        else:
            out.append(s)
    return "".join(out)


def decode(text: str) -> str:
    """The original of a CaseOps string. Raises CaseOpsError naming the position of a malformed marker."""
    out = []
    escape = False
    mode = None  # a pending TITLE or ALLCAPS for the next letter run
    caps = False  # inside a run opened by ALLCAPS
    capnext = False
    in_run = False
    for i, c in enumerate(text):
        if escape:
            if c not in CONTROLS:
                raise CaseOpsError(f"position {i}: ESC before {c!r}, which is not a control character")
            out.append(c)
            escape, in_run, caps = False, False, False
            continue
        letter = c.isascii() and c.isalpha()
        if c == ESC or c == TITLE or c == ALLCAPS:
            if mode is not None or capnext:
                raise CaseOpsError(f"position {i}: a case marker follows another that has no letter")
            if c == ESC:
                escape = True
            else:
                mode = c
            in_run, caps = False, False
            continue
        if c == CAPNEXT:
            if capnext or mode is not None:
                raise CaseOpsError(f"position {i}: CAPNEXT follows a marker that has no letter")
            capnext = True
            continue
        if letter:
            if not in_run:
                caps = mode == ALLCAPS
                upper = mode is not None
                mode, in_run = None, True
            else:
                upper = caps
            if capnext:
                upper, capnext = True, False
            out.append(c.upper() if upper else c)
            continue
        if mode is not None or capnext:
            raise CaseOpsError(f"position {i}: a case marker is not followed by an ASCII letter")
        out.append(c)
        in_run, caps = False, False
    if escape or mode is not None or capnext:
        raise CaseOpsError("the string ends with a marker that has nothing to apply to")
    return "".join(out)


def _code_points(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(code points uint32 [len], their UTF-8 lengths int64 [len]) of `text`."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return cp, (1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)).astype(np.int64)


def char_bytes(transformed: str) -> np.ndarray:
    """For each character of a CaseOps string, the original UTF-8 bytes it stands for (int64 [len]):
    markers and ESC 0, an escaped control character 3, any other character its UTF-8 length."""
    cp, out = _code_points(transformed)
    escaped_upto = -1  # the position of the last control character taken literally
    for i in np.flatnonzero((cp >= 0xE001) & (cp <= 0xE004)).tolist():
        if i - 1 > escaped_upto and i > 0 and cp[i - 1] == 0xE004:  # after an ESC that is a marker itself
            escaped_upto = i  # literal: keeps its 3 bytes
        else:
            out[i] = 0
    return out


def check_tokenizer(sp) -> None:
    """Raise CaseOpsError unless `sp` holds the four control characters as pieces 4-7 (the record's
    `..._caseops_v1_reserved.model`): the transformed text would otherwise be encoded as byte fallbacks."""
    for ch, i in CONTROL_PIECE_IDS.items():
        if sp.get_piece_size() <= i or sp.id_to_piece(i) != ch:
            raise CaseOpsError(
                f"the tokenizer's piece {i} is not the CaseOps control U+{ord(ch):04X}: not a CaseOps tokenizer "
                "(fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model)"
            )


def token_bytes(sp, original: str) -> tuple[list[int], np.ndarray]:
    """(token ids, original UTF-8 bytes per token [n] int64) of one document: `encode(original)` tokenized by
    `sp`, each token charged the original bytes of the text span SentencePiece aligned it to (see the module
    docstring). The counts sum to `len(original.encode())`: text the normalizer drops goes to the next token
    with a span, text stripped at the end to the last. Raises ValueError for a document of some bytes that
    encodes to no token."""
    transformed = encode(original)
    proto = sp.encode(transformed, return_type="proto")
    ids = [p.id for p in proto.pieces]
    raw = transformed.encode()
    per_char = char_bytes(transformed)
    # original bytes before each UTF-8 byte offset of the transformed text: charge each character at its
    # first byte, so a span that starts inside a character (byte fallback) takes none of it
    at_byte = np.zeros(len(raw) + 1, dtype=np.int64)
    _, width = _code_points(transformed)
    starts = np.concatenate([[0], np.cumsum(width)[:-1]]) if len(width) else width
    np.add.at(at_byte, starts + 1, per_char)
    before = np.cumsum(at_byte)
    out = np.zeros(len(ids), dtype=np.int64)
    total = int(per_char.sum())
    covered, last = 0, None  # text charged so far (a byte offset), the last token with a span
    for k, p in enumerate(proto.pieces):
        if p.end > covered:  # from the end of the text charged so far: gaps go to the next token
            out[k] = before[p.end] - before[covered]
            covered, last = p.end, k
    if ids:
        out[len(ids) - 1 if last is None else last] += total - before[covered]  # stripped at the end
    elif total:
        raise ValueError(f"a document of {total} bytes encodes to no token")
    return ids, out
