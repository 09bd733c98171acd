"""Phased score-first TTT (pgolf/eval/phased_ttt.py; PR #1610 -> #1626 -> #1767, the eval of PR #1611): the
adapters on every virtual slot and their formula, every target scored once, the frozen-model limit, the
global phases (later scores only), warm-start A, the queue orders, the record's config, bad settings, and
1 vs 2 processes. The stream-order flip test of both forms is in tests/test_causality.py."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import end_spawned_rank, free_port, perturbed_tiny_gpt
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext, TargetLog, gather_log, score_windows
from pgolf.eval.lora_ttt import chunk_window, documents
from pgolf.eval.modes import parse_mode, run_mode
from pgolf.eval.phased_ttt import PhasedLoRA, PhasedSettings, global_sgd, phase_bounds, phased_queue
from pgolf.model.gpt import GPT
from pgolf.model.layers import rms_norm, rope_tables

V = 32
CPU = torch.device("cpu")
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
BOS_AT = [0, 9, 30, 41, 70, 77, 101, 130, 139, 160, 181]  # 11 documents of 7 to 29 targets
# chunks of 8 in windows of 16, 2 documents a batch, 2 chains (rounds of 2 batches = 4 documents), global
# phases after 2 and 4 documents on sequences of 8 in chunks of 16 tokens
SMALL = {"chunk_size": 8, "context": 16, "batch_docs": 2, "chains": 2, "rank": 2, "alpha": 4.0, "lr": 0.05}
SMALL |= {"prefix_docs": 4, "phases": 2, "global_chunk_tokens": 16, "global_seq_len": 8, "global_lr": 0.05}
# a tiny PR #1611 stack: layer 1 looped once more (virtual [0,1,1,2]), two-lane decoder on layer 2, gated
# SmearGate, sparse attention gate, gated skips, XSA, partial RoPE, LN scale
TINY_1611 = dict(num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=2, smear_gate="gated", skip_gates=True)
TINY_1611 |= dict(sparse_attn_gate=True, sparse_attn_gate_scale=0.5, gate_window=4, xsa_last_n=3, rope_dims=4)
TINY_1611 |= dict(ln_scale=True, qk_gain_init=5.0, mlp_act="leaky_relu2", leaky_slope=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(layers: int = 3, **kw) -> GPT:
    """A GPT of width 32 moved off its zero init (every feature matters)."""
    return perturbed_tiny_gpt(V, layers, **kw)


def luts() -> ByteLUTs:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 4, (V,), generator=g).to(torch.int16)
    base[1] = 0
    return ByteLUTs(base, torch.rand(V, generator=g) < 0.4, torch.zeros(V, dtype=torch.bool))


def stream() -> torch.Tensor:
    t = torch.randint(2, V, (200,), generator=torch.Generator().manual_seed(4))
    t[BOS_AT] = 1
    return t


def run(settings: dict, m=None, toks=None, name: str = "phased_ttt", **kw):
    log = TargetLog()
    ctx = EvalContext(luts(), CPU, 16, 4, log=log, **kw)
    r = run_mode(name, settings, m if m is not None else tiny(**TINY_1611), toks if toks is not None else stream(), ctx)
    return r, log.arrays()


def settings(**kw) -> PhasedSettings:
    return parse_mode("phased_ttt", SMALL | kw, seq_len=16)[1]


def targets_scored_by(toks: torch.Tensor, st: PhasedSettings, entries: int) -> np.ndarray:
    """The targets of the documents of the first `entries` queue entries (in scoring order)."""
    docs = documents(toks, st.bos_id)
    out = [np.arange(docs[d][0], sum(docs[d])) for _, ids in phased_queue(docs, st)[:entries] for d in ids]
    return np.sort(np.concatenate(out))


# ---- the adapters --------------------------------------------------------------------------------------
def test_adapters_sit_on_every_virtual_slot_and_follow_the_schedule():
    """Q, K, V, O, MLP adapters per virtual slot (looped layers get one set per pass) plus the head, shaped
    and initialised as PR #1611's BatchedTTTLoRA (A ~ U(±1/√in), B = 0, scale α/r); in a forward each slot's
    adapters act at the physical layer the schedule gives it, every adapter once; all get gradients."""
    m = tiny(**TINY_1611)
    cfg = m.cfg
    assert cfg.layer_schedule == [0, 1, 1, 2]
    lora = PhasedLoRA(cfg, 2, rank=3, alpha=6.0)
    lora.draw_a([11, 12])
    assert len(lora.slots) == 4 and len(lora.adapters()) == 4 * 5 + 1
    shapes = {k: tuple(lora.slots[2][k].B.shape[1:2]) + tuple(lora.slots[2][k].A.shape[2:]) for k in lora.slots[2]}
    assert shapes == {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32), "mlp": (32, 32)}
    assert tuple(lora.head.B.shape) == (2, V, 3) and all(a.scale == 2.0 for a in lora.adapters())
    assert all(not a.B.any() and 0 < a.A.abs().max() <= 1 / math.sqrt(32) for a in lora.adapters())
    again = PhasedLoRA(cfg, 1, rank=3, alpha=6.0)
    again.draw_a([12])  # a row's draw depends on its seed only
    assert all(torch.equal(a.A[0], b.A[1]) for a, b in zip(again.adapters(), lora.adapters(), strict=True))
    with torch.no_grad():
        for a in lora.adapters():
            a.B.normal_(0.0, 0.1)
    calls = []
    for i, block in enumerate(m.blocks):
        block.mlp.register_forward_hook(lambda _m, _a, _o, i=i: calls.append((lora.slot, i)))
    x = stream()[None, :12].expand(2, 12)
    lora.select(torch.arange(2))
    with lora.attached(m):
        h = m.forward_hidden(x, lora)
        loss = m.logits_from_hidden(h, lora.head(h)).square().mean()
    assert calls == [(j, li) for j, li in enumerate(cfg.layer_schedule)]  # slot j at its physical layer
    loss.backward()
    assert all(a.A.grad.abs().sum() > 0 and a.B.grad.abs().sum() > 0 for a in lora.adapters())
    with torch.no_grad():  # detached: the model is the base model again
        torch.testing.assert_close(m.forward_hidden(x), tiny(**TINY_1611).forward_hidden(x), atol=0, rtol=0)


def test_delta_enters_where_the_records_forward_adds_it():
    """One document, one layer: the adapted forward equals PR #1611's `_block_with_lora` written out: Q, K, V
    deltas of the normed input (= merged weights), the O delta of the same input added to the projected
    attention output and the MLP delta of the MLP's normed input added to its output (before the layer
    scales), the head delta added to the logits before the softcap."""
    m = tiny(layers=1, ln_scale=True, sparse_attn_gate=True, gate_window=4, xsa_last_n=1)
    lora = PhasedLoRA(m.cfg, 1, rank=2, alpha=3.0)
    lora.draw_a([5])
    with torch.no_grad():
        for a in lora.adapters():
            a.B.normal_(0.0, 0.2)
    x = stream()[None, 1:14]
    with lora.attached(m), torch.no_grad():
        h = m.forward_hidden(x, lora)
        got = m.logits_from_hidden(h, lora.head(h))
    s = lora.slots[0]
    ref = copy.deepcopy(m)
    attn, block = ref.blocks[0].attn, ref.blocks[0]
    with torch.no_grad():
        for kind, lin in (("q", attn.c_q), ("k", attn.c_k), ("v", attn.c_v)):
            lin.weight += 1.5 * s[kind].B[0] @ s[kind].A[0]  # scale α/r = 1.5
        x0 = ref.embed(x)
        mix = block.resid_mix
        xin = mix[0] * x0 + mix[1] * x0
        n = rms_norm(xin) * block.norm_scale
        cos, sin = rope_tables(x.size(1), m.cfg.head_dim, m.cfg.rope_base, 0, CPU)
        xo = xin + block.attn_scale * (attn(n, cos, sin) + s["o"](n))
        n2 = rms_norm(xo) * block.norm_scale
        h = rms_norm(xo + block.mlp_scale * (block.mlp(n2) + s["mlp"](n2)))
        want = m.logits_from_hidden(h, lora.head(h))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


# ---- scoring -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["phased_ttt", "phased_ttt_1611"])
def test_every_target_is_scored_once_and_the_sums_are_the_audits(name):
    toks = stream()
    sidecar = torch.randint(0, 5, (toks.numel() + 3,), generator=torch.Generator().manual_seed(1))
    r, a = run(SMALL, toks=toks, name=name, val_bytes=sidecar)
    total = toks.numel() - 1
    assert a["index"].tolist() == list(range(total)) and r.tokens == r.distinct == total
    assert r.bytes == float(sidecar[1 : total + 1].sum()) == a["bytes"].astype(np.float64).sum()  # CaseOps bytes
    assert r.val_loss == pytest.approx(a["nll"].astype(np.float64).sum() / total, rel=1e-9)
    assert r.scoring == "each target once" and r.compliant and r.once is None
    assert r.settings["documents"] == 11 and r.settings["batches"] == 6 and r.settings["phase_docs"] == [2, 4]
    assert r.settings["global_steps"] > 0 and r.windows == sum(-(-n // 8) for _, n in documents(toks, 1))


def test_without_learning_it_is_the_chunked_document_eval_and_the_model_is_unchanged():
    """lr 0 and global_lr 0: B stays 0, so every chunk is scored by the frozen model in its window."""
    m, toks = tiny(**TINY_1611), stream()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _, got = run(SMALL | {"lr": 0.0, "global_lr": 0.0}, m=m, toks=toks)
    st = settings()
    wins = [chunk_window(d, i, st) for d in documents(toks, 1) for i in range(-(-d[1] // 8))]
    log = TargetLog()
    score_windows(m, toks, wins, EvalContext(luts(), CPU, 16, log=log), seq_len=16, batch_windows=4)
    np.testing.assert_allclose(got["nll"], log.arrays()["nll"], atol=2e-6, rtol=0)
    _, adapted = run(SMALL, m=m, toks=toks)
    assert np.abs(adapted["nll"] - got["nll"]).max() > 1e-3
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # phases train a copy
    assert all(p.requires_grad for p in m.parameters()) and not m.training


@pytest.mark.parametrize("order", ["stream", "length"])
def test_global_phase_changes_later_scores_never_earlier_ones(order):
    """In scoring order: the documents of the rounds up to the first phase are scored before any global
    update (bit for bit those of a run without phases); documents after it change."""
    m, toks = tiny(**TINY_1611), stream()
    _, none = run(SMALL | {"order": order, "prefix_docs": 0}, m=m, toks=toks)
    r, phased = run(SMALL | {"order": order}, m=m, toks=toks)
    assert r.settings["phase_docs"] == [2, 4] and none["index"].tolist() == phased["index"].tolist()
    first_round = targets_scored_by(toks, settings(order=order), 2)  # 2 chains: the first round, 4 documents
    np.testing.assert_array_equal(phased["nll"][first_round], none["nll"][first_round])
    later = np.setdiff1d(np.arange(toks.numel() - 1), first_round)
    assert np.abs(phased["nll"][later] - none["nll"][later]).max() > 1e-3


def test_warm_start_a_passes_along_a_chain():
    """A fresh per batch (warm_start_a false) and warm-started give the same first round (every chain
    starts fresh) and different later ones; without phases only warm-start A links the rounds."""
    m, toks = tiny(**TINY_1611), stream()
    base = SMALL | {"prefix_docs": 0}
    _, warm = run(base, m=m, toks=toks)
    _, cold = run(base | {"warm_start_a": False}, m=m, toks=toks)
    first = targets_scored_by(toks, settings(), 2)
    np.testing.assert_array_equal(warm["nll"][first], cold["nll"][first])
    assert np.abs(warm["nll"] - cold["nll"]).max() > 1e-5


def test_global_sgd_step_is_the_mean_loss_sgd_step_with_document_bounded_attention():
    """Two chunks of 16 tokens (the second skipped): one step θ - lr·∇(mean CE over the first chunk's 2
    sequences of 8, each attending within its documents and row)."""
    m, toks = tiny(**TINY_1611), stream()
    st = settings(global_grad_clip=0.0)
    docs = documents(toks, 1)[:2]  # 9 + 21 targets: 32 tokens
    ids = torch.cat([toks[s : s + n + 1] for s, n in docs])
    ref = copy.deepcopy(m).train()
    seq = ids[:17].unfold(0, 9, 8)  # [2, 9]
    assert ids[9] == 1 and ids[10] == 1  # the record's concatenation: a document's tokens end with the next BOS
    cu = torch.tensor([0, 8, 9, 10, 16], dtype=torch.int32)  # segments: row starts 0, 8 and the BOS at 9, 10
    grads = torch.autograd.grad(ref(seq[:, :-1], seq[:, 1:], cu_seqlens=cu), list(ref.parameters()))
    want = [p.detach() - st.global_lr * g for p, g in zip(ref.parameters(), grads, strict=True)]
    assert global_sgd(m, toks, docs, st, EvalContext(luts(), CPU, 16)) == 1
    for p, w in zip(m.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_flat_global_packing_is_the_records_one_row_per_rank():
    """PR #1611 (`global_packing: flat`): a rank's sequences form one row whose segments start at every BOS and
    every `global_seq_len` tokens from a document start, so the document at 12 keeps its context past the
    sequence start at 16 (rows: cut there). Documents 2, 0, 1 concatenated: BOS at 0, 11, 12, 21, 22; one
    step on the first chunk of 24 tokens (3 sequences of 8), the second skipped."""
    m, toks = tiny(**TINY_1611), stream()
    docs = [documents(toks, 1)[i] for i in (2, 0, 1)]
    ids = torch.cat([toks[s : s + n + 1] for s, n in docs])
    assert torch.nonzero(ids[:24] == 1).flatten().tolist() == [0, 11, 12, 21, 22]
    x, y = ids[:24].view(1, 24), ids[1:25].view(1, 24)
    cu = {"flat": [0, 8, 11, 12, 20, 21, 22, 24], "rows": [0, 8, 11, 12, 16, 21, 22, 24]}
    for packing in ("flat", "rows"):
        st = settings(global_grad_clip=0.0, global_chunk_tokens=24, global_packing=packing)
        ref, got = copy.deepcopy(m).train(), copy.deepcopy(m)
        c = torch.tensor(cu[packing], dtype=torch.int32)
        shape = (1, 24) if packing == "flat" else (3, 8)  # rows: no smear or context across a row start
        grads = torch.autograd.grad(ref(x.view(shape), y.view(shape), cu_seqlens=c), list(ref.parameters()))
        assert global_sgd(got, toks, docs, st, EvalContext(luts(), CPU, 16)) == 1
        for p, g, w in zip(got.parameters(), grads, ref.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), w.detach() - st.global_lr * g, atol=1e-6, rtol=1e-5)
        if packing == "flat":
            flat = [p.detach().clone() for p in got.parameters()]
    assert max((a - p.detach()).abs().max().item() for a, p in zip(flat, got.parameters(), strict=True)) > 1e-6


# ---- queue, phases, config, settings -----------------------------------------------------------------
def test_queue_orders_and_phase_boundaries():
    docs = [(0, 5), (5, 9), (14, 2), (16, 9), (25, 7)]
    st = settings()
    assert phased_queue(docs, st) == [(0, [0, 1]), (1, [2, 3]), (2, [4])]
    # PR #1611: sorted by length (stable), batches [2,0] [4,1] [3], queued by their longest, longest first
    assert phased_queue(docs, settings(order="length")) == [(1, [4, 1]), (2, [3]), (0, [2, 0])]
    assert phase_bounds(50_000, PhasedSettings()) == [833, 1666, 2500]  # PR #1611's log
    assert phase_bounds(3, PhasedSettings()) == [1, 2, 3] and phase_bounds(10, PhasedSettings(prefix_docs=0)) == []


def test_phased_ttt_1611_config_is_the_records():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["eval=phased_ttt_1611", "artifact=x"])
    st = parse_mode("phased_ttt_1611", OmegaConf.to_container(cfg.eval.phased_ttt_1611), seq_len=2048)[1]
    assert (st.rank, st.alpha, st.chunk_size, st.context, st.batch_docs) == (80, 144.0, 48, 2048, 64)
    assert (st.lr, st.beta1, st.beta2, st.eps, st.weight_decay) == (1e-4, 0.0, 0.99, 1e-10, 0.5)
    assert (st.prefix_docs, st.phases, st.global_lr, st.global_momentum) == (2500, 3, 1e-3, 0.9)
    assert (st.global_chunk_tokens, st.global_seq_len, st.global_grad_clip) == (32768, 2048, 1.0)
    assert (st.order, st.warm_start_a, st.global_doc_bounded, st.chains) == ("length", True, True, 8)
    assert st.global_packing == "flat" and st.last_chunk_window == "chunk_end"
    assert st.last_chunk_window == "chunk_end"
    assert parse_mode("phased_ttt", {}, seq_len=2048)[1] == PhasedSettings(order="stream")
    assert parse_mode("phased_ttt_1611", {}, seq_len=2048)[1].last_chunk_window == "chunk_end"


@pytest.mark.parametrize(
    "doc,i,start_window,end_window",
    [
        ((0, 2047), 42, (16, 2031, 2000), (0, 2047, 2016)),  # the reviewer's case: 2,047 targets, last chunk 31
        ((100, 5000), 104, (100 + 2992, 2008, 2000), (100 + 2952, 2048, 2040)),  # 5,000 = 104*48 + 8
        ((7, 4800), 99, (7 + 2752, 2048, 2000), (7 + 2752, 2048, 2000)),  # whole chunks: the same window
        ((0, 30), 0, (0, 30, 0), (0, 30, 0)),  # a short document: its whole self
    ],
)
def test_last_chunk_window_is_the_records_window_ending_at_the_document_end(doc, i, start_window, end_window):
    """PR #1611: chunk c is scored in `[max(0, end_c - 2048), end_c)`, end_c = min(48(c+1), n); pgolf's
    `chunk_start` window starts where a full chunk's would. (start, length, score_from) in stream positions."""
    s, n = doc
    assert chunk_window(doc, i, PhasedSettings(last_chunk_window="chunk_start")) == start_window
    got = chunk_window(doc, i, PhasedSettings(last_chunk_window="chunk_end"))
    end_c = min(48 * (i + 1), n)
    want = (s + max(0, end_c - 2048), end_c - max(0, end_c - 2048), 48 * i - max(0, end_c - 2048))
    assert got == want == end_window


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"order": "random"}, "order 'random' not in"),
        ({"chunk_size": 64, "context": 32}, "chunk_size 64 must be in 1..context 32"),
        ({"global_seq_len": 64, "global_chunk_tokens": 32}, "global_seq_len 64"),
        ({"chains": 0}, "chains 0 must be > 0"),
        ({"last_chunk_window": "doc_end"}, "last_chunk_window 'doc_end' not in"),
        ({"global_packing": "flat", "global_doc_bounded": False}, "global_packing flat needs global_doc_bounded"),
        ({"phases": 0}, "phases 0 must be > 0"),
        ({"beta2": 1.0}, "betas must be in"),
        ({"seq_len": 16}, r"unknown settings \['seq_len'\]"),
    ],
)
def test_bad_settings_fail_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        run(SMALL | bad)


def test_document_bounded_phases_refuse_a_model_that_reads_across_documents():
    m = tiny(layers=2, bigram="v5", bigram_buckets=64, bigram_dim=8)
    with pytest.raises(ValueError, match="global_doc_bounded is true but the model's BigramHash"):
        run(SMALL, m=m)
    assert run(SMALL | {"global_doc_bounded": False}, m=m)[0].tokens == stream().numel() - 1
    assert run(SMALL | {"prefix_docs": 0}, m=m)[0].settings["global_steps"] == 0  # no phases: no check


# ---- 1 vs 2 processes ------------------------------------------------------------------------------------
def _dist_run(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = []
    for name in ("phased_ttt", "phased_ttt_1611"):  # 1611: global_packing flat
        log = TargetLog()
        r = run_mode(name, SMALL, tiny(**TINY_1611), stream(), EvalContext(luts(), CPU, 16, 4, log=log))
        res.append((r.val_loss, r.val_bpb, r.tokens, r.bytes, r.windows, gather_log(log)["nll"]))
    if rank == 0:
        torch.save(res, out)
    dist.barrier()  # no rank tears gloo down while the other still uses it
    dist.destroy_process_group()
    end_spawned_rank()


@pytest.mark.slow  # two spawned processes (gloo): a few seconds of process start-up
def test_one_and_two_processes_give_the_same_numbers(tmp_path):
    """2 chains, 2 ranks: each rank runs one chain; the global phases split each chunk's 2 sequences. The
    documents scored before the first phase agree bit for bit, the rest to float32 summation order. With
    `global_packing: flat` (phased_ttt_1611) a rank's row is its share, one sequence here: 2 processes
    equal 1 process with `rows`, and differ from 1 process with `flat` (one row of 2 sequences)."""
    out = str(tmp_path / "two.pt")
    mp.spawn(_dist_run, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for (name, b), order in zip(zip(("phased_ttt", "phased_ttt_1611"), two, strict=True), ("stream", "length")):
        r, a = run(SMALL | {"global_packing": "rows"}, name=name)
        assert (r.tokens, r.bytes, r.windows) == b[2:5], name
        first = targets_scored_by(stream(), settings(order=order), 2)
        np.testing.assert_array_equal(a["nll"][first], b[5][first])
        assert np.abs(a["nll"] - b[5]).max() < 1e-4, name
        assert r.val_bpb == pytest.approx(b[1], rel=1e-6, abs=0), name
    flat = run(SMALL, name="phased_ttt_1611")[1]["nll"]
    assert np.abs(flat - two[1][5]).max() > 1e-3  # one row of 2 sequences: documents keep context past row 1
