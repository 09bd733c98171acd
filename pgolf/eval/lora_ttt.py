"""The `lora_ttt` eval mode: per-document LoRA test-time training (records/track_10min_16mb/2026-03-17_LoRA_TTT,
PR #77; "LORA77" below). Compliant: every chunk is scored before the adapter step that uses it. Config:
conf/eval/lora_ttt.yaml.

Documents start at each BOS (a document's last target is the next document's BOS); each document's
targets are cut into `chunk_size` chunks; chunk i is scored inside a window of at most `context` tokens of
the same document, and the same forward gives the loss of one Adam step on rank-r adapters of q, v (every
layer) and the LM head, owned by that document alone. Adapters and Adam state start fresh for every
document (each document's adapters are initialised from a generator seeded by its index). Documents are
split contiguously across ranks, sorted by chunk count and processed `batch_docs` at a time.

A document's scores do not depend on the other documents of its batch nor on the number of processes, bit
for bit (checked on CPU: tests/test_causality.py, tests/test_evaluate.py): step i of a batch pads every
window to `min(context, (i+1)·chunk_size)`, the longest window chunk i of any document can have, rather
than to the longest window in the batch. Padding to the batch's longest window made the attention's
rounding depend on which documents share the batch, and so, through where later documents start, on later
tokens (1-2 float32 ulps, up to 4.8e-7 nats, in the flip test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pgolf.data.stream import rank_slice
from pgolf.data.tokenizer import BOS_ID
from pgolf.eval.core import EvalContext, Scored, dist_info, make_batch, nll_from_logits, reduce_sums, unwrap
from pgolf.eval.registry import Mode, register

LORA_REASON = (
    "LoRA TTT: per-document adapters, reset per document; each chunk is scored before the adapter step that "
    "uses it, from a context window fixed by the chunk's start (SPEC §4.4)"
)


@dataclass
class LoraSettings:
    seq_len: int
    rank: int = 8
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-10
    chunk_size: int = 256
    context: int | None = None  # window length (chunk + preceding document context); None = seq_len
    batch_docs: int = 64
    targets: tuple = ("q", "v", "head")
    bos_id: int = BOS_ID
    seed: int = 0

    def __post_init__(self):
        self.context = int(self.context or self.seq_len)
        self.targets = tuple(self.targets)
        bad = set(self.targets) - {"q", "v", "head"}
        checks = [
            (not bad, f"targets {sorted(bad)} not in (q, v, head)"),
            (self.rank > 0, f"rank {self.rank} must be > 0"),
            (0 < self.chunk_size <= self.context, f"chunk_size {self.chunk_size} must be in 1..context {self.context}"),
            (self.batch_docs > 0, f"batch_docs {self.batch_docs} must be > 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"lora_ttt: {'; '.join(bad)}")


class Adapter(nn.Module):
    """Per-document low-rank delta Δ(x) = (x Aᵀ) Bᵀ: A [docs, r, in] ~ U(±1/√in), B [docs, out, r] = 0 (LORA77)."""

    def __init__(self, docs: int, in_f: int, out_f: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(docs, rank, in_f))
        self.B = nn.Parameter(torch.zeros(docs, out_f, rank))
        self.rows: torch.Tensor | None = None  # documents of the current forward (rows of A, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, T, in] -> [n, T, out]
        A, B = (self.A, self.B) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        return (x @ A.to(x.dtype).transpose(1, 2)) @ B.to(x.dtype).transpose(1, 2)


class DocLoRA(nn.Module):
    """The `lora` object GPT.forward_hidden takes: `layer(j).delta("q"|"v", x)` per virtual layer j, plus the
    LM-head delta passed to `logits_from_hidden` as a logit bias."""

    def __init__(self, cfg, docs: int, st: LoraSettings, seeds: list[int]):
        super().__init__()
        d, kv, L = cfg.model_dim, cfg.kv_dim, len(cfg.layer_schedule)
        t = st.targets
        self.q = nn.ModuleList(Adapter(docs, d, d, st.rank) for _ in range(L)) if "q" in t else None
        self.v = nn.ModuleList(Adapter(docs, d, kv, st.rank) for _ in range(L)) if "v" in t else None
        self.head = Adapter(docs, d, cfg.vocab_size, st.rank) if "head" in t else None
        adapters = [a for a in self.modules() if isinstance(a, Adapter)]
        with torch.no_grad():
            for i, seed in enumerate(seeds):  # a document's init depends only on its own seed
                g = torch.Generator().manual_seed(seed)
                for a in adapters:
                    bound = 1.0 / math.sqrt(a.A.size(2))
                    a.A[i].copy_(torch.rand(a.A.shape[1:], generator=g) * 2 * bound - bound)

    def select(self, rows: torch.Tensor) -> None:
        for a in self.modules():
            if isinstance(a, Adapter):
                a.rows = rows

    def layer(self, j: int) -> _LayerLoRA:
        return _LayerLoRA(self.q[j] if self.q is not None else None, self.v[j] if self.v is not None else None)


class _LayerLoRA:
    def __init__(self, q: Adapter | None, v: Adapter | None):
        self.q, self.v = q, v

    def delta(self, kind: str, x: torch.Tensor):
        a = self.q if kind == "q" else self.v
        return a(x) if a is not None else 0.0


def documents(tokens: torch.Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(first target, target count) of each document: a document starts at a BOS input (or at 0) and its
    last target is the next document's BOS."""
    total = tokens.numel() - 1
    starts = torch.nonzero(tokens[:total] == bos_id).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [total]
    return [(s, e - s) for s, e in zip(starts, ends)]


def chunk_window(doc: tuple[int, int], i: int, st: LoraSettings) -> tuple[int, int, int]:
    """Window (start, length, score_from) scoring chunk i of a document. The window starts `context -
    chunk_size` tokens before the chunk start (within the document), so a target's context never depends on
    where its document ends (LORA77 ends the window at the chunk end, which a later BOS can move). Its
    length is at most `min(context, (i+1)·chunk_size)`."""
    s, n = doc
    c0 = s + i * st.chunk_size
    c1 = s + min((i + 1) * st.chunk_size, n)
    w0 = max(s, c0 - (st.context - st.chunk_size))
    return w0, c1 - w0, c0 - w0


def lora_doc_batch(model, toks: torch.Tensor, docs, ids: list[int], st: LoraSettings, ctx: EvalContext, sums) -> int:
    """Score (and adapt on) the documents `ids` side by side, adding to `sums`; returns the number of chunk
    windows scored. Step i scores chunk i of every document that has one, in windows padded to a length
    that depends on i only (see the module docstring)."""
    nch = [-(-docs[i][1] // st.chunk_size) for i in ids]
    lora = DocLoRA(model.cfg, len(ids), st, [st.seed * 1_000_003 + i for i in ids]).to(ctx.device)
    opt = torch.optim.Adam(lora.parameters(), lr=st.lr, betas=(st.beta1, st.beta2), eps=st.eps)
    windows = 0
    for i in range(max(nch)):
        rows = [j for j in range(len(ids)) if i < nch[j]]
        train = torch.tensor([i < nch[j] - 1 for j in rows], device=ctx.device)
        table = torch.tensor([chunk_window(docs[ids[j]], i, st) for j in rows], dtype=torch.long)
        b = make_batch(toks, table, min(st.context, (i + 1) * st.chunk_size), table.size(0))
        lora.select(torch.tensor(rows, device=ctx.device))
        pos = b.all_positions()
        mask = (pos >= b.lo[:, None]) & (pos < b.n[:, None])
        with torch.set_grad_enabled(bool(train.any())), ctx.autocast():
            h = model.forward_hidden(b.x, lora)
            logits = model.logits_from_hidden(h, lora.head(h) if lora.head is not None else None)
            nll = nll_from_logits(logits, b.y)
        ctx.record(sums, b, pos, mask, nll)
        windows += len(rows)
        if bool(train.any()):  # one Adam step on Σ over documents of each one's mean chunk loss (SPEC §4.4)
            m = (mask & train[:, None]).float()
            loss = (nll * m).sum(1).div(m.sum(1).clamp_min(1.0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return windows


def run_lora_ttt(model, tokens: torch.Tensor, st: LoraSettings, ctx: EvalContext) -> Scored:
    """Per-document LoRA TTT; the model's weights are frozen (restored afterwards), never changed."""
    m, _ = unwrap(model)  # adapters enter every layer: the eager forward is used
    docs = documents(tokens, st.bos_id)
    rank, world = dist_info()
    a, z = rank_slice(len(docs), rank, world)
    mine = sorted(range(a, z), key=lambda i: -(-docs[i][1] // st.chunk_size))
    flags = [(p, p.requires_grad) for p in m.parameters()]
    was_training = m.training
    try:
        m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        toks = tokens.to(ctx.device)
        sums = ctx.zeros()
        windows = torch.zeros(1, dtype=torch.float64, device=ctx.device)
        for k in range(0, len(mine), st.batch_docs):
            windows += lora_doc_batch(m, toks, docs, mine[k : k + st.batch_docs], st, ctx, sums)
        n = int(reduce_sums(windows).item())
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        m.train(was_training)
    return Scored(sums, n, {"documents": len(docs), "windows": n})


register(Mode("lora_ttt", LoraSettings, run_lora_ttt, rule=lambda st: (True, LORA_REASON)))
