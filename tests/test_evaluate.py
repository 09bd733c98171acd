"""Standard and sliding evaluation: every target scored exactly once, exact sums, 1 vs 2 processes."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pgolf.evaluate import TargetLog, eval_sliding, eval_standard, sliding_windows
from pgolf.model import GPT, GPTConfig
from pgolf.tokenizer import ByteLUTs

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
    for s, n, lo in sliding_windows(total, S, stride, reference_tail=True):
        counts[s + lo : s + n] += 1
    assert (counts[: total - stride] == 1).all()
    assert (counts[-stride:] > 1).all()  # the final targets are re-scored by every tail window


def test_standard_eval_equals_a_direct_computation():
    m, toks, lt = model(), tokens(), luts()
    S = 16
    r = eval_standard(m, toks, seq_len=S, batch_windows=5, luts=lt, device=torch.device("cpu"))
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
    st = eval_standard(m, toks, seq_len=64, batch_windows=4, luts=lt, device=torch.device("cpu"))
    sl = eval_sliding(m, toks, seq_len=64, stride=16, batch_windows=4, luts=lt, device=torch.device("cpu"))
    assert sl.tokens == st.tokens and sl.bytes == st.bytes  # same targets, each scored once
    assert sl.val_loss != st.val_loss


def test_audit_log_is_in_stream_order_and_sums_to_the_result():
    m, toks, lt = model(), tokens(), luts()
    log = TargetLog()
    r = eval_sliding(m, toks, seq_len=64, stride=16, batch_windows=3, luts=lt, device=torch.device("cpu"), log=log)
    a = log.arrays()
    assert a["index"].tolist() == list(range(toks.numel() - 1))
    assert a["nll"].astype("float64").sum() == pytest.approx(r.val_loss * r.tokens, rel=1e-6)
    assert a["bytes"].sum() == r.bytes


def _dist_eval(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    m, toks, lt = model(), tokens(), luts()
    res = [
        eval_standard(m, toks, seq_len=16, batch_windows=5, luts=lt, device=torch.device("cpu")),
        eval_sliding(m, toks, seq_len=64, stride=16, batch_windows=3, luts=lt, device=torch.device("cpu")),
    ]
    if rank == 0:
        torch.save([(r.val_loss, r.val_bpb, r.tokens, r.bytes) for r in res], out)
    dist.destroy_process_group()


def test_one_and_two_processes_give_the_same_numbers(tmp_path):
    m, toks, lt = model(), tokens(), luts()
    one = [
        eval_standard(m, toks, seq_len=16, batch_windows=5, luts=lt, device=torch.device("cpu")),
        eval_sliding(m, toks, seq_len=64, stride=16, batch_windows=3, luts=lt, device=torch.device("cpu")),
    ]
    out = str(tmp_path / "two.pt")
    mp.spawn(_dist_eval, args=(2, 29541, out), nprocs=2, join=True)
    two = torch.load(out)
    for a, (loss, b, n, nb) in zip(one, two):
        assert a.tokens == n and a.bytes == nb
        assert a.val_loss == pytest.approx(loss, rel=1e-12, abs=0) and a.val_bpb == pytest.approx(b, rel=1e-12)
