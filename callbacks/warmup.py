"""Compile-priming warm-up (the baseline train_gpt.py's WARMUP_STEPS): run N real training steps to trigger
compilation, then restore the initial weights, optimizer state, RNG state and data stream (the warm-up reads a
separate copy of the stream from micro-step 0, so the real stream is untouched). Runs before the challenge clock
starts, in a resumed run too (from its restored state, which is restored again after), but not in one resumed at
the step where training ended (it takes no step). A model with progressive
depth recurrence (`model.num_loops`, switched on during training) is warmed up in both states, N steps each, so both
graphs are compiled off the clock (PR #1611). A SIGTERM stops it at the next warm-up step boundary (the decision
reduced across ranks): `Terminated`, status 143, since no step has trained (callbacks/checkpoint.py)."""

from __future__ import annotations

import copy

import lightning as L
import torch

from callbacks.checkpoint import Terminated
from pgolf.runlog import log0


class CompileWarmup(L.Callback):
    def __init__(self, steps: int = 20, only_when_compiled: bool = True, clock=None, checkpoint=None):
        self.steps, self.only_when_compiled = int(steps), only_when_compiled
        self.clock = clock  # the challenge clock (callbacks/wallclock.py): a run resumed where training ended
        self.checkpoint = checkpoint  # callbacks/checkpoint.py's Checkpointing: its SIGTERM handler and flag
        self.ran = 0

    def on_train_start(self, trainer, pl_module):
        # a resumed run warms up too: its process compiles afresh, and its first steps would compile on the clock;
        # not one resumed at the step where training ended, which takes no step (the clock says so next)
        if self.steps <= 0 or (self.only_when_compiled and not pl_module.compile):
            return
        if self.clock is not None and self.clock.ended_by(trainer.global_step):
            return
        if self.checkpoint is not None:
            self.checkpoint.arm()
        opt = trainer.optimizers[0]
        model_state = copy.deepcopy(pl_module.gpt.state_dict())
        opt_state = copy.deepcopy(opt.state_dict())
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        dm = trainer.datamodule
        stream = dm.train_stream(start_micro_step=0)
        accum = dm.layout.grad_accum
        strategy = trainer.strategy
        pl_module.train()
        gpt = pl_module.gpt
        was_looping = gpt.looping_active
        states = [False, True] if gpt.cfg.num_loops > 0 and gpt.cfg.enable_looping_at > 0 else [was_looping]
        n = 0
        for looping in states:
            gpt.looping_active = looping
            for k in range(self.steps):
                for m in range(accum):
                    batch = tuple(t.to(pl_module.device) for t in stream.batch(n * accum + m))
                    loss = strategy.training_step(batch, n * accum + m)
                    strategy.backward(loss / accum, opt)
                opt.step()
                opt.zero_grad(set_to_none=True)
                n += 1
                tag = f" looping:{looping}" if len(states) > 1 else ""
                log0(f"warmup_step:{k + 1}/{self.steps}{tag}")
                if self.checkpoint is not None and self.checkpoint.sigterm(trainer):
                    raise Terminated("the compile warm-up (no step was trained: run the same command again)")
        gpt.looping_active = was_looping
        pl_module.gpt.load_state_dict(model_state)
        opt.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        pl_module.state.clear_loss()
        self.ran = n
