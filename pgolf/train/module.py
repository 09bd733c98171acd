"""The LightningModule around the GPT: loss, sum-reduced validation metrics, the one optimizer.

It owns the `StepState` shared with the training callbacks (`self.state`: the step's loss sum, LR scale,
clock time, latest validation metrics, preemption flag; see `pgolf.train.state`).

Validation accumulates float64 loss/token/byte sums over this rank's windows and reduces them across
ranks at the end of the epoch (never a mean of means, never a padded sampler), so `val_bpb` is exact.
`torch.compile` wraps the inner GPT only (compiling the LightningModule breaks `self.log`, Lightning
#21836); `self.gpt` stays the uncompiled module that owns the weights.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from pgolf.config.typed import ConfigError
from pgolf.data.tokenizer import ByteLUTs, bpb
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.optim.groups import build_optimizer
from pgolf.runlog import log0
from pgolf.train.state import StepState


class GolfModule(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optim: dict,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend="inductor",
        doc_attention: bool = False,
        max_seg_len: int = 2048,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = GPTConfig.from_dict(dict(model))
        self.optim_cfg = dict(optim)
        self.gpt = GPT(self.model_cfg)
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        self._compiled = None  # kept out of the module tree, so state_dict has no duplicate keys
        self.luts: ByteLUTs | None = None  # set by the training script from the tokenizer
        self.state = StepState()
        self._val_sums: torch.Tensor | None = None
        self._val_weights = "raw"  # state.weights when the running validation started
        # Document-bounded attention in training (PR #1530 / #1611): segments start at every BOS and every
        # `max_seg_len` tokens inside a document; the train stream builds them on the host with each batch.
        self.doc_attention, self.max_seg_len = bool(doc_attention), int(max_seg_len)

    def configure_model(self) -> None:
        if self.compile and self._compiled is None:
            compiled = torch.compile(
                self.gpt, dynamic=False, fullgraph=True, mode=self.compile_mode, backend=self.compile_backend
            )
            object.__setattr__(self, "_compiled", compiled)

    @property
    def _fwd(self):
        return self._compiled if self._compiled is not None else self.gpt

    def forward(self, idx, targets=None):
        return self._fwd(idx, targets)

    def training_step(self, batch, batch_idx):
        x, y, *cu = batch  # with document-bounded attention the stream adds the batch's cu_seqlens
        loss = self._fwd(x, y, cu_seqlens=cu[0]) if cu else self._fwd(x, y)
        # Summed on the device without a sync; the clock callback reads it once per optimizer step.
        self.state.add_loss(loss.detach())
        return loss

    # ---- validation: float64 sums, reduced across ranks ------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self._val_weights = self.state.weights  # after the callbacks' hook: an averaging swap has happened
        if self.luts is not None and self.luts.base_bytes.device != self.device:
            self.luts = self.luts.to(self.device)

    def validation_step(self, batch, batch_idx):
        x, y, *sidecar = batch  # (x, y) or, with a CaseOps byte sidecar, (x, y, the targets' original bytes)
        nll = self._fwd(x, y, reduction="none")
        nb = sidecar[0].to(torch.float64) if sidecar else self.luts.target_bytes(x, y)
        self._val_sums += torch.stack(
            (nll.double().sum(), torch.tensor(float(y.numel()), dtype=torch.float64, device=self.device), nb.sum())
        )

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        loss_sum, n, nbytes = (float(v) for v in sums.cpu())
        val_loss, val_bpb = bpb(loss_sum, n, nbytes)
        dm = self.trainer.datamodule
        self.state.last_val = {
            "val_loss": val_loss,
            "val_bpb": val_bpb,
            "val_tokens": n,
            "val_bytes": nbytes,
            "step": self.trainer.global_step,
            "weights": self._val_weights,
            "seq_len": getattr(dm, "eval_seq_len", None),
        }
        # for callbacks that monitor a metric; the clock writes it to the loggers at its optimizer step
        # (Lightning's own logging would file it under the step before: its step counter moves after validation)
        self.log_dict({"val_loss": val_loss, "val_bpb": val_bpb}, rank_zero_only=True, sync_dist=False, logger=False)

    # ---- checkpoints carry the RNG states (Lightning's do not), as tensors and plain types so that
    # ---- Lightning's weights-only loading accepts them ---------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, pstate, pgauss = random.getstate()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, torch.tensor(pstate, dtype=torch.int64), pgauss],
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_tensors(self.state_dict(), checkpoint.get("state_dict", {}))
        check_checkpoint_momentum(self.optim_cfg, checkpoint)
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            version, pstate, pgauss = rng["python"]
            random.setstate((version, tuple(int(v) for v in pstate.tolist()), pgauss))

    def configure_optimizers(self):
        return build_optimizer(self.gpt, self.optim_cfg)

    # ---- gradient clipping on each rank's local gradients (optim.grad_clip_scope: local) -------------------
    @property
    def local_clip(self) -> bool:
        """Clip each rank's local gradients, then average them, as the banked records do (they run no DDP: PR
        #399's Parallel Muon, #549, #1019, #1298, #1611); only with several processes (alone both are one)."""
        return self.optim_cfg.get("grad_clip_scope", "averaged") == "local" and self.trainer.world_size > 1

    def on_fit_start(self) -> None:
        if self.local_clip:  # DDP keeps each rank's gradients; configure_gradient_clipping averages them
            ddp = self.trainer.strategy.model
            if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                raise ConfigError("optim.grad_clip_scope=local needs the DDP strategy with several processes")
            ddp.register_comm_hook(None, keep_local_gradients)
            log0("grad_clip: each rank's local gradients are clipped, then averaged (optim.grad_clip_scope=local)")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not self.local_clip:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        clip_local_then_average(params, float(gradient_clip_val or 0.0))
        return None


def check_checkpoint_tensors(model: dict, checkpoint: dict) -> None:
    """A resumed checkpoint's weights are the config's model's: the same names (none missing, none
    unexpected), shapes and dtypes, checked before Lightning loads them (a load would round an fp32 table
    into a bf16 one, or fail on a shape or a name with a traceback). `model`, `checkpoint`: state dicts
    {name: tensor}. Raises ConfigError naming the first mismatches of each kind."""
    missing = [k for k in model if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model]
    bad = [
        f"{k} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')} (the config's model: {tuple(model[k].shape)} "
        f"{str(model[k].dtype).removeprefix('torch.')})"
        for k, v in checkpoint.items()
        if k in model and (tuple(v.shape) != tuple(model[k].shape) or v.dtype != model[k].dtype)
    ]
    found = [
        f"{what}: {_first(names)}"
        for what, names in (
            ("missing from the checkpoint", missing),
            ("not in the config's model", unexpected),
            ("other shapes or dtypes", bad),
        )
        if names
    ]
    if found:
        raise ConfigError(
            f"resume: the checkpoint does not match this config's model ({'; '.join(found)}); resume with the "
            "overrides of the run that wrote it"
            + (" (model.embed_dtype: a table's dtype is never converted on resume)" if bad else "")
        )


def _first(names: list[str], n: int = 4) -> str:
    """The first `n` of `names`, comma-separated, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_checkpoint_momentum(optim: dict, checkpoint: dict) -> None:
    """A resumed checkpoint's Muon momentum has the config's `optim.muon_momentum_dtype` (torch's
    load_state_dict would cast an fp32 buffer to bf16 silently; checkpoints without the field hold fp32).
    Raises ConfigError."""
    want = optim.get("muon_momentum_dtype", "fp32")
    for state in checkpoint.get("optimizer_states", []):
        for g in state.get("param_groups", []):
            have = g.get("momentum_dtype", "fp32")
            if g.get("kind") == "muon" and have != want:
                raise ConfigError(
                    f"resume: the checkpoint's Muon momentum is {have} but optim.muon_momentum_dtype={want}; resume "
                    "with the overrides of the run that wrote it"
                )


def keep_local_gradients(_state, bucket):  # no annotations: DDP rejects string ones (postponed evaluation)
    """A DDP communication hook that communicates nothing: each rank keeps its own gradients (the bucket's
    buffer as it is), for `clip_local_then_average` to clip and average."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def clip_local_then_average(params: list[torch.Tensor], max_norm: float) -> None:
    """The banked records' order (no DDP; PR #399's Parallel Muon, #549 to #1611): clip this rank's local
    gradients to global norm `max_norm` (torch.nn.utils.clip_grad_norm_, as the records; 0: no clip), then
    average every gradient over the ranks (a sum in each gradient's dtype, divided by the world size), in
    place. Needs an initialised process group."""
    live = [p for p in params if p.grad is not None]
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(live, max_norm)
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in live:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        i = 0
        for g in grads:
            g.copy_(flat[i : i + g.numel()].view_as(g))
            i += g.numel()
