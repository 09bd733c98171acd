"""The input-side features of the record stacks: SmearGate (the 1.1556 record and PR #549 forms; the
input-dependent gated form of PR #1667 / #1851 is pgolf/model/record_1611.py's `GatedSmear`), BigramHash and
value embeddings (docs/techniques.md#smeargate).

Each looks at the token ids (or the embedded inputs) and adds to, or mixes into, what the blocks read. The
`before` arguments carry the one position of look-back across the boundary of an incremental decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pgolf.model.config import GPTConfig
from pgolf.model.layers import CastedLinear, lookup


class SmearGate(nn.Module):
    """Mix each position with the previous one through a learned per-channel gate g = σ(w).
    v5: out_t = g x_t + (1-g) x_{t-1} (init 3.0); record: out_t = (1-g) x_t + g x_{t-1} (init 0)."""

    def __init__(self, d: int, form: str, init: float | None):
        super().__init__()
        self.form = form
        self.gate = nn.Parameter(torch.full((d,), float(init if init is not None else (3.0 if form == "v5" else 0.0))))

    def forward(self, x, before=None):  # [B,T,d]; `before` [B,1,d]: the input just before x (decoding)
        g = torch.sigmoid(self.gate).to(x.dtype)
        if before is None:
            prev = F.pad(x[:, :-1], (0, 0, 1, 0))  # x_{t-1}, zero at t=0
        else:
            prev = torch.cat((before.to(x.dtype), x[:, :-1]), dim=1)
        return g * x + (1 - g) * prev if self.form == "v5" else (1 - g) * x + g * prev


class BigramHash(nn.Module):
    """Hashed embedding of (previous token, token) pairs added to the token embedding (PR #162;
    multiplicative form of the 1.1556 record, XOR form of PR #549)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.form, self.B = cfg.bigram, cfg.bigram_buckets
        self.embed = nn.Embedding(self.B, cfg.bigram_dim)
        self.proj = None
        if cfg.bigram_dim != cfg.model_dim:
            # v5: a zero-init projection that stays zero-init; xor: created zero but, lacking the zero-init
            # flag, re-initialised orthogonal by a model-wide ortho init, as in PR #549.
            self.proj = CastedLinear(cfg.bigram_dim, cfg.model_dim, zero_init=self.form == "v5")
        self.scale = nn.Parameter(torch.tensor(float(cfg.bigram_scale_init))) if self.form == "xor" else None

    def reset_parameters(self):
        if self.form == "v5":
            nn.init.normal_(self.embed.weight, 0.0, 0.01)
        else:
            nn.init.zeros_(self.embed.weight)
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def indices(self, idx: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
        """Bucket of each position [B,T]; `before` [B,1] is the token just before idx (decoding), else
        idx starts a sequence."""
        prev = F.pad(idx[:, :-1], (1, 0)) if before is None else torch.cat((before, idx[:, :-1]), dim=1)
        if self.form == "v5":
            return (prev * 92821 + idx) % self.B
        cur, prev = idx.to(torch.int32), prev.to(torch.int32)
        h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (self.B - 1)
        if before is None:
            h[:, 0] = self.B - 1  # reserved bucket for the first position of every sequence/window
        return h.long()

    def forward(self, idx, before=None, dtype=torch.float32):  # dtype: the rows' outside autocast (`lookup`)
        e = lookup(self.embed, self.indices(idx, before), dtype)
        if self.proj is not None:
            e = self.proj(e)
        return e * self.scale.to(e.dtype) if self.scale is not None else e


class ValueEmbedding(nn.Module):
    """VE (PR #374): one shared table V x ve_dim projected to the KV width, added to chosen layers' values."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.ve_dim)
        self.proj = CastedLinear(cfg.ve_dim, cfg.kv_dim)
        self.scale = nn.Parameter(torch.tensor(float(cfg.ve_scale_init)))

    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, 0.0, 0.01)
        nn.init.zeros_(self.proj.weight)

    def forward(self, idx):  # [B,T] -> [B,T,kv_dim]
        e = self.proj(lookup(self.embed, idx, self.proj.weight.dtype))
        return e * self.scale.to(e.dtype)
