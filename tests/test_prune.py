"""Selective ±1 pruning to a decimal size target (PR #609): the fewest cheapest entries, real sizes."""

from __future__ import annotations

import pytest
import torch

from pgolf.quant.artifact import encode_artifact, pack
from pgolf.quant.prune import prune_candidates, prune_to_target, zero_cheapest
from pgolf.quant.rules import QuantRule, quantize_state
from pgolf.quant.settings import PruneConfig


@pytest.fixture(scope="module")
def entries():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 64, generator=g) * 0.1, torch.randn(32, 64, generator=g) * 0.1
    a[:, 0] = torch.linspace(1.0, 3.0, 48)  # one outlier per row sets its scale: many |q| = 1, unequal costs
    b[:, 5] = torch.linspace(0.5, 2.0, 32)
    state = {
        "a.weight": a,
        "b.weight": b,
        "emb.weight": torch.randn(40, 64, generator=g) * 0.1,
        "gain": torch.ones(64),
    }
    rules = [
        QuantRule(store="fp16", max_numel=64, name="small"),
        QuantRule(store="int", pattern=r"^(a|b)\.", bits=6, clip=1.0, scale_floor=False, name="int6"),
        QuantRule(store="int", bits=8, clip=1.0, scale_floor=False, name="int8"),
    ]
    return quantize_state(state, rules)


def size_fn(codec="zlib"):
    def size_of(e, record):
        return len(encode_artifact(pack(e, {"prune": record}), codec, 9))

    return size_of


def test_candidates_are_the_int6_plus_minus_ones_cheapest_first(entries):
    c = prune_candidates(entries, [6])
    assert c.names == ["a.weight", "b.weight"]  # int8 embedding and fp16 gain give none
    n_pm1 = sum(int((entries[n].q.abs() == 1).sum()) for n in c.names)
    assert len(c) == n_pm1 > 100
    assert torch.all(c.cost[1:] >= c.cost[:-1])
    for i in (0, len(c) // 2, len(c) - 1):
        e = entries[c.names[int(c.tensor[i])]]
        pos = int(c.flat[i])
        assert abs(int(e.q.view(-1)[pos])) == 1
        assert c.cost[i] == e.scale.float()[pos // e.q.size(1)] ** 2


def test_zero_cheapest_changes_only_those_entries(entries):
    c = prune_candidates(entries, [6])
    out = zero_cheapest(entries, c, 50)
    changed = sum(int((out[n].q != entries[n].q).sum()) for n in c.names)
    assert changed == 50 and out["emb.weight"] is entries["emb.weight"]
    for i in range(50):
        assert out[c.names[int(c.tensor[i])]].q.view(-1)[int(c.flat[i])] == 0
    assert all(entries[n].q.abs().eq(1).sum() > 0 for n in c.names)  # the input is untouched


def test_binary_search_finds_the_smallest_count_that_fits(entries):
    size_of = size_fn()
    c = prune_candidates(entries, [6])
    N = len(c)
    s0 = size_of(entries, {"zeroed": 0})
    sN = size_of(zero_cheapest(entries, c, N), {"zeroed": N})
    assert sN < s0 - 500  # 1,814 candidates: 6,222 -> 5,552 bytes (zlib-9)
    target = (s0 + sN) // 2
    pruned, info = prune_to_target(entries, size_of, target, [6])
    n = info["zeroed"]
    assert 0 < n < N and info["fits"] and info["model_bytes"] <= target
    record = lambda k: {"target_model_bytes": target, "candidates": N, "zeroed": k, "bits": [6]}
    assert size_of(pruned, record(n)) == info["model_bytes"]  # what was measured is what is written
    assert size_of(zero_cheapest(entries, c, n - 1), record(n - 1)) > target  # one fewer does not fit
    assert info["probes"] <= 2 + N.bit_length()


def test_nothing_or_everything(entries):
    size_of = size_fn()
    out, info = prune_to_target(entries, size_of, 10**9, [6])
    assert info["zeroed"] == 0 and info["fits"] and info["probes"] == 1 and out["a.weight"] is entries["a.weight"]
    out, info = prune_to_target(entries, size_of, 100, [6])
    assert info["zeroed"] == info["candidates"] and not info["fits"]
    assert all(not (out[n].q.abs() == 1).any() for n in ("a.weight", "b.weight"))


def test_prune_config_validation():
    assert PruneConfig(bits=["6"]).bits == [6]
    with pytest.raises(ValueError, match="total_bytes"):
        PruneConfig(total_bytes=0)


def test_search_is_exact_on_monotone_sizes_and_needs_few_probes():
    """On a non-increasing size curve (steps and flats, like compressed sizes) the search returns exactly
    the smallest fitting n, with at most about twice bisection's probes."""
    from pgolf.quant.prune import _search

    g = torch.Generator().manual_seed(0)
    N = 50_000
    drops = torch.randint(0, 3, (N,), generator=g)  # 0, 1 or 2 bytes saved per zeroed entry
    sizes = (1_000_000 - torch.cat([torch.zeros(1, dtype=torch.long), drops.cumsum(0)])).tolist()
    for target in torch.randint(sizes[-1], sizes[0], (25,), generator=g).tolist():
        probes = []

        def size(n, probes=probes):
            probes.append(n)
            return sizes[n]

        n = _search(size, target, 0, sizes[0], N, sizes[N])
        assert n == next(i for i, s in enumerate(sizes) if s <= target)
        assert len(probes) <= 2 * N.bit_length()
