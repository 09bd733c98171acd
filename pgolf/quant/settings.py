"""The export's optional stages' settings (conf/export/*.yaml sections `gptq`, `calibration`, `prune`,
`lqer`) and the calibration compliance rule: plain data, so the export config (pgolf/export/config.py) reads
them without loading the stages themselves (pgolf/export/gptq_stage.py, prune_stage.py), which a packed
train_gpt.py leaves out when its config does not use them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

HESSIAN_NORMS = ("sequences", "batches")
HESSIAN_FORWARDS = ("autocast", "bf16")
GPTQ_DEVICES = ("cpu", "model")


@dataclass
class GPTQSettings:
    """The export config's `gptq` section (docs/techniques.md#full-gptq): the column loop's block size and
    damping, act-order, the damping added to each Hessian when it is collected (the reference damps there
    too, so twice in all), how many calibration sequences go through the model per forward (`batch`), what
    `Σ XᵀX` is divided by (`hessian_norm`), in what precision the calibration forward runs (`hessian_forward`)
    and where GPTQ runs (`device`).

    hessian_norm: `sequences` (PR #1019: the number of calibration sequences) or `batches` (PR #1611: the
    number of forward batches of `batch` sequences, GPTQ_CALIBRATION_BATCHES=16 of 48).
    hessian_forward: `autocast` (the run's precision: bf16 autocast on a GPU, fp32 on a CPU; PR #1019
    calibrates under `torch.autocast`) or `bf16` (a bf16 copy of the model without autocast, so every linear's
    input X is bf16: PR #1611's `collect_hessians` runs its bf16 model with autocast off).
    device: `cpu` moves the Hessians to the CPU once collected (before they are divided) and runs GPTQ there
    (Cholesky, column loop, error propagation, in fp32); `model` leaves them, and GPTQ, on the model's device
    (the GPU at a training-end export: faster, but not the records' arithmetic). cpu is the default because
    every record with full GPTQ runs it on the CPU: PR #1019 accumulates its Hessians on the CPU, PR #1611
    moves them there (`hessians[name].cpu() / n`) before `gptq_mixed_quantize`. On a CPU-only run both are
    the same."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    hessian_damp: float = 0.01
    batch: int = 8
    hessian_norm: str = "sequences"
    hessian_forward: str = "autocast"
    device: str = "cpu"

    def __post_init__(self):
        if self.block_size < 1 or self.batch < 1:
            raise ValueError(f"gptq.block_size ({self.block_size}) and gptq.batch ({self.batch}) must be >= 1")
        if self.damp < 0 or self.hessian_damp < 0:
            raise ValueError("gptq.damp and gptq.hessian_damp must be >= 0")
        if self.hessian_norm not in HESSIAN_NORMS:
            raise ValueError(f"gptq.hessian_norm {self.hessian_norm!r} not in {HESSIAN_NORMS}")
        if self.hessian_forward not in HESSIAN_FORWARDS:
            raise ValueError(f"gptq.hessian_forward {self.hessian_forward!r} not in {HESSIAN_FORWARDS}")
        if self.device not in GPTQ_DEVICES:
            raise ValueError(f"gptq.device {self.device!r} not in {GPTQ_DEVICES}")


@dataclass
class LQERSettings:
    """The export config's `lqer` section: LQER after quantization (pgolf/quant/lqer.py; PR #1797 as PR #1611
    runs it: LQER_ENABLED=1, LQER_RANK=4, LQER_TOP_K=3, LQER_ASYM_ENABLED=1, LQER_ASYM_GROUP=64,
    LQER_FACTOR_BITS=4). The `top_k` GPTQ'd matrices with the largest quantization error ‖W − diag(s)·q‖_F
    get a rank-`rank` correction; its factors are packed asymmetrically (A INT2, B INT4 in groups of
    `asym_group`) when `asym` is on and the group divides B's size, else per row as INT`factor_bits`."""

    enabled: bool = False
    rank: int = 4
    top_k: int = 3
    factor_bits: int = 4
    asym: bool = True
    asym_group: int = 64

    def __post_init__(self):
        if self.rank < 1 or self.top_k < 1 or self.asym_group < 1:
            raise ValueError(
                f"lqer.rank ({self.rank}), lqer.top_k ({self.top_k}) and lqer.asym_group ({self.asym_group}) "
                "must be >= 1"
            )
        if not 2 <= self.factor_bits <= 8:
            raise ValueError(f"lqer.factor_bits {self.factor_bits} must be in 2..8 (int8 containers)")

    def to_dict(self) -> dict:
        return asdict(self)


SOURCES = ("none", "ar", "train", "train_shuffled")


@dataclass
class CalibrationConfig:
    """The export config's `calibration` section (pgolf/quant/calibrate.py): where GPTQ's calibration
    sequences come from and how many. `world_size` (train_shuffled): the rank-0 shard files are
    `files[0::world_size]`; None = the run's world size (a re-export: 1; set 8 for an 8-GPU record's)."""

    source: str = "none"  # none | ar | train | train_shuffled
    count: int = 64
    length: int = 2048
    temperature: float = 0.8
    seed: int | None = None  # None: the run's seed (ar); train_shuffled: the rank (PR #1611)
    batch: int = 8  # sequences generated together (ar)
    world_size: int | None = None

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"calibration.source {self.source!r} not in {SOURCES}")
        if self.count < 1 or self.length < 2 or self.batch < 1:
            raise ValueError(
                f"calibration needs count >= 1, length >= 2, batch >= 1 (got {self.count}, {self.length}, {self.batch})"
            )
        if self.world_size is not None and self.world_size < 1:
            raise ValueError(f"calibration.world_size {self.world_size} must be >= 1 (or null: the run's)")
        if self.temperature < 0:
            raise ValueError(f"calibration.temperature {self.temperature} must be >= 0 (0 = greedy)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneConfig:
    enabled: bool = False
    total_bytes: int | None = None  # code + model target in decimal bytes; None = the export's limit_bytes
    bits: list[int] = field(default_factory=lambda: [6])  # which integer widths give candidates

    def __post_init__(self):
        self.bits = [int(b) for b in self.bits]
        if self.total_bytes is not None and self.total_bytes <= 0:
            raise ValueError(f"prune.total_bytes {self.total_bytes} must be positive (decimal bytes)")

    def to_dict(self) -> dict:
        return asdict(self)


def compliance(source: str, seconds: float, train_time_ms: float | None, cap_ms: float | None) -> dict:
    """Whether calibration ran inside the training time budget and whether it was allowed (PRs #535/#569/#593/#609).

    The calibration is counted from the end of training: inside iff train time + calibration time <= cap.
    Self-generation reads no data, so it is compliant either way; training data (`train`, `train_shuffled`)
    is compliant only inside."""
    inside = None
    if cap_ms and cap_ms > 0 and train_time_ms is not None:
        inside = train_time_ms + 1000.0 * seconds <= cap_ms
    if source == "none":
        return {"inside_training_budget": inside, "compliant": True, "reason": "no calibration data used"}
    if source == "ar":
        reason = "self-generated by the trained model: no training or validation data read (PR #1019)"
        return {"inside_training_budget": inside, "compliant": True, "reason": reason}
    if inside:
        reason = "training data read inside the training time budget"
        return {"inside_training_budget": True, "compliant": True, "reason": reason}
    if inside is None:
        reason = (
            "training data read with no training time cap set (train.max_wallclock_seconds=0), so it cannot be "
            "shown to fit in the training budget; not compliant (PRs #535/#569/#593/#609)"
        )
    else:
        reason = (
            f"training data read after the training deadline ({train_time_ms / 1000:.1f}s trained + "
            f"{seconds:.1f}s calibration > {cap_ms / 1000:.0f}s cap); not compliant "
            "(PRs #535/#569/#593/#609)"
        )
    return {"inside_training_budget": inside, "compliant": False, "reason": reason}


def calibration_ok(record) -> tuple[bool, str]:
    """(whether an artifact's `calibration` record (`compliance` above, pgolf/export/gptq_stage.py) says its
    GPTQ calibration was compliant, the record's reason). No record (an artifact without GPTQ, or written
    before records existed) is compliant; a record that is not a mapping with `compliant: true` is not. The
    one rule eval.py (pgolf/eval/run.py) and the end-of-training results (callbacks/export.py) apply."""
    if record is None:
        return True, "no calibration record"
    if not isinstance(record, dict):
        return False, f"the artifact's calibration record is not a mapping: {record!r}"
    reason = str(record.get("reason", "no reason recorded"))
    return record.get("compliant") is True, reason


def calibration_verdict(record) -> str | None:
    """None when `calibration_ok(record)`, else the verdict's reason `calibration: <the record's reason>`."""
    ok, reason = calibration_ok(record)
    return None if ok else f"calibration: {reason}"


def mark_not_compliant(modes, why: str) -> None:
    """Every mode result of `modes` (dicts with `compliant` and `reason`) `compliant: false`, `why` in front of
    its own reason: every mode scored the same artifact (eval.py's results and results.json's round trip)."""
    for r in modes:
        r["compliant"], r["reason"] = False, f"{why}; {r['reason']}"
