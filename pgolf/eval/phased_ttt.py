"""The phased score-first TTT eval modes: per-document LoRA test-time training on every virtual block plus
global SGD phases on the base model over documents already scored. The eval of the final #1 record of the
challenge (PR #1611, records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611),
built up by PR #1610 (phased TTT), PR #1626 (several global SGD phases) and PR #1767 (warm-start A, α/r
scaling). Two registered forms: `phased_ttt` (documents in stream order, pgolf's form) and `phased_ttt_1611`
(the record's order). Configs: conf/eval/phased_ttt.yaml, phased_ttt_1611.yaml.

Documents and chunks (as `lora_ttt`, pgolf/eval/lora_ttt.py): a document starts at a BOS and its last
target is the next document's BOS. Each document's targets are cut into chunks of `chunk_size`; chunk i is
scored in a window of at most `context` tokens of the same document, then one AdamW step is taken on the
document's adapters with that chunk's mean loss, unless it is the document's last chunk (never trained on).
`batch_docs` documents are adapted side by side, each with its own adapters.

Adapters (PR #1611's `BatchedTTTLoRA`): for every virtual block slot (`GPTConfig.layer_schedule`; each pass
of a looped layer has its own) Q, K, V (input: the attention's normed input), O (same input, added to the
projected attention output) and MLP (input: the MLP's normed input, added to its output), plus the LM head
(input: the final hidden state, added to the logits before the softcap). Each is Δ(x) = (x Aᵀ) Bᵀ·α/r,
A ~ U(±1/√in), B = 0. Q and V enter through the model's `lora.layer(j).delta` interface; K, O and MLP
through forward hooks on `attn.c_k`, `attn` and `mlp` that read the slot `layer(j)` last set (the model has
no K/O/MLP LoRA interface), attached only while a batch is scored.

Warm-start A (PR #1767): B and the AdamW state start fresh for every batch, A continues from the previous
batch of the same *chain* (fresh for a chain's first batch, after every global phase and for a batch of
fewer than `batch_docs` documents, which does not pass its A on). The record keeps one reusable LoRA per
GPU and claims batches from a file-locked counter (work stealing), so which batches share an A lineage
depends on timing and on the number of GPUs. Here the queue is assigned statically: queue entry q belongs
to chain q mod `chains` (the record's 8 GPUs: 8), chains to ranks round-robin (chain c on rank c mod world),
and the queue runs in rounds of `chains` entries. The result is the same at any world size, except through
`global_packing: flat` (below).

Global phases (PR #1626): boundaries `prefix_docs·(p+1)/phases` documents. After each round, if the
documents scored so far (while phases remain) reach the next boundary, the first `boundary` of them in
scoring order (batch, then position in it; the record sorts the same way) are concatenated (each
document's tokens up to and including the next BOS, as the record does) and the base model takes SGD steps
on them: chunks of `global_chunk_tokens` (the last chunk skipped), one step per chunk on its sequences of
`global_seq_len` split across ranks, lr cosine over chunks `global_lr·½(1+cos(πc/(C−1)))`, momentum,
global-norm clip, document-bounded attention when `global_doc_bounded`. How a rank's sequences meet the
attention is `global_packing`: `rows` (pgolf's `phased_ttt`) makes each sequence a row, so segments start
at every BOS and at every row start; `flat` (the record's, `phased_ttt_1611`) joins a rank's sequences
into one row, whose segments start at every BOS and every `global_seq_len` tokens from a document start, so
a document that crosses a sequence boundary keeps its context, except across ranks: a rank's row is its
share, so with `flat` the global phases depend on the number of processes, as the record's do. The
gradient is the mean over every rank's targets (one all-reduce; the record averages per-rank means, equal
when ranks get equal shares). Scoring then resumes with the updated base model. The phases train a copy:
the model handed in is unchanged.

The per-document AdamW is PyTorch's fused kernel on a GPU (the record's `fused=True`), the default
(foreach) one elsewhere.

Order (`order`): `stream` (pgolf): batches of consecutive documents in stream order. Every document,
chain predecessor and global-phase document that can influence a document's scores precedes it in the
stream, so every score depends on earlier tokens only (the flip test of tests/test_causality.py). `length`
(the record's): documents sorted by length, cut into batches, the batches queued longest first. Score
before update still holds in that scoring order (the record's Issue #1017 argument), but a document's
scores then depend on the documents scored before it, which may come later in the stream, and on every
document's length (through the order): flipping a later token moves earlier targets.

Deviations from the record, each to keep every score a function of earlier tokens and the metric
independent of the number of processes: in `phased_ttt`, a document's last, partial chunk is scored in a
window that starts where a full chunk's would (`last_chunk_window: chunk_start`, `lora_ttt.chunk_window`);
the record ends it at the document's end (`chunk_end`, the default of `phased_ttt_1611`), which the next BOS
places, giving up to `chunk_size`−1 more tokens of context to every document whose last chunk is partial and
whose window is cut by `context` (e.g. a document of 2,047 targets: window [0, 2047) against [16, 2031));
fresh A is drawn from generators seeded with `seed·1000003 + q·batch_docs + row` (the record: the process's
global generator); the static chains above. On one GPU the record has one A lineage and checks the phase boundaries
after every batch: `chains: 1` reproduces that schedule (with `chains: 8` the boundaries are checked after
every round of 8 batches, so the phases fire at different document counts; on 8 GPUs the record's own
counts depend on timing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pgolf.data.stream import rank_slice
from pgolf.data.tokenizer import BOS_ID
from pgolf.eval.core import EvalContext, Scored, dist_info, reduce_sums, unwrap
from pgolf.eval.lora_ttt import LAST_CHUNK_WINDOWS, Adapter, AdapterSet, DocPlan, documents, score_and_adapt
from pgolf.eval.registry import Mode, register
from pgolf.eval.ttt import all_reduce_grads, ttt_model, ttt_params
from pgolf.model.varlen import document_cu_seqlens

ORDERS = ("stream", "length")
PACKINGS = ("rows", "flat")  # global phases: a sequence per row (pgolf) | a rank's sequences in one row (PR #1611)
KINDS = ("q", "k", "v", "o", "mlp")  # per virtual block slot; plus the LM head
PHASED_REASON = (
    "phased score-first TTT: each chunk is scored before the LoRA step that uses it, a document's last chunk is "
    "never trained on; global SGD phases train the base model only on documents already scored, and warm-start A "
    "passes only from batches already scored (PR #1610, #1626, #1767)"
)


@dataclass
class PhasedSettings:
    rank: int = 80
    alpha: float = 144.0  # Δ(x) = (x Aᵀ) Bᵀ · alpha / rank (PR #1767)
    lr: float = 1e-4  # AdamW on the adapters
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-10
    weight_decay: float = 0.5
    chunk_size: int = 48  # targets scored per step
    context: int = 2048  # window length, in-document context included
    batch_docs: int = 64  # documents adapted side by side
    chains: int = 8  # warm-start A lineages; queue entry q belongs to chain q mod chains
    order: str = "stream"  # stream (pgolf) | length (PR #1611: by length, longest batch first)
    warm_start_a: bool = True  # A continues across a chain's batches (PR #1767); false: fresh A per batch
    prefix_docs: int = 2500  # documents the global phases train on, in all
    phases: int = 3
    global_lr: float = 1e-3  # SGD, cosine over chunks
    global_momentum: float = 0.9
    global_chunk_tokens: int = 32768
    global_seq_len: int = 2048
    global_grad_clip: float = 1.0  # global-norm clip; 0 = off
    global_doc_bounded: bool = True  # document-bounded attention in the global phases (cu_seqlens from BOS)
    global_packing: str = "rows"  # rows (pgolf): a row per sequence | flat (PR #1611): a rank's sequences in one row
    bos_id: int = BOS_ID
    seed: int = 0  # fresh A of queue entry q, row j: generator seeded with seed·1000003 + q·batch_docs + j
    last_chunk_window: str = "chunk_start"  # chunk_start (pgolf) | chunk_end (PR #1611); lora_ttt.chunk_window

    def __post_init__(self):
        self.warm_start_a, self.global_doc_bounded = bool(self.warm_start_a), bool(self.global_doc_bounded)
        checks = [
            (self.rank > 0 and self.alpha > 0, f"rank {self.rank} and alpha {self.alpha} must be > 0"),
            (0 < self.chunk_size <= self.context, f"chunk_size {self.chunk_size} must be in 1..context {self.context}"),
            (self.batch_docs > 0, f"batch_docs {self.batch_docs} must be > 0"),
            (self.chains > 0, f"chains {self.chains} must be > 0"),
            (self.order in ORDERS, f"order {self.order!r} not in {ORDERS}"),
            (self.prefix_docs >= 0, f"prefix_docs {self.prefix_docs} must be >= 0"),
            (self.phases > 0, f"phases {self.phases} must be > 0"),
            (
                0 < self.global_seq_len <= self.global_chunk_tokens,
                f"global_seq_len {self.global_seq_len} must be in 1..global_chunk_tokens {self.global_chunk_tokens}",
            ),
            (
                min(self.lr, self.global_lr, self.weight_decay, self.global_grad_clip) >= 0,
                "lr, global_lr, weight_decay and global_grad_clip must be >= 0",
            ),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0, "betas must be in [0, 1), eps > 0"),
            (0 <= self.global_momentum < 1, f"global_momentum {self.global_momentum} must be in [0, 1)"),
            (self.global_packing in PACKINGS, f"global_packing {self.global_packing!r} not in {PACKINGS}"),
            (
                self.global_packing != "flat" or self.global_doc_bounded,
                "global_packing flat needs global_doc_bounded true (without document bounds a flat row would attend "
                "across every document of a rank's share)",
            ),
            (
                self.last_chunk_window in LAST_CHUNK_WINDOWS,
                f"last_chunk_window {self.last_chunk_window!r} not in {LAST_CHUNK_WINDOWS}",
            ),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))  # the caller names the mode

    def global_lr_at(self, c: int, chunks: int) -> float:
        """The global SGD lr of chunk c of `chunks` (PR #1626: cosine to 0 at the last, skipped, chunk)."""
        return self.global_lr * 0.5 * (1.0 + math.cos(math.pi * c / max(chunks - 1, 1)))


class PhasedLoRA(AdapterSet):
    """PR #1611's adapters for `docs` documents: Q, K, V, O, MLP per virtual block slot and the LM head, each an
    `Adapter` (A [docs, r, in], B [docs, out, r] = 0, scale α/r). The `lora` object `GPT.forward_hidden`
    takes: `layer(j)` marks slot j current and returns this object, whose `delta("q"|"v", x)` the attention
    calls; K, O and MLP enter through the hooks of `attached`."""

    def __init__(self, cfg, docs: int, rank: int, alpha: float):
        super().__init__()
        d, kv = cfg.model_dim, cfg.kv_dim
        out = {"q": d, "k": kv, "v": kv, "o": d, "mlp": d}
        scale = alpha / rank
        self.slots = nn.ModuleList(
            nn.ModuleDict({k: Adapter(docs, d, out[k], rank, scale) for k in KINDS}) for _ in cfg.layer_schedule
        )
        self.head = Adapter(docs, d, cfg.vocab_size, rank, scale)
        self.slot = 0

    def adapters(self) -> list[Adapter]:
        """Every adapter, in a fixed order (slot by slot, Q K V O MLP, then the head)."""
        return [s[k] for s in self.slots for k in KINDS] + [self.head]

    @torch.no_grad()
    def draw_a(self, seeds: list[int]) -> None:
        """A of row j ~ U(±1/√in), drawn from a generator seeded with seeds[j] (one per document row)."""
        for j, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(seed)
            for a in self.adapters():
                bound = 1.0 / math.sqrt(a.A.size(2))
                a.A[j].copy_(torch.rand(a.A.shape[1:], generator=g) * 2 * bound - bound)

    def a_state(self) -> list[torch.Tensor]:
        """Copies of every A (what a chain's next batch starts from)."""
        return [a.A.detach().clone() for a in self.adapters()]

    @torch.no_grad()
    def load_a(self, state: list[torch.Tensor]) -> None:
        for a, t in zip(self.adapters(), state, strict=True):
            a.A.copy_(t)

    def layer(self, j: int) -> PhasedLoRA:
        self.slot = j
        return self

    def delta(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The current slot's `kind` delta of x [n,T,in] -> [n,T,out]."""
        return self.slots[self.slot][kind](x)

    @contextlib.contextmanager
    def attached(self, model) -> Iterator[PhasedLoRA]:
        """Within the block: every block's K projection, attention output and MLP output of `model` (a GPT) get
        the current slot's K, O and MLP deltas of their inputs (the attention's and the MLP's normed inputs)."""

        def hook(kind: str):
            return lambda _module, args, out: out + self.delta(kind, args[0])

        handles = []
        for block in model.blocks:
            handles.append(block.attn.c_k.register_forward_hook(hook("k")))
            handles.append(block.attn.register_forward_hook(hook("o")))
            handles.append(block.mlp.register_forward_hook(hook("mlp")))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def phased_queue(docs: list[tuple[int, int]], st: PhasedSettings) -> list[tuple[int, list[int]]]:
    """The queue: (sort key, document indices) per batch, in the order batches are scored. `stream`: batches
    of `batch_docs` consecutive documents, key = position. `length` (PR #1611 `_build_ttt_global_batches`):
    documents sorted by length (stable), cut into batches, key = the batch's index in that order, batches
    queued by their longest document, longest first (stable)."""
    B = st.batch_docs
    if st.order == "stream":
        return [(k, list(range(i, min(i + B, len(docs))))) for k, i in enumerate(range(0, len(docs), B))]
    by_len = sorted(range(len(docs)), key=lambda d: docs[d][1])
    entries = list(enumerate(by_len[i : i + B] for i in range(0, len(by_len), B)))
    entries.sort(key=lambda e: -max(docs[d][1] for d in e[1]))
    return entries


def phase_bounds(n_docs: int, st: PhasedSettings) -> list[int]:
    """Documents each global phase trains on: `prefix·(p+1) // phases`, prefix = min(prefix_docs, n_docs);
    none when the prefix is empty (PR #1626; PR #1611: [833, 1666, 2500])."""
    prefix = min(n_docs, st.prefix_docs)
    return [prefix * (p + 1) // st.phases for p in range(st.phases)] if prefix > 0 else []


def check_doc_bounded(model) -> None:
    """Raise ValueError when `model` (a GPT) cannot take document-bounded attention (`cu_seqlens`)."""
    if model.bigram is not None or (model.smear is not None and model.smear.form != "gated"):
        raise ValueError(
            "phased_ttt: global_doc_bounded is true but the model's BigramHash or v5/record SmearGate reads the "
            "previous token across document boundaries; set global_doc_bounded: false (dense attention in the "
            "global phases)"
        )


def global_sgd(model, tokens: torch.Tensor, docs: list[tuple[int, int]], st: PhasedSettings, ctx: EvalContext) -> int:
    """One global phase: SGD on every parameter of `model` (a GPT, adapted in place) over the concatenated
    tokens of `docs` ((first target, targets) each; its tokens up to and including the next BOS) of the
    stream `tokens` (1-D, on the device). Chunks of `global_chunk_tokens` targets, the last skipped; per
    chunk one step on its `global_seq_len` sequences, split across ranks, at `global_lr_at`, as rows or one
    flat row (`global_packing`). Returns the steps taken. The parameters are frozen again afterwards, the
    model in eval mode."""
    if not docs:
        return 0
    ids = torch.cat([tokens[s : s + n + 1] for s, n in docs])
    total = ids.numel() - 1
    K, S = st.global_chunk_tokens, st.global_seq_len
    chunks = -(-total // K)
    params = ttt_params(model, 0)
    opt = torch.optim.SGD(params, lr=st.global_lr, momentum=st.global_momentum)
    rank, world = dist_info()
    offs = torch.arange(S + 1, device=ids.device)
    steps = 0
    model.train()
    try:
        for c in range(chunks - 1):  # the last chunk is skipped (PR #1626)
            start, nseq = c * K, K // S  # every chunk but the last holds K targets
            opt.param_groups[0]["lr"] = st.global_lr_at(c, chunks)
            a, b = rank_slice(nseq, rank, world)
            opt.zero_grad(set_to_none=True)
            if b > a:
                seq = ids[start + torch.arange(a, b, device=ids.device)[:, None] * S + offs]  # [n, S+1]
                x, y = seq[:, :-1], seq[:, 1:]
                if st.global_packing == "flat":  # PR #1611: the rank's span of tokens as one row
                    x, y = x.reshape(1, -1), y.reshape(1, -1)
                cu = document_cu_seqlens(x, st.bos_id, S) if st.global_doc_bounded else None
                with ctx.autocast():
                    loss = model(x, y, reduction="sum", cu_seqlens=cu)
                loss.backward()
            all_reduce_grads(params, 1.0 / (nseq * S))  # the mean over every rank's targets
            if st.global_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, st.global_grad_clip)
            opt.step()
            steps += 1
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    return steps


def phased_batch(
    model, toks: torch.Tensor, docs, entry, q: int, warm: dict, st: PhasedSettings, ctx: EvalContext, sums
) -> int:
    """Score and adapt on queue entry q (`entry` = (key, document indices)) with its chain's warm A (from
    `warm`, chain -> A state, updated after a full batch); returns the chunk windows scored."""
    ids = entry[1]
    chain = q % st.chains
    lora = PhasedLoRA(model.cfg, len(ids), st.rank, st.alpha).to(ctx.device)
    full = len(ids) == st.batch_docs
    if full and st.warm_start_a and chain in warm:
        lora.load_a(warm[chain])
    else:
        lora.draw_a([st.seed * 1_000_003 + q * st.batch_docs + j for j in range(len(ids))])
    betas = (st.beta1, st.beta2)
    fused = torch.device(ctx.device).type == "cuda"  # the record's fused AdamW
    opt = torch.optim.AdamW(
        lora.parameters(), lr=st.lr, betas=betas, eps=st.eps, weight_decay=st.weight_decay, fused=fused
    )
    plans = [DocPlan(s, n, s + n, -(-n // st.chunk_size) - 1) for s, n in (docs[d] for d in ids)]
    with lora.attached(model):
        windows = score_and_adapt(model, toks, plans, lora, opt, st, ctx, sums, None)
    if full and st.warm_start_a:
        warm[chain] = lora.a_state()
    return windows


def run_phased_ttt(model, tokens: torch.Tensor, st: PhasedSettings, ctx: EvalContext) -> Scored:
    """Phased score-first TTT (module docstring) on a copy of `model` (the model itself is not changed)."""
    base, _ = unwrap(model)  # adapters and hooks enter every layer: the eager forward is used
    docs = documents(tokens, st.bos_id)
    bounds = phase_bounds(len(docs), st)
    if bounds and st.global_doc_bounded:
        check_doc_bounded(base)
    queue = phased_queue(docs, st)
    rank, world = dist_info()
    m = ttt_model(base, "off")
    for p in m.parameters():
        p.requires_grad_(False)
    toks = tokens.to(ctx.device)
    sums = ctx.zeros()
    windows = torch.zeros(1, dtype=torch.float64, device=ctx.device)
    warm: dict[int, list[torch.Tensor]] = {}
    scored: list[tuple[int, int, int]] = []  # (batch key, position, document) scored while phases remain
    phase = steps = 0
    for r0 in range(0, len(queue), st.chains):  # rounds: one queue entry per chain
        for q in range(r0, min(r0 + st.chains, len(queue))):
            if (q % st.chains) % world == rank:
                windows += phased_batch(m, toks, docs, queue[q], q, warm, st, ctx, sums)
        if phase < len(bounds):
            scored += [(key, j, d) for key, ids in queue[r0 : r0 + st.chains] for j, d in enumerate(ids)]
            if len(scored) >= bounds[phase]:  # PR #1626: train on the first `boundary` scored documents
                chosen = [docs[d] for _, _, d in sorted(scored)[: bounds[phase]]]
                steps += global_sgd(m, toks, chosen, st, ctx)
                warm.clear()  # fresh A after every phase
                phase += 1
    n = int(reduce_sums(windows).item())
    info = {"documents": len(docs), "windows": n, "batches": len(queue), "phase_docs": bounds[:phase]}
    return Scored(sums, n, info | {"global_steps": steps})


def phased_rule(st: PhasedSettings) -> tuple[bool, str]:
    if st.order == "stream":
        return True, PHASED_REASON + "; documents in stream order: every score depends on earlier tokens only"
    return True, PHASED_REASON + (
        "; the record's order (PR #1611): documents sorted by length, longest batch first: score before update "
        "holds in that scoring order, but a document's scores depend on documents scored before it that may come "
        "later in the stream, and on every document's length (the stream-order flip test moves earlier targets)"
        + (
            "; a document's last chunk is scored in the window ending at the document's end (placed by the next BOS)"
            if st.last_chunk_window == "chunk_end"
            else ""
        )
    )


register(Mode("phased_ttt", PhasedSettings, run_phased_ttt, phased_rule))
register(
    Mode(
        "phased_ttt_1611",
        PhasedSettings,
        run_phased_ttt,
        phased_rule,
        {"order": "length", "last_chunk_window": "chunk_end", "global_packing": "flat"},
    )
)
