"""Quantize-and-export at the end of training, then the round trip (docs/techniques.md#export-pipeline, STYLE 8).

At `setup` (before any training step): a training-data calibration that could not be read at the end is
refused (`check_calibration_source`). At `on_train_end` (after any weight-averaging callback listed before
it has swapped in its weights, and after the challenge clock, handed in at construction, has stopped):
evaluate the float model (`DIAGNOSTIC pre_quant`), save the float weights for re-export, calibrate and
collect Hessians if the scheme uses GPTQ (self-generated, or from the training data: the training stream,
or PR #1611's shuffled windows of the training shards; their compliance depends on the training clock and
its cap), quantize the weights with the configured scheme, prune to
the size target if asked, pack and compress them with the model config, tokenizer identity, provenance
and calibration record, write the artifact atomically (rank 0), re-read it from disk on every rank,
de-quantize into a fresh model, re-evaluate, and print the reference's size and round-trip lines. The
results also go to `results.json` in the run directory, its paths relative to the run directory, with the
artifact's compliance (`artifact_compliance`: calibration, size, full validation, finite scores; as eval.py
judges it); a NaN or infinite figure is written as null.

No pass over the validation set is made twice for the same number, and the log says when one is reused:
- the pre-quantization figure is the last validation's (`reusable_validation`) when that validation ran at
  the final step, on the weights being exported (`state.weights`: raw, or the averaged weights with
  `callbacks.averaging.validate=averaged`), on the same tokens in the same `seq_len` windows, at the same
  precision. The training forward (`GolfModule.validation_step`) and the eval forward compute the same
  sums by different code, which can differ in the last float digits; the figure is a diagnostic.
- the round trip's standard figure is the pre-quantization one when the export was lossless
  (pgolf/export/roundtrip.py's `lossless_reuse`).
The passes that run print progress lines every `progress_every` seconds (callbacks.progress_every_seconds;
none with callbacks.progress=none). `final_eval.max_tokens` scores only the first N validation targets in
every pass after training: not the challenge's metric, and results.json says so.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from callbacks.wallclock import ChallengeClock
from pgolf import optional
from pgolf.config.typed import ConfigError
from pgolf.data.shards import list_shards
from pgolf.eval.core import CAUSAL_REASON, EvalContext, EvalResult, json_safe, mark_non_finite
from pgolf.eval.registry import parse_mode, scoring_line
from pgolf.export.config import ExportConfig, ExportContext
from pgolf.export.roundtrip import (
    MAX_TOKENS_REASON,
    VAL_MAX_TOKENS_REASON,
    final_eval_modes,
    final_eval_tokens,
    roundtrip_evaluate,
    with_progress,
)
from pgolf.export.stages import export_model, pre_quant_diagnostic
from pgolf.io import atomic_write_bytes
from pgolf.quant.artifact import check_codec
from pgolf.quant.rules import rules_from_config, uses_gptq
from pgolf.quant.settings import CalibrationConfig, calibration_verdict, mark_not_compliant
from pgolf.runlog import log0, set_phase

# Lightning's `trainer.precision` -> the autocast dtype its forward ran under (None: full precision)
PRECISION_AUTOCAST = {
    "32-true": None,
    "32": None,
    "64-true": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


def reusable_validation(trainer, pl_module, tokens: torch.Tensor, seq_len: int, autocast) -> EvalResult | None:
    """The last validation as the float model's standard result on `tokens` (1-D) in `seq_len` windows at
    precision `autocast`, or None unless it ran at the final step on the weights the GPT holds now, over
    the same windows, at the same precision."""
    v = pl_module.state.last_val
    if v is None or v["step"] != trainer.global_step or v["weights"] != pl_module.state.weights:
        return None
    targets = tokens.numel() - 1
    scored = (targets // seq_len) * seq_len
    precision = str(trainer.precision)
    if v["seq_len"] != seq_len or int(v["val_tokens"]) != scored:
        return None
    if precision not in PRECISION_AUTOCAST or PRECISION_AUTOCAST[precision] != autocast:
        return None
    n = int(v["val_tokens"])
    return EvalResult(
        "standard",
        v["val_loss"],
        v["val_bpb"],
        n,
        v["val_bytes"],
        0.0,
        True,
        CAUSAL_REASON,
        {"seq_len": seq_len},
        windows=n // seq_len,
        targets=targets,
        distinct=n,
        scoring=scoring_line(n, n, targets),
    )


def relative(path: str | None, run_dir: Path) -> str | None:
    """`path` relative to the run directory (results.json keeps no machine paths)."""
    return None if path is None else os.path.relpath(path, run_dir)


def check_calibration_source(c: CalibrationConfig, files: list[Path], dm, world_size: int) -> None:
    """Refuse, before training, a training-data calibration the export could not read at the end of it.

    `train`: each calibration sequence is cut from one training micro-batch, so `c.length` must not exceed a
    micro-batch's tokens (`dm.layout.local`). `train_shuffled`: builds the export's `ShuffledSequenceLoader`
    (pgolf/data/shuffled.py, PR #1611; shard files memory-mapped, nothing read) for rank 0 of the calibration
    world (`c.world_size`, else the run's `world_size`) over the sorted training shards `files`; its
    ValueError (the rank owns no file, or its files hold no `c.length + 1`-token window) becomes a ConfigError
    naming the setting (one `config error:` line, pgolf/train/run.py); so does a `train` length over a
    micro-batch. Asking for more windows than rank 0's files hold in one pass is allowed (the loader draws a
    fresh phase and order when every window is used, so windows repeat, shifted): one WARNING line.
    Other sources read no training data: nothing to check."""
    if c.source == "train":
        local = dm.layout.local
        if c.length > local:
            raise ConfigError(
                f"export.calibration.source=train cuts each calibration sequence from one training micro-batch "
                f"of {local} tokens per rank: export.calibration.length={c.length} is longer (lower it, or use "
                "train_shuffled)"
            )
    elif c.source == "train_shuffled":
        world = int(c.world_size or world_size)
        seed = int(c.seed) if c.seed is not None else 0  # the export calibrates on rank 0: seed = the rank
        loader_cls = optional.get("shuffled_calibration").ShuffledSequenceLoader
        try:
            loader = loader_cls(files, c.length, 0, world, seed, dm.vocab_size)
        except ValueError as e:
            raise ConfigError(
                f"export.calibration.source=train_shuffled (length={c.length}, world_size={world}) cannot draw "
                f"calibration windows: {e}; lower export.calibration.length or export.calibration.world_size"
            ) from None
        windows = sum(loader.remaining())
        if c.count > windows:
            log0(
                f"WARNING: export.calibration.count={c.count} is more than the {windows} {c.length + 1}-token "
                f"windows rank 0 of {world} owns ({len(loader.files)} shard files): windows repeat after a reset"
            )


def check_eval_windows(final_eval: dict, val_tokens: torch.Tensor) -> None:
    """Refuse, before training, a final evaluation whose window (`seq_len`, the mode's own or
    `final_eval.seq_len`) is longer than the validation targets it will score: those of `val_tokens` (after
    `data.val_max_tokens`), cut by `final_eval.max_tokens` (`final_eval_tokens`). It would score no target,
    and a mode that scores none is an error after training (pgolf/eval/registry.py `run_mode`). Raises
    ConfigError naming the mode."""
    ev = final_eval
    targets = final_eval_tokens(val_tokens, ev["seq_len"], ev.get("max_tokens")).numel() - 1
    for name, own in final_eval_modes(ev["modes"], ev["stride"], ev["reference_tail"], ev.get("settings")).items():
        st = parse_mode(name, own, seq_len=ev["seq_len"], batch_windows=ev["batch_windows"])[1]
        n = getattr(st, "seq_len", 0)
        if n > targets:
            raise ConfigError(
                f"final_eval: mode {name} scores windows of seq_len={n} tokens, longer than the {targets:,} "
                "validation targets of this run: it would score none (set a shorter seq_len)"
            )


def artifact_compliance(results: dict, partial: str | None) -> dict:
    """results.json's `compliance`, the artifact's side of the verdict eval.py gives (pgolf/eval/run.py):
    its GPTQ calibration was compliant (`calibration_ok`: the export's calibration record; training data read
    only inside the training time budget, PRs #535/#569/#593/#609), code + model fit the limit (`size_ok`),
    the whole validation split was scored (`full_validation`; `partial`: why not, if not), and the reasons it
    is not. A non-compliant calibration also marks every round-trip mode of `results` `compliant: false`
    (edited in place), as eval.py marks its modes, and so does a NaN or infinite score (`mark_non_finite`, a
    reason each); each mode keeps its own score-before-adapt rule. Logs one `compliance:` line."""
    why = calibration_verdict(results["export"].get("calibration"))  # no record: no GPTQ, or rank > 0
    reasons = []
    if why is not None:
        reasons.append(why)
        mark_not_compliant(results.get("roundtrip", {}).values(), why)
    size_ok = bool(results["export"]["size_ok"])
    if not size_ok:
        e = results["export"]
        reasons.append(f"size: {e['total_bytes']:,} bytes (model + code) is over the {e['limit_bytes']:,}-byte limit")
    if partial is not None:
        reasons.append(partial)
    reasons += mark_non_finite(results.get("roundtrip", {}).values())
    verdict = {
        "calibration_ok": why is None,
        "size_ok": size_ok,
        "full_validation": partial is None,
        "reasons": reasons,
    }
    flags = " ".join(f"{k}:{str(v).lower()}" for k, v in verdict.items() if k != "reasons")
    log0(f"compliance: {flags}" + "".join(f" | {r}" for r in reasons))
    return verdict


class QuantizeExport(L.Callback):
    def __init__(
        self,
        clock: ChallengeClock,
        cfg: ExportConfig,
        run_dir: str | Path,
        meta: dict,
        eval_cfg: dict,
        progress_every: float | None = None,
    ):
        self.clock = clock
        self.cfg, self.run_dir, self.meta, self.eval_cfg = cfg, Path(run_dir), meta, eval_cfg
        self.progress_every = progress_every
        if "sliding" in eval_cfg.get("modes", []) and not 0 < eval_cfg["stride"] <= eval_cfg["seq_len"]:
            raise ValueError(
                f"final_eval.stride={eval_cfg['stride']} must be in 1..{eval_cfg['seq_len']} (the eval sequence length)"
            )
        self.results: dict = {}
        if cfg.enabled:  # before training: a missing lrzip (the pergroup codec) is found now, not after 10 minutes
            check_codec(cfg.codec, cfg.level)

    def setup(self, trainer, pl_module, stage):
        # before any training step (the datamodule has set up its batch layout and validation tokens): final
        # evaluations that would score nothing and calibration data the export cannot read fail now, not after
        # the training run
        if stage != "fit" or not self.cfg.enabled:
            return
        dm = trainer.datamodule
        check_eval_windows(self.eval_cfg, dm.val_tokens)
        if uses_gptq(rules_from_config(self.cfg.rules)):
            check_calibration_source(self.cfg.calibration, list_shards(dm.train_pattern), dm, trainer.world_size)

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
            clock_ms=self.clock.elapsed_ms,
            run_clock=lambda: self.clock.running(pl_module),
            train_batches=lambda: iter(dm.train_stream(start_micro_step=0)),
            train_files=lambda: list_shards(dm.train_pattern),  # sorted, as the stream reads them
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=device,
            autocast_dtype=autocast,
        )
        ev = self.eval_cfg
        max_tokens = ev.get("max_tokens")
        tokens = final_eval_tokens(dm.val_tokens, ev["seq_len"], max_tokens)
        partial = None
        if max_tokens is not None:
            partial = MAX_TOKENS_REASON
            log0(
                f"final_eval:max_tokens={max_tokens}: the first {tokens.numel() - 1:,} of {dm.val_tokens.numel() - 1:,}"
                f" validation targets: NOT the challenge's metric (results marked compliant: false)"
            )
        if dm.val_cut_from is not None:
            partial = VAL_MAX_TOKENS_REASON if partial is None else f"{partial}; {VAL_MAX_TOKENS_REASON}"
            log0(
                f"final_eval: data.val_max_tokens cut the validation split to its first {dm.val_tokens.numel() - 1:,}"
                f" of {dm.val_cut_from:,} targets: NOT the challenge's metric (results marked compliant: false)"
            )
        vb = None if dm.val_bytes is None else dm.val_bytes[: tokens.numel()].to(device)  # a CaseOps byte sidecar
        doc = pl_module.max_seg_len if pl_module.doc_attention else None  # as trained: document-bounded windows
        if doc is not None:
            log0(f"final_eval: document-bounded windows (attention stops at BOS and every {doc} tokens), as trained")
        eval_ctx = EvalContext(
            pl_module.luts,
            device,
            ev["seq_len"],
            ev["batch_windows"],
            autocast_dtype=autocast,
            val_bytes=vb,
            doc_max_seg_len=doc,
        )
        t0 = time.perf_counter()
        set_phase("the pre-quantization evaluation")
        val = reusable_validation(trainer, pl_module, tokens, ev["seq_len"], autocast)
        why = f"the validation at step {trainer.global_step} scored these weights on the same windows"
        progress = with_progress(eval_ctx, "pre_quant", tokens, self.progress_every)
        pre = pre_quant_diagnostic(pl_module.gpt, tokens, progress, reuse=val, why=why)
        set_phase("the export")
        report = export_model(pl_module.gpt, self.cfg, self.run_dir, meta, rank=trainer.global_rank, ctx=ctx)
        report = replace(report, pre_quant={**pre.to_dict(), **({"reused_from": why} if val is not None else {})})
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        modes = final_eval_modes(ev["modes"], ev["stride"], ev["reference_tail"], ev.get("settings"))
        results = roundtrip_evaluate(
            report,
            tokens,
            replace(eval_ctx, compile=pl_module.compile),
            modes,
            pre=None if val is not None else pre,  # only a pass of the eval code stands in for another
            float_gpt=pl_module.gpt,
            progress_every=self.progress_every,
            partial=partial,
        )
        export = report.to_dict()
        export["path"], export["float_path"] = (
            relative(report.path, self.run_dir),
            relative(report.float_path, self.run_dir),
        )
        self.results = {
            "export": export,
            "export_seconds": round(time.perf_counter() - t0, 2),
            "training": meta["training"],  # steps and challenge-clock time, for compare/submission
            **results,
        }
        if max_tokens is not None:
            self.results["final_eval"] = {
                "max_tokens": int(max_tokens),
                "targets": tokens.numel() - 1,
                "of_targets": dm.val_tokens.numel() - 1,
                "compliant": False,
                "reason": MAX_TOKENS_REASON,
            }
        self.results["compliance"] = artifact_compliance(self.results, partial)
        set_phase("writing results.json")
        if trainer.global_rank == 0:
            text = json.dumps(json_safe(self.results), indent=2, allow_nan=False)  # a NaN score: null
            atomic_write_bytes(self.run_dir / "results.json", (text + "\n").encode())
        set_phase("the end of the run")
