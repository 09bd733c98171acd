"""Evaluation-throughput benchmark: `python bench/eval_bench.py [--tokens N] [--modes standard,sliding,...]
[--artifact PATH] [--compile] [hydra overrides...]`.

Modes are the configs of conf/eval/ (standard, sliding, ttt, lora_ttt, lora_ttt_1090, slot_1263, slot_1298,
causal_slot); override a mode's settings with `eval.<mode>.<key>=value` and the model/device with
training-config overrides (e.g. `model=pr1263 train.seq_len=2048 trainer=gpu`). Scores N random validation
tokens (so BOS, id 1, falls about once per vocab-size tokens: LoRA TTT sees documents of about that length)
with the experiment's model or an artifact's, and prints per mode: seconds, tokens/s, windows/s, and the
extrapolation to the 62,021,632-target FineWeb validation set on this one device (divide by the device
count for 8 GPUs). Each mode is first run on a short prefix (compilation, warm-up). Prints figures; it is
not a test.
"""

from __future__ import annotations

import argparse

import torch
from common import compose, figures_line, model_from_cfg, save_json
from omegaconf import OmegaConf

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext
from pgolf.eval.modes import run_mode
from pgolf.export.weights import load_artifact_model

FINEWEB_VAL_TARGETS = 62_021_632


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--modes", default="standard,sliding")
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--batch-windows", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (also: train.compile=true)")
    ap.add_argument("--json", default=None)
    args, overrides = ap.parse_known_args()
    modes = args.modes.split(",")
    eval_over = [o for o in overrides if o.startswith("eval.")]
    cfg = compose("train", [o for o in overrides if not o.startswith("eval.")])
    ecfg = compose("eval", [f"eval=[{','.join(modes)}]", "artifact=bench", *eval_over])
    cuda = cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    model = load_artifact_model(args.artifact, device)[0] if args.artifact else model_from_cfg(cfg).to(device).eval()
    S = cfg.train.seq_len
    V = model.cfg.vocab_size
    n = (args.tokens // S) * S
    tokens = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(0))
    luts = ByteLUTs(
        torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool)
    ).to(device)
    autocast = torch.bfloat16 if cuda else None
    compile_ = args.compile or bool(cfg.train.compile)
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = {"device": dev_name, "seq_len": S, "tokens": n, "compile": compile_, "modes": {}}
    ctx = EvalContext(luts, device, S, args.batch_windows, autocast_dtype=autocast, compile=compile_)
    for mode in modes:
        settings = OmegaConf.to_container(ecfg.eval[mode], resolve=True)
        run_mode(mode, settings, model, tokens[: S * 4 + 1], ctx)  # warm-up / compile
        r = run_mode(mode, settings, model, tokens, ctx)
        fig = {
            "seconds": round(r.seconds, 3),
            "tokens_per_s": round(r.tokens / r.seconds),
            "windows": r.windows,
            "windows_per_s": round(r.windows_per_second, 1),
            "extrapolated_fineweb_val_s": round(r.seconds * FINEWEB_VAL_TARGETS / r.tokens, 1),
            "val_bpb_random_tokens": round(r.val_bpb, 4),
        }
        out["modes"][mode] = fig
        print(mode, figures_line(fig), flush=True)
    save_json(args.json, out)


if __name__ == "__main__":
    main()
