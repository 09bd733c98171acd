"""Forward+backward time per token: `python bench/model_bench.py [--models baseline,pr1263] [--batch 4]
[--seq 256] [--steps 5]`.

Random tokens, fp32 on CPU (bf16 autocast on a GPU), the full model including the loss; prints ms per
forward+backward, microseconds per token, tokens/s and model FLOPs per token for each model config.
`record_1611` is built at its record's vocabulary (8192) and timed in both states of its depth recurrence:
`record_1611` looping (layers 3-5 three times, from 35% of its training on) and `record_1611:no_loop`
(before). Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from common import compose, figures_line, flops_per_token, fwd_bwd, model_from_cfg, save_json

# Overrides that give a model group its record's setting where the default data group would not.
MODEL_OVERRIDES = {"record_1611": ["model.vocab_size=8192"]}  # PR #1611 trains on SP8192


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="baseline,pr1263")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out = {"device": str(device), "threads": torch.get_num_threads(), "batch": a.batch, "seq": a.seq, "models": {}}
    for name in a.models.split(","):
        model = model_from_cfg(compose("train", [f"model={name}", *MODEL_OVERRIDES.get(name, [])])).to(device).train()
        x = torch.randint(0, model.cfg.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0)).to(
            device
        )
        for looping in (True, False) if model.cfg.num_loops > 0 else (None,):
            if looping is not None:
                model.set_looping(looping)
            times = []
            for i in range(a.steps + 1):
                dt = fwd_bwd(model, x, amp)
                if i > 0:  # the first pass warms up
                    times.append(dt)
            t = statistics.median(times)
            n = a.batch * a.seq
            fig = {"params": sum(p.numel() for p in model.parameters()), "ms_per_fwd_bwd": round(1000 * t, 1),
                   "us_per_token": round(1e6 * t / n, 1), "tokens_per_s": round(n / t),
                   "model_flops_per_token": flops_per_token(model, a.seq)}  # fmt: skip
            label = name if looping in (None, True) else f"{name}:no_loop"
            out["models"][label] = fig
            print(f"{label}: " + figures_line(fig))
    save_json(a.json, out)


if __name__ == "__main__":
    main()
