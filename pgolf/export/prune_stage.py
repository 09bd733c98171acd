"""The export's selective ±1 pruning stage (optional part `prune`, pgolf/optional.py; PR #609, as in PR #1019):
prune the quantized entries until code + model fits the target, measured on the artifact exactly as it will
be written. pgolf/export/stages.py runs it with `export.prune.enabled`.
"""

from __future__ import annotations

from pgolf.export.config import ExportConfig
from pgolf.optional import register
from pgolf.quant.artifact import encode_artifact, pack
from pgolf.quant.prune import prune_to_target
from pgolf.quant.rules import QuantEntry
from pgolf.runlog import log0


@register("prune")
def prune_stage(
    entries: dict[str, QuantEntry], cfg: ExportConfig, art_meta: dict, n_code: int
) -> tuple[dict[str, QuantEntry], dict, dict]:
    """Selective ±1 pruning so that code + model <= prune.total_bytes (default: the limit), decimal.
    Returns (pruned entries, the artifact's `prune` record, `prune_to_target`'s report)."""
    total = int(cfg.prune.total_bytes or cfg.limit_bytes)
    target = total - n_code
    if target <= 0:
        raise ValueError(f"prune target {total} bytes leaves no room for the model after {n_code} code bytes")

    def size_of(e: dict[str, QuantEntry], record: dict) -> int:
        return len(encode_artifact(pack(e, {**art_meta, "prune": record}), cfg.codec, cfg.level))

    log0(f"prune: target total {total} bytes - code {n_code} = model {target} bytes ({cfg.codec}-{cfg.level})")
    pruned, report = prune_to_target(entries, size_of, target, cfg.prune.bits, log=log0)
    record = {k: report[k] for k in ("target_model_bytes", "candidates", "zeroed", "bits")}
    verdict = "fits" if report["fits"] else "STILL OVER the target with every candidate zeroed"
    log0(
        f"prune: zeroed {report['zeroed']}/{report['candidates']} ±1 entries, model {report['model_bytes_before']} -> "
        f"{report['model_bytes']} bytes, {report['probes']} probes in {report['seconds']:.1f}s ({verdict})"
    )
    return pruned, record, report
