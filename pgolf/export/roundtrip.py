"""The round trip: the artifact re-read from disk, scored by the final eval modes, printed as the
reference's `final_<label>_roundtrip` / `final_<label>_sliding_window` lines."""

from __future__ import annotations

import torch

from pgolf.eval.core import EvalContext
from pgolf.eval.modes import run_mode
from pgolf.export.config import ExportReport
from pgolf.export.weights import load_artifact_model
from pgolf.runlog import log0


def final_eval_modes(names, stride: int = 64, reference_tail: bool = False) -> dict[str, dict]:
    """The end-of-training evaluations (`final_eval` of conf/train.yaml) as {name: settings}: `sliding`
    takes the run's `stride` and `reference_tail`, every other mode its registered defaults (the values of
    conf/eval/<name>.yaml)."""
    return {n: {"stride": stride, "reference_tail": reference_tail} if n == "sliding" else {} for n in names}


def log_key(label: str, mode: str) -> str:
    """The reference's names: `final_<label>_roundtrip` (standard), `final_<label>_sliding_window`."""
    return {"standard": f"final_{label}_roundtrip", "sliding": f"final_{label}_sliding_window"}.get(
        mode, f"final_{label}_{mode}"
    )


def roundtrip_evaluate(report: ExportReport, tokens: torch.Tensor, ctx: EvalContext, modes: dict[str, dict]) -> dict:
    """Re-read the artifact from disk onto `ctx.device`, score `tokens` with every mode of `modes`
    ({name: settings}, see `final_eval_modes`), print the round-trip lines; returns
    {"roundtrip": {mode: result dict}, "size_ok", "total_bytes"}."""
    model, _ = load_artifact_model(report.path, ctx.device)
    res = {name: run_mode(name, settings, model, tokens, ctx) for name, settings in modes.items()}
    for mode, r in res.items():
        key = log_key(report.label, mode)
        extra = f" stride:{r.settings['stride']}" if mode == "sliding" else ""
        log0(f"{key} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{1000 * r.seconds:.0f}ms")
        log0(f"{key}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    if not report.size_ok:
        log0(f"FAIL: total submission size {report.total_bytes} bytes exceeds the {report.limit_bytes}-byte limit")
    return {
        "roundtrip": {m: r.to_dict() for m, r in res.items()},
        "size_ok": report.size_ok,
        "total_bytes": report.total_bytes,
    }
