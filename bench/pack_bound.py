"""How small the packed train_gpt.py of an experiment could get by packing less of the same runtime: its bytes if
every statement a short run of the experiment never executes were left out (dead branches, other features'
code, every error path), against the targets of pack_bench.py.

    python bench/pack_bound.py [EXP ...]      (default: baseline record_1298 record_1263 record_1611)

For each experiment, one short CPU run of `train.py` (the experiment with its model shrunk, the synthetic data,
4 steps, its own export and final eval modes) under coverage.py; then, per packed module, the fraction of its
statements that ran, applied to the module's minified bytes: `bound = packed bytes x (config + sum(minified x
ran)) / (config + sum(minified))`. A GPU run executes more of the runtime (compile, CUDA, DDP paths), so the
bound is a lower bound on what a packed file of this runtime can hold; the targets below it need a smaller
runtime, not better packing. One line per experiment: `experiment:... bytes:... ran:... bound:... target:...`.
Needs coverage (`pip install -e ".[dev]"`) and, for record_1611's per-group export, lrzip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, figures_line, save_json
from pack_bench import TARGETS

from pgolf.tools.pack import compose_train, pack, unpack
from pgolf.tools.synthetic import ensure_synthetic

# The experiment with a small model on the synthetic data (vocab 256), a few steps, its own export and eval.
SMALL = {
    "model.model_dim": 64,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "model.vocab_size": 256,
    "train.seq_len": 32,
    "train.batch_tokens": 1024,
    "train.grad_accum": 1,
    "train.iterations": 4,
    "train.max_wallclock_seconds": 0,
    "train.warmup_steps": 2,
    "train.compile": "false",
    "final_eval.seq_len": 32,
    "final_eval.stride": 16,
    "final_eval.batch_windows": 8,
    "export.calibration.length": 32,
    "export.calibration.count": 8,
    "trainer": "cpu",
    "logger": "csv",
    "callbacks.progress": "none",
}
PER_EXPERIMENT = {  # a 1611-family model small enough for a CPU run; documents bounded at 16 tokens
    "record_1611": {
        "model": "tiny_1611",
        "model.vocab_size": 256,
        "train.max_seg_len": 16,
        "data.eval_seq_len": 32,
        "export.gptq.batch": 8,
    },
}


def overrides(exp: str, root: Path) -> list[str]:
    over = {**SMALL, **PER_EXPERIMENT.get(exp, {})}
    if over.get("model") == "tiny_1611":
        for k in ("model.model_dim", "model.num_heads", "model.num_kv_heads"):
            over.pop(k)
    return [f"experiment={exp}", "data=synthetic", f"data.root={root}", *(f"{k}={v}" for k, v in over.items())]


def ran_fractions(exp: str, root: Path, work: Path) -> dict[str, float]:
    """{module file: fraction of its statements that ran} of one short run of `exp` under coverage."""
    data = work / f"{exp}.coverage"
    cmd = [sys.executable, "-m", "coverage", "run", f"--data-file={data}", "--source=pgolf,callbacks", "train.py"]
    cmd += [*overrides(exp, root), f"hydra.run.dir={work / exp}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{exp}: the run failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    out = work / f"{exp}.json"
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", f"--data-file={data}", "-o", str(out)], check=True)
    files = json.loads(out.read_text())["files"]
    return {str(Path(f).resolve()): v["summary"]["percent_covered"] / 100 for f, v in files.items()}


def bound(exp: str, root: Path, work: Path) -> dict:
    cfg = compose_train([f"experiment={exp}"])
    packed = pack(cfg)
    payload, sources = unpack(packed.script)
    ran = ran_fractions(exp, root, work)
    head = len(json.dumps(payload, sort_keys=True, separators=(",", ":")))
    total = kept = head
    for key, src in sources.items():
        f = ran.get(str((ROOT / (key.replace(".", "/") + ".py")).resolve()), 1.0)  # a module not measured: all
        total += len(src)
        kept += len(src) * f
    n = packed.code["bytes"]
    fig = {"experiment": exp, "bytes": n, "ran": round(kept / total, 3), "bound": round(n * kept / total)}
    if exp in TARGETS:
        fig |= {"target": TARGETS[exp], "bound_ok": fig["bound"] <= TARGETS[exp]}
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiments", nargs="*", default=["baseline", "record_1298", "record_1263", "record_1611"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "syn"
        ensure_synthetic(root)
        rows = []
        for exp in args.experiments:
            rows.append(bound(exp, root, Path(tmp)))
            print(figures_line(rows[-1]), flush=True)
    save_json(args.json, {"experiments": rows})


if __name__ == "__main__":
    main()
