"""Document-bounded ("varlen") attention over packed rows (PR #1530,
records/track_10min_16mb/2026-04-10_VarLenAttn; used by PR #1611): no token attends across a segment
boundary of `cu_seqlens` (pgolf/model/varlen.py builds it).

RoPE keeps the row positions (PR #1530's choice): attention scores depend only on relative offsets, so this
equals per-document positions up to rounding. Here `cu_seqlens` runs over the flattened [B*T] tokens of a
[B,T] batch (the records use B = 1); tokens of different rows never attend to each other in any case. Two
exact implementations of the same mask:

- `mask`: `F.scaled_dot_product_attention` with a boolean block-diagonal causal mask (any device and dtype;
  for tests and CPU runs). Rows of up to `MASK_GROUP_TOKENS` tokens, and any row inside torch.compile (the
  groups are host values a full graph cannot hold), take one [B,1,T,T] mask; a longer eager row (a packed
  row of PR #1611's global TTT phases, 16 sequences of 2048) is cut at segment starts into
  groups of whole segments of at most `MASK_GROUP_TOKENS` tokens (a longer segment alone), each attended
  with its own mask: no token attends across a segment, so the result is the same up to rounding, in
  memory O(T·MASK_GROUP_TOKENS) instead of O(T²);
- `flex`: `torch.nn.attention.flex_attention` with a document `BlockMask` (PyTorch's block-sparse kernel:
  fused and block-skipping under torch.compile on a GPU, fp32 or bf16, GQA native). On the CPU it has no
  backward and runs unfused (it materialises the scores) when not compiled.

`auto` (`pick_impl`) picks `flex` on CUDA and `mask` elsewhere, but `mask` also on CUDA for a row longer than
`MASK_GROUP_TOKENS` outside torch.compile (phased TTT's eager global phases): eager flex attention
materialises the [T,T] scores, the grouped mask does not. (torch.nn.attention.varlen.varlen_attn is the closer
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
MASK_GROUP_TOKENS = 4096  # `mask`: longer rows are attended in groups of whole segments (module docstring)


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


def pick_impl(cuda: bool, compiling: bool, T: int) -> str:
    """`auto`'s implementation for rows of T tokens: `flex` on CUDA, except an eager row longer than
    `MASK_GROUP_TOKENS` (eager flex materialises the [T,T] scores); `mask` elsewhere."""
    return "flex" if cuda and (compiling or T <= MASK_GROUP_TOKENS) else "mask"


def _doc_mask(doc: torch.Tensor) -> torch.Tensor:
    """[..., T, T] bool: query t may attend to key s (s <= t, same segment), from segment ids `doc` [..., T]."""
    T = doc.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (doc[..., :, None] == doc[..., None, :]) & causal


def segment_groups(doc: torch.Tensor, limit: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)] cutting one row's tokens (segment ids `doc` [T], non-decreasing) into consecutive groups of
    whole segments of at most `limit` tokens (default `MASK_GROUP_TOKENS`); a longer segment is a group alone."""
    limit = MASK_GROUP_TOKENS if limit is None else limit
    T = doc.numel()
    cuts = (torch.nonzero(doc[1:] != doc[:-1]).flatten() + 1).tolist()
    groups, start = [], 0
    for s, e in zip([0, *cuts], [*cuts, T], strict=True):
        if e - start > limit and s > start:
            groups.append((start, s))
            start = s
    groups.append((start, T))
    return groups


@register("doc_attention")
class DocumentMask:
    """Document-causal attention for one forward: built once from `cu_seqlens`, used by every layer.

    `attend(q, k, v)` with q [B,H,T,D], k/v [B,Hkv,T,D] returns [B,H,T,D]: query t attends to keys s <= t
    of its own segment only. `impl` is one of DOC_IMPLS (see the module docstring)."""

    def __init__(self, cu_seqlens: torch.Tensor, B: int, T: int, impl: str = "auto"):
        if impl not in DOC_IMPLS:
            raise ValueError(f"document attention impl {impl!r} not in {DOC_IMPLS}")
        self.doc = document_ids(cu_seqlens, B, T)  # [B,T]
        compiling = torch.compiler.is_compiling()
        if impl == "auto":
            impl = pick_impl(self.doc.is_cuda, compiling, T)
        self.impl = impl
        self.dense = self.block = None
        self.groups = None
        if impl == "mask" and T > MASK_GROUP_TOKENS and not compiling:  # the groups are host values
            self.groups = [
                [(a, b, _doc_mask(self.doc[r, a:b])) for a, b in segment_groups(self.doc[r])] for r in range(B)
            ]
        elif impl == "mask":
            self.dense = _doc_mask(self.doc)[:, None]  # [B,1,T,T]
        else:
            doc = self.doc

            def same_doc_causal(b, h, q_idx, kv_idx):
                return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

            self.block = create_block_mask(same_doc_causal, B, None, T, T, device=doc.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = k.size(1) != q.size(1)
        if self.groups is not None:
            rows = []
            for r, groups in enumerate(self.groups):
                parts = [
                    F.scaled_dot_product_attention(
                        q[r : r + 1, :, a:b], k[r : r + 1, :, a:b], v[r : r + 1, :, a:b], attn_mask=m, enable_gqa=gqa
                    )
                    for a, b, m in groups
                ]
                rows.append(torch.cat(parts, dim=2))
            return torch.cat(rows, dim=0)
        if self.dense is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
        return flex_attention(q, k, v, block_mask=self.block, enable_gqa=gqa)
