"""Documents -> challenge shards:
`python -m pgolf.tools.prepare --input DOCS... --out DIR [--tokenizer M | --vocab-size V]`.

Reads text (`.txt`: one document per file, or per line with `--txt-lines`) or JSONL (`--text-field`,
default `text`) documents; splits train/val by whole documents (the first `--val-docs` documents, as the
challenge does, or a seeded `--val-fraction`); trains a SentencePiece BPE with the challenge settings on
the train split unless `--tokenizer` gives a `.model`; encodes every document as `[BOS]+pieces`; writes
`{name}_train_NNNNNN.bin` / `{name}_val_NNNNNN.bin` shards and `manifest.json` (token counts, tokenizer
hash).

`--caseops` (with `--tokenizer`, a CaseOps model such as the final #1 record's
`fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model`; PR #1729, PR #1611 records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611, its `prepare_caseops_data.py`): every document
is CaseOps-transformed before encoding (pgolf/data/caseops.py), and every validation shard gets a parallel
byte sidecar `{name}_val_bytes_NNNNNN.bin` (same format, one uint16 per token: the original UTF-8 bytes the
token stands for, BOS 0; a document's entries sum to its UTF-8 length). The manifest records the transform and
the sidecar files (`val.byte_sidecar`), which pgolf/data/stream.py `load_val_data` reads for BPB. A tokenizer
without the CaseOps control pieces is refused before any document is read.

A tokenizer trained here is `{name}_{vocab}_bpe_selftrained.model`, a name that the challenge's
published `fineweb_{vocab}_bpe.model` cannot be mistaken for; a given one keeps its own name. The output
directory is built under a temporary name and renamed into place, so an existing directory is never
touched (it is refused unless `--overwrite`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pgolf.data import caseops
from pgolf.data.shards import SHARD_TOKENS, sidecar_name, write_shard
from pgolf.data.tokenizer import BOS_ID, TokenizerError, TokenizerInfo, load_tokenizer
from pgolf.io import atomic_dir, atomic_write_bytes, sha256_file


def read_documents(paths: Iterable[str | Path], text_field: str = "text", txt_lines: bool = False) -> Iterator[str]:
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: input document file not found")
        if p.suffix in (".jsonl", ".json"):
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from e
                    if text_field not in obj:
                        raise ValueError(f"{p}:{n}: JSON object has no {text_field!r} field")
                    yield obj[text_field]
        else:
            text = p.read_text(encoding="utf-8")
            if txt_lines:
                yield from (line for line in text.splitlines() if line.strip())
            else:
                yield text


def split_documents(
    docs: list[str], val_docs: int | None = None, val_fraction: float | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(train, val) by whole documents: the first `val_docs`, or a seeded random `val_fraction`."""
    if val_docs is not None:
        if not 0 < val_docs < len(docs):
            raise ValueError(f"--val-docs={val_docs} must be between 1 and {len(docs) - 1} ({len(docs)} documents)")
        return docs[val_docs:], docs[:val_docs]
    frac = 0.1 if val_fraction is None else val_fraction
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, round(frac * len(docs)))
    if n_val >= len(docs):
        raise ValueError(f"val fraction {frac} leaves no training documents ({len(docs)} documents)")
    val = sorted(idx[:n_val])
    val_set = set(val)
    return [docs[i] for i in range(len(docs)) if i not in val_set], [docs[i] for i in val]


# ---- tokenizer training and encoding ------------------------------------------------------------------
# The challenge tokenizer's settings (data/download_hf_docs_and_tokenize.py of openai/parameter-golf).
CHALLENGE_SPM_SETTINGS = dict(
    model_type="bpe",
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    character_coverage=0.999,
    max_sentencepiece_length=16,
    byte_fallback=True,
)

TOKENIZER_THREADS = 2  # recorded in the .model: fixed so that the file does not depend on the machine


MAX_VOCAB = 65536  # shard token ids are uint16


def trained_tokenizer_file(name: str, vocab_size: int) -> str:
    """The file name of a tokenizer `prepare` trains: never the name of a published challenge tokenizer
    (`fineweb_1024_bpe.model`), even for `--name fineweb`, since the two differ (another hash, other pieces)."""
    return f"{name}_{vocab_size}_bpe_selftrained.model"


def train_tokenizer(
    lines: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 1024,
    threads: int = TOKENIZER_THREADS,
    **overrides,
) -> Path:
    """Train a SentencePiece BPE with the challenge's settings; returns the `.model` path.

    The model is trained in memory and written atomically to `<model_prefix>.model`. SentencePiece
    records its trainer settings in the file, including the output prefix when it writes the file
    itself; training in memory leaves the prefix empty, so the same lines give a byte-identical file
    (and tokenizer hash) whatever directory it is trained in. Raises TokenizerError when SentencePiece
    cannot train (e.g. a vocabulary smaller than the characters plus the 256 byte pieces).
    """
    import sentencepiece as spm

    settings = {**CHALLENGE_SPM_SETTINGS, **overrides}
    path = Path(model_prefix).with_suffix(".model")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            num_threads=threads,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
            **settings,
        )
    except RuntimeError as e:  # e.g. a vocabulary smaller than the required characters (+256 byte pieces)
        raise TokenizerError(
            f"SentencePiece training failed for vocab_size={vocab_size}: {str(e).split('] ')[-1]}"
        ) from e
    atomic_write_bytes(path, buf.getvalue())
    return path


def encode_documents(sp, docs: Iterable[str], batch: int = 256, transform=None) -> Iterator[np.ndarray]:
    """Each document as `[BOS] + pieces` (no EOS, as the challenge export), uint16; `transform` (str -> str,
    e.g. `caseops.encode`) is applied to each document first."""
    buf: list[str] = []

    def flush():
        for ids in sp.EncodeAsIds(buf):
            yield np.asarray([BOS_ID, *ids], dtype=np.uint16)

    for d in docs:
        buf.append(transform(d) if transform is not None else d)
        if len(buf) >= batch:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def caseops_documents(sp, docs: Iterable[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each document CaseOps-transformed and encoded, `([BOS] + pieces, [0] + original bytes per piece)`, both
    uint16 (`caseops.token_bytes`). ValueError naming the document for a count that does not fit uint16."""
    for k, d in enumerate(docs):
        ids, nbytes = caseops.token_bytes(sp, d)
        if nbytes.size and int(nbytes.max()) > np.iinfo(np.uint16).max:
            raise ValueError(
                f"document {k}: a token stands for {int(nbytes.max())} original bytes, more than a uint16 byte "
                "sidecar entry holds"
            )
        yield np.asarray([BOS_ID, *ids], dtype=np.uint16), np.concatenate([[0], nbytes]).astype(np.uint16)


def write_split(
    encoded: Iterable[tuple[np.ndarray, np.ndarray | None]], out: Path, prefix: str, shard_tokens: int
) -> dict:
    """Write encoded documents (`(ids [n] uint16, original bytes [n] uint16 or None)` each) as shards of at most
    `shard_tokens` tokens; returns manifest stats. Documents with byte counts (`caseops_documents`) get a
    parallel sidecar shard beside each token shard (the same cuts), and the stats a `byte_sidecar` entry
    {files, bytes}."""
    files, side_files, buf, side, buffered, total, n_docs, n_bytes = [], [], [], [], 0, 0, 0, 0
    sidecar = None  # whether the documents carry byte counts (all or none of them)

    def flush():
        nonlocal buf, side, buffered
        path = out / f"{prefix}_{len(files):06d}.bin"
        write_shard(path, np.concatenate(buf) if buf else np.zeros(0, np.uint16))
        files.append(path.name)
        if sidecar:
            write_shard(out / sidecar_name(path), np.concatenate(side) if side else np.zeros(0, np.uint16))
            side_files.append(sidecar_name(path))
        buf, side, buffered = [], [], 0

    for ids, nbytes in encoded:
        if sidecar is None:
            sidecar = nbytes is not None
        elif sidecar != (nbytes is not None):
            raise ValueError(f"{prefix}: document {n_docs} has byte counts {'missing' if sidecar else 'unexpected'}")
        if nbytes is not None and nbytes.shape != ids.shape:
            raise ValueError(f"{prefix}: document {n_docs} has {ids.size} tokens but {nbytes.size} byte counts")
        n_docs += 1
        total += ids.size
        n_bytes += 0 if nbytes is None else int(nbytes.sum(dtype=np.int64))
        while ids.size:
            take = min(ids.size, shard_tokens - buffered)
            buf.append(ids[:take])
            ids = ids[take:]
            if nbytes is not None:
                side.append(nbytes[:take])
                nbytes = nbytes[take:]
            buffered += take
            if buffered == shard_tokens:
                flush()
    if buffered or not files:
        flush()
    stats = {"files": files, "tokens": int(total), "docs": n_docs}
    if sidecar:
        stats["byte_sidecar"] = {"files": side_files, "bytes": n_bytes}
    return stats


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    name: str = "data",
    tokenizer: str | Path | None = None,
    vocab_size: int = 1024,
    val_docs: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    text_field: str = "text",
    txt_lines: bool = False,
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    documents: tuple[list[str], list[str]] | None = None,
    source: dict | None = None,
    byte_fallback: bool = True,
    caseops_transform: bool = False,
) -> Path:
    """Build a shard directory; returns its path. `documents=(train, val)` skips reading and splitting.
    `caseops_transform`: CaseOps shards with a validation byte sidecar (module docstring); needs `tokenizer`,
    a CaseOps model, checked before any document is read (caseops.CaseOpsError, a ValueError, otherwise)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    # the arguments, before any document is read
    if tokenizer is None and not (isinstance(vocab_size, int) and 1 <= vocab_size <= MAX_VOCAB):
        raise ValueError(
            f"--vocab-size must be an integer in 1..{MAX_VOCAB} (shards hold uint16 ids), got {vocab_size}"
        )
    if not (isinstance(shard_tokens, int) and shard_tokens >= 1):
        raise ValueError(f"--shard-tokens must be a positive integer, got {shard_tokens}")
    if caseops_transform:
        if tokenizer is None:
            raise ValueError("--caseops needs --tokenizer: a CaseOps SentencePiece model (pieces 4-7 the controls)")
        try:
            caseops.check_tokenizer(load_tokenizer(tokenizer))
        except caseops.CaseOpsError as e:
            raise caseops.CaseOpsError(f"--caseops: {tokenizer}: {e}") from None
    elif tokenizer is not None:
        load_tokenizer(tokenizer)  # TokenizerError naming the user's file, not the copy made below
    if documents is None:
        docs = list(read_documents(inputs, text_field, txt_lines))
        if len(docs) < 2:
            raise ValueError(f"need at least 2 documents to split train/val, found {len(docs)}")
        train_docs, val_docs_list = split_documents(docs, val_docs, val_fraction, seed)
    else:
        train_docs, val_docs_list = documents
    with atomic_dir(out) as tmp:
        if tokenizer is None:
            lines = (line for d in train_docs for line in d.splitlines() if line.strip())
            model = train_tokenizer(
                lines,
                tmp / trained_tokenizer_file(name, vocab_size),
                vocab_size=vocab_size,
                byte_fallback=byte_fallback,
            )
        else:
            model = tmp / Path(tokenizer).name
            shutil.copyfile(tokenizer, model)
        sp = load_tokenizer(model)
        info = TokenizerInfo.from_path(model)
        transform = caseops.encode if caseops_transform else None
        train_enc = ((ids, None) for ids in encode_documents(sp, train_docs, transform=transform))
        if caseops_transform:
            val_enc = caseops_documents(sp, val_docs_list)
        else:
            val_enc = ((ids, None) for ids in encode_documents(sp, val_docs_list))
        train = write_split(train_enc, tmp, f"{name}_train", shard_tokens)
        val = write_split(val_enc, tmp, f"{name}_val", shard_tokens)
        manifest = {
            "name": name,
            "tokenizer": {"file": model.name, "vocab_size": info.vocab_size, "sha256": info.sha256},
            "transform": caseops.TRANSFORM if caseops_transform else None,
            "train": train,
            "val": val,
            "source": source or {"inputs": [Path(p).name for p in inputs], "sha256": [sha256_file(p) for p in inputs]},
            "split": {"val_docs": val_docs, "val_fraction": val_fraction, "seed": seed},
            "format": {"bos_prefix": True, "eos": False, "shard_tokens": shard_tokens},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def is_prepared(out: str | Path, tokenizer_file: str) -> bool:
    """Whether `out` holds a complete `prepare` output whose tokenizer is `tokenizer_file` (a folder from an
    older naming, or with a shard missing, is not: the caller prepares it again)."""
    out = Path(out)
    try:
        m = json.loads((out / "manifest.json").read_text())
        sidecar = (m["val"].get("byte_sidecar") or {}).get("files", [])
        files = [m["tokenizer"]["file"], *m["train"]["files"], *m["val"]["files"], *sidecar]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return files[0] == tokenizer_file and all((out / f).is_file() for f in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl document files")
    ap.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    ap.add_argument("--name", default="data", help="shard name prefix, e.g. fineweb -> fineweb_train_000000.bin")
    ap.add_argument("--tokenizer", help="an existing SentencePiece .model (else one is trained on the train split)")
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--val-docs", type=int, help="the first N documents form the validation split")
    ap.add_argument("--val-fraction", type=float, help="else a seeded random fraction of documents (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--txt-lines", action="store_true", help="each non-empty line of a .txt file is a document")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument(
        "--caseops",
        action="store_true",
        help="CaseOps-transform documents (PR #1729) and write validation byte sidecars; needs a CaseOps --tokenizer",
    )
    a = ap.parse_args(argv)
    try:
        out = prepare(
            a.input,
            a.out,
            a.name,
            a.tokenizer,
            a.vocab_size,
            a.val_docs,
            a.val_fraction,
            a.seed,
            a.text_field,
            a.txt_lines,
            a.shard_tokens,
            a.overwrite,
            caseops_transform=a.caseops,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = json.loads((out / "manifest.json").read_text())
    print(
        f"wrote {out}: train {m['train']['docs']} docs {m['train']['tokens']} tokens in {len(m['train']['files'])} "
        f"shards; val {m['val']['docs']} docs {m['val']['tokens']} tokens; tokenizer {m['tokenizer']['file']} "
        f"(vocab {m['tokenizer']['vocab_size']}, sha256 {m['tokenizer']['sha256'][:12]}…)"
    )
    if m["val"].get("byte_sidecar"):
        sc = m["val"]["byte_sidecar"]
        print(f"transform {m['transform']}: val byte sidecar {len(sc['files'])} shards, {sc['bytes']} original bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
