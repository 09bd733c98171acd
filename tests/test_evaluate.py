"""Standard and sliding evaluation: every target scored exactly once, exact sums; every mode on 1 vs 2 processes
(with the records' windows and document rules too, and the each-target-once figure they carry)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import end_spawned_rank, free_port

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext, TargetLog, gather_log
from pgolf.eval.modes import run_mode
from pgolf.eval.windows import plan_windows, sliding_windows
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT

V = 64


def luts():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 4, (V,), generator=g).to(torch.int16)
    space = torch.rand(V, generator=g) < 0.4
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    base[:2] = 0
    return ByteLUTs(base, space, boundary)


def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off the zero init so positions matter
    return m.eval()


def tokens(n=1 + 16 * 23):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))


def ctx(lt, seq_len, batch_windows, log=None) -> EvalContext:
    return EvalContext(lt, torch.device("cpu"), seq_len, batch_windows, log=log)


def standard(m, toks, lt, S, bw):
    return run_mode("standard", {}, m, toks, ctx(lt, S, bw))


def sliding(m, toks, lt, S, stride, bw, log=None):
    return run_mode("sliding", {"stride": stride}, m, toks, ctx(lt, S, bw, log))


@pytest.mark.parametrize(
    "total,S,stride", [(1000, 128, 64), (1000, 128, 32), (128, 128, 64), (130, 128, 64), (5000, 256, 64), (257, 64, 64)]
)
def test_sliding_scores_every_target_exactly_once(total, S, stride):
    counts = torch.zeros(total, dtype=torch.long)
    for s, n, lo in sliding_windows(total, S, stride):
        assert n <= S and s + n <= total
        assert lo == 0 or n - lo <= stride  # later windows score at most `stride` new targets
        if s > 0:
            assert lo >= min(S - stride, n - 1) or s + lo > 0  # context of >= S-stride tokens where available
        counts[s + lo : s + n] += 1
    assert (counts == 1).all()


def test_reference_tail_rescoring_is_reproducible():
    total, S, stride = 1000, 128, 64
    counts = torch.zeros(total, dtype=torch.long)
    for s, n, lo, _ in plan_windows("reference", total, S, stride):
        counts[s + lo : s + n] += 1
    assert (counts[: total - stride] == 1).all()
    assert (counts[-stride:] > 1).all()  # the final targets are re-scored by every tail window


def test_standard_eval_equals_a_direct_computation():
    m, toks, lt = model(), tokens(), luts()
    S = 16
    r = standard(m, toks, lt, S, 5)
    x, y = toks[:-1].view(-1, S), toks[1:].view(-1, S)
    with torch.no_grad():
        nll = F.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="none")
    nbytes = lt.target_bytes(x, y).sum().item()
    assert r.tokens == y.numel() and r.bytes == nbytes
    assert r.val_loss == pytest.approx(nll.double().mean().item(), rel=1e-6)
    assert r.val_bpb == pytest.approx(nll.double().sum().item() / (math.log(2) * nbytes), rel=1e-6)
    assert r.compliant


def test_sliding_and_standard_score_the_same_targets():
    m, toks, lt = model(), tokens(1 + 64 * 6), luts()  # truncated to whole windows, as load_val_tokens does
    st = standard(m, toks, lt, 64, 4)
    sl = sliding(m, toks, lt, 64, 16, 4)
    assert sl.tokens == st.tokens and sl.bytes == st.bytes  # same targets, each scored once
    assert sl.val_loss != st.val_loss


def test_audit_log_is_in_stream_order_and_sums_to_the_result():
    m, toks, lt = model(), tokens(), luts()
    log = TargetLog()
    r = sliding(m, toks, lt, 64, 16, 3, log)
    a = log.arrays()
    assert a["index"].tolist() == list(range(toks.numel() - 1))
    assert a["nll"].astype("float64").sum() == pytest.approx(r.val_loss * r.tokens, rel=1e-6)
    assert a["bytes"].sum() == r.bytes


# The adaptive modes at test size (S=16, stride 4); the random stream holds BOS (id 1) about every 64 tokens.
ADAPTIVE = {
    "ttt": {"stride": 4, "chunk_tokens": 48, "epochs": 2, "batch_seqs": 3, "lr": 0.05},
    "lora_ttt": {"chunk_size": 4, "context": 12, "batch_docs": 3, "lr": 0.05},
    "lora_ttt_1090": {"chunk_size": 4, "context": 4, "batch_docs": 3},
    "slot_1263": {"stride": 4},
    "slot_1298": {"stride": 4},
    "causal_slot": {"stride": 4},
    "ttt_reference": {"mode": "ttt", "stride": 4, "chunk_tokens": 48, "epochs": 1, "batch_seqs": 3, "lr": 0.05}
    | {"windows": "reference", "qat": "keep"},
    "sliding_v5": {"mode": "sliding", "stride": 8, "windows": "v5"},
    "sliding_reference": {"mode": "sliding", "stride": 8, "windows": "reference"},
}
RECORD_METRIC = {"lora_ttt_1090", "ttt_reference", "sliding_v5", "sliding_reference"}  # these carry `once`
# Per-window (causal SLOT, sliding) or per-document (LoRA TTT: windows padded to a length set by the chunk
# index) arithmetic: bit-identical at any world size.
EXACT = {"causal_slot", "lora_ttt", "lora_ttt_1090", "sliding_v5", "sliding_reference"}
TOL = {"ttt": 1e-4, "ttt_reference": 1e-4, "slot_1263": 1e-3, "slot_1298": 1e-3}  # max per-target |Δnll|


def _all_modes(m, toks, lt):
    res = [standard(m, toks, lt, 16, 5), sliding(m, toks, lt, 64, 16, 3)]
    out = [(r.val_loss, r.val_bpb, r.tokens, r.bytes, None, None) for r in res]
    for name, s in ADAPTIVE.items():
        log = TargetLog()
        r = run_mode(name, s, m, toks, ctx(lt, 16, 4, log))
        out.append((r.val_loss, r.val_bpb, r.tokens, r.bytes, gather_log(log)["nll"], r.once))
    return out


def _dist_eval(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = _all_modes(model(), tokens(), luts())
    if rank == 0:
        torch.save(res, out)
    dist.barrier()  # no rank tears gloo down while the other still uses it (a SIGABRT seen once in CI)
    dist.destroy_process_group()
    end_spawned_rank()


def test_one_and_two_processes_give_the_same_numbers(tmp_path):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _all_modes(model(), tokens(), luts())
    finally:
        torch.set_num_threads(n_threads)
    out = str(tmp_path / "two.pt")
    mp.spawn(_dist_eval, args=(2, free_port(), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for name, a, b in zip(["standard", "sliding", *ADAPTIVE], one, two):
        assert a[2:4] == b[2:4], name  # the same targets and bytes
        assert (a[5] is None) == (b[5] is None) == (name not in RECORD_METRIC), name
        if a[5] is not None:  # the each-target-once figure: every target of the stream, once
            assert a[5]["tokens"] == b[5]["tokens"] == tokens().numel() - 1 and a[5]["bytes"] == b[5]["bytes"], name
        if name in ("standard", "sliding") or name in EXACT:
            assert a[:2] == b[:2], name
            assert a[4] is None or np.array_equal(a[4], b[4]), name
            assert a[5] is None or a[5]["val_bpb"] == pytest.approx(b[5]["val_bpb"], rel=1e-12), name
        else:  # TTT: gradients summed in another order; seed SLOT: a batch-mean loss over other windows (Adam eps)
            assert a[1] == pytest.approx(b[1], rel=1e-6, abs=0) and np.abs(a[4] - b[4]).max() < TOL[name], name
            assert a[5] is None or a[5]["val_bpb"] == pytest.approx(b[5]["val_bpb"], rel=1e-6, abs=0), name


# ---- document-bounded windows (PR #1530 / #1611's eval batches) ----------------------------------------------
def _per_target(m, toks, lt, doc):
    log = TargetLog()
    c = EvalContext(lt, torch.device("cpu"), 16, 4, log=log, doc_max_seg_len=doc)
    run_mode("standard", {}, m, toks, c)
    return gather_log(log)


def test_document_bounded_windows_never_see_another_document():
    """Documents start at BOS (id 1). With doc_max_seg_len the NLL of a target depends only on its own document:
    changing a token of the document before it changes nothing; without it, later targets in the window move."""
    m, lt = model(), luts()
    toks = tokens(1 + 16 * 4).clamp(min=2)
    toks[[0, 9, 21, 40]] = 1  # documents at 0, 9, 21 (crossing the window border at 16), 40
    other = toks.clone()
    other[5] = (other[5] + 1) % V if other[5] + 1 < V else 2  # inside the first document
    a, b = _per_target(m, toks, lt, 16), _per_target(m, other, lt, 16)
    later = a["index"] >= 9  # targets predicted from the second document on (input position >= its BOS, 9)
    assert np.array_equal(a["nll"][later], b["nll"][later])
    assert not np.array_equal(a["nll"][~later], b["nll"][~later])
    plain_a, plain_b = _per_target(m, toks, lt, None), _per_target(m, other, lt, None)
    assert not np.array_equal(plain_a["nll"][later], plain_b["nll"][later])  # plain windows do see it
    # pieces of at most 4 tokens: a target only sees the last few tokens of its piece, so results differ again
    assert not np.array_equal(_per_target(m, toks, lt, 4)["nll"], a["nll"])


def test_a_forged_document_attention_setting_in_the_artifact_is_refused():
    from pgolf.eval.run import doc_max_seg_len
    from pgolf.quant.artifact import ArtifactError

    assert doc_max_seg_len({"train": {"doc_attention": True, "max_seg_len": 2048}}) == 2048
    assert doc_max_seg_len({"train": {"doc_attention": False, "max_seg_len": 2048}}) is None
    assert doc_max_seg_len({}) is None
    for bad in ({"doc_attention": "yes", "max_seg_len": 8}, {"doc_attention": True, "max_seg_len": 0}):
        with pytest.raises(ArtifactError, match="meta.train"):
            doc_max_seg_len({"train": bad})
