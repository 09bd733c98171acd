"""Shared helpers for the benchmark scripts: config composition, FLOP counts, device facts."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf.model.config import GPTConfig  # noqa: E402
from pgolf.model.gpt import GPT  # noqa: E402

# Dense bf16 tensor-core peak (no sparsity), for the MFU estimate.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=overrides)


def model_from_cfg(cfg) -> GPT:
    from omegaconf import OmegaConf

    return GPT(GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))


def flops_per_token(model: GPT, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2·N_matmul per token forward (weights used in matmuls, including the output
    head; embedding look-ups excluded) plus causal attention 2·2·L·T·d/2 per token forward (QKᵀ and AV
    over on average T/2 keys); training = 3x forward."""
    cfg = model.cfg
    n = sum(
        p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "emb" not in name and "embed" not in name
    )
    n += cfg.vocab_size * cfg.model_dim  # output projection (tied or not)
    layers = len(cfg.layer_schedule)
    attn = 2 * layers * seq_len * cfg.model_dim  # 4·L·(T/2)·d
    fwd = 2 * n + attn
    return 3 * fwd if training else fwd


def device_peak(device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s, how it was obtained): the datasheet for known GPUs, else a measured fp32 matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_TFLOPS.items():
            if key in name:
                return v, f"{name} bf16 dense datasheet"
    a = torch.randn(1024, 1024, device=device)
    for _ in range(3):
        a @ a
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ a
    sync(device)
    dt = (time.perf_counter() - t) / n
    return 2 * 1024**3 / dt / 1e12, f"measured fp32 1024^3 matmul on {device.type}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(model, x: torch.Tensor, amp) -> float:
    """Seconds of one forward+backward of the loss on x [B, T+1]."""
    device = x.device
    sync(device)
    t0 = time.perf_counter()
    with amp:
        loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    sync(device)
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def figures_line(fig: dict) -> str:
    """`key:value` pairs on one line, the form every benchmark prints."""
    return " ".join(f"{k}:{v}" for k, v in fig.items())


def save_json(path: str | None, obj: dict) -> None:
    """Write the figures to `path` as JSON (nothing when no path was asked for)."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
