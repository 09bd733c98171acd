"""One optimizer object for Muon and Adam, the parameter partition, and Newton-Schulz orthogonalization.

`MuonAdam` is a single `torch.optim.Optimizer` whose param groups carry a `kind` ("muon" or "adam"), so
Lightning's automatic optimization, step counting and gradient clipping see one optimizer (SPEC §6,
STYLE 4). Every group keeps its `base_lr`; the schedule callback sets `lr = base_lr * scale`.

Muon (SPEC §6.1): Nesterov momentum, optional MuonEq-R row normalisation (§6.4), Newton-Schulz with the
quintic (3.4445, -4.7750, 2.0315) or the Polar Express per-iteration coefficients (§6.5), the shape scale
sqrt(max(1, rows/cols)), and decoupled weight decay with the scheduled lr. Distributed: matrix i is
orthogonalized by rank i mod world and the updates are shared with one all-reduce of a flat buffer
(zeros elsewhere, so the sum is exact) — every rank then applies every update.

Adam (SPEC §6.2): PyTorch's AdamW arithmetic (decoupled `p *= 1 - lr*wd`), checked step for step against
`torch.optim.AdamW` in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from pgolf.model.roles import AUX_PROJ_NAMES, EMBED_NAMES, is_control

QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express (arXiv:2505.16932), the tuples used by R1298 / PE1787 / nanochat (SPEC §6.5).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    if kind == "quintic":
        return [QUINTIC] * steps
    if kind == "polar_express":
        if not 1 <= steps <= len(POLAR_EXPRESS):
            raise ValueError(f"polar_express supports 1..{len(POLAR_EXPRESS)} steps, got {steps}")
        return list(POLAR_EXPRESS[:steps])
    raise ValueError(f"unknown Newton-Schulz variant {kind!r} (quintic | polar_express)")


def newton_schulz(G: torch.Tensor, coeffs: list[tuple[float, float, float]], dtype=torch.bfloat16, eps=1e-7):
    """Approximate the orthogonal polar factor of G [m,n] (or a batch [b,m,n]) by the odd quintic
    iteration X <- aX + (bA + cA²)X with A = XXᵀ, on the wide orientation, after Frobenius normalisation."""
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coeffs:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if transposed else X


def row_normalize(U: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """MuonEq-R (SPEC §6.4): every row of the update to unit L2 norm (norm in fp32, clamp_min(eps))."""
    n = U.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    return (U.float() / n).to(U.dtype)


class MuonAdam(torch.optim.Optimizer):
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
        )
        for g in param_groups:
            if g.get("kind") not in ("muon", "adam"):
                raise ValueError(f"param group {g.get('name')!r} has kind {g.get('kind')!r}; expected muon or adam")
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g["kind"] == "adam":
                self._adam_step(g)
            else:
                self._muon_step(g)
        return loss

    # ---- Adam ----------------------------------------------------------------------------------------
    def _adam_step(self, g: dict) -> None:
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
        beta1, beta2 = g["betas"]
        grads, avgs, sqs, steps = [], [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        torch._foreach_add_(steps, 1.0)
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        for p, m, v, s in zip(params, avgs, sqs, steps):  # per-tensor step counts (params may join late)
            t = s.item()
            bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            denom = (v.sqrt() / bc2**0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bc1)

    # ---- Muon ----------------------------------------------------------------------------------------
    def _muon_step(self, g: dict) -> None:
        params = g["params"]
        if not params:
            return
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        coeffs = ns_coefficients(g["ns_kind"], g["ns_steps"])
        mu, lr, wd = g["momentum"], g["lr"], g["weight_decay"]
        dev = params[0].device
        ns_dtype = self.ns_dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        # Momentum for every matrix on every rank (cheap, elementwise; gradients are already averaged), so each
        # rank's optimizer state is complete and a rank-0 checkpoint resumes exactly. Only Newton-Schulz, the
        # expensive part, is split across ranks.
        live = [p for p in params if p.grad is not None]
        bufs = []
        for p in live:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(st["momentum_buffer"])
        if live:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, [p.grad for p in live])
        owners = self._owners(g, world)
        sizes = [p.numel() for p in params]
        flat = torch.zeros(sum(sizes), device=dev, dtype=ns_dtype) if world > 1 else None
        updates: list[torch.Tensor | None] = [None] * len(params)
        offset = 0
        for i, p in enumerate(params):
            if owners[i] == rank and p.grad is not None:
                buf = self.state[p]["momentum_buffer"]
                u = p.grad.add(buf, alpha=mu) if g["nesterov"] else buf
                if g["row_norm"]:
                    u = row_normalize(u)
                o = newton_schulz(u, coeffs, dtype=ns_dtype)
                o = o * math.sqrt(max(1.0, p.size(0) / p.size(1)))
                if flat is not None:
                    flat[offset : offset + sizes[i]] = o.reshape(-1)
                else:
                    updates[i] = o
            offset += sizes[i]
        if flat is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # each slice is written by exactly one rank: exact
        offset = 0
        for i, p in enumerate(params):
            o = flat[offset : offset + sizes[i]].view_as(p) if flat is not None else updates[i]
            offset += sizes[i]
            if o is None or p.grad is None:
                continue
            if wd != 0:
                p.mul_(1 - lr * wd)  # decoupled weight decay with the scheduled lr (SPEC §6.1 step 5)
            p.add_(o.to(p.dtype), alpha=-lr)

    def _owners(self, g: dict, world: int) -> list[int]:
        shapes = [tuple(p.shape) for p in g["params"]]
        key = (tuple(shapes), world)
        if key not in self._owner_cache:
            self._owner_cache[key] = balanced_owners(shapes, world)
        return self._owner_cache[key]


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


# ---- parameter partition ---------------------------------------------------------------------------
def partition_params(
    named_params: Iterable[tuple[str, nn.Parameter]], aux_proj_to_muon: bool = False
) -> dict[str, list[str]]:
    """Assign every parameter name to exactly one of: matrix (Muon), embed, head, scalar (Adam).

    matrix: 2-D block matrices (Q, K, V, O, MLP); with `aux_proj_to_muon` also the bigram/VE projections
    (V5 puts its bigram projection in Muon; the record stacks keep them with the scalars, SPEC §6.2).
    embed: the token embedding and the bigram / VE tables. head: an untied output head. scalar: the rest.
    """
    groups: dict[str, list[str]] = {"matrix": [], "embed": [], "head": [], "scalar": []}
    seen: set[str] = set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if name in seen:
            raise AssertionError(f"parameter {name} listed twice")
        seen.add(name)
        if name in EMBED_NAMES:
            groups["embed"].append(name)
        elif name == "lm_head.weight":
            groups["head"].append(name)
        elif name in AUX_PROJ_NAMES:
            groups["matrix" if aux_proj_to_muon else "scalar"].append(name)
        elif name.startswith("blocks.") and p.ndim == 2 and not is_control(name):
            groups["matrix"].append(name)
        else:
            groups["scalar"].append(name)
    assigned = [n for names in groups.values() for n in names]
    assert len(assigned) == len(set(assigned)) == len(seen), "partition must place every parameter exactly once"
    return groups


def build_optimizer(model: nn.Module, cfg: dict) -> MuonAdam:
    """MuonAdam over `model` from an optim config (see conf/optim/*.yaml)."""
    named = dict(model.named_parameters())
    parts = partition_params(named.items(), aux_proj_to_muon=bool(cfg.get("aux_proj_to_muon", False)))
    betas = tuple(cfg.get("betas", (0.9, 0.95)))
    eps = float(cfg.get("adam_eps", 1e-8))
    adam_wd = float(cfg.get("adam_wd", 0.0))
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", True)
    embed_lr = cfg["embed_lr"] if tied else cfg.get("untied_embed_lr", cfg["embed_lr"])  # BASE: 0.05 tied, 0.6 untied
    lrs = {"embed": embed_lr, "head": cfg["head_lr"], "scalar": cfg["scalar_lr"]}
    groups = []
    if parts["matrix"]:
        groups.append(
            dict(
                name="matrix",
                kind="muon",
                params=[named[n] for n in parts["matrix"]],
                base_lr=float(cfg["matrix_lr"]),
                momentum=float(cfg.get("muon_momentum", 0.95)),
                nesterov=True,
                ns_steps=int(cfg.get("ns_steps", 5)),
                ns_kind=str(cfg.get("ns_kind", "quintic")),
                row_norm=bool(cfg.get("muon_row_norm", False)),
                weight_decay=float(cfg.get("muon_wd", 0.0)),
            )
        )
    for key in ("embed", "head", "scalar"):
        if parts[key]:
            groups.append(
                dict(
                    name=key,
                    kind="adam",
                    params=[named[n] for n in parts[key]],
                    base_lr=float(lrs[key]),
                    betas=betas,
                    eps=eps,
                    weight_decay=adam_wd,
                )
            )
    return MuonAdam(groups)
