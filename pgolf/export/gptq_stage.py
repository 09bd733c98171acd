"""The export's full-GPTQ stage (optional part `gptq_calibration`, pgolf/optional.py): calibration sequences
from the configured source, then the Hessians of every quantized linear (PR #1019,
records/track_10min_16mb/2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072). pgolf/export/stages.py runs it when
a rule uses `method: gptq`; the quantization itself is the part `gptq` (pgolf/quant/gptq.py).
"""

from __future__ import annotations

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
        output_head=needs_output_hessian(gpt, rules_from_config(cfg.rules)),
    )
    log0(f"gptq:hessians layers:{hinfo['layers']} tokens:{hinfo['tokens']} time:{hinfo['seconds']:.1f}s")
    used = info["seconds"] + hinfo["seconds"]
    comp = compliance(c.source, used, ctx.train_time_ms, ctx.cap_ms)
    record = {**info, "hessian_seconds": hinfo["seconds"], "hessian_layers": hinfo["layers"], **comp}
    return H, record
