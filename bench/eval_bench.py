"""Evaluation-throughput benchmark: `python bench/eval_bench.py [--tokens N] [--modes standard,sliding]
[--artifact PATH] [hydra overrides...]`.

Scores N random validation tokens (or the experiment's model from an artifact) with each mode and prints
seconds, tokens/s, windows/s, and the extrapolation to the 62,021,632-token FineWeb validation set.
Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import compose, model_from_cfg

from pgolf.evaluate import run_mode
from pgolf.export import load_artifact_model
from pgolf.tokenizer import ByteLUTs

FINEWEB_VAL_TARGETS = 62_021_632


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--modes", default="standard,sliding")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--batch-windows", type=int, default=32)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--json", default=None)
    args, overrides = ap.parse_known_args()
    cfg = compose("train", overrides)
    cuda = cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = load_artifact_model(args.artifact, device)[0] if args.artifact else model_from_cfg(cfg).to(device).eval()
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if cfg.train.compile else model
    S = cfg.train.seq_len
    V = model.cfg.vocab_size
    n = (args.tokens // S) * S
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(0))
    luts = ByteLUTs(
        torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool)
    ).to(device)
    autocast = torch.bfloat16 if cuda else None
    out = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "seq_len": S, "tokens": n, "modes": {}}
    for mode in args.modes.split(","):
        settings = {"mode": mode, **({"stride": args.stride} if mode == "sliding" else {})}
        run_mode(
            mode,
            settings,
            fwd,
            tokens[: S * 2 + 1],
            luts=luts,
            device=device,
            autocast_dtype=autocast,
            batch_windows=args.batch_windows,
            seq_len=S,
        )  # warm-up / compile
        r = run_mode(
            mode,
            settings,
            fwd,
            tokens,
            luts=luts,
            device=device,
            autocast_dtype=autocast,
            batch_windows=args.batch_windows,
            seq_len=S,
        )
        windows = r.settings.get("windows", n // S)
        fig = {
            "seconds": round(r.seconds, 3),
            "tokens_per_s": round(r.tokens / r.seconds),
            "windows_per_s": round(windows / r.seconds, 1),
            "extrapolated_fineweb_val_s": round(r.seconds * FINEWEB_VAL_TARGETS / r.tokens, 1),
        }
        out["modes"][mode] = fig
        print(mode, " ".join(f"{k}:{v}" for k, v in fig.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
