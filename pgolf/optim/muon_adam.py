"""`MuonAdam`: one optimizer object for Muon and Adam, and the split of Newton-Schulz work across ranks.

`MuonAdam` is a single `torch.optim.Optimizer` whose param groups carry a `kind` ("muon", "adam", or
"frozen": parameters that are never stepped, PR #1090's smear gate), so Lightning's automatic optimization,
step counting, zero_grad and gradient clipping see one optimizer (docs/techniques.md#optimizer). Every group keeps its
`base_lr`; the schedule callback sets `lr = base_lr * scale`.

Muon (the baseline train_gpt.py, modded-nanogpt): Nesterov momentum (fp32, or bf16 as Parallel Muon keeps it,
PR #399: `momentum_dtype`), optional MuonEq-R row normalisation (PR #1298), Newton-Schulz
(pgolf/optim/newton_schulz.py), the shape scale sqrt(max(1, rows/cols)), and decoupled weight decay with
the scheduled lr. Distributed: each matrix is orthogonalized by one rank (`balanced_owners`) and the updates
are shared with one all-reduce of a flat buffer (zeros elsewhere, so the sum is exact) — every rank then
applies every update.

Adam (the records' AdamW groups): PyTorch's fused AdamW kernel, as the records run it (`fused=True`; decoupled
`p *= 1 - lr*wd`), checked step for step against `torch.optim.AdamW(fused=True)` in the tests, for fp32 and bf16
parameters.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from pgolf.optim.newton_schulz import ROW_NORM_FORMS, newton_schulz, ns_coefficients, row_normalize

KINDS = ("muon", "adam", "frozen")
# Where sqrt(max(1, rows/cols)) is applied: to the update in the Newton-Schulz dtype (the baseline's Muon), or
# in the step size (PR #399's Parallel Muon: p.add_(update, alpha=-lr * scale)).
SHAPE_SCALES = ("update", "step")
MOMENTUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # Muon's momentum buffer (and gradient) dtype
CHOICES = {"row_norm_form": ROW_NORM_FORMS, "shape_scale": SHAPE_SCALES, "momentum_dtype": MOMENTUM_DTYPES}


class MuonAdam(torch.optim.Optimizer):
    """Muon for the groups of kind "muon" (2-D matrices only), AdamW for those of kind "adam"; groups of kind
    "frozen" are held (zero_grad, clipping, state_dict see them) but never updated.

    Raises ValueError for a group of another kind, a non-matrix parameter in a Muon group, or a Newton-Schulz
    variant/step count that does not exist. `ns_dtype`: the Newton-Schulz dtype (default bf16 on CUDA, fp32
    elsewhere)."""

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype | None = None):
        defaults = dict(
            kind="adam",
            lr=1e-3,
            base_lr=None,
            betas=(0.9, 0.95),
            eps=1e-8,
            weight_decay=0.0,
            momentum=0.95,
            nesterov=True,
            ns_steps=5,
            ns_kind="quintic",
            row_norm=False,
            momentum_dtype="fp32",
            row_norm_form="fp32_clamp",
            shape_scale="update",
        )
        for g in param_groups:
            if g.get("kind") not in KINDS:
                raise ValueError(f"param group {g.get('name')!r} has kind {g.get('kind')!r}; expected one of {KINDS}")
            g.setdefault("base_lr", g.get("lr", defaults["lr"]))
            g.setdefault("lr", g["base_lr"])
        super().__init__(param_groups, defaults)
        self.ns_dtype = ns_dtype
        self._owner_cache: dict = {}
        for g in self.param_groups:
            if g["kind"] == "muon":
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon group {g.get('name')!r} holds non-matrix parameters {bad}")
                ns_coefficients(g["ns_kind"], g["ns_steps"])  # validate early
                for key, allowed in CHOICES.items():
                    if g[key] not in allowed:
                        raise ValueError(f"Muon group {g.get('name')!r}: {key} {g[key]!r} not in {tuple(allowed)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g["kind"] == "adam":
                self._adam_step(g)
            elif g["kind"] == "muon":
                self._muon_step(g)
        return loss

    # ---- Adam ----------------------------------------------------------------------------------------
    def _adam_step(self, g: dict) -> None:
        """One AdamW step of group `g` by PyTorch's fused kernel (`torch.optim.AdamW(fused=True)`, the records'
        `fused=True`): fp32 arithmetic for every parameter dtype, so a bf16 embedding table (`model.embed_dtype:
        bf16`) keeps bf16 moments and is rounded once per step, as the records' bf16 tables are."""
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif st["step"].device != p.device:  # a checkpoint's step, loaded onto the CPU
                st["step"] = st["step"].to(p.device, torch.float32)
        states = [self.state[p] for p in params]
        beta1, beta2 = g["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            [],
            [st["step"] for st in states],  # per tensor: parameters may join late
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=g["lr"],
            weight_decay=g["weight_decay"],
            eps=g["eps"],
            maximize=False,
        )

    # ---- Muon ----------------------------------------------------------------------------------------
    def _muon_step(self, g: dict) -> None:
        params = g["params"]
        if not params:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        self._update_momentum(params, g["momentum"], MOMENTUM_DTYPES[g["momentum_dtype"]])
        lr, wd = g["lr"], g["weight_decay"]
        in_step = g["shape_scale"] == "step"
        for p, o in zip(params, self._orthogonal_updates(g, world, rank)):
            if o is None or p.grad is None:
                continue
            if wd != 0:
                p.mul_(1 - lr * wd)  # decoupled weight decay with the scheduled lr (as the records' Muon)
            p.add_(o.to(p.dtype), alpha=-lr * (shape_scale(p) if in_step else 1.0))

    def _update_momentum(self, params: list[torch.Tensor], mu: float, dtype: torch.dtype) -> None:
        # Momentum for every matrix on every rank (cheap, elementwise; gradients are already averaged), so each
        # rank's optimizer state is complete and a rank-0 checkpoint resumes exactly. Only Newton-Schulz, the
        # expensive part, is split across ranks. `dtype` bf16: Parallel Muon's (PR #399) gradient copied to
        # bf16 and a bf16 buffer, so buf <- mu*buf + g rounds in bf16 as in the banked records.
        live = [p for p in params if p.grad is not None]
        bufs = []
        for p in live:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p.grad, dtype=dtype)
            elif st["momentum_buffer"].dtype != dtype:  # load_state_dict casts state to the parameter's dtype:
                st["momentum_buffer"] = st["momentum_buffer"].to(dtype)  # a resumed bf16 buffer, exactly back
            bufs.append(st["momentum_buffer"])
        for p, b in zip(live, bufs):  # per tensor: a CPU foreach multiply would round mu itself to bf16
            b.mul_(mu).add_(p.grad.to(b.dtype))

    def _orthogonal_updates(self, g: dict, world: int, rank: int) -> list[torch.Tensor | None]:
        """Each parameter's scaled Newton-Schulz update (None where this rank has none to apply). With several
        ranks, each computes the matrices it owns into a zero flat buffer and one all-reduce shares them."""
        params, mu = g["params"], g["momentum"]
        coeffs = ns_coefficients(g["ns_kind"], g["ns_steps"])
        dev = params[0].device
        ns_dtype = self.ns_dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        owners = self._owners(g, world)
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes), device=dev, dtype=ns_dtype) if world > 1 else None
        updates: list[torch.Tensor | None] = [None] * len(params)
        offset = 0
        for i, p in enumerate(params):
            if owners[i] == rank and p.grad is not None:
                buf = self.state[p]["momentum_buffer"]
                u = p.grad.to(buf.dtype).add(buf, alpha=mu) if g["nesterov"] else buf  # Nesterov in buf's dtype
                if g["row_norm"]:
                    u = row_normalize(u, form=g["row_norm_form"])
                o = newton_schulz(u, coeffs, dtype=ns_dtype)
                if g["shape_scale"] == "update":
                    o = o * shape_scale(p)
                if flat is not None:
                    flat[offset : offset + sizes[i]] = o.reshape(-1)
                else:
                    updates[i] = o
            offset += sizes[i]
        if flat is None:
            return updates
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # each slice is written by exactly one rank: exact
        offsets = [0, *itertools.accumulate(sizes)]
        return [flat[offsets[i] : offsets[i + 1]].view_as(p) for i, p in enumerate(params)]

    def _owners(self, g: dict, world: int) -> list[int]:
        shapes = [tuple(p.shape) for p in g["params"]]
        key = (tuple(shapes), world)
        if key not in self._owner_cache:
            self._owner_cache[key] = balanced_owners(shapes, world)
        return self._owner_cache[key]


def shape_scale(p: torch.Tensor) -> float:
    """Muon's sqrt(max(1, rows/cols)) of a matrix [rows, cols] (the baseline train_gpt.py)."""
    return math.sqrt(max(1.0, p.size(0) / p.size(1)))


def balanced_owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """Assign each matrix's Newton-Schulz to a rank: largest cost first, to the least-loaded rank.

    Cost ~ m·n·min(m, n) per iteration. Plain round-robin (BASE: i mod world) leaves ranks unbalanced when
    matrix sizes differ (an MLP matrix costs 3x an attention one); the greedy split is deterministic, so every
    rank computes the same assignment without communicating."""
    cost = [m * n * min(m, n) for m, n in shapes]
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    return owners
