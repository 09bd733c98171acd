"""Weight averaging (EMA: PR #287; SWA: PR #162, tight SWA of PR #414) on Lightning's `WeightAveraging` callback.

EMA: an fp32 shadow of the GPT's parameters (bf16 embedding tables included, applied rounded to bf16 as the
records' `load_state_dict` rounds them), initialised from the (restored) initial weights and updated
after every optimizer step from step 1: θ_ema ← d·θ_ema + (1-d)·θ (d = 0.997 in the records). SWA: a
uniform average of the weights taken every `every` steps once the LR scale is below `threshold`. Either
one is *applied* at the end of training (PRs #549/#1019 collect tight SWA and never apply it), before
the export callback, which Lightning calls later because it comes later in the callback list; not when the
run was preempted (`pl_module.state.preempted`: no export, and the checkpoint it saved holds the average, which
the resumed run continues and applies). SWA reads the step's LR scale from `pl_module.state` (set by the LR
schedule earlier in the same step).

Periodic validation during training (`train.val_every`) scores the raw weights by default, as the records
do (their `step:N val_bpb` lines are the training weights'; the averaged weights are only scored after they
are applied): `validate: raw`. With `validate: averaged` each validation inside fit swaps the averaged
weights in (`on_validation_epoch_start`) and the raw ones back (`on_validation_epoch_end`), off the
challenge clock (it pauses for validation first); training continues on exactly the weights it had. The
run's log says which, once, at the start of training. `pl_module.state.weights` says which weights the GPT
holds (raw | averaged), so the export knows whether the last validation scored the weights it exports.

Lightning's class averages the whole LightningModule; here the average is over `pl_module.gpt` (the
compiled wrapper and the byte tables stay out of the copy) and buffers are not averaged (the QAT switch is
a buffer). Checkpoints hold both the current and the averaged weights (Lightning's format), so a resumed
run continues the same average.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pgolf.config.typed import ConfigError
from pgolf.optional import register
from pgolf.runlog import log0

VALIDATE = ("raw", "averaged")  # which weights periodic validation scores (callbacks.averaging.validate)


class GPTAveraging(WeightAveraging):
    kind = "average"

    def __init__(self, validate: str = "raw", **kwargs):
        if validate not in VALIDATE:
            raise ValueError(f"averaging validate must be raw or averaged, got {validate!r}")
        super().__init__(**kwargs)
        self.validate = validate
        self._swapped = False
        self._raw: list[torch.Tensor] | None = None  # the raw weights while the averaged ones are swapped in

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._average_model is None:
            self._average_model = AveragedModel(pl_module.gpt, device=self._device, use_buffers=False, **self._kwargs)
            for p in self._average_model.module.parameters():  # an fp32 average, bf16 tables included
                p.data = p.data.float()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx, module=pl_module):
            self._average_model.update_parameters(_Float(pl_module.gpt))
            self._latest_update_step = trainer.global_step

    def should_update(self, step_idx=None, epoch_idx=None, module=None) -> bool:  # noqa: ARG002
        return step_idx is not None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # averaging is per step only
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.limit_val_batches:  # periodic validation is on (train.val_every > 0)
            which = f"the {self.kind.upper()} weights" if self.validate == "averaged" else "the raw training weights"
            log0(
                f"{self.kind}:validation during training scores {which} (callbacks.averaging.validate="
                f"{self.validate}); the {self.kind.upper()} weights are applied at the end of training"
            )

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.state.preempted:  # no export; the checkpoint just saved holds the average for the resume
            return
        if self.ready():
            log0(f"{self.kind}:applying {self.kind.upper()} weights ({self.describe()})")
            self._copy(self._average_model.module, pl_module.gpt)
            pl_module.state.weights = "averaged"
        else:
            log0(f"{self.kind}:no averaged weights collected; exporting the final weights")

    def ready(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def describe(self) -> str:
        return f"{int(self._average_model.n_averaged)} updates"

    @staticmethod
    def _in_fit(trainer) -> bool:
        # Validation inside fit runs in the VALIDATING stage (`trainer.training` is False there); the
        # function being run is still FITTING.
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate == "averaged" and self.ready() and self._in_fit(trainer):
            self._swap(pl_module.gpt)
            self._swapped = True
            pl_module.state.weights = "averaged"

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap(pl_module.gpt)
            self._swapped = False
            pl_module.state.weights = "raw"

    def _swap(self, gpt) -> None:
        """Averaged weights in (rounded to the GPT's dtypes), or the raw ones back; the average is untouched."""
        if self._raw is None:
            self._raw = [p.detach().clone() for p in gpt.parameters()]
            self._copy(self._average_model.module, gpt)
        else:
            with torch.no_grad():
                for p, r in zip(gpt.parameters(), self._raw):
                    p.copy_(r)
            self._raw = None

    @staticmethod
    def _copy(src, dst) -> None:
        with torch.no_grad():
            for s, d in zip(src.parameters(), dst.parameters()):
                d.copy_(s.to(d.dtype))

    # ---- checkpoints: the averaged model and its counter ride along with the current weights ---------------
    def state_dict(self) -> dict:
        return {"latest_update_step": self._latest_update_step}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is not None:
            checkpoint[f"averaging/{self.kind}"] = {
                k: v.detach().cpu().clone() for k, v in self._average_model.state_dict().items()
            }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(f"averaging/{self.kind}")
        if state is None and int(checkpoint.get("global_step", 0)) > 0:
            # the average would restart from the initial weights (0 updates) and be exported as the model
            held = [k.split("/", 1)[1] for k in checkpoint if k.startswith("averaging/")]
            raise ConfigError(
                f"resume: the checkpoint holds no {self.kind.upper()} average (its run averaged "
                f"{' and '.join(held) or 'nothing'}); resume with the callbacks.averaging.kind of the run that wrote it"
            )
        if state is not None and self._average_model is not None:
            self._average_model.load_state_dict(state)


class _Float:
    """What `AveragedModel.update_parameters` reads of the GPT: its parameters in fp32 (a bf16 embedding table
    is averaged in fp32, as the records' EMA adds `t.float()`)."""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return (p.detach().float() for p in self.module.parameters())

    def buffers(self):
        return self.module.buffers()


class EMA(GPTAveraging):
    """θ_ema ← decay·θ_ema + (1-decay)·θ after every step, from the initial weights (EMA of PR #287)."""

    kind = "ema"

    def __init__(self, decay: float = 0.997, validate: str = "raw"):
        super().__init__(validate, device=None, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = float(decay)

    def setup(self, trainer, pl_module, stage: str) -> None:
        fresh = self._average_model is None
        super().setup(trainer, pl_module, stage)
        if fresh and self._average_model is not None:
            # AveragedModel's first update would copy the weights; the reference's shadow starts at the
            # initial weights and the first update already averages (n_averaged = 1 makes it do so).
            self._average_model.n_averaged.fill_(1)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        # after the compile warm-up restored the initial weights: start the shadow from them
        if trainer.global_step == 0 and self._average_model is not None:
            self._copy(pl_module.gpt, self._average_model.module)

    def describe(self) -> str:
        return f"decay {self.decay}, {int(self._average_model.n_averaged) - 1} updates"


class SWA(GPTAveraging):
    """Uniform average of the weights every `every` steps while the LR scale is below `threshold`
    (tight SWA, PR #414; arXiv:1803.05407)."""

    kind = "swa"

    def __init__(self, every: int = 50, threshold: float = 0.2, validate: str = "raw"):
        super().__init__(validate, device=None, use_buffers=False)
        self.every, self.threshold = int(every), float(threshold)
        self._started = False

    def should_update(self, step_idx=None, epoch_idx=None, module=None) -> bool:
        if step_idx is None or module is None:
            return False
        step = step_idx + 1
        ok = module.state.lr_scale < self.threshold and step % self.every == 0
        if ok and not self._started:
            self._started = True
            log0(f"swa:start step:{step}")
        return ok


@register("averaging")
def build_averaging(cfg) -> GPTAveraging | None:
    """The averaging callback of `callbacks.averaging` (kind none | ema | swa, and which weights periodic
    validation scores: validate raw | averaged); None for none.

    Raises ValueError for an unknown kind or `validate`."""
    kind = cfg.get("kind", "none") if cfg is not None else "none"
    if kind in (None, "none"):
        return None
    if kind == "ema":
        return EMA(decay=cfg.ema_decay, validate=cfg.validate)
    if kind == "swa":
        return SWA(every=cfg.swa_every, threshold=cfg.swa_threshold, validate=cfg.validate)
    raise ValueError(f"averaging.kind must be none, ema or swa, got {kind!r}")
