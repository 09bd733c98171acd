"""The model features of the PR #1611 stack (records/track_10min_16mb/
2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) that only its configs use: the input-dependent
gated SmearGate (PR #1667 with the BOS mask of PR #1851) and the two-lane parallel block (PR #1530).

An optional part of the runtime (pgolf/optional.py, `model_1611`): pgolf/model/gpt.py reaches this module
through `optional.get("model_1611")` when its config has `smear_gate: gated` or `parallel_start_layer` > 0,
so a packed train_gpt.py of another stack leaves it out.

Shapes: B batch, T sequence, d model width.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.layers import rms_norm
from pgolf.optional import register


class GatedSmear(nn.Module):
    """Input-dependent SmearGate on the raw token embeddings e [B,T,d] (PR #1667, modded-nanogpt; BOS mask of
    PR #1851, kept by PR #1611):

        e_t <- e_t + lam * sigmoid(w . e_t[:window]) * e_{t-1} * [id_t != bos_id]      (t >= 1)

    `gate` = w [1, window] and `lam` [1] start at 0 (the identity). The gate reads the current token; the BOS
    mask stops the last token of one packed document leaking into the next one's BOS (bos_id -1: no mask, the
    PR #1667 form)."""

    form = "gated"

    def __init__(self, window: int, bos_id: int, init: float | None):
        super().__init__()
        self.window, self.bos_id = window, bos_id
        self.gate = nn.Parameter(torch.zeros(1, window))
        self.lam = nn.Parameter(torch.full((1,), float(init if init is not None else 0.0)))

    def forward(self, e, idx, before=None):  # e [B,T,d], idx [B,T]; `before` [B,1,d]: the raw embedding before e
        g = self.lam.to(e.dtype) * torch.sigmoid(F.linear(e[..., : self.window], self.gate.to(e.dtype)))  # [B,T,1]
        if self.bos_id >= 0:
            g = g * (idx != self.bos_id).unsqueeze(-1).to(e.dtype)
        if before is None:  # position 0 of the sequence is left as it is
            return torch.cat((e[:, :1], e[:, 1:] + g[:, 1:] * e[:, :-1]), dim=1)
        return e + g * torch.cat((before.to(e.dtype), e[:, :-1]), dim=1)


def forward_lanes(block, lane0, lane1, x0, resid, post, cos, sin, ve=None, lora=None, kv=None, docs=None):
    """The two-lane form of `block` (a pgolf/model/layers.py Block; PR #1530, kept by PR #1611): lanes
    [B,T,d], resid [2] (the layer's `parallel_resid_lambdas` row), post [2,2] (its `parallel_post_lambdas`:
    row 0 attention's, row 1 the MLP's weights into lane 0 and lane 1). Attention reads lane0 mixed with x0
    by `resid_mix`, the MLP reads lane1 alone; returns (lane0', lane1') with
    lane_i' = resid[i] lane_i + post[0,i] a + post[1,i] m."""
    mix = block.resid_mix.to(lane0.dtype)
    attn_in = mix[0] * lane0 + mix[1] * x0
    a = block.attn(rms_norm(attn_in) * block.norm_scale, cos, sin, ve, lora, kv, docs)
    a = block.attn_scale.to(lane0.dtype) * a
    m = block.mlp_scale.to(lane1.dtype) * block.mlp(rms_norm(lane1) * block.norm_scale)
    r, p = resid.to(lane0.dtype), post.to(lane0.dtype)
    lane0 = r[0] * lane0 + p[0, 0] * a + p[1, 0] * m
    lane1 = r[1] * lane1 + p[0, 1] * a + p[1, 1] * m
    return lane0, lane1


register("model_1611")(sys.modules[__name__])
