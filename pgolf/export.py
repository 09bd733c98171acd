"""Export and round trip as plain functions (the export callback and the re-export command call these).

`export_model`: float-model diagnostic eval, quantization by the configured rules, artifact write (rank 0,
atomic) with size accounting against 16,000,000 bytes. `load_artifact_model`: the artifact -> a fresh GPT
with de-quantized weights (what `eval.py` and the round trip use; no checkpoint, no pickle).
`roundtrip_evaluate`: that model scored by the configured final eval modes, printed as reference lines.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.artifact import SizeReport, code_bytes, read_artifact, write_artifact
from pgolf.evaluate import EvalResult, run_mode
from pgolf.model import GPT, GPTConfig
from pgolf.quant import dequantize_state, quantize_state, rules_from_config
from pgolf.runlog import log0

# SPEC §8.1: the baseline int8 + zlib scheme as rules (first match wins).
BASELINE_RULES = [
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 8, "granularity": "row", "clip": 0.9999984},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": 0.9999984},
]


class OverBudgetError(RuntimeError):
    """The artifact (code + compressed model) is over the 16,000,000-byte limit."""


@dataclass
class ExportConfig:
    enabled: bool = True
    label: str = "int8_zlib"  # names the log lines: final_{label}_roundtrip
    codec: str = "zlib"
    level: int | None = 9
    rules: list[dict] = field(default_factory=lambda: [dict(r) for r in BASELINE_RULES])
    filename: str = "final_model.{label}.ptz"
    limit_bytes: int = ARTIFACT_LIMIT_BYTES
    fail_over_limit: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        d = dict(d)
        d["rules"] = [dict(r) for r in d.get("rules") or BASELINE_RULES]
        return cls(**d)

    @property
    def path_name(self) -> str:
        return self.filename.format(label=self.label)


@dataclass
class ExportReport:
    path: str
    label: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    limit_bytes: int
    size_ok: bool
    quantize_seconds: float
    write_seconds: float
    pre_quant: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def git_provenance(root: Path | None = None) -> dict:
    root = root or Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": bool(dirty) if dirty is not None else None}


def provenance() -> dict:
    import lightning

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        **git_provenance(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "device": dev,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluate_modes(
    model, *, tokens, luts, device, autocast_dtype, modes, seq_len, batch_windows, stride=64, reference_tail=False
) -> dict[str, EvalResult]:
    """The final evaluations after training: `standard` and/or `sliding` with the run's settings."""
    out = {}
    for mode in modes:
        settings = {"mode": mode, **({"stride": stride, "reference_tail": reference_tail} if mode == "sliding" else {})}
        out[mode] = run_mode(
            mode,
            settings,
            model,
            tokens,
            luts=luts,
            device=device,
            autocast_dtype=autocast_dtype,
            batch_windows=batch_windows,
            seq_len=seq_len,
        )
    return out


def export_model(
    gpt: GPT, cfg: ExportConfig, run_dir: str | Path, meta: dict, rank: int = 0, val: dict | None = None
) -> ExportReport:
    """Quantize `gpt` and write the artifact (rank 0). With `val`, first score the float model."""
    run_dir = Path(run_dir)
    pre = None
    if val is not None:
        v = dict(val)
        v["modes"] = ["standard"]
        was_training = gpt.training
        gpt.eval()
        pre = evaluate_modes(gpt, **v)["standard"]
        gpt.train(was_training)
        ms = 1000 * pre.seconds
        log0(f"DIAGNOSTIC pre_quant val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f} eval_time:{ms:.0f}ms")
    path = run_dir / cfg.path_name
    t0 = time.perf_counter()
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in gpt.state_dict().items()
    }
    n_code = code_bytes()
    full_meta = {
        **meta,
        "model": gpt.cfg.to_dict(),
        "quant": {"label": cfg.label, "codec": cfg.codec, "level": cfg.level, "rules": cfg.rules},
        "code_bytes": n_code,
    }
    model_bytes, tq, tw = 0, 0.0, 0.0
    if rank == 0:
        entries = quantize_state(state, rules_from_config(cfg.rules))
        tq = time.perf_counter() - t0
        t1 = time.perf_counter()
        model_bytes = write_artifact(path, entries, full_meta, cfg.codec, cfg.level)
        tw = time.perf_counter() - t1
    else:
        model_bytes = 0
    rep = SizeReport(model_bytes, n_code, cfg.limit_bytes)
    if rank == 0:
        for line in rep.lines(cfg.label.replace("_", "+")):
            log0(line)
        log0(f"export: quantize {tq:.2f}s write {tw:.2f}s -> {path.name}")
    return ExportReport(
        str(path),
        cfg.label,
        model_bytes,
        n_code,
        rep.total,
        cfg.limit_bytes,
        rep.ok,
        tq,
        tw,
        pre.to_dict() if pre is not None else None,
    )


def load_artifact_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A fresh GPT from an artifact: config from its metadata, de-quantized weights, eval mode."""
    entries, meta = read_artifact(path)
    cfg = GPTConfig.from_dict(meta["model"])
    model = GPT(cfg)
    state = dequantize_state(entries)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: artifact tensors do not match its model config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval(), meta


def roundtrip_evaluate(
    report: ExportReport,
    *,
    device,
    autocast_dtype,
    tokens,
    luts,
    modes=("standard",),
    seq_len,
    batch_windows,
    stride=64,
    reference_tail=False,
    compile_model=False,
) -> dict:
    """Re-read the artifact from disk, evaluate it, print the round-trip lines; returns a results dict."""
    model, meta = load_artifact_model(report.path, device)
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    res = evaluate_modes(
        fwd,
        tokens=tokens,
        luts=luts,
        device=device,
        autocast_dtype=autocast_dtype,
        modes=modes,
        seq_len=seq_len,
        batch_windows=batch_windows,
        stride=stride,
        reference_tail=reference_tail,
    )
    label = report.label
    for mode, r in res.items():
        key = f"final_{label}_roundtrip" if mode == "standard" else f"final_{label}_sliding_window"
        extra = f" stride:{stride}" if mode == "sliding" else ""
        log0(f"{key} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{1000 * r.seconds:.0f}ms")
        log0(f"{key}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    if not report.size_ok:
        log0(f"FAIL: total submission size {report.total_bytes} bytes exceeds the {report.limit_bytes}-byte limit")
    return {
        "roundtrip": {m: r.to_dict() for m, r in res.items()},
        "size_ok": report.size_ok,
        "total_bytes": report.total_bytes,
    }
