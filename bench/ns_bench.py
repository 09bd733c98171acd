"""Newton-Schulz cost: `python bench/ns_bench.py [--model pr1263] [--steps 3] [--dtype float32]`.

Times one Muon optimizer step over all of a record model's Muon matrices (66 for the 11-layer stack) with
random gradients, for quintic-5 vs Polar-Express-4 (and -5), on whatever device is present, and prints the
median seconds per step, the share of it spent in Newton-Schulz, and the singular-value range each variant
leaves on one random 1536x512 matrix. Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import compose, figures_line, model_from_cfg, save_json, sync

from pgolf.optim.groups import partition_params
from pgolf.optim.muon_adam import MuonAdam
from pgolf.optim.newton_schulz import newton_schulz, ns_coefficients


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pr1263")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="NS dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model_from_cfg(compose("train", [f"model={a.model}"])).to(device)
    names = partition_params(model.named_parameters())["matrix"]
    named = dict(model.named_parameters())
    mats = [named[n] for n in names]
    g = torch.Generator(device="cpu").manual_seed(0)
    for p in mats:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    out = {"device": str(device), "dtype": str(dtype), "model": a.model, "matrices": len(mats),
           "elements": sum(p.numel() for p in mats), "variants": {}}  # fmt: skip
    G = torch.randn(1536, 512, generator=g).to(device)
    for kind, steps in [("quintic", 5), ("polar_express", 4), ("polar_express", 5)]:
        opt = MuonAdam(
            [dict(kind="muon", params=mats, lr=0.0, momentum=0.95, ns_kind=kind, ns_steps=steps)], ns_dtype=dtype
        )
        times, ns_times = [], []
        for i in range(a.steps + 1):
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            t1 = time.perf_counter()
            for p in mats:  # NS alone on the same shapes
                newton_schulz(p.grad, ns_coefficients(kind, steps), dtype=dtype)
            sync(device)
            if i > 0:
                times.append(t1 - t0)
                ns_times.append(time.perf_counter() - t1)
        s = torch.linalg.svdvals(newton_schulz(G, ns_coefficients(kind, steps), dtype=dtype).float())
        fig = {"step_s": round(statistics.median(times), 3), "ns_only_s": round(statistics.median(ns_times), 3),
               "sv_min": round(s.min().item(), 3), "sv_max": round(s.max().item(), 3)}  # fmt: skip
        out["variants"][f"{kind}-{steps}"] = fig
        print(f"{kind}-{steps}: " + figures_line(fig))
    save_json(a.json, out)


if __name__ == "__main__":
    main()
