"""The export as named stages (the export callback and the re-export command call `export_model`).

Stages, in order: the float model's diagnostic eval (every rank), then on rank 0: save the float weights
for re-export, calibration and Hessians when a rule uses full GPTQ (PR #1019,
records/track_10min_16mb/2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072), quantize by the configured rules,
selective ±1 pruning to the size target (PR #609), pack, compress, write (atomic), the size under other
codecs; then the size report against 16,000,000 bytes. One `Stopwatch` times the stages into the report's
`timings` and the `export_time:` log line. Settings and report: pgolf/export/config.py; round trip:
pgolf/export/roundtrip.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pgolf import optional
from pgolf.eval.core import EvalContext, EvalResult
from pgolf.eval.modes import run_mode
from pgolf.export import gptq_stage, prune_stage  # noqa: F401  (register the optional stages: pgolf/optional.py)
from pgolf.export.code import code_bytes
from pgolf.export.config import ExportConfig, ExportContext, ExportReport
from pgolf.export.weights import save_float_weights
from pgolf.io import atomic_write_bytes
from pgolf.model.gpt import GPT
from pgolf.quant import lqer  # noqa: F401  (registers the optional part lqer: pgolf/optional.py)
from pgolf.quant.artifact import DEFAULT_LEVELS, SizeReport, codec_sizes, encode_artifact, pack
from pgolf.quant.rules import QuantEntry, QuantRule, quantize_state, rules_from_config, uses_gptq
from pgolf.quant.settings import GPTQSettings, compliance
from pgolf.runlog import log0


class Stopwatch:
    """Seconds per named stage, in the order the stages ran (the report's `timings`, rounded to ms)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name`; a block that raises records nothing."""
        t0 = time.perf_counter()
        yield
        self.record(name, time.perf_counter() - t0)

    def record(self, name: str, seconds: float) -> None:
        """A stage timed elsewhere (calibration, Hessians, GPTQ's share of quantization, pruning)."""
        self.timings[name] = round(seconds, 3)

    def line(self, target: str) -> str:
        """The `export_time: save_float:0.12s ... -> final_model.<label>.ptz` log line."""
        parts = " ".join(f"{k}:{v:.2f}s" for k, v in self.timings.items())
        return f"export_time: {parts} -> {target}"


@dataclass(kw_only=True)
class Written:
    """What rank 0's stages produced; the defaults are what the other ranks report (they write nothing)."""

    model_bytes: int = 0
    calibration: dict | None = None  # the artifact's `calibration` record
    prune: dict | None = None  # `prune_to_target`'s report
    codec_sizes: dict[str, int] = field(default_factory=dict)  # "codec-level" -> model bytes
    float_path: str | None = None


def export_model(
    gpt: GPT,
    cfg: ExportConfig,
    run_dir: str | Path,
    meta: dict,
    rank: int = 0,
    val_tokens: torch.Tensor | None = None,
    eval_ctx: EvalContext | None = None,
    ctx: ExportContext | None = None,
) -> ExportReport:
    """Quantize `gpt` and write `run_dir/cfg.path_name` (rank 0 only); with `val_tokens` (the validation
    stream, 1-D) and `eval_ctx`, first score the float model. `meta` goes into the artifact's metadata.
    Returns the report on every rank (other ranks: 0 model bytes, no timings). Raises RuntimeError when the
    size pruning measured differs from the size written."""
    ctx = ctx or ExportContext(seed=int(meta.get("seed", 0)))
    run_dir = Path(run_dir)
    path = run_dir / cfg.path_name
    pre = pre_quant_diagnostic(gpt, val_tokens, eval_ctx) if val_tokens is not None else None
    n_code = code_bytes(meta)  # the packed train_gpt.py of the run (meta["code"]), pgolf/export/code.py
    clock = Stopwatch()
    out = write_artifact_stages(gpt, cfg, ctx, meta, run_dir, n_code, clock) if rank == 0 else Written()
    size = SizeReport(model_bytes=out.model_bytes, code_bytes=n_code, limit=cfg.limit_bytes)
    if rank == 0:
        log_size_report(cfg, size, out.codec_sizes)
        log0(clock.line(path.name))
    return ExportReport(
        path=str(path),
        label=cfg.label,
        model_bytes=out.model_bytes,
        code_bytes=n_code,
        total_bytes=size.total,
        limit_bytes=cfg.limit_bytes,
        size_ok=size.ok,
        quantize_seconds=clock.timings.get("quantize", 0.0),
        write_seconds=clock.timings.get("compress", 0.0) + clock.timings.get("write", 0.0),
        pre_quant=pre.to_dict() if pre is not None else None,
        calibration=out.calibration,
        prune=out.prune,
        codec_sizes=out.codec_sizes,
        timings=clock.timings,
        float_path=out.float_path,
    )


def write_artifact_stages(
    gpt: GPT, cfg: ExportConfig, ctx: ExportContext, meta: dict, run_dir: Path, n_code: int, clock: Stopwatch
) -> Written:
    """Rank 0's stages, each timed by `clock`: save_float, calibration + hessians, quantize (+ gptq), prune,
    pack, compress, write, codec_report."""
    state = float_state(gpt)
    rules = rules_from_config(cfg.rules)
    art_meta = artifact_meta(gpt, cfg, meta, rules, n_code)
    float_path = None
    if cfg.save_float:
        with clock.stage("save_float"):
            float_path = save_float(gpt, state, meta, run_dir / cfg.float_filename)
    hessians, calibration = calibration_stage(gpt, cfg, ctx, rules, clock)
    art_meta["calibration"] = calibration
    entries = quantize_stage(state, rules, hessians, cfg.gptq, clock)
    if cfg.lqer.enabled:
        with clock.stage("lqer"):
            entries, art_meta["lqer"] = optional.get("lqer")(entries, state, cfg.lqer, log=log0)
    prune_report = None
    if cfg.prune.enabled:
        entries, art_meta["prune"], prune_report = optional.get("prune")(entries, cfg, art_meta, n_code)
        clock.record("prune", prune_report["seconds"])
    with clock.stage("pack"):
        raw = pack(entries, art_meta)
    with clock.stage("compress"):
        data = encode_artifact(raw, cfg.codec, cfg.level)
    with clock.stage("write"):
        atomic_write_bytes(run_dir / cfg.path_name, data)
    if prune_report is not None and len(data) != prune_report["model_bytes"]:
        raise RuntimeError(f"pruning measured {prune_report['model_bytes']} bytes but {len(data)} were written")
    return Written(
        model_bytes=len(data),
        calibration=calibration,
        prune=prune_report,
        codec_sizes=codec_report(raw, len(data), cfg, clock),
        float_path=float_path,
    )


# ---- the stages ----------------------------------------------------------------------------------
def pre_quant_diagnostic(
    gpt: GPT, tokens: torch.Tensor, eval_ctx: EvalContext | None, reuse: EvalResult | None = None, why: str = ""
) -> EvalResult:
    """The float model's standard eval of `tokens` (1-D), uncompiled, logged as `DIAGNOSTIC pre_quant
    val_loss:… val_bpb:… eval_time:…ms`; the model's train/eval mode is restored. `eval_ctx.log` receives
    the scored targets (a progress counter: pgolf/export/roundtrip.py's `with_progress`). With `reuse`, a
    result that already scored these weights on the same windows (the export callback's last validation;
    `why` says how it decided), nothing is evaluated: the line gives its figures, 0 ms and `(reused: why)`.
    ValueError without `eval_ctx` when there is something to evaluate."""
    if reuse is not None:
        log0(
            f"DIAGNOSTIC pre_quant val_loss:{reuse.val_loss:.4f} val_bpb:{reuse.val_bpb:.4f} eval_time:0ms "
            f"(reused: {why})"
        )
        return reuse
    if eval_ctx is None:
        raise ValueError("the pre-quantization eval needs an eval context with the validation tokens")
    was_training = gpt.training
    gpt.eval()
    try:
        pre = run_mode("standard", {}, gpt, tokens, replace(eval_ctx, compile=False))
    finally:
        gpt.train(was_training)
    ms = 1000 * pre.seconds
    log0(f"DIAGNOSTIC pre_quant val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f} eval_time:{ms:.0f}ms")
    return pre


def float_state(gpt: GPT) -> dict[str, torch.Tensor]:
    """The state dict on the CPU (what is quantized and saved), each tensor in its parameter dtype: fp32, or
    bf16 for the embedding tables of `embed_dtype: bf16`, which the artifact records as their original dtype
    and dequantizes back to, as the records' `(q * s).to(bf16)` does."""
    return {k: v.detach().cpu() for k, v in gpt.state_dict().items()}


def artifact_meta(gpt: GPT, cfg: ExportConfig, meta: dict, rules: list[QuantRule], n_code: int) -> dict:
    """The artifact's metadata: `meta` + model config + the quantization scheme + code bytes (the stages add
    `calibration` and `prune`)."""
    quant = {"label": cfg.label, "codec": cfg.codec, "level": cfg.level, "rules": cfg.rules}
    if uses_gptq(rules):
        quant["gptq"] = asdict(cfg.gptq)
    if cfg.lqer.enabled:
        quant["lqer"] = asdict(cfg.lqer)
    return {**meta, "model": gpt.cfg.to_dict(), "quant": quant, "code_bytes": n_code}


def save_float(gpt: GPT, state: dict[str, torch.Tensor], meta: dict, path: Path) -> str:
    """Save the float weights with `meta` (less any `calibration` record) and the model config."""
    fmeta = {k: v for k, v in meta.items() if k != "calibration"}
    return str(save_float_weights(path, state, {**fmeta, "model": gpt.cfg.to_dict()}))


def calibration_stage(
    gpt: GPT, cfg: ExportConfig, ctx: ExportContext, rules: list[QuantRule], clock: Stopwatch
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Calibration and Hessians when a rule uses GPTQ (timed as `calibration` and `hessians`), else none.
    Returns (the Hessians or None, the artifact's `calibration` record) and logs the record."""
    hessians = None
    if uses_gptq(rules):
        hessians, record = optional.get("gptq_calibration")(gpt, cfg, ctx)
        clock.record("calibration", record["seconds"])
        clock.record("hessians", record["hessian_seconds"])
    else:
        record = {"source": "none", **compliance("none", 0.0, ctx.train_time_ms, ctx.cap_ms)}
    log_calibration(record)
    return hessians, record


def log_calibration(record: dict) -> None:
    """The `calibration: source:… compliant:… reason:…` line, and a WARNING line when not compliant."""
    inside = record.get("inside_training_budget")
    log0(
        f"calibration: source:{record['source']} inside_training_budget:{'n/a' if inside is None else inside} "
        f"compliant:{str(record['compliant']).lower()} reason:{record['reason']}"
    )
    if not record["compliant"]:
        log0(f"WARNING: calibration not compliant: {record['reason']}")


def quantize_stage(
    state: dict[str, torch.Tensor],
    rules: list[QuantRule],
    hessians: dict[str, torch.Tensor] | None,
    gptq: GPTQSettings,
    clock: Stopwatch,
) -> dict[str, QuantEntry]:
    """Every tensor by its rule (timed as `quantize`; the part spent in full GPTQ also as `gptq`). A
    `gptq:extra_damp` line names each tensor whose Hessian needed more than the configured damping."""
    per_method: dict[str, float] = {}
    with clock.stage("quantize"):
        entries = quantize_state(state, rules, hessians, gptq, per_method)
    clock.record("gptq", per_method.get("gptq", 0.0))
    for name, e in entries.items():
        if e.info.get("extra_damp"):
            log0(f"gptq:extra_damp tensor:{name} extra:{e.info['extra_damp']:g} (Hessian not positive definite)")
    return entries


def codec_report(raw: bytes, model_bytes: int, cfg: ExportConfig, clock: Stopwatch) -> dict[str, int]:
    """The artifact's size under its own codec and under each of `report_codecs` at its default level
    (timed as `codec_report` when any is asked for)."""
    sizes = {f"{cfg.codec}-{cfg.level}": model_bytes}
    if cfg.report_codecs:
        with clock.stage("codec_report"):
            for c in cfg.report_codecs:
                if f"{c}-{DEFAULT_LEVELS[c]}" not in sizes:
                    sizes.update(codec_sizes(raw, [c]))
    return sizes


def log_size_report(cfg: ExportConfig, size: SizeReport, sizes: dict[str, int]) -> None:
    """The size lines (model, code, total against the limit) and one `codec_report` line per codec."""
    for line in size.lines(cfg.size_tag):
        log0(line)
    for key, n in sizes.items():
        r = SizeReport(model_bytes=n, code_bytes=size.code_bytes, limit=cfg.limit_bytes)
        log0(f"codec_report {key}: model {n} bytes total {r.total} bytes margin {r.margin}")
