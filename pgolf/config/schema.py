"""The typed config groups of `conf/train.yaml` and `conf/eval.yaml`: one dataclass per group.

The values live in the YAML files only (conf/train.yaml and the group files): these dataclasses have no
defaults, they say which keys a group has, what each holds and its allowed range (pgolf/config/typed.py).
`model` is read into the network's own `GPTConfig` (pgolf/model/config.py, torch-free), `export` into
`ExportConfig` by pgolf/config/runtime.py, which imports torch; everything here imports in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pgolf import MAX_SEQ_LEN
from pgolf.config.typed import Fraction, Momentum, NonNegFloat, NonNegInt, PosFloat, PosInt, Range
from pgolf.model.config import GPTConfig

EvalSeqLen = Annotated[int, Range(ge=1, le=MAX_SEQ_LEN)]  # an eval window: eval.py's cap too

LearningRate = NonNegFloat
Beta = Momentum
Seed = Annotated[int, Range(ge=0, le=2**32 - 1)]  # what lightning.seed_everything accepts
Extras = dict[str, dict[str, Any]]  # name -> {_target_: a Lightning class, its keyword arguments}
WANDB_MODES = ("online", "offline", "disabled")  # W&B run modes (pgolf/train/wandb_logger.py)
PREPARE_STEPS = ("demo", "synthetic")  # pgolf/tools/datasets.py's steps (a test asserts they agree)


@dataclass(frozen=True)
class TrainConfig:
    """`train`: the step budget, batch, schedule lengths and the challenge clock."""

    batch_tokens: PosInt
    seq_len: PosInt
    grad_accum: PosInt | Literal["auto"]
    iterations: PosInt
    warmdown_iters: NonNegInt
    max_wallclock_seconds: NonNegFloat
    warmdown_frac: Fraction  # > 0: warmdown by training fraction (PR #1611: 0.85) instead of warmdown_iters
    min_lr: Fraction  # the LR multiplier's floor of the fraction warmdown (PR #1611: 0.1)
    gptq_reserve_seconds: NonNegFloat  # training stops this long before the cap, the fraction's budget (PR #1611: 0.5)
    doc_attention: bool  # document-bounded attention in training (PR #1530 / #1611)
    max_seg_len: PosInt  # its longest segment: documents are cut every this many tokens (PR #1611: 2048)
    val_every: NonNegInt
    log_every: PosInt
    compile: bool
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"]  # torch.compile's (the last two debug)
    warmup_steps: NonNegInt

    def __post_init__(self):
        if self.max_wallclock_seconds > 0 and self.gptq_reserve_seconds >= self.max_wallclock_seconds:
            raise ValueError(
                f"gptq_reserve_seconds={self.gptq_reserve_seconds} leaves no training time under "
                f"max_wallclock_seconds={self.max_wallclock_seconds} (training stops the reserve before the cap)"
            )


@dataclass(frozen=True)
class OptimConfig:
    """`optim`: Muon for the block matrices, Adam for embeddings, head and scalars (pgolf/optim/)."""

    matrix_lr: LearningRate
    scalar_lr: LearningRate
    embed_lr: LearningRate
    untied_embed_lr: LearningRate
    head_lr: LearningRate
    muon_momentum: Momentum
    momentum_start: Momentum
    momentum_warmup_steps: NonNegInt
    ns_kind: Literal["quintic", "polar_express"]
    ns_steps: PosInt
    muon_row_norm: bool
    muon_row_norm_form: Literal["fp32_clamp", "bf16_eps"]  # bf16_eps: PR #1298's own (docs/techniques.md#muoneq-r)
    muon_momentum_dtype: Literal["fp32", "bf16"]  # bf16: Parallel Muon's bf16 momentum (PR #399; banked records)
    muon_shape_scale: Literal["update", "step"]  # step: sqrt(max(1, rows/cols)) in the step size (PR #399)
    muon_wd: NonNegFloat
    adam_wd: NonNegFloat
    embed_wd: NonNegFloat | None  # the embedding group's own AdamW WD (PR #1611); null: adam_wd
    betas: tuple[Beta, Beta]
    adam_eps: PosFloat
    aux_proj_to_muon: bool
    grad_clip: NonNegFloat
    grad_clip_scope: Literal["averaged", "local"]  # local: each rank's own gradients, then averaged (banked records)
    frozen: list[str]  # glob patterns of parameters in no optimizer group (PR #1090's smear gate)


@dataclass(frozen=True)
class DataConfig:
    """`data`: where the shards and the tokenizer are, and how the validation split is batched."""

    root: str | None
    dir: str
    train_pattern: str
    val_pattern: str
    tokenizer_path: str
    vocab_size: PosInt
    prepare: str | None  # one of PREPARE_STEPS, none or null (the shards already exist)
    eval_seq_len: EvalSeqLen | None
    val_batch_tokens: PosInt
    val_max_tokens: PosInt | None  # debug runs only: a truncated validation split is not the challenge's metric
    # a CaseOps dataset's per-token byte sidecar shards (glob); null: those its manifest names, if any
    val_bytes_pattern: str | None

    def __post_init__(self):
        if self.prepare not in (*PREPARE_STEPS, "none", None):
            raise ValueError(f"prepare must be one of {' | '.join(PREPARE_STEPS)} | none | null, got {self.prepare!r}")


@dataclass(frozen=True)
class FinalEvalConfig:
    """`final_eval`: the evaluations of the round-tripped artifact at the end of training. The mode names
    are those of conf/eval/ (checked by pgolf/config/validate.py)."""

    modes: list[str]
    seq_len: EvalSeqLen
    batch_windows: PosInt
    stride: PosInt
    reference_tail: bool
    settings: dict[str, dict[str, Any]]  # mode name -> that mode's setting overrides (checked by runtime.py)
    # The first N validation targets only (whole windows): NOT the challenge's metric, so a result with it is
    # not compliant.
    max_tokens: PosInt | None

    def __post_init__(self):
        unknown = sorted(set(self.settings) - set(self.modes))
        if unknown:
            raise ValueError(f"settings names modes not in final_eval.modes: {unknown}")
        if "sliding" in self.modes and self.stride > self.seq_len:
            raise ValueError(f"stride must be in [1, seq_len={self.seq_len}] for the sliding mode, got {self.stride}")


@dataclass(frozen=True)
class AveragingConfig:
    """`callbacks.averaging`: EMA or SWA weights applied before the export (callbacks/averaging.py)."""

    kind: Literal["none", "ema", "swa"]
    ema_decay: Annotated[float, Range(gt=0, lt=1)]
    swa_every: PosInt
    swa_threshold: Fraction
    validate: Literal["raw", "averaged"]  # the weights periodic validation scores (raw: as the records)


@dataclass(frozen=True)
class CheckpointConfig:
    """`callbacks.checkpoint`: periodic and SIGTERM checkpoints (callbacks/checkpoint.py)."""

    every_steps: NonNegInt
    keep: NonNegInt  # 0 = every step checkpoint
    on_sigterm: bool


def check_extras(extras: Extras, what: str) -> None:
    for name, spec in extras.items():
        if not isinstance(spec.get("_target_"), str):
            raise ValueError(f"extra.{name} needs a _target_ (the {what} class to instantiate)")


@dataclass(frozen=True)
class CallbacksConfig:
    """`callbacks`: settings of the challenge's own callbacks (built by callbacks/__init__.py, always, in
    their fixed order) and `extra`: more Lightning callbacks by `_target_`, appended after them."""

    progress: Literal["auto", "tqdm", "line", "none"]
    progress_every_seconds: NonNegFloat
    averaging: AveragingConfig
    late_qat_threshold: Fraction
    checkpoint: CheckpointConfig
    extra: Extras

    def __post_init__(self):
        check_extras(self.extra, "callback")


@dataclass(frozen=True)
class CsvLoggerConfig:
    """`logger=csv`: the run directory's csv/metrics.csv (`kind: none`: no logger); `extra`: more Lightning
    loggers by `_target_`."""

    kind: Literal["csv", "none"]
    extra: Extras

    def __post_init__(self):
        check_extras(self.extra, "logger")


@dataclass(frozen=True)
class WandbLoggerConfig:
    """`logger=wandb`: the CSV file and a W&B run from rank 0 (pgolf/train/wandb_logger.py)."""

    kind: Literal["wandb"]
    project: str
    entity: str | None
    mode: str
    group: str | None
    job_name: str | None
    tags: list[str]
    extra: Extras

    def __post_init__(self):
        if self.mode not in ("auto", *WANDB_MODES):
            raise ValueError(f"mode must be one of auto | {' | '.join(WANDB_MODES)}, got {self.mode!r}")
        check_extras(self.extra, "logger")


# Trainer arguments pgolf/train/build.py sets itself: `trainer.<key> is set by pgolf: <what to do instead>`.
RESERVED_TRAINER_KEYS = {
    "max_steps": "use train.iterations",
    "max_epochs": "use train.iterations",
    "max_time": "use train.max_wallclock_seconds (the challenge clock)",
    "accumulate_grad_batches": "use train.grad_accum",
    "gradient_clip_val": "use optim.grad_clip",
    "gradient_clip_algorithm": "use optim.grad_clip (always the global norm)",
    "val_check_interval": "use train.val_every",
    "check_val_every_n_epoch": "use train.val_every",
    "limit_val_batches": "use train.val_every",
    "num_sanity_val_steps": "use train.val_every",
    "enable_checkpointing": "use callbacks.checkpoint",
    "enable_progress_bar": "use callbacks.progress",
    "enable_model_summary": "off (the log header prints model_params)",
    "use_distributed_sampler": "off (the DataModule slices the ranks itself)",
    "logger": "use logger, or add a Lightning logger with +logger.extra.NAME._target_=...",
    "callbacks": "add a Lightning callback with +callbacks.extra.NAME._target_=...",
    "default_root_dir": "use hydra.run.dir",
    "plugins": "pgolf's atomic checkpoint writer",
}


@dataclass(frozen=True)
class TrainerConfig:
    """`trainer`: the keys pgolf reads itself; any other key goes to `lightning.Trainer` as it is (checked
    against its signature before the data is prepared), except the RESERVED_TRAINER_KEYS."""

    OPEN: ClassVar[str] = "lightning"

    accelerator: str
    devices: PosInt
    num_nodes: PosInt
    precision: str | int
    strategy: str | dict[str, Any]
    lightning: dict[str, Any]  # the other keys, for lightning.Trainer

    def __post_init__(self):
        for key in self.lightning:
            if key in RESERVED_TRAINER_KEYS:
                raise ValueError(f"{key} is set by pgolf: {RESERVED_TRAINER_KEYS[key]}")


@dataclass(frozen=True)
class TrainRun:
    """The root of conf/train.yaml. `export` is checked against ExportConfig by pgolf/config/runtime.py."""

    name: str
    seed: Seed
    resume: str | None
    variant: str | None
    train: TrainConfig
    final_eval: FinalEvalConfig
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    logger: CsvLoggerConfig | WandbLoggerConfig
    callbacks: CallbacksConfig
    export: dict[str, Any]


@dataclass(frozen=True)
class EvalRun:
    """The root of conf/eval.yaml. `eval` maps each selected mode to its settings (checked by the eval
    registry, pgolf/eval/registry.py, before anything runs)."""

    artifact: str
    batch_windows: PosInt
    seq_len: PosInt | None
    budget_seconds: NonNegFloat
    max_tokens: PosInt | None  # the first N validation targets only: not the challenge's metric (compliant: false)
    audit: bool
    compile: bool | Literal["auto"]
    out_dir: str | None
    overwrite: bool  # replace an eval_result.json / audit.npz already in out_dir (refused otherwise)
    name: str
    data: DataConfig
    trainer: TrainerConfig
    eval: dict[str, dict[str, Any]]

    def __post_init__(self):
        if self.data.val_max_tokens is not None:
            raise ValueError("data.val_max_tokens must be null: eval.py always scores the whole validation split")
