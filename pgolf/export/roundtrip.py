"""The round trip: the artifact re-read from disk, scored by the final eval modes, printed as the
reference's `final_<label>_roundtrip` / `final_<label>_sliding_window` lines. A mode run with a record's
windows or document rules prints the record's metric on those lines and, after them, pgolf's
each-target-once figure from the same pass (`..._once_exact`).

Each pass over the validation set prints progress lines (`EvalProgress`) and names its phase for a SIGTERM
(pgolf/runlog.py). The standard pass is not run again when it would give the pre-quantization pass's number
exactly (`lossless_reuse`: the artifact's de-quantized weights are bit-identical to the float weights that
pass scored, with the same code, windows, precision and no compilation); the log and results.json say so.
`final_eval.max_tokens` scores only the first N validation targets (`final_eval_tokens`): a quick look, not
the challenge's metric, so every result is marked `compliant: false`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields

import torch

from pgolf.eval.core import EvalContext, EvalResult, TargetLog, dist_info
from pgolf.eval.modes import get_mode, parse_mode, run_mode
from pgolf.export.config import ExportReport
from pgolf.export.weights import load_written_model
from pgolf.model.gpt import GPT
from pgolf.runlog import Progress, log0, set_phase

MAX_TOKENS_REASON = "max_tokens: not the full validation set"  # the words of eval.py's results (pgolf/eval/run.py)
VAL_MAX_TOKENS_REASON = "data.val_max_tokens: not the full validation set"  # a debug run's cut split


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
    extra = f" stride:{r.settings['stride']}" if "stride" in r.settings and r.mode == "sliding" else ""
    log0(f"{key} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{1000 * r.seconds:.0f}ms")
    log0(f"{key}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    if r.once is not None:
        o = r.once
        log0(
            f"{key}_once_exact val_loss:{o['val_loss']:.8f} val_bpb:{o['val_bpb']:.8f} tokens:{o['tokens']} "
            f"(pgolf's each-target-once figure; the record's metric above: {r.scoring})"
        )


class EvalProgress(TargetLog):
    """Progress of one evaluation pass: every eval mode hands each batch's scored targets to
    `EvalContext.log` (`EvalContext.record`); this log counts them into a `pgolf.runlog.Progress` and keeps
    no per-target arrays (`arrays()` is empty)."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def add(self, index: torch.Tensor, nll: torch.Tensor, nbytes: torch.Tensor) -> None:
        self.progress.advance(index.numel())


def with_progress(ctx: EvalContext, phase: str, tokens: torch.Tensor, every_seconds: float | None) -> EvalContext:
    """`ctx` with a log that prints progress lines of `phase` every `every_seconds` (None: none), counting
    the targets this rank scores against its share of the stream (1-D `tokens`): a mode that re-scores
    targets can pass 100% a little before it ends."""
    _, world = dist_info()
    return dataclasses.replace(
        ctx, log=EvalProgress(Progress(phase, (tokens.numel() - 1) // world, "targets", every_seconds))
    )


def final_eval_tokens(tokens: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The validation stream (1-D, targets + 1 tokens) the final evaluations score: all of it, or with
    `max_tokens` its first max_tokens targets rounded down to whole `seq_len` windows (at least one), as
    eval.py's `max_tokens` does: NOT the challenge's metric."""
    if max_tokens is None:
        return tokens
    keep = min(max(int(max_tokens) // seq_len, 1) * seq_len, tokens.numel() - 1)
    return tokens[: keep + 1]


def lossless_reuse(
    model: GPT, float_gpt: GPT | None, pre: EvalResult | None, settings: dict, tokens: torch.Tensor, ctx: EvalContext
) -> bool:
    """Whether the round trip's standard pass with `settings` would give exactly `pre`, the float model's
    standard pass (`pgolf.export.stages.pre_quant_diagnostic`, run eagerly with `ctx`'s precision on these
    `tokens`): the artifact's model `model` has the same config and bit-identical weights as `float_gpt`
    (a lossless export, e.g. `store: fp32` rules), the windows (`seq_len`) and targets are the same, and the
    round trip is not compiled (compiled kernels may round differently)."""
    if pre is None or float_gpt is None or ctx.compile or pre.mode != "standard":
        return False
    _, st = parse_mode("standard", settings, seq_len=ctx.seq_len, batch_windows=ctx.batch_windows)
    if st.seq_len != pre.settings.get("seq_len") or pre.targets != tokens.numel() - 1 or model.cfg != float_gpt.cfg:
        return False
    a, b = model.state_dict(), float_gpt.state_dict()
    if a.keys() != b.keys():
        return False
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def roundtrip_evaluate(
    report: ExportReport,
    tokens: torch.Tensor,
    ctx: EvalContext,
    modes: dict[str, dict],
    *,
    pre: EvalResult | None = None,
    float_gpt: GPT | None = None,
    progress_every: float | None = None,
    partial: str | None = None,
) -> dict:
    """Re-read the artifact from disk onto `ctx.device`, score `tokens` (1-D) with every mode of `modes`
    ({name: settings}, see `final_eval_modes`), print the round-trip lines; returns
    {"roundtrip": {mode: result dict}, "size_ok", "total_bytes"}.

    `pre` (the float model's standard result, computed on these tokens) and `float_gpt` (that model) let
    the standard mode reuse `pre` when `lossless_reuse` says it would give the same number (its result then
    has `reused_from: "pre_quant"` and 0 s). `progress_every`: seconds between progress lines (None: none).
    `partial`: why `tokens` is not the whole validation split (MAX_TOKENS_REASON, VAL_MAX_TOKENS_REASON), if
    it is not; it marks every result `compliant: false`."""
    model, _ = load_written_model(report.path, ctx.device)  # the file this run just wrote
    res: dict[str, EvalResult] = {}
    reused: set[str] = set()
    for i, (name, settings) in enumerate(modes.items()):
        set_phase(f"the round trip ({name})")
        if (settings or {}).get("mode", name) == "standard" and lossless_reuse(
            model, float_gpt, pre, settings, tokens, ctx
        ):
            res[name] = dataclasses.replace(pre, mode=name, seconds=0.0, windows_per_second=0.0)
            reused.add(name)
            log0(
                f"final_eval:{name} reused the DIAGNOSTIC pre_quant figure: the artifact's weights are bit-identical "
                "to the float weights it scored (same windows, precision, uncompiled)"
            )
            continue
        log0(f"final_eval:{name} ({i + 1}/{len(modes)}) on {tokens.numel() - 1:,} targets", file=False)
        res[name] = run_mode(
            name, settings, model, tokens, with_progress(ctx, f"final_eval {name}", tokens, progress_every)
        )
    set_phase("the end of the round trip")
    for mode, r in res.items():
        log_result(log_key(report.label, mode), r)
    if not report.size_ok:
        log0(f"FAIL: total submission size {report.total_bytes} bytes exceeds the {report.limit_bytes}-byte limit")
    out = {m: r.to_dict() for m, r in res.items()}
    for m, d in out.items():
        if m in reused:
            d["reused_from"] = "pre_quant"
        if partial is not None:
            d["compliant"], d["reason"] = False, f"{partial}; {d['reason']}"
    return {"roundtrip": out, "size_ok": report.size_ok, "total_bytes": report.total_bytes}
