"""The round trip: the artifact re-read from disk, scored by the final eval modes, printed as the
reference's `final_<label>_roundtrip` / `final_<label>_sliding_window` lines."""

from __future__ import annotations

import torch

from pgolf.eval.core import EvalResult, run_mode
from pgolf.export.config import ExportReport
from pgolf.export.weights import load_artifact_model
from pgolf.runlog import log0


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
