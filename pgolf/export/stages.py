"""The export as plain functions (the export callback and the re-export command call these).

`export_model`: float-model diagnostic eval, the float weights saved for re-export, calibration and
Hessians when a rule uses GPTQ (SPEC §8.4-8.5), quantization by the configured rules, selective ±1 pruning
to the size target (SPEC §8.6), artifact write (rank 0, atomic) with size accounting against 16,000,000
bytes and a per-codec size report. Settings: pgolf/export/config.py; round trip: pgolf/export/roundtrip.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from pgolf.export.code import code_bytes
from pgolf.export.config import ExportConfig, ExportContext, ExportReport
from pgolf.export.roundtrip import evaluate_modes
from pgolf.export.weights import save_float_weights
from pgolf.io import atomic_write_bytes
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import (
    DEFAULT_LEVELS,
    SizeReport,
    codec_sizes,
    encode_artifact,
    pack,
)
from pgolf.quant.calibrate import calibrate, compliance
from pgolf.quant.gptq import collect_hessians
from pgolf.quant.prune import prune_to_target
from pgolf.quant.rules import QuantEntry, quantize_state, rules_from_config, uses_gptq
from pgolf.runlog import log0


def calibration_hessians(gpt: GPT, cfg: ExportConfig, ctx: ExportContext) -> tuple[dict, dict]:
    """Calibration sequences from the configured source, then the Hessians of every quantized linear;
    returns (hessians, the artifact's `calibration` record) and logs both steps."""
    c = cfg.calibration
    batches = ctx.train_batches() if c.source == "train" and ctx.train_batches is not None else None
    seqs, info = calibrate(
        gpt, c, seed=ctx.seed, train_batches=batches, device=ctx.device, autocast_dtype=ctx.autocast_dtype
    )
    log0(
        f"gptq:calibrating source:{c.source} count:{info['count']} length:{info['length']} "
        f"time:{info['seconds']:.1f}s tokens_per_s:{info['tokens_per_s']:.0f}"
    )
    H, hinfo = collect_hessians(
        gpt,
        seqs,
        batch=cfg.gptq.batch,
        damp=cfg.gptq.hessian_damp,
        device=ctx.device,
        autocast_dtype=ctx.autocast_dtype,
    )
    log0(f"gptq:hessians layers:{hinfo['layers']} tokens:{hinfo['tokens']} time:{hinfo['seconds']:.1f}s")
    used = info["seconds"] + hinfo["seconds"]
    comp = compliance(c.source, used, ctx.train_time_ms, ctx.cap_ms)
    record = {**info, "hessian_seconds": hinfo["seconds"], "hessian_layers": hinfo["layers"], **comp}
    return H, record


def log_calibration(record: dict) -> None:
    inside = record.get("inside_training_budget")
    log0(
        f"calibration: source:{record['source']} inside_training_budget:{'n/a' if inside is None else inside} "
        f"compliant:{str(record['compliant']).lower()} reason:{record['reason']}"
    )
    if not record["compliant"]:
        log0(f"WARNING: calibration not compliant: {record['reason']}")


def export_model(
    gpt: GPT,
    cfg: ExportConfig,
    run_dir: str | Path,
    meta: dict,
    rank: int = 0,
    val: dict | None = None,
    ctx: ExportContext | None = None,
) -> ExportReport:
    """Quantize `gpt` and write the artifact (rank 0). With `val`, first score the float model."""
    ctx = ctx or ExportContext(seed=int(meta.get("seed", 0)))
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
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in gpt.state_dict().items()
    }
    n_code = code_bytes()
    rules = rules_from_config(cfg.rules)
    quant_meta = {"label": cfg.label, "codec": cfg.codec, "level": cfg.level, "rules": cfg.rules}
    if uses_gptq(rules):
        quant_meta["gptq"] = asdict(cfg.gptq)
    full_meta = {**meta, "model": gpt.cfg.to_dict(), "quant": quant_meta, "code_bytes": n_code}
    model_bytes, timings, calib, prune_meta, prune_report, sizes, float_path = 0, {}, None, None, None, {}, None
    if rank == 0:
        if cfg.save_float:
            t = time.perf_counter()
            fmeta = {k: v for k, v in meta.items() if k != "calibration"}
            float_path = str(
                save_float_weights(run_dir / cfg.float_filename, state, {**fmeta, "model": gpt.cfg.to_dict()})
            )
            timings["save_float"] = round(time.perf_counter() - t, 3)
        hessians = None
        if uses_gptq(rules):
            hessians, calib = calibration_hessians(gpt, cfg, ctx)
            timings["calibration"], timings["hessians"] = calib["seconds"], calib["hessian_seconds"]
        else:
            calib = {"source": "none", **compliance("none", 0.0, ctx.train_time_ms, ctx.cap_ms)}
        full_meta["calibration"] = calib
        log_calibration(calib)
        t = time.perf_counter()
        per_method: dict[str, float] = {}
        entries = quantize_state(state, rules, hessians, cfg.gptq, per_method)
        timings["quantize"] = round(time.perf_counter() - t, 3)
        timings["gptq"] = round(per_method.get("gptq", 0.0), 3)
        if cfg.prune.enabled:
            entries, prune_meta, prune_report = _prune(entries, cfg, full_meta, n_code)
            full_meta["prune"] = prune_meta
            timings["prune"] = prune_report["seconds"]
        t = time.perf_counter()
        raw = pack(entries, full_meta)
        timings["pack"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        data = encode_artifact(raw, cfg.codec, cfg.level)
        timings["compress"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        atomic_write_bytes(path, data)
        timings["write"] = round(time.perf_counter() - t, 3)
        model_bytes = len(data)
        if prune_report is not None and model_bytes != prune_report["model_bytes"]:
            raise RuntimeError(f"pruning measured {prune_report['model_bytes']} bytes but {model_bytes} were written")
        sizes = {f"{cfg.codec}-{cfg.level}": model_bytes}
        t = time.perf_counter()
        for c in cfg.report_codecs:
            if f"{c}-{DEFAULT_LEVELS[c]}" not in sizes:
                sizes.update(codec_sizes(raw, [c]))
        if cfg.report_codecs:
            timings["codec_report"] = round(time.perf_counter() - t, 3)
    rep = SizeReport(model_bytes, n_code, cfg.limit_bytes)
    if rank == 0:
        for line in rep.lines(cfg.size_tag):
            log0(line)
        for key, n in sizes.items():
            r = SizeReport(n, n_code, cfg.limit_bytes)
            log0(f"codec_report {key}: model {n} bytes total {r.total} bytes margin {r.margin}")
        parts = " ".join(f"{k}:{v:.2f}s" for k, v in timings.items())
        log0(f"export_time: {parts} -> {path.name}")
    return ExportReport(
        str(path),
        cfg.label,
        model_bytes,
        n_code,
        rep.total,
        cfg.limit_bytes,
        rep.ok,
        timings.get("quantize", 0.0),
        timings.get("compress", 0.0) + timings.get("write", 0.0),
        pre.to_dict() if pre is not None else None,
        calib,
        prune_report,
        sizes,
        timings,
        float_path,
    )


def _prune(entries: dict[str, QuantEntry], cfg: ExportConfig, full_meta: dict, n_code: int):
    """Selective ±1 pruning so that code + model <= prune.total_bytes (default: the limit), decimal."""
    total = int(cfg.prune.total_bytes or cfg.limit_bytes)
    target = total - n_code
    if target <= 0:
        raise ValueError(f"prune target {total} bytes leaves no room for the model after {n_code} code bytes")

    def size_of(e: dict[str, QuantEntry], record: dict) -> int:
        return len(encode_artifact(pack(e, {**full_meta, "prune": record}), cfg.codec, cfg.level))

    log0(f"prune: target total {total} bytes - code {n_code} = model {target} bytes ({cfg.codec}-{cfg.level})")
    pruned, report = prune_to_target(entries, size_of, target, cfg.prune.bits, log=log0)
    record = {k: report[k] for k in ("target_model_bytes", "candidates", "zeroed", "bits")}
    verdict = "fits" if report["fits"] else "STILL OVER the target with every candidate zeroed"
    log0(
        f"prune: zeroed {report['zeroed']}/{report['candidates']} ±1 entries, model {report['model_bytes_before']} -> "
        f"{report['model_bytes']} bytes, {report['probes']} probes in {report['seconds']:.1f}s ({verdict})"
    )
    return pruned, record, report
