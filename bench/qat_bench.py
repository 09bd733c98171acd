"""Late QAT's cost before its switch: `python bench/qat_bench.py [--model pr1263] [--shapes 2x256,1x1024]
[--reps 10] [--threads N] [--compile aot_eager]`.

Forward+backward of a record model (default conf/model/pr1263.yaml, composed by Hydra as training does) in
train mode, fp32 on CPU (bf16 autocast on a GPU): `model.qat=late` before its switch against
`model.qat=off`, with the same weights, runs interleaved (A B C A B C ...) so that drift in machine load hits
every variant alike; C is late QAT after its switch, for reference. Prints the median ms of each and the
ratios late/off and on/off for each batch shape.

`--compile BACKEND` (aot_eager or inductor) then compiles the late-QAT model (fullgraph, static shapes),
runs it before the switch, flips the switch, and prints the number of compilations before and after it
(dynamo's frame counter), the seconds of the first call (compilation) and of the first call after the
switch (the recompilation), and the steady call time before and after. Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
from common import compose, figures_line, fwd_bwd, model_from_cfg, save_json


def variants(name: str, device: torch.device) -> dict:
    """{"late": before the switch, "off": no QAT, "on": late QAT switched on}, all with the same weights."""
    out = {}
    for label, qat in (("late", "late"), ("off", "off"), ("on", "late")):
        out[label] = model_from_cfg(compose("train", [f"model={name}", f"model.qat={qat}"])).to(device).train()
    for label in ("off", "on"):
        out[label].load_state_dict(out["late"].state_dict())
    out["on"].set_qat("late", enabled=True)
    return out


def interleaved(models: dict, x: torch.Tensor, reps: int, amp) -> dict[str, float]:
    """Median ms per variant over `reps` rounds of A B C ... (one warm-up round first)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(reps + 1):
        for label, m in models.items():
            dt = fwd_bwd(m, x, amp)
            if r > 0:
                times[label].append(dt)
    return {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}


def compile_switch(model, x: torch.Tensor, backend: str, amp) -> dict:
    """Compilation count and times around late QAT's switch of a compiled `model` (see the module docstring)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    cm = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    first = fwd_bwd(cm, x, amp)
    before = statistics.median(fwd_bwd(cm, x, amp) for _ in range(3))
    frames_before = counter.frame_count
    model.set_qat("late", enabled=True)
    recompile = fwd_bwd(cm, x, amp)
    after = statistics.median(fwd_bwd(cm, x, amp) for _ in range(3))
    return {
        "backend": backend,
        "compilations_before_switch": frames_before,
        "compilations_after_switch": counter.frame_count,
        "first_call_s": round(first, 2),
        "first_call_after_switch_s": round(recompile, 2),
        "steady_ms_before": round(1000 * before, 1),
        "steady_ms_after": round(1000 * after, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pr1263")
    ap.add_argument("--shapes", default="2x256,1x1024", help="batch x sequence, comma-separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", default=None, metavar="BACKEND", help="also measure the switch under torch.compile")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    models = variants(a.model, device)
    out = {"device": str(device), "threads": torch.get_num_threads(), "model": a.model, "reps": a.reps, "shapes": {}}
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        x = torch.randint(0, models["off"].cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        ms = interleaved(models, x.to(device), a.reps, amp)
        fig = {f"ms_{k}": v for k, v in ms.items()}
        fig |= {"late_over_off": round(ms["late"] / ms["off"], 3), "on_over_off": round(ms["on"] / ms["off"], 3)}
        out["shapes"][shape] = fig
        print(f"{a.model} {shape}: " + figures_line(fig))
    if a.compile:
        B, T = (int(v) for v in a.shapes.split(",")[0].split("x"))
        x = torch.randint(0, models["off"].cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        fig = compile_switch(models["late"], x.to(device), a.compile, amp)
        out["compile"] = fig
        print(f"{a.model} compile: " + figures_line(fig))
    save_json(a.json, out)


if __name__ == "__main__":
    main()
