"""The round trip: the artifact re-read from disk, scored by the final eval modes, printed as the
reference's `final_<label>_roundtrip` / `final_<label>_sliding_window` lines. A mode run with a record's
windows or document rules prints the record's metric on those lines and, after them, pgolf's
each-target-once figure from the same pass (`..._once_exact`)."""

from __future__ import annotations

from dataclasses import fields

import torch

from pgolf.eval.core import EvalContext, EvalResult
from pgolf.eval.modes import get_mode, parse_mode, run_mode
from pgolf.export.config import ExportReport
from pgolf.export.weights import load_artifact_model
from pgolf.runlog import log0


def final_eval_modes(
    names, stride: int = 64, reference_tail: bool = False, settings: dict | None = None
) -> dict[str, dict]:
    """The end-of-training evaluations (`final_eval` of conf/train.yaml) as {name: settings}. Every mode
    starts from its registered defaults (the values of conf/eval/<name>.yaml); every mode with a `stride`
    setting (sliding, ttt, the SLOT forms) takes the run's `stride`; with `reference_tail`, every mode with a
    `windows` setting (the same) runs the records' windows (`windows: reference`, PR #549's tail);
    `settings` ({name: {key: value}}) is applied last, e.g. `{"sliding": {"windows": "v5"}, "ttt": {"qat":
    "keep"}}`. Raises ValueError for a `settings` entry that names no mode of `names`."""
    settings = settings or {}
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"final_eval.settings names modes not in final_eval.modes: {unknown}")
    out = {}
    for name in names:
        own = dict(settings.get(name) or {})
        keys = {f.name for f in fields(get_mode(own.get("mode", name)).settings)}
        base = {"stride": stride} if "stride" in keys else {}
        if reference_tail and "windows" in keys:
            base["windows"] = "reference"
        out[name] = {**base, **own}
    return out


def final_eval_plan(final_eval: dict) -> dict[str, dict]:
    """`final_eval_modes` of a `final_eval` config ({modes, seq_len, batch_windows, stride, reference_tail,
    settings (optional)}), every mode's settings checked as the run will parse them: call it before
    training so a bad setting fails at once (ValueError naming the mode and key)."""
    ev = final_eval
    modes = final_eval_modes(ev["modes"], ev["stride"], ev.get("reference_tail", False), ev.get("settings"))
    for name, settings in modes.items():
        parse_mode(name, settings, seq_len=ev["seq_len"], batch_windows=ev["batch_windows"])
    return modes


def log_key(label: str, mode: str) -> str:
    """The reference's names: `final_<label>_roundtrip` (standard), `final_<label>_sliding_window`."""
    return {"standard": f"final_{label}_roundtrip", "sliding": f"final_{label}_sliding_window"}.get(
        mode, f"final_{label}_{mode}"
    )


def log_result(key: str, r: EvalResult) -> None:
    """The reference's two lines for one mode; for a record's metric, pgolf's each-target-once figure after."""
    extra = f" stride:{r.settings['stride']}" if r.mode == "sliding" else ""
    log0(f"{key} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{1000 * r.seconds:.0f}ms")
    log0(f"{key}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    if r.once is not None:
        o = r.once
        log0(
            f"{key}_once_exact val_loss:{o['val_loss']:.8f} val_bpb:{o['val_bpb']:.8f} tokens:{o['tokens']} "
            f"(pgolf's each-target-once figure; the record's metric above: {r.scoring})"
        )


def roundtrip_evaluate(report: ExportReport, tokens: torch.Tensor, ctx: EvalContext, modes: dict[str, dict]) -> dict:
    """Re-read the artifact from disk onto `ctx.device`, score `tokens` with every mode of `modes`
    ({name: settings}, see `final_eval_modes`), print the round-trip lines; returns
    {"roundtrip": {mode: result dict}, "size_ok", "total_bytes"}."""
    model, _ = load_artifact_model(report.path, ctx.device)
    res = {name: run_mode(name, settings, model, tokens, ctx) for name, settings in modes.items()}
    for mode, r in res.items():
        log_result(log_key(report.label, mode), r)
    if not report.size_ok:
        log0(f"FAIL: total submission size {report.total_bytes} bytes exceeds the {report.limit_bytes}-byte limit")
    return {
        "roundtrip": {m: r.to_dict() for m, r in res.items()},
        "size_ok": report.size_ok,
        "total_bytes": report.total_bytes,
    }
