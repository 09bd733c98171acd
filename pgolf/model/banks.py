"""The banked state-dict layout of PR #1611 (records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611; the banks come from PR #1530's parallel-Muon
code) and its map onto pgolf's per-layer names, so a held-out comparison can load identical weights.

The record keeps the block matrices in four 3-D banks (L = num_layers):

    qo_bank        [2L, d, d]       rows 0..L-1: W_q of layer i; rows L..2L-1: W_o of layer i-L
    kv_bank        [2L, kv, d]      rows 0..L-1: W_k of layer i; rows L..2L-1: W_v of layer i-L
    mlp_up_bank    [L, hidden, d]   W_up of layer i
    mlp_down_bank  [L, d, hidden]   W_down of layer i

pgolf has one linear per matrix (`blocks.i.attn.c_q.weight`, `c_k`, `c_v`, `proj`, `blocks.i.mlp.fc.weight`,
`blocks.i.mlp.proj.weight`), and names the gated SmearGate's `smear_gate.weight` / `smear_lambda`
`smear.gate` / `smear.lam`. Every other record name (tok_emb.weight, blocks.i.attn.q_gain,
blocks.i.attn.attn_gate_w, blocks.i.attn_scale, blocks.i.mlp_scale, blocks.i.resid_mix, skip_weights,
skip_gates, parallel_post_lambdas, parallel_resid_lambdas, lm_head.weight) is pgolf's name too.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

RENAMES = {"smear_gate.weight": "smear.gate", "smear_lambda": "smear.lam"}  # record name -> pgolf name


def bank_layout(num_layers: int) -> dict[str, list[str]]:
    """Record bank name -> the pgolf parameter names of its rows, in row order. Raises ValueError for
    num_layers < 1."""
    if num_layers < 1:
        raise ValueError(f"num_layers {num_layers} must be >= 1")
    rng = range(num_layers)
    return {
        "qo_bank": [f"blocks.{i}.attn.c_q.weight" for i in rng] + [f"blocks.{i}.attn.proj.weight" for i in rng],
        "kv_bank": [f"blocks.{i}.attn.c_k.weight" for i in rng] + [f"blocks.{i}.attn.c_v.weight" for i in rng],
        "mlp_up_bank": [f"blocks.{i}.mlp.fc.weight" for i in rng],
        "mlp_down_bank": [f"blocks.{i}.mlp.proj.weight" for i in rng],
    }


def from_record_1611(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """pgolf's state dict of a PR #1611 (banked) one: banks split into per-layer matrices, the SmearGate
    renamed, everything else passed through (tensors shared, not copied). Raises ValueError naming a
    missing bank, a bank whose row count is not the layout's, or a name that is a pgolf-only name (the input
    would be pgolf's layout already)."""
    out: dict[str, torch.Tensor] = {}
    layout = bank_layout(num_layers)
    pgolf_only = {n for names in layout.values() for n in names} | set(RENAMES.values())
    for bank, names in layout.items():
        if bank not in sd:
            raise ValueError(f"record state dict has no {bank}")
        t = sd[bank]
        if t.ndim != 3 or t.size(0) != len(names):
            raise ValueError(f"{bank}: expected {len(names)} rows of 2-D matrices, got shape {tuple(t.shape)}")
        out.update(zip(names, t.unbind(0), strict=True))
    for name, t in sd.items():
        if name in layout:
            continue
        if name in pgolf_only:
            raise ValueError(f"{name} is a pgolf name, not a PR #1611 one: the input is not in the record layout")
        out[RENAMES.get(name, name)] = t
    return out


def to_record_1611(sd: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The PR #1611 (banked) state dict of pgolf's: per-layer matrices stacked into the four banks, the
    SmearGate renamed, everything else passed through. Raises ValueError naming a missing matrix or a
    matrix of another shape than the rest of its bank."""
    out: dict[str, torch.Tensor] = {}
    layout = bank_layout(num_layers)
    used: set[str] = set()
    for bank, names in layout.items():
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"{bank}: pgolf state dict lacks {missing[0]}")
        shapes = {tuple(sd[n].shape) for n in names}
        if len(shapes) != 1:
            raise ValueError(f"{bank}: its matrices differ in shape {sorted(shapes)}")
        out[bank] = torch.stack([sd[n] for n in names])
        used.update(names)
    back = {v: k for k, v in RENAMES.items()}
    for name, t in sd.items():
        if name not in used:
            out[back.get(name, name)] = t
    return out
