"""The export's full-GPTQ stage (optional part `gptq_calibration`, pgolf/optional.py): calibration sequences
from the configured source, then the Hessians of every quantized linear (PR #1019,
records/track_10min_16mb/2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072), divided by `gptq.hessian_norm` and
left where GPTQ will run (`gptq.device`: cpu, as the records, or the model's device). pgolf/export/stages.py
runs it when a rule uses `method: gptq`; the quantization itself is the part `gptq` (pgolf/quant/gptq.py),
which runs where the Hessian it is given lives.
"""

from __future__ import annotations

from contextlib import nullcontext

from pgolf.export.config import ExportConfig, ExportContext
from pgolf.model.gpt import GPT
from pgolf.optional import register
from pgolf.quant.calibrate import calibrate
from pgolf.quant.gptq import collect_hessians, needs_output_hessian
from pgolf.quant.rules import rules_from_config
from pgolf.quant.settings import compliance
from pgolf.runlog import log0


@register("gptq_calibration")
def calibration_hessians(gpt: GPT, cfg: ExportConfig, ctx: ExportContext) -> tuple[dict, dict]:
    """Calibration sequences from the configured source, then the Hessians of every quantized linear;
    returns (hessians, the artifact's `calibration` record) and logs both steps."""
    c = cfg.calibration
    start = ctx.clock_ms() if ctx.clock_ms is not None else ctx.train_time_ms
    with ctx.run_clock() if ctx.run_clock is not None else nullcontext():
        batches = ctx.train_batches() if c.source == "train" and ctx.train_batches is not None else None
        files = ctx.train_files() if c.source == "train_shuffled" and ctx.train_files is not None else None
        seqs, info = calibrate(
            gpt,
            c,
            seed=ctx.seed,
            train_batches=batches,
            train_files=files,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
            autocast_dtype=ctx.autocast_dtype,
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
            output_head=needs_output_hessian(gpt, rules_from_config(cfg.rules)),
            norm=cfg.gptq.hessian_norm,
            out_device="cpu" if cfg.gptq.device == "cpu" else None,
            forward=cfg.gptq.hessian_forward,
        )
    log0(
        f"gptq:hessians layers:{hinfo['layers']} tokens:{hinfo['tokens']} batches:{hinfo['batches']} "
        f"divided_by:{hinfo['divided_by']} ({hinfo['norm']}) forward:{hinfo['forward']} "
        f"gptq_device:{cfg.gptq.device} time:{hinfo['seconds']:.1f}s"
    )
    used = info["seconds"] + hinfo["seconds"]
    start, end, kind = clock_span(start, used, ctx)
    if start is not None:  # on the clock: compliance is `end <= cap`
        used = (end - start) / 1000.0
    comp = compliance(c.source, used, start, ctx.cap_ms)
    stamps = {"clock_start_ms": start, "clock_end_ms": end, "clock": kind}
    record = {
        **info,
        "hessian_seconds": hinfo["seconds"],
        "hessian_layers": hinfo["layers"],
        "hessian_norm": hinfo["norm"],
        "hessian_forward": hinfo["forward"],
        "hessian_divisor": hinfo["divided_by"],
        **stamps,
        **comp,
    }
    cap = f"{ctx.cap_ms / 1000:.1f}s" if ctx.cap_ms else "none"
    if start is not None:
        log0(f"gptq:challenge_clock start:{start / 1000:.3f}s end:{end / 1000:.3f}s cap:{cap} ({kind})")
    return H, record


def clock_span(start_ms: float | None, seconds: float, ctx: ExportContext) -> tuple:
    """(start, end, kind): when calibration + Hessians started and ended on the challenge clock, in ms rounded
    to 0.1 ms, for the artifact's `calibration` record. Read from the clock that timed training when the export
    has it (`challenge`), else the recorded training time plus the stage's own `seconds` (`derived`); (None,
    None, `none`) without a training time."""
    if start_ms is None:
        return None, None, "none"
    if ctx.clock_ms is not None:
        end, kind = ctx.clock_ms(), "challenge"
    else:
        end, kind = start_ms + 1000.0 * seconds, "derived"
    return round(start_ms, 1), round(end, 1), kind
