"""Test-time training on the validation stream, score first: legal score-first TTT (SPEC §4.3) and
per-document LoRA TTT (SPEC §4.4). Both are compliant: every target is scored before any update that
uses it, so the weights that score a target depend only on tokens before it.

Score-first TTT: the target stream is cut into chunks; each sliding window (SPEC §4.2, every target once)
belongs to the chunk of its first scored target. For chunk c: score its windows (eval mode, no grad),
then, unless c is the last chunk, train a copy of the model on the chunk's non-overlapping sequences
(aligned at the chunk start) for `epochs` epochs with SGD + momentum, lr cosine across chunks
(η_c = lr·½(1 + cos(π c/(C-1)))), global-norm clipping, optional frozen first blocks. Under several
processes each global batch of sequences is split across ranks and the gradients are summed with one
all-reduce and divided by the global target count: the update is the single-process update at any world
size. The optimizer state persists across chunks.

LoRA TTT (LORA77 form): documents start at each BOS (a document's last target is the next document's BOS);
each document's targets are cut into `chunk_size` chunks; chunk i is scored inside a window of at most
`context` tokens of the same document, and the same forward gives the loss of one Adam step on
rank-r adapters of q, v (every layer) and the LM head, owned by that document alone. Adapters and Adam
state start fresh for every document (each document's adapters are initialised from a generator seeded
by its index, so its scores do not depend on batching or ranks). Documents are split contiguously across
ranks, sorted by chunk count and processed `batch_docs` at a time.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from pgolf.data.stream import rank_slice
from pgolf.data.tokenizer import BOS_ID
from pgolf.eval.core import (
    EvalResult,
    TargetLog,
    autocast_ctx,
    dist_info,
    finish,
    hidden_fn,
    make_batch,
    nll_from_logits,
    record,
    reduce_sums,
    score_windows,
    sliding_windows,
    take_settings,
    timed,
    unwrap,
)

TTT_REASON = (
    "score-first TTT: each chunk is scored before the model trains on it; the weights that score chunk c were "
    "trained on chunks before c only (SPEC §4.3)"
)
LORA_REASON = (
    "LoRA TTT: per-document adapters, reset per document; each chunk is scored before the adapter step that "
    "uses it, from a context window fixed by the chunk's start (SPEC §4.4)"
)


# ---- score-first TTT -----------------------------------------------------------------------------------
@dataclass
class TTTSettings:
    seq_len: int
    batch_windows: int = 32
    stride: int = 64
    chunk_tokens: int = 32768
    lr: float = 0.002
    momentum: float = 0.9
    epochs: int = 3
    batch_seqs: int = 32
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    freeze_blocks: int = 0  # freeze blocks.0 .. blocks.{n-1}

    def __post_init__(self):
        checks = [
            (0 < self.stride <= self.seq_len, f"stride {self.stride} must be in 1..{self.seq_len}"),
            (self.chunk_tokens > 0, f"chunk_tokens {self.chunk_tokens} must be > 0"),
            (self.epochs >= 0, f"epochs {self.epochs} must be >= 0"),
            (self.batch_seqs > 0 and self.batch_windows > 0, "batch_seqs and batch_windows must be > 0"),
            (self.freeze_blocks >= 0, f"freeze_blocks {self.freeze_blocks} must be >= 0"),
            (self.lr >= 0 and self.grad_clip >= 0, "lr and grad_clip must be >= 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError(f"ttt: {'; '.join(bad)}")

    @classmethod
    def take(cls, s: dict, seq_len: int, batch_windows: int) -> TTTSettings:
        return take_settings(cls, s, seq_len=seq_len, batch_windows=batch_windows)

    def lr_at(self, c: int, chunks: int) -> float:
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * c / max(chunks - 1, 1)))


def chunk_windows(windows, chunk_tokens: int, chunks: int) -> list[list]:
    """Each window goes to the chunk of its first scored target (SPEC §4.3 step 1)."""
    out: list[list] = [[] for _ in range(chunks)]
    for w in windows:
        out[(w[0] + w[2]) // chunk_tokens].append(w)
    return out


def all_reduce_grads(params: list[nn.Parameter], scale: float) -> None:
    """Sum every rank's gradient (one flat all-reduce) and scale; a missing gradient counts as zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _, world = dist_info()
    if world > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.mul_(scale)
    i = 0
    for p in params:
        p.grad = flat[i : i + p.numel()].view_as(p).clone()
        i += p.numel()


def ttt_params(model, freeze_blocks: int) -> list[nn.Parameter]:
    """Mark blocks.0 .. blocks.{freeze_blocks-1} frozen, everything else trainable; the trainable list."""
    frozen = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    return [p for p in model.parameters() if p.requires_grad]


def train_chunk(
    model,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    tokens: torch.Tensor,
    start: int,
    end: int,
    st: TTTSettings,
    lr: float,
    device,
    autocast_dtype,
) -> int:
    """Train on the chunk's targets [start, end): sequences of seq_len aligned at `start`. Returns steps."""
    S = st.seq_len
    nseq = (end - start) // S
    if nseq == 0 or st.epochs == 0:
        return 0
    rank, world = dist_info()
    for g in opt.param_groups:
        g["lr"] = lr
    offs = torch.arange(S + 1, device=device)
    model.train()
    steps = 0
    for _ in range(st.epochs):
        for b0 in range(0, nseq, st.batch_seqs):
            b1 = min(b0 + st.batch_seqs, nseq)
            r0, r1 = rank_slice(b1 - b0, rank, world)
            opt.zero_grad(set_to_none=True)
            if r1 > r0:
                seqs = start + torch.arange(b0 + r0, b0 + r1, device=device)[:, None] * S + offs
                seq = tokens[seqs]  # [n, S+1]
                with autocast_ctx(device, autocast_dtype):
                    loss = model(seq[:, :-1], seq[:, 1:], reduction="sum")
                loss.backward()
            all_reduce_grads(params, 1.0 / ((b1 - b0) * S))  # global mean CE (SPEC §4.3: all-reduce AVG)
            if st.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
            opt.step()
            steps += 1
    model.eval()
    return steps


def eval_ttt(
    model,
    tokens: torch.Tensor,
    st: TTTSettings,
    *,
    luts,
    device,
    autocast_dtype=None,
    log: TargetLog | None = None,
    compile: bool = False,
) -> EvalResult:
    """Legal score-first TTT on a copy of `model` (the model itself is not changed)."""
    base, wrapped = unwrap(model)
    m = copy.deepcopy(base)
    m.set_qat("off")  # TTT trains full-precision weights; fake quant is a training-time device
    m.eval()
    params = ttt_params(m, st.freeze_blocks)
    opt = torch.optim.SGD(params, lr=st.lr, momentum=st.momentum)
    hidden = hidden_fn(m, compile or wrapped)
    total = tokens.numel() - 1
    windows = sliding_windows(total, st.seq_len, st.stride)
    chunks = -(-total // st.chunk_tokens)
    per_chunk = chunk_windows(windows, st.chunk_tokens, chunks)
    rank, world = dist_info()
    settings = {**asdict(st), "windows": len(windows), "chunks": chunks}

    def run() -> EvalResult:
        toks = tokens.to(device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        steps = 0
        for c in range(chunks):
            a, b = rank_slice(len(per_chunk[c]), rank, world)
            sums += score_windows(
                m,
                toks,
                per_chunk[c][a:b],
                seq_len=st.seq_len,
                batch_windows=st.batch_windows,
                luts=luts,
                device=device,
                autocast_dtype=autocast_dtype,
                log=log,
                tail=st.stride,
                hidden=hidden,
            )
            if c < chunks - 1:
                start, end = c * st.chunk_tokens, min((c + 1) * st.chunk_tokens, total)
                lr = st.lr_at(c, chunks)
                steps += train_chunk(m, opt, params, toks, start, end, st, lr, device, autocast_dtype)
        settings["train_steps"] = steps
        return finish("ttt", sums, 0.0, True, TTT_REASON, settings, len(windows))

    return timed(device, run)


# ---- LoRA TTT ------------------------------------------------------------------------------------------
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

    @classmethod
    def take(cls, s: dict, seq_len: int) -> LoraSettings:
        return take_settings(cls, s, seq_len=seq_len)


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
    where its document ends (LORA77 ends the window at the chunk end, which a later BOS can move)."""
    s, n = doc
    c0 = s + i * st.chunk_size
    c1 = s + min((i + 1) * st.chunk_size, n)
    w0 = max(s, c0 - (st.context - st.chunk_size))
    return w0, c1 - w0, c0 - w0


def lora_doc_batch(model, toks, docs, ids, st, luts, device, autocast_dtype, sums, log) -> int:
    """Score (and adapt on) one batch of documents; returns the number of chunk windows scored."""
    nch = [-(-docs[i][1] // st.chunk_size) for i in ids]
    lora = DocLoRA(model.cfg, len(ids), st, [st.seed * 1_000_003 + i for i in ids]).to(device)
    opt = torch.optim.Adam(lora.parameters(), lr=st.lr, betas=(st.beta1, st.beta2), eps=st.eps)
    windows = 0
    for i in range(max(nch)):
        rows = [j for j in range(len(ids)) if i < nch[j]]
        train = torch.tensor([i < nch[j] - 1 for j in rows], device=device)
        table = torch.tensor([chunk_window(docs[ids[j]], i, st) for j in rows], dtype=torch.long)
        T = int(table[:, 1].max())
        b = make_batch(toks, table, T, table.size(0))
        lora.select(torch.tensor(rows, device=device))
        pos = b.all_positions()
        mask = (pos >= b.lo[:, None]) & (pos < b.n[:, None])
        with torch.set_grad_enabled(bool(train.any())), autocast_ctx(device, autocast_dtype):
            h = model.forward_hidden(b.x, lora)
            logits = model.logits_from_hidden(h, lora.head(h) if lora.head is not None else None)
            nll = nll_from_logits(logits, b.y)
        record(sums, luts, b, pos, mask, nll, log)
        windows += len(rows)
        if bool(train.any()):  # one Adam step on Σ over documents of each one's mean chunk loss (SPEC §4.4)
            m = (mask & train[:, None]).float()
            loss = (nll * m).sum(1).div(m.sum(1).clamp_min(1.0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return windows


def eval_lora_ttt(
    model,
    tokens: torch.Tensor,
    st: LoraSettings,
    *,
    luts,
    device,
    autocast_dtype=None,
    log: TargetLog | None = None,
    compile: bool = False,
) -> EvalResult:
    """Per-document LoRA TTT; the model's weights are frozen (restored afterwards), never changed."""
    m, _ = unwrap(model)  # adapters enter every layer: the eager forward is used
    docs = documents(tokens, st.bos_id)
    rank, world = dist_info()
    a, z = rank_slice(len(docs), rank, world)
    mine = sorted(range(a, z), key=lambda i: -(-docs[i][1] // st.chunk_size))
    settings = {**asdict(st), "targets": list(st.targets), "documents": len(docs)}
    flags = [(p, p.requires_grad) for p in m.parameters()]
    was_training = m.training

    def run() -> EvalResult:
        toks = tokens.to(device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        windows = torch.zeros(1, dtype=torch.float64, device=device)
        for k in range(0, len(mine), st.batch_docs):
            ids = mine[k : k + st.batch_docs]
            windows += lora_doc_batch(m, toks, docs, ids, st, luts, device, autocast_dtype, sums, log)
        settings["windows"] = int(reduce_sums(windows).item())
        return finish("lora_ttt", sums, 0.0, True, LORA_REASON, settings, settings["windows"])

    try:
        m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        return timed(device, run)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        m.train(was_training)
