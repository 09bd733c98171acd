"""Window plans (pgolf/eval/windows.py) from their formulas, in every mode that slides windows: pgolf's
each-target-once windows, the records' tail (PR #549: a window at every start ws < total, the tail windows
re-scoring the final targets; its TTT keeps windows of >= stride targets), the 1.1556 record's variant
((total - S) // stride + 1 windows scoring only their last `stride` positions), and pgolf's each-target-once
figure taken from the same pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import perturbed_tiny_gpt

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext, TargetLog
from pgolf.eval.modes import run_mode
from pgolf.eval.windows import distinct_targets, plan_windows, scorings, sliding_windows, with_first

V, S, STRIDE = 32, 16, 4
CPU = torch.device("cpu")
TTT = {"chunk_tokens": 48, "epochs": 1, "batch_seqs": 3, "lr": 0.05}
WINDOWED = {"sliding": {}, "ttt": TTT, "slot_1263": {}, "slot_1298": {}, "causal_slot": {}}

pytestmark = pytest.mark.usefixtures("one_thread")


def luts() -> ByteLUTs:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 4, (V,), generator=g).to(torch.int16)
    return ByteLUTs(base, torch.rand(V, generator=g) < 0.4, torch.zeros(V, dtype=torch.bool))


def stream(targets: int) -> torch.Tensor:
    return torch.randint(2, V, (targets + 1,), generator=torch.Generator().manual_seed(3))


def run(name, settings, toks, seq_len=S, log=None, model=None):
    ctx = EvalContext(luts(), CPU, seq_len, 4, log=log)
    return run_mode(name, {"stride": STRIDE, **settings}, model or perturbed_tiny_gpt(V), toks, ctx)


def reference_counts(total: int, seq_len: int, stride: int, min_len: int = 1) -> np.ndarray:
    """How often the records' windows score each target: a window at every ws < total of length
    n = min(S, total - ws), kept when ws = 0 or n >= min_len, scoring [0, n) for ws = 0, else [n - stride, n)."""
    counts = np.zeros(total, dtype=np.int64)
    for ws in range(0, total, stride):
        n = min(seq_len, total - ws)
        if ws == 0 or n >= min_len:
            lo = 0 if ws == 0 else max(n - stride, 0)
            counts[ws + lo : ws + n] += 1
    return counts


def v5_counts(total: int, seq_len: int, stride: int) -> np.ndarray:
    """The 1.1556 record: windows k = 0 .. (total - S) // stride at k*stride, each scoring its last `stride`."""
    counts = np.zeros(total, dtype=np.int64)
    for k in range((total - seq_len) // stride + 1):
        counts[k * stride + seq_len - stride : k * stride + seq_len] += 1
    return counts


def plan_counts(windows, first: bool = False) -> np.ndarray:
    total = max(w[0] + w[1] for w in windows)
    counts = np.zeros(total, dtype=np.int64)
    for w in windows:
        lo = w[3] if first and len(w) > 3 else w[2]
        counts[w[0] + lo : w[0] + w[1]] += 1
    return counts


# ---- the plans ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,seq_len,stride", [(1000, 128, 64), (1000, 128, 32), (130, 128, 64), (199, 16, 4)])
def test_reference_plan_is_the_records_and_marks_first_scorings(total, seq_len, stride):
    for min_len in (1, stride):
        w = plan_windows("reference", total, seq_len, stride, min_len=min_len)
        np.testing.assert_array_equal(plan_counts(w), reference_counts(total, seq_len, stride, min_len))
        assert (plan_counts(w, first=True) == 1).all()  # first_from: every target's first scoring, once
        assert distinct_targets(w) == total and scorings(w) == reference_counts(total, seq_len, stride, min_len).sum()
    # the first scorings are pgolf's windows: the same starts, lengths and scored ranges
    once = sliding_windows(total, seq_len, stride)
    ref = plan_windows("reference", total, seq_len, stride)
    assert [(s, n, f) for s, n, _, f in ref if f < n] == once


def test_reference_tail_rescores_the_final_targets_s_over_stride_times():
    """PR #549 at S=2048, stride 64 on a total that is a multiple of 64: the last 64 targets are scored by the
    last full window and the 31 shorter ones, 32 times; every other target once."""
    total, seq_len, stride = 64 * 100, 2048, 64
    c = plan_counts(plan_windows("reference", total, seq_len, stride))
    assert (c[: total - stride] == 1).all() and (c[total - stride :] == seq_len // stride).all()
    assert c.sum() - total == seq_len - stride  # 1,984 extra scorings


@pytest.mark.parametrize("total", [4096, 4136])
def test_v5_plan_scores_3904_of_4096_targets(total):
    """(4096 - 256) // 64 + 1 = 61 windows of 64 scored targets: 3,904; the first 192 targets are never
    scored (nor, on 4,136 targets, the 40 after the last window)."""
    w = plan_windows("v5", total, 256, 64)
    c = plan_counts(w)
    np.testing.assert_array_equal(c[: len(v5_counts(total, 256, 64))], v5_counts(total, 256, 64))
    assert c.sum() == distinct_targets(w) == scorings(w) == 3904 and c.max() == 1
    assert (c[:192] == 0).all() and (c[192:4096] == 1).all() and (c[4096:] == 0).all()
    assert (plan_counts(w, first=True) == 1).all() and len(plan_counts(w, first=True)) == total
    with pytest.raises(ValueError, match="v5 windows need at least seq_len=256 targets"):
        plan_windows("v5", 255, 256, 64)


def test_with_first_on_hand_windows():
    # windows scoring [0,8), [6,10), [6,10), [9,12): first scorings [0,8), [8,10), none, [10,12)
    assert with_first([(0, 8, 0), (2, 8, 4), (4, 6, 2), (8, 4, 1)]) == [
        (0, 8, 0, 0),
        (2, 8, 4, 6),
        (4, 6, 2, 6),
        (8, 4, 1, 2),
    ]


# ---- every windowed mode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [192, 199])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_every_windowed_mode_scores_the_records_tail(name, total):
    toks = stream(total)
    log = TargetLog()
    r = run(name, {**WINDOWED[name], "windows": "reference"}, toks, log=log)
    want = reference_counts(total, S, STRIDE, min_len=STRIDE if name == "ttt" else 1)
    idx = log.arrays()["index"]
    np.testing.assert_array_equal(np.bincount(idx, minlength=total), want)
    assert (r.tokens, r.distinct, r.targets) == (want.sum(), total, total) and r.tokens > total
    assert (
        r.scoring
        == f"{total} of {total} targets scored ({want.sum()} scorings, {want.sum() - total} repeating earlier ones)"
    )
    assert "tail windows score the final targets again" in r.reason
    bytes_all = float(luts().target_bytes(toks[:-1], toks[1:]).sum())
    assert r.once["tokens"] == total and r.once["bytes"] == bytes_all
    once = run(name, WINDOWED[name], toks)  # pgolf's own windows: each target once, no second figure
    assert once.once is None and once.scoring == "each target once" and once.tokens == total
    if name in ("sliding", "ttt"):  # frozen / chunk-wise identical scorings: the same figure, bit for bit
        assert (r.once["val_loss"], r.once["val_bpb"]) == (once.val_loss, once.val_bpb)
    else:  # SLOT fits on a loss over its batch (or its context): the tail windows move the last batch's fits
        assert r.once["val_bpb"] == pytest.approx(once.val_bpb, rel=2e-3)


def test_v5_sliding_mode_scores_the_records_targets_and_pgolfs_figure_beside():
    total, seq_len = 4096, 256
    toks, m = stream(total), perturbed_tiny_gpt(V)
    log = TargetLog()
    r = run("sliding", {"stride": 64, "windows": "v5"}, toks, seq_len, log, m)
    idx = log.arrays()["index"]
    assert idx.tolist() == list(range(192, 4096))
    assert (r.tokens, r.distinct, r.targets, r.windows) == (3904, 3904, 4096, len(sliding_windows(total, 256, 64)))
    assert r.scoring == "3904 of 4096 targets scored, each once" and "never scored" in r.reason and r.compliant
    once = run("sliding", {"stride": 64}, toks, seq_len, model=m)
    assert r.once == {"val_loss": once.val_loss, "val_bpb": once.val_bpb, "tokens": 4096, "bytes": once.bytes}
    # windows 0 and 60 by hand: the last 64 positions of the model's forward over toks[k*64 : k*64+256]
    nll = dict(zip(idx.tolist(), log.arrays()["nll"].tolist()))
    with torch.no_grad():
        for k in (0, 60):
            x, y = toks[k * 64 : k * 64 + 256][None], toks[k * 64 + 1 : k * 64 + 257][None]
            want = m.token_nll(x, y)[0, -64:]
            got = torch.tensor([nll[k * 64 + 192 + j] for j in range(64)])
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_windows_settings_are_checked():
    for name, bad in (("sliding", "tail"), ("ttt", "v5"), ("slot_1263", "v5"), ("causal_slot", "v5")):
        with pytest.raises(ValueError, match=f"windows '{bad}' not in"):
            run(name, {**WINDOWED[name], "windows": bad}, stream(64))
