"""A small generated corpus for tests and smoke runs: `prepare: synthetic` in the data config.

Documents are sentences from a fixed seeded word-level Markov chain (learnable structure, so a model's
loss falls quickly), a SentencePiece BPE of vocab 256 is trained on the train split, and shards are
written by the same `pgolf.tools.prepare` code as real data. Deterministic: the same bytes on every machine.
"""

from __future__ import annotations

import random
from pathlib import Path

from pgolf.io import file_lock
from pgolf.tools.prepare import is_prepared, prepare, trained_tokenizer_file

WORDS = (
    "the a one two red blue green small large old new quick slow cat dog bird fish tree river stone house "
    "runs sees finds takes makes gives eats sleeps sings walks over under near with into from and or but "
    "because while when then again never always very quite rather"
).split()


def make_documents(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    nxt = {w: rng.sample(WORDS, 4) for w in WORDS}  # each word has 4 likely successors
    docs = []
    for _ in range(n_docs):
        w = rng.choice(WORDS)
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = [w]
            for _ in range(rng.randint(4, 12)):
                w = rng.choice(nxt[w]) if rng.random() < 0.9 else rng.choice(WORDS)
                words.append(w)
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(" ".join(sentences))
    return docs


def ensure_synthetic(root: str | Path = "data/synthetic", n_docs: int = 400) -> Path:
    root = Path(root)
    shards = root / "shards"
    with file_lock(root / ".prepare.lock"):
        if is_prepared(shards, trained_tokenizer_file("synth", 256)):
            return shards
        docs = make_documents(n_docs)
        n_val = max(1, n_docs // 10)
        prepare(
            [],
            shards,
            name="synth",
            vocab_size=256,
            documents=(docs[n_val:], docs[:n_val]),
            source={"generator": "pgolf.tools.synthetic", "n_docs": n_docs},
            overwrite=True,
            byte_fallback=False,
        )
    return shards
