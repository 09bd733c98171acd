"""The config checks that need torch: `export` read into `ExportConfig`, the Newton-Schulz variant's
step count, every final evaluation's settings as the export callback will parse them, and which optional
parts of the runtime (pgolf/optional.py) a run needs (`PART_RULES`).

Importing this module imports torch (about 2 s), unlike the rest of pgolf/config: train.py imports it once
the torch-free checks (pgolf/config/validate.py) have passed, and still before Lightning and before any
data preparation. Every problem is a `ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from pgolf import optional
from pgolf.config.typed import ConfigError, load
from pgolf.config.validate import plain
from pgolf.eval.registry import parse_mode
from pgolf.export.config import ExportConfig
from pgolf.export.roundtrip import final_eval_plan
from pgolf.optim.newton_schulz import ns_coefficients
from pgolf.quant.rules import config_uses_gptq

# The eval modes that run document-bounded attention (phased TTT's global phases, `global_doc_bounded`).
DOC_ATTENTION_MODES = ("phased_ttt", "phased_ttt_1611")


def run_modes(final_eval: dict) -> set[str]:
    """The registered eval modes a plain `final_eval` config runs: each name of `modes`, or the mode its own
    settings name (`final_eval.settings.<name>.mode`)."""
    settings = final_eval.get("settings") or {}
    return {(settings.get(name) or {}).get("mode", name) for name in final_eval["modes"]}


def uses_doc_attention(config: dict) -> bool:
    """Whether a run of the plain config passes `cu_seqlens` to the model (pgolf/model/doc_attention.py):
    training with `train.doc_attention` (its final evaluations then score document-bounded windows too), or
    a final evaluation by one of DOC_ATTENTION_MODES."""
    return bool(config["train"]["doc_attention"] or set(DOC_ATTENTION_MODES) & run_modes(config["final_eval"]))


# Optional part (pgolf/optional.py) -> whether a run of a plain config needs it. The packer leaves out the
# modules of the parts a packed config does not need.
PART_RULES: dict[str, Callable[[dict], bool]] = {
    "gptq": config_uses_gptq,
    "gptq_calibration": config_uses_gptq,
    "prune": lambda c: bool(c["export"]["prune"]["enabled"]),
    "lqer": lambda c: bool(c["export"]["lqer"]["enabled"]),
    "wandb": lambda c: c["logger"]["kind"] == "wandb",
    "wandb_finish": lambda c: c["logger"]["kind"] == "wandb",
    "averaging": lambda c: c["callbacks"]["averaging"]["kind"] != "none",
    "pergroup": lambda c: bool({"pergroup", "pergroup_brotli"} & {c["export"]["codec"], *c["export"]["report_codecs"]}),
    "sdclip": lambda c: any(r.get("clip") == "sdclip" for r in c["export"]["rules"]),
    "doc_attention": lambda c: uses_doc_attention(c),
    "model_1611": lambda c: c["model"]["smear_gate"] == "gated" or c["model"]["parallel_start_layer"] > 0,
    "decode": lambda c: config_uses_gptq(c) and c["export"]["calibration"]["source"] == "ar",
    "shuffled_calibration": lambda c: config_uses_gptq(c) and c["export"]["calibration"]["source"] == "train_shuffled",
}


def check_export(export: dict) -> ExportConfig:
    """The `export` group as an ExportConfig (read as the export callback reads it, `ExportConfig.from_dict`),
    after its keys and types and those of its sections (gptq, calibration, prune) were checked. Raises
    ConfigError."""
    load(ExportConfig, export, "export", construct=False)
    try:
        return ExportConfig.from_dict(export)
    except ValueError as e:
        raise ConfigError(f"export: {e}") from None


def check_optim(optim: dict) -> None:
    """The Newton-Schulz variant supports `optim.ns_steps` (Polar Express has a fixed table of steps)."""
    try:
        ns_coefficients(optim["ns_kind"], optim["ns_steps"])
    except ValueError as e:
        raise ConfigError(f"optim.ns_steps: {e}") from None


def check_final_eval(final_eval: dict) -> dict[str, dict]:
    """Every mode of `final_eval` with its settings (registered defaults, the run's stride and windows,
    `final_eval.settings` last) parsed as the export callback will run it: {mode: settings}. Raises
    ConfigError naming the mode and key."""
    try:
        return final_eval_plan(final_eval)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"final_eval: {e}") from None


def check_bos_ids(plan: dict[str, dict], final_eval: dict, vocab_size: int) -> None:
    """A mode setting `bos_id` (where documents start: the TTT modes) must be a token id of the model's
    vocabulary, else no document would ever start. Raises ConfigError naming the mode."""
    for name, settings in plan.items():
        st = parse_mode(name, settings, seq_len=final_eval["seq_len"], batch_windows=final_eval["batch_windows"])[1]
        bos = getattr(st, "bos_id", None)
        if bos is not None and not 0 <= bos < vocab_size:
            raise ConfigError(
                f"final_eval.settings.{name}.bos_id={bos} is not a token id of the model's vocabulary "
                f"(model.vocab_size={vocab_size})"
            )


def check_clip_scope(config: dict) -> None:
    """`optim.grad_clip_scope: local` averages the gradients itself after clipping, which fp16 mixed precision
    cannot follow: its loss scaler checks each rank's local gradients for overflow, so one rank could skip a
    step the others take. Raises ConfigError for that pair (no record trains in fp16)."""
    precision = str(config["trainer"].get("precision", ""))
    if config["optim"]["grad_clip_scope"] == "local" and precision.startswith("16"):
        raise ConfigError(
            f"optim.grad_clip_scope=local cannot run with trainer.precision={precision} (the fp16 loss scaler would "
            "check each rank's local gradients); use bf16-mixed or 32-true, or grad_clip_scope=averaged"
        )


def check_runtime(cfg: DictConfig) -> ExportConfig:
    """The checks of this module on a composed conf/train.yaml that passed `validate_train`."""
    d = plain(cfg)
    check_optim(d["optim"])
    check_clip_scope(d)
    plan = check_final_eval(d["final_eval"])
    check_bos_ids(plan, d["final_eval"], int(d["model"]["vocab_size"]))
    return check_export(d["export"])


def needed_parts(config: dict) -> list[str]:
    """The optional parts (`PART_RULES`) a run of the plain config `config` uses."""
    return [name for name, rule in PART_RULES.items() if rule(config)]


def check_parts(cfg: DictConfig) -> None:
    """Every optional part the run needs is loaded (pgolf/optional.py): in a packed train_gpt.py, an override
    that turns on a part its config had off is refused here, before training. Raises ConfigError."""
    missing = [name for name in needed_parts(plain(cfg)) if name not in optional.PARTS]
    if missing:
        raise ConfigError(
            f"this train_gpt.py does not hold the optional parts {missing} that this config needs (packed for a "
            "config that did not use them); pack the experiment with the setting: python -m pgolf.tools.pack ..."
        )
