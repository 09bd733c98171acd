"""Per-target audit files (`audit.npz` from `eval.py audit=true`): summarise, diff, and the flip test from outside.

    python -m pgolf.tools.audit summary RUN/audit.npz
    python -m pgolf.tools.audit diff A/audit.npz B/audit.npz [--mode sliding] [--top 10]
    python -m pgolf.tools.audit flip --val 'data/demo/shards/demo_val_*.bin' --position P --token T --out DIR
    python -m pgolf.tools.audit diff A/audit.npz B/audit.npz --flip P

The flip test (PR #1240): change the validation token at stream position P (`flip` writes a copy
of the validation shards with that one change into a new directory), evaluate both with `audit=true`, and
`diff --flip P`: a causal mode never changes the score of a target before P-1 (target t predicts token
t+1, so targets < P-1 are predicted before token P is seen, and target P-1 is token P itself). Scores from
P-1 on may change. A mode that fits on the targets it scores (SLOT as in PR #1263/#1298) is caught: targets
before P-1 in the same window change.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from pgolf.data.shards import list_shards, open_shard, write_shard


def load_audit(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{mode: {index, nll, bytes}} from an audit.npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audit file not found (run eval.py with audit=true)")
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            mode, _, field = key.rpartition(".")
            if not mode or field not in ("index", "nll", "bytes"):
                raise ValueError(f"{path}: unexpected array {key!r} (expected <mode>.index|nll|bytes)")
            out.setdefault(mode, {})[field] = z[key]
    for mode, arrs in out.items():
        if set(arrs) != {"index", "nll", "bytes"} or not len(arrs["index"]) == len(arrs["nll"]) == len(arrs["bytes"]):
            raise ValueError(f"{path}: mode {mode!r} lacks one of index/nll/bytes or their lengths differ")
    return out


def summarize(a: dict[str, np.ndarray]) -> dict:
    """Recompute a mode's figures from its per-target arrays (float64 sums, docs/techniques.md#bits-per-byte)."""
    idx = a["index"]
    loss, n, nb = float(a["nll"].astype(np.float64).sum()), int(idx.size), float(a["bytes"].astype(np.float64).sum())
    unique = np.unique(idx).size
    contiguous = bool(unique == idx.size and (idx.size == 0 or (idx[0] == 0 and idx[-1] == idx.size - 1)))
    return {
        "tokens": n,
        "bytes": nb,
        "val_loss": loss / max(n, 1),
        "val_bpb": loss / (math.log(2.0) * max(nb, 1.0)),
        "every_target_once": contiguous,
    }


def diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], flip: int | None = None, tol: float = 0.0) -> dict:
    """Token-by-token comparison of one mode's arrays from two runs (same validation targets)."""
    if not np.array_equal(a["index"], b["index"]):
        raise ValueError("the two audits score different targets (index arrays differ)")
    d = b["nll"].astype(np.float64) - a["nll"].astype(np.float64)
    changed = np.abs(d) > tol
    out = {
        "targets": int(d.size),
        "changed": int(changed.sum()),
        "first_changed": int(a["index"][changed][0]) if changed.any() else None,
        "max_abs_diff": float(np.abs(d).max()) if d.size else 0.0,
        "mean_diff": float(d.mean()) if d.size else 0.0,
        "bytes_equal": bool(np.array_equal(a["bytes"], b["bytes"])),
    }
    if flip is not None:
        before = changed & (a["index"] < flip - 1)
        out["flip_position"] = flip
        out["changed_before_flip"] = int(before.sum())
        out["max_abs_diff_before_flip"] = float(np.abs(d[a["index"] < flip - 1]).max()) if flip > 1 else 0.0
        out["causal"] = not bool(before.any())
    return out


def largest(a: dict[str, np.ndarray], b: dict[str, np.ndarray], k: int) -> list[tuple[int, float, float]]:
    d = b["nll"].astype(np.float64) - a["nll"].astype(np.float64)
    order = np.argsort(-np.abs(d), kind="stable")[:k]
    return [(int(a["index"][i]), float(a["nll"][i]), float(b["nll"][i])) for i in order]


def write_flipped_shards(pattern: str, position: int, token: int, out_dir: str | Path) -> list[Path]:
    """Copy the validation shards matching `pattern` into `out_dir` (same names) with the token at stream
    position `position` replaced by `token`. Refuses to overwrite existing files or to write over the source."""
    files = list_shards(pattern)
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == f.parent.resolve() for f in files):
        raise ValueError(f"{out_dir}: output directory holds the source shards; choose a new directory")
    taken = [out_dir / f.name for f in files if (out_dir / f.name).exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists; refusing to overwrite (choose a new --out directory)")
    offset, done, written = 0, False, []
    for f in files:
        toks = np.array(open_shard(f))
        if not done and offset <= position < offset + toks.size:
            old = int(toks[position - offset])
            if old == token:
                raise ValueError(f"token at position {position} is already {token}; pick another value")
            toks[position - offset] = token
            done = True
        offset += toks.size
        write_shard(out_dir / f.name, toks)
        written.append(out_dir / f.name)
    if not done:
        for p in written:
            p.unlink()
        raise ValueError(f"position {position} is outside the validation stream ({offset} tokens)")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.audit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="recompute each mode's figures from an audit file")
    s.add_argument("path")
    d = sub.add_parser("diff", help="compare two audit files target by target")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--mode", default=None, help="only this mode (default: every mode in both files)")
    d.add_argument("--flip", type=int, default=None, help="stream position of the flipped token: check causality")
    d.add_argument("--tol", type=float, default=0.0, help="|Δnll| above this counts as changed")
    d.add_argument("--top", type=int, default=5, help="show the k largest differences")
    f = sub.add_parser("flip", help="write a copy of the validation shards with one token changed")
    f.add_argument("--val", required=True, help="validation shard glob (data.val_pattern)")
    f.add_argument("--position", type=int, required=True)
    f.add_argument("--token", type=int, required=True)
    f.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "summary":
        for mode, arrs in load_audit(args.path).items():
            print(mode, " ".join(f"{k}:{v}" for k, v in summarize(arrs).items()))
        return 0
    if args.cmd == "flip":
        paths = write_flipped_shards(args.val, args.position, args.token, args.out)
        print(f"wrote {len(paths)} shard(s) to {args.out}; evaluate with data.val_pattern='{args.out}/*.bin'")
        return 0
    a, b = load_audit(args.a), load_audit(args.b)
    modes = [args.mode] if args.mode else [m for m in a if m in b]
    missing = [m for m in modes if m not in a or m not in b]
    if missing or not modes:
        raise SystemExit(f"mode(s) {missing or '(none in common)'} not in both audit files")
    violations = 0
    for mode in modes:
        r = diff(a[mode], b[mode], args.flip, args.tol)
        print(mode, " ".join(f"{k}:{v}" for k, v in r.items()))
        for i, x, y in largest(a[mode], b[mode], args.top):
            print(f"  target {i}: nll {x:.6f} -> {y:.6f} ({y - x:+.6f})")
        violations += args.flip is not None and not r["causal"]
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
