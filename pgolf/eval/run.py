"""What `eval.py` does, as a function: artifact -> eval modes -> eval_result.json (+ audit.npz).

audit.npz holds, for every mode, `<mode>.index` (target index in the validation stream, int64),
`<mode>.nll` (nats, float32) and `<mode>.bytes` (float32), sorted by index: one entry per scoring of the
mode's metric (a target the record's windows score twice appears twice, in scoring order).
`python -m pgolf.tools.audit` compares two of them (diff two models, or the flip test from outside).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf.data.stream import load_val_tokens
from pgolf.data.tokenizer import TokenizerInfo, build_byte_luts, load_tokenizer
from pgolf.eval.core import EvalContext, TargetLog, gather_log
from pgolf.eval.modes import parse_mode, run_mode
from pgolf.export.weights import load_artifact_model
from pgolf.io import atomic_path, atomic_write_bytes
from pgolf.runlog import log0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.accelerator asks for a GPU but CUDA is not available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_compile(compile, device: torch.device) -> bool:
    if compile in ("auto", None):
        return device.type == "cuda"
    if isinstance(compile, str):
        if compile.lower() not in ("true", "false"):
            raise ValueError(f"compile={compile!r}: expected auto, true or false")
        return compile.lower() == "true"
    return bool(compile)


def evaluate_artifact(
    *,
    artifact,
    modes: dict,
    data: dict,
    accelerator="cpu",
    batch_windows=32,
    seq_len=None,
    budget_seconds=600,
    audit=False,
    compile="auto",
    out_dir: Path,
) -> dict:
    """Score the artifact with every mode of `modes` ({name: settings}, conf/eval/) on the validation split
    of `data`, write eval_result.json (and audit.npz) to `out_dir` on rank 0; returns the result dict.

    Every mode's settings are checked before the data is read or any mode runs (ValueError); a tokenizer
    that is not the artifact's is refused."""
    if not modes:
        raise ValueError("no eval mode selected (eval=[standard,sliding,...])")
    device = pick_device(accelerator)
    use_compile = resolve_compile(compile, device)
    rank, world = init_distributed(device)
    model, meta = load_artifact_model(artifact, device)
    tok = TokenizerInfo.from_path(data["tokenizer_path"])
    tok.check_matches(meta["tokenizer"], what=f"artifact {Path(artifact).name}")
    train_seq = int(meta.get("train", {}).get("seq_len", 0) or 0)
    S = int(seq_len or train_seq or data.get("eval_seq_len") or 1024)
    for name, settings in modes.items():
        parse_mode(name, settings, seq_len=S, batch_windows=batch_windows)
    tokens = load_val_tokens(data["val_pattern"], max(S, train_seq), tok.vocab_size)
    luts = build_byte_luts(load_tokenizer(data["tokenizer_path"]), model.cfg.vocab_size).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    ctx = EvalContext(luts, device, S, batch_windows, autocast_dtype=autocast, compile=use_compile)
    t_all = time.perf_counter()
    results, arrays = run_all(model, tokens, ctx, modes, audit, budget_seconds)
    total = time.perf_counter() - t_all
    first = next(iter(results.values()))
    out = {
        **{k: first[k] for k in ("mode", "val_loss", "val_bpb", "tokens", "bytes", "seconds", "compliant")},
        "artifact": Path(artifact).name,
        "world_size": world,
        "eval_seconds_total": total,
        "budget_seconds": budget_seconds,
        "within_budget": total <= budget_seconds,
        "results": results,
    }
    log0(f"eval_time_total:{total:.1f}s budget:{budget_seconds}s within_budget:{str(total <= budget_seconds).lower()}")
    if rank == 0:
        write_outputs(out_dir, out, arrays if audit else None)
    return out


def run_all(model, tokens, ctx: EvalContext, modes: dict, audit: bool, budget_seconds: float) -> tuple[dict, dict]:
    """({name: result dict}, audit arrays {"<name>.index|nll|bytes": array}) of every mode, one log line each."""
    results, arrays = {}, {}
    for name, settings in modes.items():
        log = TargetLog() if audit else None
        r = run_mode(name, settings, model, tokens, replace(ctx, log=log))
        results[name] = r.to_dict()
        share = 100 * r.seconds / budget_seconds if budget_seconds else 0.0
        log0(
            f"{r.line(f'eval_{name}')} tokens:{r.tokens} windows_per_s:{r.windows_per_second:.1f} "
            f"budget_share:{share:.1f}% compliant:{str(r.compliant).lower()}"
        )
        if r.scoring != "each target once":
            log0(f"eval_{name}_scoring {r.scoring}")
        if r.once is not None:
            o = r.once
            log0(
                f"eval_{name}_once val_loss:{o['val_loss']:.8f} val_bpb:{o['val_bpb']:.8f} tokens:{o['tokens']} "
                "(pgolf's each-target-once figure, same pass)"
            )
        if audit:
            arrays.update({f"{name}.{k}": v for k, v in gather_log(log).items()})
    return results, arrays


def write_outputs(out_dir: Path, out: dict, arrays: dict | None) -> None:
    """eval_result.json and, with audit arrays, audit.npz, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "eval_result.json", (json.dumps(out, indent=2) + "\n").encode())
    if arrays is not None:
        with atomic_path(out_dir / "audit.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
