"""The flip test of PR #1240 for every eval mode, read from the per-target audit.

Target t predicts token t+1. Changing the token at stream position P may change the scores of targets from
P-1 on (target P-1 *is* token P), never those of targets before P-1. Over all V values of token P:
* causal modes (standard, sliding, score-first TTT, LoRA TTT, causal SLOT) leave every target < P-1
  bit-for-bit unchanged, and the probabilities they give target P-1 over the V values sum to 1: the
  distribution a target is scored with is a full normalised distribution that does not depend on its
  own value;
* both seed SLOT forms (PR #1263, PR #1298) are caught: they fit on the targets they score, so earlier
  targets of the same window move, and the "distribution" over the flipped token's values sums to > 1
  (each value raises its own probability);
* phased TTT in the final #1 record's order (PR #1611: documents by length, longest batch first) scores
  each target before any update that saw it in *its* order, but earlier targets of the stream move: the
  flipped token's document is scored first and the global phase and warm-start A carry it to documents
  that come before it in the stream (its own document's earlier targets stay put).
Every mode also scores every target exactly once, and its sums equal its audit.

Value 1 of the flipped token is the BOS: it re-cuts the documents LoRA TTT adapts on, so the documents
batched with earlier ones change; the earlier targets' scores must still not move by one bit (they did, by
one float32 ulp, 2.4e-7 nats, while windows were padded to the batch's longest; a real leak, adapting on a
chunk before scoring it, moves them by 0.03-0.11 nats here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import perturbed_tiny_gpt

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext, TargetLog
from pgolf.eval.modes import mode_names, run_mode
from pgolf.model.gpt import GPT

V, S = 16, 16
FLIP = 59  # target 58: mid-window (stride 4), chunk 1 of TTT, third chunk of a LoRA document
BOS_AT = [0, 13, 30, 47, 70, 88]
PHASED = {"chunk_size": 8, "context": 16, "batch_docs": 2, "chains": 1, "rank": 2, "alpha": 4.0, "lr": 0.05}
PHASED |= {"prefix_docs": 4, "phases": 2, "global_chunk_tokens": 16, "global_seq_len": 8, "global_lr": 0.05}
MODES = {  # every registered mode at its conf/eval/ defaults, stride and chunks scaled to the tiny stream
    "standard": {},
    "sliding": {"stride": 4},
    "ttt": {"stride": 4, "chunk_tokens": 32, "epochs": 2, "batch_seqs": 2, "lr": 0.05},
    "lora_ttt": {"chunk_size": 4, "context": 12, "batch_docs": 4, "lr": 0.05},
    # PR #1090's adaptation (init, 1/r, chunks alone, Adam lr 0.05); its rules choosing which targets count
    # are switched off here (every target scored once) and flip-tested by index below
    "lora_ttt_1090": {"chunk_size": 4, "context": 4, "batch_docs": 4}
    | {"score_doc_end": True, "score_min_tokens": 0, "score_min_chunk": 1},
    "causal_slot": {"stride": 4},
    "slot_1263": {"stride": 4},
    "slot_1298": {"stride": 4},
    # chunks of 8 in 16-token windows, 2 documents a batch, one chain; global phases after 2 and 4 documents
    # (the second trains on the flipped token's document), sequences of 8 in chunks of 16 tokens
    "phased_ttt": PHASED,
    "phased_ttt_1611": PHASED,
}
CAUSAL = ["standard", "sliding", "ttt", "lora_ttt", "lora_ttt_1090", "causal_slot", "phased_ttt"]
SEED_SLOT = ["slot_1263", "slot_1298"]
REORDERED = ["phased_ttt_1611"]  # causal in their own scoring order, not in the stream's
REORDERED_VALUES = [1, 12]  # values of the flipped token (7 in the stream) tried for them (1: BOS)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> GPT:
    return perturbed_tiny_gpt(V)


def luts() -> ByteLUTs:
    g = torch.Generator().manual_seed(0)
    boundary = torch.zeros(V, dtype=torch.bool)
    boundary[:2] = True
    base = torch.randint(1, 4, (V,), generator=g).to(torch.int16)
    base[:2] = 0
    return ByteLUTs(base, torch.rand(V, generator=g) < 0.4, boundary)


def stream() -> torch.Tensor:
    t = torch.randint(2, V, (1 + S * 6,), generator=torch.Generator().manual_seed(2))
    t[BOS_AT] = 1  # documents for LoRA TTT
    return t


def audit(model, name: str, tokens: torch.Tensor):
    log = TargetLog()
    r = run_mode(name, MODES[name], model, tokens, EvalContext(luts(), torch.device("cpu"), S, 4, log=log))
    return r, log.arrays()


@pytest.fixture(scope="module")
def flips():
    """For every mode: the base run and the per-target NLL with token FLIP set to each of the V values."""
    model, toks = tiny_model(), stream()
    out = {}
    for name in MODES:
        base = audit(model, name, toks)
        nll = []
        for v in REORDERED_VALUES if name in REORDERED else range(V):
            t = toks.clone()
            t[FLIP] = v
            nll.append(audit(model, name, t)[1]["nll"].astype(np.float64))
        out[name] = (base, np.stack(nll))
    return out


def test_every_registered_mode_is_flip_tested():
    assert sorted(MODES) == mode_names() and sorted(CAUSAL + SEED_SLOT + REORDERED) == mode_names()


@pytest.mark.parametrize("name", list(MODES))
def test_every_target_scored_exactly_once_and_sums_match_the_audit(flips, name):
    (r, a), _ = flips[name]
    toks, lt = stream(), luts()
    total = toks.numel() - 1
    assert a["index"].tolist() == list(range(total))
    assert r.tokens == total
    assert r.bytes == float(lt.target_bytes(toks[:-1], toks[1:]).sum())
    assert a["bytes"].astype(np.float64).sum() == r.bytes
    assert r.val_loss == pytest.approx(a["nll"].astype(np.float64).sum() / total, rel=1e-9)
    assert r.val_bpb == pytest.approx(a["nll"].astype(np.float64).sum() / (math.log(2) * r.bytes), rel=1e-9)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_modes_pass_the_flip_test(flips, name):
    (r, a), nll = flips[name]
    assert r.compliant
    before = nll[:, : FLIP - 1]
    assert (before == a["nll"][: FLIP - 1].astype(np.float64)).all(), "a target before the flip changed"
    # the flipped token is visible to the targets after it (the test can see a change when there is one)
    assert np.ptp(nll[:, FLIP:], axis=0).max() > 1e-3
    # target FLIP-1's probabilities over all values of its own token form one normalised distribution
    assert np.exp(-nll[:, FLIP - 1]).sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", SEED_SLOT)
def test_seed_slot_forms_are_detected(flips, name):
    (r, a), nll = flips[name]
    assert not r.compliant and "fits" in r.reason
    moved = np.abs(nll[:, : FLIP - 1] - a["nll"][: FLIP - 1].astype(np.float64)).max(axis=0)
    assert moved.max() > 1e-3, "flipping a token must move earlier targets of its window under SLOT"
    assert moved[FLIP - 4 : FLIP - 1].max() > 1e-3  # the earlier targets of the flipped token's own window
    # each value of the token raises its own probability: the 'distribution' over its values sums to > 1
    assert np.exp(-nll[:, FLIP - 1]).sum() > 1.0 + 1e-3


@pytest.mark.parametrize("name", REORDERED)
def test_record_order_is_score_first_in_its_order_but_moves_earlier_stream_targets(flips, name):
    (r, a), nll = flips[name]
    assert r.compliant and "longest batch first" in r.reason
    base = a["nll"].astype(np.float64)
    moved = np.abs(nll[:, : BOS_AT[3]] - base[: BOS_AT[3]]).max(axis=1)
    assert (moved > 1e-2).all()  # for each value, documents before the flipped one in the stream moved
    own = slice(BOS_AT[3], FLIP - 1)  # the flipped token's document, scored first: its earlier targets stay
    assert (nll[REORDERED_VALUES.index(12), own] == base[own]).all()


def test_phased_ttt_carries_a_flip_to_later_documents_only(flips):
    """Positive control: the documents after the flipped token's batch (scored after the global phase that
    trained on it, with the A its batch passed on) change; those before it do not."""
    _, nll = flips["phased_ttt"]
    assert np.ptp(nll[:, BOS_AT[4] :], axis=0).max() > 1e-3
    assert np.ptp(nll[:, : FLIP - 1], axis=0).max() == 0.0


def test_score_first_ttt_adapts_on_earlier_chunks_only(flips):
    """Positive control: targets in later chunks whose windows do not contain the flipped token still
    change, so the flip reached them through training on its chunk (after that chunk was scored)."""
    _, nll = flips["ttt"]
    first_unseen = FLIP + S  # windows scoring targets >= this start after token FLIP
    assert np.ptp(nll[:, first_unseen:], axis=0).max() > 1e-4
    _, sl = flips["sliding"]
    assert np.ptp(sl[:, first_unseen:], axis=0).max() == 0.0  # without training they cannot change


def test_lora_1090_record_rules_choose_targets_never_change_a_score():
    """PR #1090's metric skips a document's last target (the next BOS), documents under 5 tokens and final
    one-target chunks: which targets count depends on where documents end, a later token (flipping token FLIP
    to BOS drops target FLIP-1, whose token is then a BOS). Every target scored both before and after a flip,
    and before FLIP-1, keeps its score bit for bit, and the targets before FLIP-1 that count stay the same."""
    model, toks = tiny_model(), stream()
    rules = {"chunk_size": 4, "context": 4, "batch_docs": 4}
    base = audit_with(model, "lora_ttt_1090", rules, toks)[1]
    early = base["index"] < FLIP - 1
    for v in range(V):
        t = toks.clone()
        t[FLIP] = v
        r, a = audit_with(model, "lora_ttt_1090", rules, t)
        assert r.compliant and r.once["tokens"] == toks.numel() - 1
        assert (FLIP - 1 in a["index"]) == (v != 1)
        mine = a["index"] < FLIP - 1
        assert np.array_equal(a["index"][mine], base["index"][early])
        assert np.array_equal(a["nll"][mine], base["nll"][early]), f"value {v}: an earlier target changed"


def audit_with(model, name: str, settings: dict, tokens: torch.Tensor):
    log = TargetLog()
    r = run_mode(name, settings, model, tokens, EvalContext(luts(), torch.device("cpu"), S, 4, log=log))
    return r, log.arrays()
