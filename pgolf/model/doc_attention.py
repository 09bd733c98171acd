"""Document-bounded ("varlen") attention over packed rows (PR #1530,
records/track_10min_16mb/2026-04-10_VarLenAttn; used by PR #1611): no token attends across a segment
boundary of `cu_seqlens` (pgolf/model/varlen.py builds it).

RoPE keeps the row positions (PR #1530's choice): attention scores depend only on relative offsets, so this
equals per-document positions up to rounding. Here `cu_seqlens` runs over the flattened [B*T] tokens of a
[B,T] batch (the records use B = 1); tokens of different rows never attend to each other in any case. Two
exact implementations of the same mask:

- `mask`: `F.scaled_dot_product_attention` with a boolean block-diagonal causal mask [B,1,T,T] (any device
  and dtype; memory O(B·T²), so for tests, CPU runs and short rows);
- `flex`: `torch.nn.attention.flex_attention` with a document `BlockMask` (PyTorch's block-sparse kernel:
  fused and block-skipping under torch.compile on a GPU, fp32 or bf16, GQA native). On the CPU it has no
  backward and runs unfused (it materialises the scores) when not compiled.

`auto` picks `flex` on CUDA and `mask` elsewhere. (torch.nn.attention.varlen.varlen_attn is the closer
analogue of the records' FA3 call, but it takes fp16/bf16 only and needs CUDA, so it could not be checked
here; flex covers every dtype and traces with fullgraph=True.) For long rows build the block mask inside
the compiled forward (as `GPT.forward` does), where `create_block_mask` is compiled too.

An optional part of the runtime (pgolf/optional.py, `doc_attention`): `GPT.forward_hidden` reaches
`DocumentMask` through `optional.get("doc_attention")`, so a packed train_gpt.py whose run never passes
`cu_seqlens` (no `train.doc_attention`, no phased TTT) leaves this module out.

Shapes: B batch, T sequence, H query heads, Hkv KV heads, D head dim, S segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from pgolf.optional import register

DOC_IMPLS = ("auto", "mask", "flex")


def document_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Segment index of every token [B,T] (int64) from `cu_seqlens` [S+1] over the flattened B*T tokens.

    Raises ValueError when cu_seqlens is not a 1-D integer tensor; outside torch.compile also when it does
    not start at 0, end at B*T and never decrease (one host sync)."""
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of >= 2 entries, got {tuple(cu_seqlens.shape)}")
    if not torch.compiler.is_compiling():
        c = cu_seqlens.detach().cpu().long()
        if c[0] != 0 or c[-1] != B * T or bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to B*T = {B * T}, got {c.tolist()[:8]}...")
    pos = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.bucketize(pos, cu_seqlens[1:], right=True).view(B, T)


@register("doc_attention")
class DocumentMask:
    """Document-causal attention for one forward: built once from `cu_seqlens`, used by every layer.

    `attend(q, k, v)` with q [B,H,T,D], k/v [B,Hkv,T,D] returns [B,H,T,D]: query t attends to keys s <= t
    of its own segment only. `impl` is one of DOC_IMPLS (see the module docstring)."""

    def __init__(self, cu_seqlens: torch.Tensor, B: int, T: int, impl: str = "auto"):
        if impl not in DOC_IMPLS:
            raise ValueError(f"document attention impl {impl!r} not in {DOC_IMPLS}")
        self.doc = document_ids(cu_seqlens, B, T)  # [B,T]
        if impl == "auto":
            impl = "flex" if self.doc.is_cuda else "mask"
        self.impl = impl
        self.dense = self.block = None
        if impl == "mask":
            causal = torch.ones(T, T, dtype=torch.bool, device=self.doc.device).tril()
            self.dense = ((self.doc[:, :, None] == self.doc[:, None, :]) & causal)[:, None]  # [B,1,T,T]
        else:
            doc = self.doc

            def same_doc_causal(b, h, q_idx, kv_idx):
                return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

            self.block = create_block_mask(same_doc_causal, B, None, T, T, device=doc.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = k.size(1) != q.size(1)
        if self.dense is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
        return flex_attention(q, k, v, block_mask=self.block, enable_gqa=gqa)
