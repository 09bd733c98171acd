"""The state of incremental decoding: per-layer preallocated keys and values and the look-back of the
input features. `GPT.new_cache` builds one (`new_cache`) and `GPT.decode` advances it (used by the AR
self-generated GPTQ calibration of PR #1019).

An optional part of the runtime (pgolf/optional.py, `decode`): `GPT.new_cache` reaches `new_cache` through
`optional.get("decode")`, so a packed train_gpt.py whose export does not self-generate its calibration
leaves this module out.

Shapes: B batch, T new positions, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from pgolf.model.layers import rope_tables
from pgolf.optional import register


class LayerKV:
    """Preallocated keys/values [B,Hkv,max_len,D] of one virtual layer; `pos` positions filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.pos = k, v, 0

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B,Hkv,T,D] at the next T positions; return the keys and values of the whole prefix
        and the attention mask (None when one query may see everything before it)."""
        p, T = self.pos, k.size(2)
        if p + T > self.k.size(2):
            raise ValueError(f"decode cache holds {self.k.size(2)} positions; {p} + {T} requested")
        self.k[:, :, p : p + T] = k.to(self.k.dtype)
        self.v[:, :, p : p + T] = v.to(self.v.dtype)
        self.pos = p + T
        mask = None
        if T > 1:  # query i (absolute position p+i) sees keys 0..p+i
            mask = torch.ones(T, p + T, dtype=torch.bool, device=k.device).tril(diagonal=p)
        return self.k[:, :, : p + T].to(k.dtype), self.v[:, :, : p + T].to(v.dtype), mask


@dataclass
class DecodeCache:
    """State of an incremental decode: per-virtual-layer KV, RoPE tables of the full length, and the last
    token and SmearGate input (BigramHash and SmearGate look one position back)."""

    layers: list[LayerKV]
    cos: torch.Tensor
    sin: torch.Tensor
    max_len: int
    pos: int = 0
    last_token: torch.Tensor | None = None
    smear_in: torch.Tensor | None = None

    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, r/2] of the next T positions; ValueError when they pass `max_len`."""
        if self.pos + T > self.max_len:
            raise ValueError(f"decode cache holds {self.max_len} positions; {self.pos} + {T} requested")
        return self.cos[self.pos : self.pos + T], self.sin[self.pos : self.pos + T]

    def advance(self, idx: torch.Tensor) -> None:
        self.pos += idx.size(1)
        self.last_token = idx[:, -1:]


def new_cache(model, batch: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> DecodeCache:
    """An empty KV cache of `model` (a GPT: one LayerKV [batch, Hkv, max_len, D] per entry of its
    `schedule`) for up to `max_len` positions, on `device` (default: the model's).

    RoPE: the cache encodes every position with the table of a `max_len`-long forward, so with NTK
    scaling a cached decode of a `max_len` sequence gives exactly the logits of one full
    forward of that sequence. The reference's cache-less generation instead re-runs the growing prefix,
    whose RoPE base changes once the prefix passes `rope_ntk_base_len` (PR #1019's generator); we keep the base of
    the final length, which is the one the model was trained with when max_len = train seq_len."""
    cfg = model.cfg
    device = device if device is not None else model.tok_emb.weight.device
    r = cfg.rope_dims or cfg.head_dim
    cos, sin = rope_tables(max_len, r, cfg.rope_base, cfg.rope_ntk_base_len, device)
    layers = [
        LayerKV(
            torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype),
            torch.zeros(batch, cfg.num_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype),
        )
        for _ in model.schedule
    ]
    return DecodeCache(layers=layers, cos=cos, sin=sin, max_len=max_len)


register("decode")(sys.modules[__name__])
