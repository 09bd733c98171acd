"""Weight averaging (EMA: PR #287; SWA: PR #162, tight SWA of PR #414) on Lightning's `WeightAveraging` callback.

EMA: an fp32 shadow of the GPT's parameters, initialised from the (restored) initial weights and updated
after every optimizer step from step 1: θ_ema ← d·θ_ema + (1-d)·θ (d = 0.997 in the records). SWA: a
uniform average of the weights taken every `every` steps once the LR scale is below `threshold`. Either
one is *applied* at the end of training (PRs #549/#1019 collect tight SWA and never apply it), before
the export callback, which Lightning calls later because it comes later in the callback list. SWA reads the
step's LR scale from `pl_module.state` (set by the LR schedule earlier in the same step).

Lightning's class averages the whole LightningModule; here the average is over `pl_module.gpt` (the
compiled wrapper and the byte tables stay out of the copy) and buffers are not averaged (the QAT switch is
a buffer). Checkpoints hold both the current and the averaged weights (Lightning's format), so a resumed
run continues the same average.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pgolf.optional import register
from pgolf.runlog import log0


class GPTAveraging(WeightAveraging):
    kind = "average"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._average_model is None:
            self._average_model = AveragedModel(pl_module.gpt, device=self._device, use_buffers=False, **self._kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx, module=pl_module):
            self._average_model.update_parameters(pl_module.gpt)
            self._latest_update_step = trainer.global_step

    def should_update(self, step_idx=None, epoch_idx=None, module=None) -> bool:  # noqa: ARG002
        return step_idx is not None

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # averaging is per step only
        return None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.ready():
            log0(f"{self.kind}:applying {self.kind.upper()} weights ({self.describe()})")
            self._copy(self._average_model.module, pl_module.gpt)
        else:
            log0(f"{self.kind}:no averaged weights collected; exporting the final weights")

    def ready(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def describe(self) -> str:
        return f"{int(self._average_model.n_averaged)} updates"

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.ready() and trainer.training:
            self._swap(pl_module.gpt)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.ready() and trainer.training:
            self._swap(pl_module.gpt)

    def _swap(self, gpt) -> None:
        for a, c in zip(self._average_model.module.parameters(), gpt.parameters()):
            tmp = a.data.clone()
            a.data.copy_(c.data)
            c.data.copy_(tmp)

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
        if state is not None and self._average_model is not None:
            self._average_model.load_state_dict(state)


class EMA(GPTAveraging):
    """θ_ema ← decay·θ_ema + (1-decay)·θ after every step, from the initial weights (EMA of PR #287)."""

    kind = "ema"

    def __init__(self, decay: float = 0.997):
        super().__init__(device=None, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay = float(decay)

    def setup(self, trainer, pl_module, stage: str) -> None:
        fresh = self._average_model is None
        super().setup(trainer, pl_module, stage)
        if fresh and self._average_model is not None:
            # AveragedModel's first update would copy the weights; the reference's shadow starts at the
            # initial weights and the first update already averages (n_averaged = 1 makes it do so).
            self._average_model.n_averaged.fill_(1)
            for p in self._average_model.module.parameters():
                p.data = p.data.float()

    def on_train_start(self, trainer, pl_module) -> None:
        # after the compile warm-up restored the initial weights: start the shadow from them
        if trainer.global_step == 0 and self._average_model is not None:
            self._copy(pl_module.gpt, self._average_model.module)

    def describe(self) -> str:
        return f"decay {self.decay}, {int(self._average_model.n_averaged) - 1} updates"


class SWA(GPTAveraging):
    """Uniform average of the weights every `every` steps while the LR scale is below `threshold`
    (tight SWA, PR #414; arXiv:1803.05407)."""

    kind = "swa"

    def __init__(self, every: int = 50, threshold: float = 0.2):
        super().__init__(device=None, use_buffers=False)
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
    """The averaging callback of `callbacks.averaging` (kind none | ema | swa); None for none.

    Raises ValueError for an unknown kind."""
    kind = cfg.get("kind", "none") if cfg is not None else "none"
    if kind in (None, "none"):
        return None
    if kind == "ema":
        return EMA(decay=cfg.ema_decay)
    if kind == "swa":
        return SWA(every=cfg.swa_every, threshold=cfg.swa_threshold)
    raise ValueError(f"averaging.kind must be none, ema or swa, got {kind!r}")
