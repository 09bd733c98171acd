"""A token-bigram baseline: `python -m pgolf.tools.bigram [--data-dir DIR] [--seq-len S]`.

Fits an interpolated bigram `P(y|x) = λ c(x,y)/c(x) + (1-λ) P_uni(y)` (add-one unigram) on the train
shards, picks λ on a held-out tail of the train split (then refits on all of it), and scores the same
validation targets as the standard eval (the val stream truncated to whole sequences of S), in BPB with
the same byte tables. The demo must beat it by a clear margin to show that training learned more than
token pair statistics.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards, open_shard
from pgolf.data.stream import load_val_tokens
from pgolf.data.tokenizer import build_byte_luts, load_tokenizer


def bigram_counts(tokens: np.ndarray, V: int) -> np.ndarray:
    pair = tokens[:-1].astype(np.int64) * V + tokens[1:].astype(np.int64)
    return np.bincount(pair, minlength=V * V).reshape(V, V).astype(np.float64)


def log_probs(counts: np.ndarray, lam: float) -> np.ndarray:
    """log P(y|x) [V, V] of the interpolated model."""
    uni = counts.sum(0) + 1.0
    uni /= uni.sum()
    row = counts.sum(1, keepdims=True)
    cond = np.divide(counts, row, out=np.zeros_like(counts), where=row > 0)
    return np.log(lam * cond + (1 - lam) * uni[None, :])


LAMBDA_GRID = np.linspace(0.05, 0.99, 48)


def fit_lambda(tokens: np.ndarray, V: int, grid=LAMBDA_GRID) -> float:
    cut = int(0.9 * tokens.size)
    counts = bigram_counts(tokens[:cut], V)
    held = tokens[cut:]
    x, y = held[:-1].astype(np.int64), held[1:].astype(np.int64)
    best = min(grid, key=lambda lam: -log_probs(counts, lam)[x, y].mean())
    return float(best)


def evaluate(data_dir: Path, train_pattern: str, val_pattern: str, tokenizer: Path, seq_len: int) -> dict:
    sp = load_tokenizer(tokenizer)
    V = int(sp.vocab_size())
    train = np.concatenate([np.asarray(open_shard(p, V)) for p in list_shards(str(data_dir / train_pattern))])
    lam = fit_lambda(train, V)
    lp = log_probs(bigram_counts(train, V), lam)
    val = load_val_tokens(str(data_dir / val_pattern), seq_len, V)
    x, y = val[:-1], val[1:]
    nll = -torch.from_numpy(lp)[x, y]
    luts = build_byte_luts(sp, V)
    nbytes = luts.target_bytes(x, y).sum().item()
    loss = nll.double().sum().item()
    return {
        "lambda": lam,
        "val_loss": loss / y.numel(),
        "val_bpb": loss / (math.log(2) * nbytes),
        "tokens": int(y.numel()),
        "bytes": nbytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.bigram", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/demo/shards")
    ap.add_argument("--train-pattern", default="demo_train_*.bin")
    ap.add_argument("--val-pattern", default="demo_val_*.bin")
    ap.add_argument("--tokenizer", default=None, help="default: the .model in --data-dir")
    ap.add_argument("--seq-len", type=int, default=512, help="truncate val like the standard eval with this S")
    a = ap.parse_args(argv)
    d = Path(a.data_dir)
    tok = Path(a.tokenizer) if a.tokenizer else next(iter(sorted(d.glob("*.model"))), None)
    if tok is None:
        print(f"error: no tokenizer .model in {d}; pass --tokenizer", file=sys.stderr)
        return 2
    r = evaluate(d, a.train_pattern, a.val_pattern, tok, a.seq_len)
    print(
        f"bigram lambda:{r['lambda']:.3f} val_loss:{r['val_loss']:.4f} val_bpb:{r['val_bpb']:.4f} "
        f"tokens:{r['tokens']} bytes:{r['bytes']:.0f}"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
