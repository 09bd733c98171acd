"""The packed train_gpt.py of every experiment: its length (the counted code), the modules it holds and the
time to pack it, against the targets (0.8x the records' own scripts: baseline 47,686, PR #1298 60,868,
PR #1263 73,198 bytes of code).

    python bench/pack_bench.py [--repeat 3] [--json FILE]
    python bench/pack_bench.py --breakdown record_1611


One line per experiment of conf/experiment/ (`experiment:record_1263 bytes:... modules:... pack_ms:...
pack_cpu_ms:... target:... ok:...`: wall and CPU time, the median of `--repeat` packs after a warm-up pack;
on a loaded machine read the CPU time); for the record experiments also the packed code plus the record's
model bytes (the record's largest artifact minus its code: the records' logs and submission.json) against
16,000,000.

`--breakdown EXP`: what each packed module of one experiment costs, largest first: its minified source bytes and
the compressed bytes the payload loses without it (brotli-11 of the payload with and without the module; the
sum exceeds the payload, since modules share their words), and the config's JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import brotli
from common import ROOT, figures_line, save_json

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.tools.pack import BROTLI, compose_train, pack, unpack

# 0.8x the records' scripts; record_1611: the record's own compressed script (PR #1611)
TARGETS = {"baseline": 38_000, "record_1298": 48_700, "record_1263": 58_000, "record_1611": 31_999}
# The records' model bytes: the largest artifact minus the record script's code bytes (baseline:
# openai/parameter-golf train_gpt.py log; PR #1263, PR #1298 and PR #1611: their logs / submission.json).
RECORD_MODEL_BYTES = {
    "baseline": 15_863_489 - 47_642,
    "record_1263": 15_890_549 - 73_198,
    "record_1298": 15_824_588 - 60_868,
    "record_1611": 15_907_550 - 31_999,
}


def experiments() -> list[str]:
    conf = ROOT / "conf" / "experiment"
    return sorted(str(p.relative_to(conf).with_suffix("")) for p in conf.rglob("*.yaml"))


def measure(exp: str, repeat: int) -> dict:
    cfg = compose_train([f"experiment={exp}"])
    packed = pack(cfg, use_cache=False)
    wall, cpu = [], []
    for _ in range(repeat):
        c0 = time.process_time()
        wall.append(pack(cfg, use_cache=False).seconds)  # made afresh (a train.py run reads the pack cache)
        cpu.append(time.process_time() - c0)
    n = packed.code["bytes"]
    fig = {"experiment": exp, "bytes": n, "modules": len(packed.modules)}
    fig |= {"pack_ms": round(1000 * statistics.median(wall)), "pack_cpu_ms": round(1000 * statistics.median(cpu))}
    if exp in TARGETS:
        fig |= {"target": TARGETS[exp], "ok": n <= TARGETS[exp]}
    if exp in RECORD_MODEL_BYTES:
        total = n + RECORD_MODEL_BYTES[exp]
        fig |= {"record_model": RECORD_MODEL_BYTES[exp], "total": total, "fits": total <= ARTIFACT_LIMIT_BYTES}
    return fig


def breakdown(exp: str) -> list[dict]:
    """[{module, minified, compressed}] of `exp`'s packed file, the config first, then by compressed cost."""
    payload, sources = unpack(pack(compose_train([f"experiment={exp}"])).script)
    head = json.dumps(payload, sort_keys=True, separators=(",", ":"))

    def size(skip: str | None) -> int:
        text = "\0".join([head if skip != "config" else "{}"] + [f"{k}\n{s}" for k, s in sources.items() if k != skip])
        return len(brotli.compress(text.encode(), **BROTLI))

    full = size(None)
    rows = [{"module": k, "minified": len(s), "compressed": full - size(k)} for k, s in sources.items()]
    rows.sort(key=lambda r: -r["compressed"])
    return [{"module": "config", "minified": len(head), "compressed": full - size("config")}, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--breakdown", metavar="EXP", help="the cost of each packed module of one experiment")
    args = ap.parse_args()
    if args.breakdown:
        rows = breakdown(args.breakdown)
        for r in rows:
            print(figures_line(r))
        save_json(args.json, {"experiment": args.breakdown, "modules": rows})
        return
    rows = [measure(exp, args.repeat) for exp in experiments()]
    for r in rows:
        print(figures_line(r))
    save_json(args.json, {"experiments": rows})


if __name__ == "__main__":
    main()
