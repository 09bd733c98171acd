"""Document segments of packed rows (PR #1530, records/track_10min_16mb/2026-04-10_VarLenAttn; used by
PR #1611): where document-bounded ("varlen") attention cuts a packed row.

A packed row holds several documents back to back. The records pass FlashAttention-3's varlen kernel a
`cu_seqlens` vector (int32: the start of every segment, then the total length) so that no token attends
across a segment boundary; a segment is a document, or a piece of at most `max_seg_len` tokens of one.
`document_cu_seqlens` builds it on the host (the training stream, the evaluation windows, phased TTT); the
attention that honours it is pgolf/model/doc_attention.py (`DocumentMask`, an optional part of the runtime).

Shapes: B batch, T sequence, S segments.
"""

from __future__ import annotations

import torch


def document_cu_seqlens(ids: torch.Tensor, bos_id: int, max_seg_len: int, pad_multiple: int = 64) -> torch.Tensor:
    """The records' segment starts of a packed batch (PR #1530 `DocumentPackingLoader`), int32 [S+1 padded].

    ids [T] or [B,T] (token ids; flattened row-major): a segment starts at every `bos_id` position, at every
    row start (position 0 of a row that does not begin with BOS), and every `max_seg_len` tokens inside a
    document (starts doc_start, doc_start + max_seg_len, ...). The vector ends with B*T and is padded to a
    multiple of `pad_multiple` entries by repeating B*T (zero-length trailing segments; the records bucket
    the length so torch.compile sees few shapes). Runs on the host (a data-loader step). Raises ValueError for
    max_seg_len < 1, pad_multiple < 1 or an empty/3-D `ids`."""
    if max_seg_len < 1 or pad_multiple < 1:
        raise ValueError(f"max_seg_len {max_seg_len} and pad_multiple {pad_multiple} must be >= 1")
    if ids.ndim not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty [T] or [B,T] tensor, got shape {tuple(ids.shape)}")
    T = ids.size(-1)
    n = ids.numel()
    flat = ids.reshape(-1).cpu()
    docs = sorted(set((flat == bos_id).nonzero().flatten().tolist()) | set(range(0, n, T)))
    starts: list[int] = []
    for s, e in zip(docs, docs[1:] + [n], strict=True):
        starts.extend(range(s, e, max_seg_len))
    cu = starts + [n]
    cu += [n] * (-len(cu) % pad_multiple)
    return torch.tensor(cu, dtype=torch.int32)
