"""Training-step benchmark: `python bench/train_bench.py [--steps N] [--warmup W] [hydra overrides...]`.

Runs N optimizer steps of any experiment's model, optimizer, batch and precision on whatever device is
present (random tokens, so no data is needed) and prints the median ms/step after warm-up, tokens/s, model
FLOPs per token, an MFU estimate and peak memory. Grad accumulation is the experiment's (8/world on one
device). Example: `python bench/train_bench.py experiment=baseline trainer=gpu --steps 200`.
Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import compose, device_peak, flops_per_token, median_ms, model_from_cfg, save_json, sync
from omegaconf import OmegaConf

from pgolf.optim.groups import build_optimizer
from pgolf.train.build import grad_accum_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the median (compilation)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args, overrides = ap.parse_known_args()
    cfg = compose("train", overrides)
    cuda = cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model_from_cfg(cfg).to(device)
    opt = build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True))
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if cfg.train.compile else model
    accum = grad_accum_of(cfg)  # single process: 8 micro-steps per step unless train.grad_accum says otherwise
    world = 1
    T = cfg.train.seq_len
    micro_tokens = cfg.train.batch_tokens // (world * accum)
    B = micro_tokens // T
    bf16 = "bf16" in str(cfg.trainer.precision)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and bf16) else contextlib.nullcontext()
    g = torch.Generator(device="cpu").manual_seed(0)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + args.warmup):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(accum):
            x = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=g).to(device, non_blocking=True)
            with amp:
                loss = fwd(x[:, :-1], x[:, 1:])
            (loss / accum).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    ms = median_ms(times)
    tok_s = cfg.train.batch_tokens / world / (ms / 1000)
    fpt = flops_per_token(model, T)
    peak, how = device_peak(device)
    mfu = tok_s * fpt / (peak * 1e12)
    out = {
        "experiment": cfg.name,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "precision": str(cfg.trainer.precision),
        "compile": bool(cfg.train.compile),
        "params": sum(p.numel() for p in model.parameters()),
        "batch_tokens": cfg.train.batch_tokens,
        "seq_len": T,
        "grad_accum": accum,
        "steps_timed": len(times),
        "median_ms_per_step": round(ms, 2),
        "tokens_per_s": round(tok_s),
        "model_flops_per_token": fpt,
        "peak_tflops": round(peak, 2),
        "peak_source": how,
        "mfu": round(mfu, 4),
        "peak_mem_mib": torch.cuda.max_memory_allocated() // 2**20 if cuda else None,
        "final_loss": round(loss.item(), 4),
    }
    for k, v in out.items():
        print(f"{k}: {v}")
    save_json(args.json, out)


if __name__ == "__main__":
    main()
