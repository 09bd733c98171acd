"""Quantize-and-export at the end of training, then the round trip (docs/techniques.md#export-pipeline, STYLE 8).

At `on_train_end` (after any weight-averaging callback listed before it has swapped in its weights, and
after the challenge clock, handed in at construction, has stopped):
evaluate the float model (`DIAGNOSTIC pre_quant`), save the float weights for re-export, calibrate and
collect Hessians if the scheme uses GPTQ (self-generated, or from the training stream, whose compliance
depends on the training clock and its cap), quantize the weights with the configured scheme, prune to
the size target if asked, pack and compress them with the model config, tokenizer identity, provenance
and calibration record, write the artifact atomically (rank 0), re-read it from disk on every rank,
de-quantize into a fresh model, re-evaluate, and print the reference's size and round-trip lines. The
results also go to `results.json` in the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from callbacks.wallclock import ChallengeClock
from pgolf.eval.core import EvalContext
from pgolf.export.config import ExportConfig, ExportContext
from pgolf.export.roundtrip import final_eval_modes, roundtrip_evaluate
from pgolf.export.stages import export_model
from pgolf.io import atomic_write_bytes


class QuantizeExport(L.Callback):
    def __init__(self, clock: ChallengeClock, cfg: ExportConfig, run_dir: str | Path, meta: dict, eval_cfg: dict):
        self.clock = clock
        self.cfg, self.run_dir, self.meta, self.eval_cfg = cfg, Path(run_dir), meta, eval_cfg
        if "sliding" in eval_cfg.get("modes", []) and not 0 < eval_cfg["stride"] <= eval_cfg["seq_len"]:
            raise ValueError(
                f"final_eval.stride={eval_cfg['stride']} must be in 1..{eval_cfg['seq_len']} (the eval sequence length)"
            )
        self.results: dict = {}

    def on_train_end(self, trainer, pl_module):
        if not self.cfg.enabled or pl_module.state.preempted:
            return
        dm = trainer.datamodule
        # the artifact records the clock at the last step boundary (what the last step line printed); the
        # calibration compliance check counts the clock's whole time, read after it stopped at train end
        step_ms = pl_module.state.train_time_ms
        meta = {**self.meta, "training": {"steps": trainer.global_step, "train_time_ms": round(step_ms, 1)}}
        device = pl_module.device
        autocast = torch.bfloat16 if device.type == "cuda" else None
        ctx = ExportContext(
            seed=int(self.meta.get("seed", 0)),
            train_time_ms=self.clock.elapsed_ms(),
            cap_ms=self.clock.cap_ms,
            train_batches=lambda: iter(dm.train_stream(start_micro_step=0)),
            device=device,
            autocast_dtype=autocast,
        )
        ev = self.eval_cfg
        eval_ctx = EvalContext(pl_module.luts, device, ev["seq_len"], ev["batch_windows"], autocast_dtype=autocast)
        t0 = time.perf_counter()
        report = export_model(
            pl_module.gpt,
            self.cfg,
            self.run_dir,
            meta,
            rank=trainer.global_rank,
            val_tokens=dm.val_tokens,
            eval_ctx=eval_ctx,
            ctx=ctx,
        )
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        modes = final_eval_modes(ev["modes"], ev["stride"], ev["reference_tail"], ev.get("settings"))
        results = roundtrip_evaluate(report, dm.val_tokens, replace(eval_ctx, compile=pl_module.compile), modes)
        self.results = {
            "export": report.to_dict(),
            "export_seconds": round(time.perf_counter() - t0, 2),
            "training": meta["training"],  # steps and challenge-clock time, for compare/submission
            **results,
        }
        if trainer.global_rank == 0:
            atomic_write_bytes(self.run_dir / "results.json", (json.dumps(self.results, indent=2) + "\n").encode())
