"""The parameter partition (which tensor each optimizer group updates) and the optimizer builder.

`partition_params` is a pure function that places every parameter in exactly one group and asserts it
(the form of nanochat's `GPT.setup_optimizer`); `build_optimizer` turns an optim config (conf/optim/*.yaml)
into one `MuonAdam`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from pgolf.model.roles import AUX_PROJ_NAMES, EMBED_NAMES, is_control
from pgolf.optim.muon_adam import MuonAdam


def partition_params(
    named_params: Iterable[tuple[str, nn.Parameter]], aux_proj_to_muon: bool = False, frozen: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Assign every parameter name to exactly one of: matrix (Muon), embed, head, scalar (Adam), frozen.

    matrix: 2-D block matrices (Q, K, V, O, MLP); with `aux_proj_to_muon` also the bigram/VE projections
    (V5 and PR #1263 put them in Muon; PR #549 / #1298 keep them with the scalars).
    embed: the token embedding and the bigram / VE tables. head: an untied output head. scalar: the rest.
    frozen: names matching one of the `frozen` glob patterns (fnmatch, e.g. "bigram.*"), whatever their
    role: kept out of every stepped group, as PR #1090 leaves its smear gate and bigram module out of its
    optimizers (their gradient is computed, never applied). Raises ValueError for a pattern that matches
    no parameter (a typo would silently train what was meant to stay fixed).
    """
    groups: dict[str, list[str]] = {"matrix": [], "embed": [], "head": [], "scalar": [], "frozen": []}
    seen: set[str] = set()
    used: set[str] = set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if name in seen:
            raise AssertionError(f"parameter {name} listed twice")
        seen.add(name)
        hits = [pat for pat in frozen if fnmatch.fnmatchcase(name, pat)]
        used.update(hits)
        if hits:
            groups["frozen"].append(name)
        elif name in EMBED_NAMES:
            groups["embed"].append(name)
        elif name == "lm_head.weight":
            groups["head"].append(name)
        elif name in AUX_PROJ_NAMES:
            groups["matrix" if aux_proj_to_muon else "scalar"].append(name)
        elif name.startswith("blocks.") and p.ndim == 2 and not is_control(name):
            groups["matrix"].append(name)
        else:
            groups["scalar"].append(name)
    unused = [pat for pat in frozen if pat not in used]
    if unused:
        raise ValueError(f"frozen patterns {unused} match no parameter")
    assigned = [n for names in groups.values() for n in names]
    assert len(assigned) == len(set(assigned)) == len(seen), "partition must place every parameter exactly once"
    return groups


def build_optimizer(model: nn.Module, cfg: dict) -> MuonAdam:
    """MuonAdam over `model` from an optim config (see conf/optim/*.yaml); `cfg["frozen"]` (glob patterns,
    optional) names parameters that go in a group of kind "frozen", which `MuonAdam.step` never updates.
    Adam's decoupled weight decay is `adam_wd` for every Adam group, or `embed_wd` for the embedding group
    when set (PR #1611's AdamW groups: tok 0.085, scalars 0.02)."""
    named = dict(model.named_parameters())
    parts = partition_params(
        named.items(),
        aux_proj_to_muon=bool(cfg.get("aux_proj_to_muon", False)),
        frozen=tuple(cfg.get("frozen", ())),
    )
    betas = tuple(cfg.get("betas", (0.9, 0.95)))
    eps = float(cfg.get("adam_eps", 1e-8))
    adam_wd = float(cfg.get("adam_wd", 0.0))
    embed_wd = cfg.get("embed_wd")  # PR #1611: 0.085 on the embedding, adam_wd (0.02) on the scalars
    wds = {"embed": adam_wd if embed_wd is None else float(embed_wd), "head": adam_wd, "scalar": adam_wd}
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
                momentum_dtype=str(cfg.get("muon_momentum_dtype", "fp32")),
                row_norm_form=str(cfg.get("muon_row_norm_form", "fp32_clamp")),
                shape_scale=str(cfg.get("muon_shape_scale", "update")),
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
                    weight_decay=wds[key],
                )
            )
    if parts["frozen"]:  # zeroed with the rest by zero_grad and seen by gradient clipping, never stepped
        groups.append(dict(name="frozen", kind="frozen", params=[named[n] for n in parts["frozen"]], base_lr=0.0))
    return MuonAdam(groups)
