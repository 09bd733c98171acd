"""Late QAT (PR #286; threshold 0.15 from PR #414): switch on int6 straight-through fake quantization of
every quantized matrix on
the first step whose LR scale is below `threshold`. The switch is a Python flag on each `CastedLinear`: the
forward costs nothing extra before it, and a compiled forward recompiles once when it flips (the records'
class flag was constant-folded by torch.compile and never acted:
records/track_10min_16mb/2026-03-21_11L_XSA4_EMA_PartialRoPE_LateQAT_1.1248/README.md).
Must come after the LR schedule callback, whose scale it reads."""

from __future__ import annotations

import lightning as L

from pgolf.runlog import log0


class LateQAT(L.Callback):
    def __init__(self, threshold: float = 0.15):
        self.threshold = float(threshold)
        self.enabled_at: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._maybe_enable(trainer, pl_module)

    def _maybe_enable(self, trainer, pl_module) -> None:
        if self.enabled_at is not None or pl_module.gpt.cfg.qat != "late" or self.threshold <= 0:
            return
        scale = pl_module.state.lr_scale
        if scale < self.threshold:
            pl_module.gpt.set_qat("late", enabled=True)
            self.enabled_at = trainer.global_step
            log0(f"late_qat:enabled step:{trainer.global_step} scale:{scale:.4f}")

    def on_train_start(self, trainer, pl_module):
        if self.enabled_at is not None:  # resumed after the switch: re-apply it
            pl_module.gpt.set_qat("late", enabled=True)

    def state_dict(self) -> dict:
        return {"enabled_at": self.enabled_at}

    def load_state_dict(self, state: dict) -> None:
        self.enabled_at = state.get("enabled_at")
