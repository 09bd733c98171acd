"""Builders that turn the composed Hydra config into Lightning objects (called by `train.py`), and the
config checks that need Lightning itself (`check_lightning_config`), run before any data preparation."""

from __future__ import annotations

import csv
import inspect
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from pgolf import optional
from pgolf.config.typed import ConfigError
from pgolf.data.datamodule import GolfDataModule
from pgolf.data.stream import StreamLayout, default_grad_accum, load_val_data, val_seq_len
from pgolf.data.tokenizer import TokenizerError, TokenizerInfo, build_byte_luts, load_tokenizer
from pgolf.export.provenance import provenance
from pgolf.io import atomic_path, atomic_write_bytes
from pgolf.model.gpt import count_params
from pgolf.quant.artifact import ArtifactError, check_codec
from pgolf.runlog import global_rank
from pgolf.train import wandb_logger  # noqa: F401  (registers the optional part `wandb`; imports wandb only when a run is made)
from pgolf.train.module import GolfModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file, fsync'ed and renamed: a crash never leaves a torn file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def world_size_of(trainer_cfg: DictConfig) -> int:
    if "WORLD_SIZE" in os.environ:  # launched by torchrun / SLURM
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_cfg.get("devices", 1)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices must be a positive integer, got {devices!r}")
    return devices * int(trainer_cfg.get("num_nodes", 1))


def grad_accum_of(cfg: DictConfig) -> int:
    world = world_size_of(cfg.trainer)
    ga = cfg.train.grad_accum
    return default_grad_accum(world) if ga in (None, "auto") else int(ga)


def check_lightning_config(cfg: DictConfig) -> None:
    """The checks that need Lightning, before any data preparation: every `trainer` key that pgolf does not
    read itself is an argument of `lightning.Trainer`, and `train.batch_tokens` splits into whole sequences
    per rank and micro-step. Raises ConfigError."""
    params = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in cfg.trainer:
        if key not in params:
            raise ConfigError(f"trainer.{key} is not an argument of lightning.Trainer")
    try:
        StreamLayout(cfg.train.batch_tokens, cfg.train.seq_len, world_size_of(cfg.trainer), grad_accum_of(cfg))
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None


def check_accelerator(cfg: DictConfig) -> None:
    """`trainer.accelerator` gpu (or cuda) needs a CUDA device on this machine (the records' experiments ask
    for one). Raises ConfigError saying how to run on the CPU, where Lightning raised a
    MisconfigurationException traceback."""
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={acc}, but this machine has no CUDA device: run on the CPU with trainer=cpu "
            "(train.py) or trainer.accelerator=cpu trainer.precision=32-true train.compile=false (a packed "
            "train_gpt.py)"
        )


def check_export_codec(cfg: DictConfig) -> None:
    """The export's codec and level, and the external program it needs (`lrzip` for the per-group codec, PR
    #1611), checked before any data is prepared, so that a missing program is one `config error:` line and
    not a traceback after the data download. Raises ConfigError."""
    if not cfg.export.get("enabled", True):
        return
    try:
        check_codec(str(cfg.export.codec), cfg.export.get("level"))
    except ArtifactError as e:
        raise ConfigError(f"export: {e}") from None


def instantiate_extras(specs: DictConfig, base: type, where: str) -> list:
    """`{name: {_target_: class path, **kwargs}}` instantiated in order (hydra.utils.instantiate), each an
    instance of `base`. Raises ConfigError naming `where.name`."""
    out = []
    for name, spec in specs.items():
        try:
            obj = instantiate(spec)
        except InstantiationException as e:
            raise ConfigError(f"{where}.{name}: {' '.join(str(e).split())}") from None
        if not isinstance(obj, base):
            raise ConfigError(f"{where}.{name}: {spec._target_} is not a {base.__module__}.{base.__name__}")
        out.append(obj)
    return out


def build_extra_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The Lightning callbacks of `callbacks.extra` (e.g. `+callbacks.extra.lr_monitor._target_=
    lightning.pytorch.callbacks.LearningRateMonitor`), for after the challenge's own."""
    return instantiate_extras(cfg.callbacks.extra, L.Callback, "callbacks.extra")


def truncated_val_tokens(
    pattern: str, seq_len: int, vocab_size: int, max_tokens: int, bytes_pattern: str | None = None
) -> tuple[torch.Tensor, int]:
    """(the validation tokens as the DataModule loads them, cut to the first `max_tokens` targets rounded
    down to whole sequences (at least one), the number of targets of the whole split): `data.val_max_tokens`
    of debug runs, never the challenge's metric. With a byte sidecar (CaseOps data) the DataModule cuts its
    bytes to the same prefix."""
    tokens = load_val_data(pattern, seq_len, vocab_size, bytes_pattern=bytes_pattern).tokens
    keep = max(max_tokens // seq_len, 1) * seq_len
    return tokens[: min(keep, tokens.numel() - 1) + 1], tokens.numel() - 1


def build_datamodule(cfg: DictConfig) -> GolfDataModule:
    d, t = cfg.data, cfg.train
    dm = GolfDataModule(
        train_pattern=d.train_pattern,
        val_pattern=d.val_pattern,
        tokenizer_path=d.tokenizer_path,
        vocab_size=d.vocab_size,
        batch_tokens=t.batch_tokens,
        seq_len=t.seq_len,
        eval_seq_len=d.eval_seq_len,
        val_batch_tokens=d.val_batch_tokens,
        grad_accum=grad_accum_of(cfg),
        val_bytes_pattern=d.get("val_bytes_pattern"),
        doc_seg_len=int(t.max_seg_len) if t.doc_attention else None,
    )
    if d.val_max_tokens is not None:  # the DataModule keeps val_tokens that are already set
        dm.val_tokens, full = truncated_val_tokens(
            d.val_pattern,
            dm.val_seq_len,
            d.vocab_size,
            d.val_max_tokens,
            bytes_pattern=d.get("val_bytes_pattern"),
        )
        if dm.val_tokens.numel() - 1 < full:
            dm.val_cut_from = full
    return dm


def build_module(cfg: DictConfig, tokenizer_path: str) -> tuple[GolfModule, TokenizerInfo]:
    sp = load_tokenizer(tokenizer_path)
    info = TokenizerInfo.from_path(tokenizer_path)
    if cfg.model.vocab_size < info.vocab_size:  # one `data error:` line (pgolf/train/run.py), before any step
        raise TokenizerError(
            f"{info.name}: its vocab size {info.vocab_size} is larger than model.vocab_size {cfg.model.vocab_size}: "
            "the tokenizer of another dataset (check data.tokenizer_path), or set model.vocab_size"
        )
    module = GolfModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        compile=bool(cfg.train.compile),
        compile_backend=cfg.train.get("compile_backend", "inductor"),
        doc_attention=bool(cfg.train.doc_attention),
        max_seg_len=int(cfg.train.max_seg_len),
    )
    module.luts = build_byte_luts(sp, cfg.model.vocab_size)
    return module, info


def build_logger(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The job's loggers: the CSV metrics file always (`csv/metrics.csv`, what the run directory keeps;
    `ContinuedCSVLogger` for a run resumed in its own directory), plus W&B with `logger=wandb`, then the
    Lightning loggers of `logger.extra`; with `logger.kind=none` only the extra ones. Raises ConfigError for
    an extra logger that cannot be instantiated."""
    lg = cfg.logger
    extra = instantiate_extras(lg.extra, Logger, "logger.extra")
    if lg.kind == "none":
        return extra
    resume = cfg.get("resume")
    if resume is not None and Path(resume).resolve().is_relative_to(Path(run_dir).resolve()):
        metrics = ContinuedCSVLogger(run_dir, resume)
    else:
        metrics = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if lg.kind == "csv":
        return [metrics, *extra]
    if lg.kind == "wandb":
        return [metrics, optional.get("wandb")(cfg, run_dir), *extra]
    raise ValueError(f"unknown logger.kind {lg.kind!r} (csv | wandb | none)")


class ContinuedCSVLogger(CSVLogger):
    """`csv/metrics.csv` of a run resumed in its own directory (train.py's `hydra.run.dir` is the checkpoint's
    run directory; the packed train_gpt.py's folder holds the checkpoint). Lightning 2.6's writer deletes an
    existing metrics.csv when it starts (lightning/fabric/loggers/csv_logs.py, `_check_log_dir_exists`), so
    a resume would lose the rows of the attempts before it (the step-0 validation included), while the log
    keeps their lines. This one keeps every row up to the step of the checkpoint `resume` names and drops
    the later ones, which the resumed run logs again (the same values: the resume is exact), then appends as
    Lightning does; the file is only ever rewritten atomically (pgolf/io.py), appended to otherwise."""

    def __init__(self, run_dir: str | Path, resume: str | Path):
        super().__init__(save_dir=str(run_dir), name="csv", version="")
        self.resume = Path(resume)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetrics(self.log_dir, self.resume)
        return self._experiment


class _ContinuedMetrics(ExperimentWriter):
    def __init__(self, log_dir: str, resume: Path):
        self.resume = resume
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's removes metrics.csv; keep the rows up to the checkpoint
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        step = checkpoint_step(self.resume)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(float(r["step"])) <= step]
            self.metrics_keys = list(reader.fieldnames or [])
        self._write(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:  # Lightning's rewrites in place
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


def finish_logger(loggers: list, results: dict, exit_code: int = 0) -> None:
    """End the job's logger runs: W&B gets the results in its summary and is finished (also on failure)."""
    for lg in loggers or []:
        if isinstance(lg, WandbLogger):
            optional.get("wandb_finish")(lg, results, exit_code)


def save_resolved_config(cfg: DictConfig, path: str | Path) -> Path | None:
    """Write the fully resolved config to `path` (train.py: `.hydra/resolved.yaml`, next to Hydra's
    config.yaml, which keeps `${...}` interpolations); rank 0 only."""
    if global_rank() != 0:
        return None
    atomic_write_bytes(Path(path), OmegaConf.to_yaml(cfg, resolve=True).encode())
    return Path(path)


# Printed by every run, and silenced one by one (no blanket filter):
# - Lightning 2.6's advertisements, logged at INFO by `rank_zero_info` when a Trainer is built
#   (trainer/connectors/logger_connector.py: litlogger; callback_connector.py: litmodels);
# - torch 2.13's FutureWarning on `LeafSpec`, which Lightning's own lightning/pytorch/utilities/_pytree.py
#   instantiates (`_tree_flatten`) whenever a batch is moved: Lightning's to fix, not pgolf's.
LIGHTNING_TIP = "💡 Tip:"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
LEAFSPEC_WARNING = dict(
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)


class DropLightningTips(logging.Filter):
    """Drops Lightning's `💡 Tip: ...` advertisement records, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(LIGHTNING_TIP)


def quiet_lightning() -> None:
    """Silence Lightning's tips and the LeafSpec FutureWarning from Lightning's _pytree (see above); once."""
    for name in RANK_ZERO_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in lg.filters):
            lg.addFilter(DropLightningTips())
    warnings.filterwarnings("ignore", **LEAFSPEC_WARNING)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a Lightning checkpoint was saved at (its tensors mapped, not read)."""
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def max_steps_of(cfg: DictConfig) -> int:
    """Lightning's `max_steps`: `train.iterations` (-1: no step budget), one more when the run resumes from a
    checkpoint of its last step: Lightning would skip the whole fit loop, its train-start and train-end hooks
    (the export) with it; the clock stops that run before any step (callbacks/wallclock.py)."""
    n = int(cfg.train.iterations)
    if n <= 0:
        return -1
    return n + 1 if cfg.get("resume") and checkpoint_step(cfg.resume) >= n else n


def build_trainer(cfg: DictConfig, callbacks: list, logger) -> L.Trainer:
    quiet_lightning()
    tr = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = tr.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
    t = cfg.train
    accum = grad_accum_of(cfg)
    val_every = int(t.val_every)
    has_bar = any(isinstance(cb, L.pytorch.callbacks.ProgressBar) for cb in callbacks)
    return L.Trainer(
        **tr,
        strategy=strategy,
        max_steps=max_steps_of(cfg),
        max_epochs=-1,
        accumulate_grad_batches=accum,
        gradient_clip_val=float(cfg.optim.grad_clip) or None,
        gradient_clip_algorithm="norm",
        val_check_interval=val_every * accum if val_every > 0 else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if val_every > 0 else 0,
        # the reference validates at step 0 too when VAL_LOSS_EVERY > 0: the whole validation set before the
        # first step (Lightning's sanity check, skipped on resume); the clock prints its step:0 line
        num_sanity_val_steps=-1 if val_every > 0 else 0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=has_bar,
        use_distributed_sampler=False,
        logger=logger or False,
        callbacks=callbacks,
        default_root_dir=None,
        plugins=[AtomicCheckpointIO()],
    )


def run_meta(cfg: DictConfig, tokenizer: TokenizerInfo) -> dict:
    """What an artifact records about its origin (never absolute paths)."""
    return {
        "experiment": cfg.name,
        "seed": int(cfg.seed),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256},
        "data": {
            "train_pattern": Path(cfg.data.train_pattern).name,
            "val_pattern": Path(cfg.data.val_pattern).name,
            # what the validation split was cut to a multiple of: eval.py scores the same targets
            "val_seq_len": val_seq_len(int(cfg.train.seq_len), cfg.data.eval_seq_len, bool(cfg.train.doc_attention)),
        },
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "final_eval": {"seq_len": int(cfg.final_eval.seq_len)},  # eval.py's default windows: the round trip's
        "provenance": provenance(),
    }


def log_header(
    cfg: DictConfig, module: GolfModule, dm: GolfDataModule, info: TokenizerInfo, world: int, code: dict | None = None
) -> list[str]:
    """The baseline train_gpt.py's start-of-run lines, then the run's code record (`code_bytes:N
    code_sha256:HEX`, the packed train_gpt.py; pgolf/export/code.py) when one is given."""
    m, o, t = module.model_cfg, cfg.optim, cfg.train
    xsa = [i for i, b in enumerate(module.gpt.blocks) if b.attn.xsa]
    lines = [
        f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer={info.name} vocab_size:{info.vocab_size}",
        f"train_loader:pattern={Path(cfg.data.train_pattern).name}",
        f"val_loader:pattern={Path(cfg.data.val_pattern).name} tokens:{dm.val_tokens.numel() - 1}",
        f"model_params:{count_params(module.gpt)}",
        f"world_size:{world} grad_accum_steps:{dm.layout.grad_accum}",
        f"attention_mode:{'gqa' if m.num_kv_heads != m.num_heads else 'mha'} num_heads:{m.num_heads} "
        f"num_kv_heads:{m.num_kv_heads}",
        f"XSA:last_{m.xsa_last_n} active_layers:{xsa}",
        f"tie_embeddings:{m.tie_embeddings} embed_lr:{o.embed_lr} head_lr:{o.head_lr} matrix_lr:{o.matrix_lr} "
        f"scalar_lr:{o.scalar_lr}",
        f"train_batch_tokens:{t.batch_tokens} train_seq_len:{t.seq_len} iterations:{t.iterations} "
        f"warmup_steps:{t.warmup_steps} max_wallclock_seconds:{t.max_wallclock_seconds}"
        + (f" gptq_reserve_seconds:{t.gptq_reserve_seconds}" if t.gptq_reserve_seconds else ""),  # stops earlier
        f"seed:{cfg.seed}",
        f"torch:{torch.__version__} threads:{torch.get_num_threads()}",
    ]
    if code is not None:
        lines.append(f"code_bytes:{code['bytes']} code_sha256:{code['sha256']}")
    return lines
