"""The export's settings (`conf/export/*.yaml` -> `ExportConfig`), what it needs from the run
(`ExportContext`) and what it reports (`ExportReport`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.quant.artifact import CODECS, DEFAULT_LEVELS, LEVELS
from pgolf.quant.rules import rules_from_config, uses_gptq
from pgolf.quant.settings import CalibrationConfig, GPTQSettings, LQERSettings, PruneConfig

# The baseline's int8 + zlib export (openai/parameter-golf train_gpt.py) as rules (first match wins), in
# pgolf's form: row codes from the stored fp16 scale, pgolf's control set, floored per-tensor scale. The
# baseline's exact form sets divide_by: fp32, control_patterns: baseline and an unfloored `other` rule.
BASELINE_RULES = [
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 8, "granularity": "row", "clip": 0.9999984},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": 0.9999984},
]


def _section(cls, value, what: str):
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"export.{what}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**dict(value))


@dataclass
class ExportConfig:
    enabled: bool = True
    label: str = "int8_zlib"  # names the log lines: final_{label}_roundtrip
    codec: str = "zlib"
    level: int | None = 9
    rules: list[dict] = field(default_factory=lambda: [dict(r) for r in BASELINE_RULES])
    filename: str = "final_model.{label}.ptz"
    limit_bytes: int = ARTIFACT_LIMIT_BYTES
    fail_over_limit: bool = True
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lqer: LQERSettings = field(default_factory=LQERSettings)
    report_codecs: list[str] = field(default_factory=list)  # also report the artifact's size under these
    save_float: bool = True  # save the float weights next to the artifact (for `python -m pgolf.tools.reexport`)
    float_filename: str = "final_model.float.ptz"

    def __post_init__(self):
        self.gptq = _section(GPTQSettings, self.gptq, "gptq")
        self.calibration = _section(CalibrationConfig, self.calibration, "calibration")
        self.prune = _section(PruneConfig, self.prune, "prune")
        self.lqer = _section(LQERSettings, self.lqer, "lqer")
        self.report_codecs = list(self.report_codecs or [])
        for c in [self.codec, *self.report_codecs]:
            if c not in CODECS:
                raise ValueError(f"export codec {c!r} is not one of {sorted(CODECS)}")
        if self.level is None:
            self.level = DEFAULT_LEVELS[self.codec]
        if self.level not in LEVELS[self.codec]:
            lv = LEVELS[self.codec]
            raise ValueError(f"export.level {self.level} is not a {self.codec} level ({lv.start}..{lv.stop - 1})")
        if self.limit_bytes < 1:
            raise ValueError(f"export.limit_bytes {self.limit_bytes} must be >= 1 (decimal bytes)")
        rules = rules_from_config(self.rules)
        if uses_gptq(rules) and self.calibration.source == "none":
            names = [r.name for r in rules if r.method == "gptq"]
            raise ValueError(
                f"export rules {names} use method gptq, which needs calibration data: set export.calibration.source "
                "to ar (self-generated), train or train_shuffled"
            )
        if self.gptq.hessian_norm == "batches" and self.calibration.count % self.gptq.batch:
            raise ValueError(
                f"export.gptq.hessian_norm=batches divides by whole batches: calibration.count "
                f"{self.calibration.count} is not a multiple of gptq.batch {self.gptq.batch}"
            )
        if self.lqer.enabled and not uses_gptq(rules):
            raise ValueError("export.lqer.enabled corrects the matrices of method: gptq rules, and no rule uses gptq")

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"export config: unknown keys {sorted(unknown)}")
        if d.get("rules") is not None and not d["rules"]:  # null means the baseline's rules; [] means none
            raise ValueError("export.rules is empty: a quantization scheme needs at least one rule")
        d["rules"] = [dict(r) for r in d.get("rules") or BASELINE_RULES]
        return cls(**d)

    @property
    def path_name(self) -> str:
        return self.filename.format(label=self.label)

    @property
    def size_tag(self) -> str:
        return self.label.replace("_", "+")


@dataclass
class ExportContext:
    """What the export needs from the run besides the weights: the seed (for self-generation), the training
    clock (for calibration compliance), the training stream (`train` calibration), the sorted training shard
    files with the process's rank and the run's world size (`train_shuffled` calibration, PR #1611: rank r
    reads `files[r::world_size]`; the export calibrates on rank 0), device and autocast.

    Inside a training run the challenge clock itself is given: `clock_ms()` reads it (ms) and `run_clock()`
    is a context manager that runs it over a block, so calibration and Hessians (which read training data)
    are timed on the clock that timed training, and the artifact records when they started and ended on it
    (PR #1611's `gptq_reserve_seconds` budget). Without them (re-export) the stamps are derived: the
    recorded training time, then the calibration's own seconds."""

    seed: int = 0
    train_time_ms: float | None = None
    cap_ms: float | None = None
    clock_ms: Callable[[], float] | None = None
    run_clock: Callable[[], AbstractContextManager] | None = None
    train_batches: Callable[[], Iterable] | None = None
    train_files: Callable[[], list[Path]] | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    autocast_dtype: torch.dtype | None = None


@dataclass(kw_only=True)
class ExportReport:
    """What an export did (`results.json`'s `export` section, read by pgolf/tools/compare.py and
    submission.py); built by keyword. Bytes are decimal; on ranks other than 0 nothing is written, so
    `model_bytes` is 0 and `timings` empty."""

    path: str  # the artifact
    label: str
    model_bytes: int
    code_bytes: int
    total_bytes: int  # model + code
    limit_bytes: int
    size_ok: bool  # total_bytes <= limit_bytes
    quantize_seconds: float
    write_seconds: float  # compress + write
    pre_quant: dict | None = None  # the float model's standard eval (EvalResult.to_dict())
    calibration: dict | None = None  # the artifact's calibration record
    prune: dict | None = None  # the pruning search's report
    codec_sizes: dict = field(default_factory=dict)  # "codec-level" -> model bytes
    timings: dict = field(default_factory=dict)  # stage -> seconds, in the order the stages ran
    float_path: str | None = None  # the saved float weights, if any

    def to_dict(self) -> dict:
        return asdict(self)
