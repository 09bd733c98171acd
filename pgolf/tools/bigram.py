"""A token-bigram baseline: `python -m pgolf.tools.bigram [--data-dir DIR] [--seq-len S] [--train-seq-len T]`.

Fits an interpolated bigram `P(y|x) = λ c(x,y)/c(x) + (1-λ) P_uni(y)` (add-one unigram) on the train
shards, picks λ on a held-out tail of the train split (then refits on all of it), and scores exactly the
standard eval's targets, each once: the val stream truncated to whole sequences of `max(S, T)` (as eval.py
and training load it), then the whole windows of S (pgolf/eval/standard.py). S is the eval window, T the
model's training length (default S; the demo trains and evaluates at 256). Bytes come from the same byte
tables, and the tokenizer is checked against the shards' manifest first. The demo must beat it by a clear
margin to show that training learned more than token pair statistics.
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
from pgolf.data.tokenizer import MANIFEST, build_byte_luts, check_shards_tokenizer, load_tokenizer
from pgolf.eval.standard import standard_windows

DEFAULT_SEQ_LEN = 256  # the demo's train.seq_len (conf/train.yaml), hence its standard eval window


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


def eval_targets(val_pattern: str, vocab_size: int, seq_len: int, train_seq_len: int | None = None, tokenizer=None):
    """(x, y) [N] int64: every target the standard eval scores with window `seq_len` on a model trained at
    `train_seq_len` (default `seq_len`), each once, with its input token."""
    tokens = load_val_tokens(val_pattern, max(seq_len, train_seq_len or seq_len), vocab_size, tokenizer=tokenizer)
    n = len(standard_windows(tokens.numel() - 1, seq_len)) * seq_len  # whole windows [kS, (k+1)S)
    return tokens[:n], tokens[1 : n + 1]


def evaluate(
    data_dir: Path,
    train_pattern: str,
    val_pattern: str,
    tokenizer: Path,
    seq_len: int = DEFAULT_SEQ_LEN,
    train_seq_len: int | None = None,
) -> dict:
    """Fit on `data_dir/train_pattern`, score the standard eval's targets of `data_dir/val_pattern`; returns
    {lambda, val_loss (nats/token), val_bpb, tokens, bytes}. TokenizerError when `tokenizer` did not make
    the shards (checked before any counting)."""
    train_glob, val_glob = str(data_dir / train_pattern), str(data_dir / val_pattern)
    for pattern in (train_glob, val_glob):
        check_shards_tokenizer(pattern, tokenizer)
    sp = load_tokenizer(tokenizer)
    V = int(sp.vocab_size())
    train = np.concatenate([np.asarray(open_shard(p, V)) for p in list_shards(train_glob)])
    lam = fit_lambda(train, V)
    lp = log_probs(bigram_counts(train, V), lam)
    x, y = eval_targets(val_glob, V, seq_len, train_seq_len)
    nll = -torch.from_numpy(lp)[x, y]
    luts = build_byte_luts(sp, V, name=str(tokenizer))
    nbytes = luts.target_bytes(x, y).sum().item()
    loss = nll.double().sum().item()
    return {
        "lambda": lam,
        "val_loss": loss / y.numel(),
        "val_bpb": loss / (math.log(2) * nbytes),
        "tokens": int(y.numel()),
        "bytes": nbytes,
    }


def default_tokenizer(data_dir: Path) -> Path | None:
    """The tokenizer the shards' manifest names, else the first `.model` in `data_dir`, else None."""
    try:
        return data_dir / json.loads((data_dir / MANIFEST).read_text())["tokenizer"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return next(iter(sorted(data_dir.glob("*.model"))), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.bigram", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/demo/shards")
    ap.add_argument("--train-pattern", default="demo_train_*.bin")
    ap.add_argument("--val-pattern", default="demo_val_*.bin")
    ap.add_argument("--tokenizer", default=None, help="default: the one the shards' manifest names")
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="the standard eval's window S")
    ap.add_argument("--train-seq-len", type=int, default=None, help="the model's training length (default S)")
    a = ap.parse_args(argv)
    d = Path(a.data_dir)
    tok = Path(a.tokenizer) if a.tokenizer else default_tokenizer(d)
    if tok is None:
        print(f"error: no tokenizer .model in {d}; pass --tokenizer", file=sys.stderr)
        return 2
    try:
        r = evaluate(d, a.train_pattern, a.val_pattern, tok, a.seq_len, a.train_seq_len)
    except (OSError, ValueError) as e:  # TokenizerError and ShardError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"bigram lambda:{r['lambda']:.3f} val_loss:{r['val_loss']:.4f} val_bpb:{r['val_bpb']:.4f} "
        f"tokens:{r['tokens']} bytes:{r['bytes']:.0f}"
    )
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
