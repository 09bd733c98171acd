"""The LoRA TTT eval modes: per-document LoRA test-time training. Two registered forms of one loop:
`lora_ttt` (records/track_10min_16mb/2026-03-17_LoRA_TTT, PR #77) and `lora_ttt_1090`
(PR #1090, records/track_non_record_16mb/2026-03-24_11L_XSA_SwiGLU_LoRATTT_1xH100). Compliant: every chunk
is scored before the adapter step that uses it. Configs: conf/eval/lora_ttt.yaml, lora_ttt_1090.yaml.

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

PR #1090's form (`lora_ttt_1090`): adapters on q and v only, A ~ N(0, 0.01²), B ~ N(0, 0.001²), output
scaled by 1/r; every 256-target chunk fed alone (`context` = `chunk_size`); one Adam(lr 0.05) step after
each chunk but the document's last; adapters and Adam fresh per document (as in PR #77: every document
has its own adapters and Adam state). Its scoring rules, each a setting: documents under 5 tokens are not
scored (`score_min_tokens`); a document's last target, the next document's BOS, is not scored
(`score_doc_end: false`), nor a final chunk of a single target (`score_min_chunk: 2`). A document's tokens
run from its BOS to the next BOS (or the stream's end). These rules choose which targets count by where
documents end, i.e. by later tokens (and skip every target whose token is a document's BOS); no score
depends on them. Under them the metric skips targets, and the result also carries pgolf's each-target-once
figure from the same pass: the skipped targets are scored too, in the same forwards (a skipped target is
the last of its chunk, or a chunk of its own), with the adapters of that moment, and never trained on.
PR #1090 also scores documents under 32 tokens "without TTT": such a document has a single chunk, after
which no step is taken, so the rule is implied (its code scores them with the adapters it drew first, a
draw like any document's).

Initialisation is random: document i's adapters are drawn from a generator seeded with `seed·1000003 + i`,
so a document's scores depend on its own tokens and index only (PR #1090 draws from the device's global
generator, which depends on the documents processed before on the same GPU).
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
    "uses it, from a context window fixed by the chunk's start (PR #77)"
)
INITS = ("uniform", "normal")
# Where the window of a document's last, partial chunk starts (`last_chunk_window`): `chunk_start` (pgolf):
# `context - chunk_size` before the chunk's start, as a full chunk's would, so no window depends on where its
# document ends; `chunk_end` (the records: PR #77, PR #1611): `context` tokens before the chunk's end, the
# document's end, which the next BOS (a later token) places: up to `chunk_size - 1` more tokens of context.
LAST_CHUNK_WINDOWS = ("chunk_start", "chunk_end")


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
    init: str = "uniform"  # uniform: A ~ U(±1/√in), B = 0 (PR #77) | normal: A ~ N(0, a_std²), B ~ N(0, b_std²)
    a_std: float = 0.01  # `normal` init only (PR #1090)
    b_std: float = 0.001
    scale_by_rank: bool = False  # Δ(x) = (x Aᵀ) Bᵀ / rank (PR #1090) instead of (x Aᵀ) Bᵀ
    score_min_tokens: int = 0  # documents of fewer tokens are not scored (PR #1090: 5)
    score_doc_end: bool = True  # score a document's last target, the next document's BOS (PR #1090: false)
    score_min_chunk: int = 1  # a document's final chunk of fewer targets is not scored (PR #1090: 2)
    last_chunk_window: str = "chunk_start"  # chunk_start (pgolf) | chunk_end (the records); LAST_CHUNK_WINDOWS

    def __post_init__(self):
        self.context = int(self.context or self.seq_len)
        self.targets = tuple(self.targets)
        self.scale_by_rank, self.score_doc_end = bool(self.scale_by_rank), bool(self.score_doc_end)
        bad = set(self.targets) - {"q", "v", "head"}
        checks = [
            (not bad, f"targets {sorted(bad)} not in (q, v, head)"),
            (self.rank > 0, f"rank {self.rank} must be > 0"),
            (0 < self.chunk_size <= self.context, f"chunk_size {self.chunk_size} must be in 1..context {self.context}"),
            (self.batch_docs > 0, f"batch_docs {self.batch_docs} must be > 0"),
            (self.init in INITS, f"init {self.init!r} not in {INITS}"),
            (self.a_std >= 0 and self.b_std >= 0, f"a_std {self.a_std} and b_std {self.b_std} must be >= 0"),
            (self.score_min_tokens >= 0, f"score_min_tokens {self.score_min_tokens} must be >= 0"),
            (1 <= self.score_min_chunk <= self.chunk_size, f"score_min_chunk must be in 1..{self.chunk_size}"),
            (
                self.last_chunk_window in LAST_CHUNK_WINDOWS,
                f"last_chunk_window {self.last_chunk_window!r} not in {LAST_CHUNK_WINDOWS}",
            ),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))  # the caller names the mode

    @property
    def skips_targets(self) -> bool:
        """Whether the metric leaves targets unscored (then pgolf's each-target-once figure comes with it)."""
        return not self.score_doc_end or self.score_min_tokens > 0 or self.score_min_chunk > 1


class Adapter(nn.Module):
    """Per-document low-rank delta Δ(x) = scale·(x Aᵀ) Bᵀ, A [docs, r, in], B [docs, out, r] (initialised by
    `DocLoRA`); scale 1 (PR #77) or 1/r (PR #1090)."""

    def __init__(self, docs: int, in_f: int, out_f: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(docs, rank, in_f))
        self.B = nn.Parameter(torch.zeros(docs, out_f, rank))
        self.scale = scale
        self.rows: torch.Tensor | None = None  # documents of the current forward (rows of A, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, T, in] -> [n, T, out]
        A, B = (self.A, self.B) if self.rows is None else (self.A[self.rows], self.B[self.rows])
        out = (x @ A.to(x.dtype).transpose(1, 2)) @ B.to(x.dtype).transpose(1, 2)
        return out if self.scale == 1.0 else out * self.scale


class AdapterSet(nn.Module):
    """Per-document adapters of one batch of documents (rows): `select(rows)` picks the documents of the next
    forward; `head` (an `Adapter` or None) is the LM-head delta `score_and_adapt` adds to the logits."""

    head: Adapter | None

    def select(self, rows: torch.Tensor) -> None:
        for a in self.modules():
            if isinstance(a, Adapter):
                a.rows = rows


class DocLoRA(AdapterSet):
    """The `lora` object GPT.forward_hidden takes: `layer(j).delta("q"|"v", x)` per virtual layer j, plus the
    LM-head delta passed to `logits_from_hidden` as a logit bias."""

    def __init__(self, cfg, docs: int, st: LoraSettings, seeds: list[int]):
        super().__init__()
        d, kv, L, r = cfg.model_dim, cfg.kv_dim, len(cfg.layer_schedule), st.rank
        t = st.targets
        sc = 1.0 / r if st.scale_by_rank else 1.0
        self.q = nn.ModuleList(Adapter(docs, d, d, r, sc) for _ in range(L)) if "q" in t else None
        self.v = nn.ModuleList(Adapter(docs, d, kv, r, sc) for _ in range(L)) if "v" in t else None
        self.head = Adapter(docs, d, cfg.vocab_size, r, sc) if "head" in t else None
        adapters = [a for a in self.modules() if isinstance(a, Adapter)]
        with torch.no_grad():
            for i, seed in enumerate(seeds):  # a document's init depends only on its own seed
                g = torch.Generator().manual_seed(seed)
                for a in adapters:
                    if st.init == "normal":  # PR #1090: A ~ N(0, 0.01²), B ~ N(0, 0.001²)
                        a.A[i].copy_(torch.randn(a.A.shape[1:], generator=g) * st.a_std)
                        a.B[i].copy_(torch.randn(a.B.shape[1:], generator=g) * st.b_std)
                    else:  # PR #77: A ~ U(±1/√in), B = 0
                        bound = 1.0 / math.sqrt(a.A.size(2))
                        a.A[i].copy_(torch.rand(a.A.shape[1:], generator=g) * 2 * bound - bound)

    def layer(self, j: int) -> _LayerLoRA:
        return _LayerLoRA(self.q[j] if self.q is not None else None, self.v[j] if self.v is not None else None)


class _LayerLoRA:
    def __init__(self, q: Adapter | None, v: Adapter | None):
        self.q, self.v = q, v

    def delta(self, kind: str, x: torch.Tensor):
        a = self.q if kind == "q" else self.v if kind == "v" else None
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


def chunk_window(doc: tuple[int, int], i: int, st) -> tuple[int, int, int]:
    """Window (start, length, score_from) scoring chunk i of a document `doc` = (first target, target count),
    in token positions; `st` gives `chunk_size`, `context` and `last_chunk_window`. With `chunk_start` the
    window starts `context - chunk_size` tokens before the chunk start (within the document), so a target's
    context never depends on where its document ends; with `chunk_end` (PR #77, PR #1611: `[max(0, end_c -
    context), end_c)`) it is the `context` tokens before the chunk's end, which for a document's last,
    partial chunk is the document's end (placed by the next BOS, a later token). The two differ only on a
    last partial chunk. Its length is at most `min(context, (i+1)·chunk_size)`."""
    s, n = doc
    c0 = s + i * st.chunk_size
    c1 = s + min((i + 1) * st.chunk_size, n)
    if st.last_chunk_window == "chunk_end":
        w0 = max(s, c1 - st.context)
    else:
        w0 = max(s, c0 - (st.context - st.chunk_size))
    return w0, c1 - w0, c0 - w0


@dataclass(frozen=True)
class DocPlan:
    """How one document is scored and adapted: its targets [start, start+n) are cut into chunks of
    `chunk_size`, every chunk is forwarded; the metric scores targets [start, scored_to); an Adam step
    follows chunks 0 .. steps-1."""

    start: int
    n: int
    scored_to: int
    steps: int


def doc_plan(doc: tuple[int, int], tokens, st: LoraSettings) -> DocPlan:
    """The plan of one document (`documents`) of the stream `tokens` (1-D array or tensor), under the
    settings' document rules (module docstring)."""
    s, n = doc
    ends_at_bos = int(tokens[s + n]) == st.bos_id  # its last target is the next document's BOS
    doc_tokens = n if ends_at_bos else n + 1  # from its BOS to the next BOS or the stream's end
    pred = n - 1 if ends_at_bos and not st.score_doc_end else n  # targets it scores and trains on
    if doc_tokens < st.score_min_tokens:
        return DocPlan(s, n, s, 0)
    tail = pred % st.chunk_size
    scored = pred - tail if 0 < tail < st.score_min_chunk else pred
    return DocPlan(s, n, s + scored, max(-(-pred // st.chunk_size) - 1, 0))


def lora_doc_batch(
    model, toks: torch.Tensor, plans: list[DocPlan], seeds: list[int], st: LoraSettings, ctx: EvalContext, sums, once
) -> int:
    """Score (and adapt on) the documents of `plans` side by side with fresh adapters (`DocLoRA`, seeded by
    `seeds`) and a fresh Adam; see `score_and_adapt`."""
    lora = DocLoRA(model.cfg, len(plans), st, seeds).to(ctx.device)
    opt = torch.optim.Adam(lora.parameters(), lr=st.lr, betas=(st.beta1, st.beta2), eps=st.eps)
    return score_and_adapt(model, toks, plans, lora, opt, st, ctx, sums, once)


def score_and_adapt(
    model,
    toks: torch.Tensor,
    plans: list[DocPlan],
    lora: AdapterSet,
    opt: torch.optim.Optimizer,
    st,
    ctx: EvalContext,
    sums: torch.Tensor,
    once: torch.Tensor | None,
) -> int:
    """Score the documents of `plans` side by side, chunk after chunk, each chunk before the step that uses it;
    returns the number of chunk windows scored. Adds the scored targets to `sums` (float64 [3]) and, unless
    None, every target forwarded to `once`.

    `lora`: the documents' adapters (row j = document j; its `layer(j)` is handed to `model.forward_hidden`,
    its `head` delta added to the logits), `opt` their optimizer; `st` gives `chunk_size` and `context`
    (`chunk_window`). Step i scores chunk i of every document that has one, in windows padded to
    `min(context, (i+1)·chunk_size)` (a length that depends on i only, see the module docstring), then takes
    one `opt` step on Σ over documents of each one's mean chunk loss, over the documents whose chunk i is
    followed by a training step (`DocPlan.steps`), when there is any (PR #77)."""
    nch = [-(-p.n // st.chunk_size) for p in plans]
    scored_to = torch.tensor([p.scored_to for p in plans], device=ctx.device)
    windows = 0
    for i in range(max(nch)):
        rows = [j for j in range(len(plans)) if i < nch[j]]
        train = torch.tensor([i < plans[j].steps for j in rows], device=ctx.device)
        table = torch.tensor([chunk_window((plans[j].start, plans[j].n), i, st) for j in rows], dtype=torch.long)
        b = make_batch(toks, table, min(st.context, (i + 1) * st.chunk_size), table.size(0))
        sel = torch.tensor(rows, device=ctx.device)
        lora.select(sel)
        pos = b.all_positions()
        chunk = (pos >= b.lo[:, None]) & (pos < b.n[:, None])
        mask = chunk if once is None else chunk & (b.start[:, None] + pos < scored_to[sel][:, None])
        with torch.set_grad_enabled(bool(train.any())), ctx.autocast():
            h = model.forward_hidden(b.x, lora)
            logits = model.logits_from_hidden(h, lora.head(h) if lora.head is not None else None)
            nll = nll_from_logits(logits, b.y)
        ctx.record(sums, b, pos, mask, nll, once, chunk)
        windows += len(rows)
        if bool(train.any()):  # one step on Σ over documents of each one's mean chunk loss (PR #77)
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
    stream = tokens.cpu().numpy()
    plans = {i: doc_plan(docs[i], stream, st) for i in mine}
    flags = [(p, p.requires_grad) for p in m.parameters()]
    was_training = m.training
    try:
        m.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        toks = tokens.to(ctx.device)
        sums = ctx.zeros()
        once = ctx.zeros() if st.skips_targets else None
        windows = torch.zeros(1, dtype=torch.float64, device=ctx.device)
        for k in range(0, len(mine), st.batch_docs):
            ids = mine[k : k + st.batch_docs]
            seeds = [st.seed * 1_000_003 + i for i in ids]
            windows += lora_doc_batch(m, toks, [plans[i] for i in ids], seeds, st, ctx, sums, once)
        n = int(reduce_sums(windows).item())
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        m.train(was_training)
    return Scored(sums, n, {"documents": len(docs), "windows": n}, once)


def lora_rule(st: LoraSettings) -> tuple[bool, str]:
    if not st.skips_targets:
        return True, LORA_REASON
    return True, LORA_REASON + (
        "; the record's document rules (PR #1090) leave targets unscored: a document's last target (the next "
        f"BOS) when score_doc_end is false, documents under {st.score_min_tokens} tokens, final chunks under "
        f"{st.score_min_chunk} targets"
    )


# PR #1090's form: q and v adapters, N(0, 0.01²)/N(0, 0.001²) init scaled by 1/r, each chunk alone, Adam lr 0.05
LORA_1090 = {"targets": ("q", "v"), "init": "normal", "scale_by_rank": True, "lr": 0.05, "beta2": 0.999}
LORA_1090 |= {"eps": 1e-8, "context": 256, "score_min_tokens": 5}
LORA_1090 |= {"score_doc_end": False, "score_min_chunk": 2}
register(Mode("lora_ttt", LoraSettings, run_lora_ttt, lora_rule))
register(Mode("lora_ttt_1090", LoraSettings, run_lora_ttt, lora_rule, LORA_1090))
