"""`StepState`: the per-step values that the LightningModule and the training callbacks share.

The GolfModule owns one instance (`module.state`); every writer and reader uses plain attribute access, so a
renamed field fails loudly instead of falling back to a default. Who writes and who reads each field:

- `loss_sum`, `micro`: `GolfModule.training_step` adds each micro-batch's loss; the challenge clock pops
  their mean once per optimizer step; the compile warm-up clears what its steps added.
- `lr_scale`: set by the LR schedule before each optimizer step; read by late QAT, SWA and the clock's metrics.
- `train_time_ms`: set by the clock at each optimizer-step boundary; the export records it.
- `last_val`: set by `GolfModule.on_validation_epoch_end`; the clock prints it in the validation line; the
  export reuses it as the pre-quantization figure when it scored the exported weights (callbacks/export.py).
- `weights`: which weights `pl_module.gpt` holds, `raw` (training's) or `averaged`: set by the averaging
  callback when it swaps its weights in for validation (and back) and when it applies them at the end.
- `preempted`: set by checkpointing on SIGTERM; the export is then skipped and `train.py` exits cleanly.

None of it goes into a checkpoint: every field is recomputed by the first step after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepState:
    loss_sum: torch.Tensor | None = None  # sum of this rank's micro-batch losses since the last pop (device)
    micro: int = 0  # micro-batches in loss_sum
    lr_scale: float = 1.0  # multiplier on every group's base LR for the current step (1.0 before the first)
    train_time_ms: float = 0.0  # challenge-clock time at the end of the last optimizer step
    # the latest validation: val_loss, val_bpb, val_tokens (targets), val_bytes, step, weights, seq_len
    last_val: dict | None = None
    weights: str = "raw"  # what pl_module.gpt holds: raw | averaged
    preempted: bool = False  # SIGTERM: a checkpoint was saved and training stopped; no export

    def add_loss(self, loss: torch.Tensor) -> None:
        """Add one micro-batch's (detached, scalar) loss; summed on the device without a sync."""
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro += 1

    def pop_loss(self) -> torch.Tensor | None:
        """Mean loss of the micro-batches added since the last call (a device tensor, no sync), or None if
        there were none; clears the sum."""
        if self.loss_sum is None:
            return None
        v = self.loss_sum / max(self.micro, 1)
        self.clear_loss()
        return v

    def clear_loss(self) -> None:
        self.loss_sum, self.micro = None, 0
