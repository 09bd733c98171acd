"""The one Muon+Adam optimizer: Adam half vs torch.optim.AdamW, Newton-Schulz, partition, distributed."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import end_spawned_rank, free_port

import pgolf.optim.muon_adam as muon_adam
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.optim.groups import build_optimizer, partition_params
from pgolf.optim.muon_adam import MuonAdam, balanced_owners
from pgolf.optim.newton_schulz import newton_schulz, ns_coefficients, row_normalize
from pgolf.optim.schedule import lr_scale, muon_momentum

OPTIM = dict(
    matrix_lr=0.04,
    scalar_lr=0.04,
    embed_lr=0.05,
    head_lr=0.008,
    muon_momentum=0.95,
    ns_steps=5,
    ns_kind="quintic",
    adam_wd=0.0,
    muon_wd=0.0,
)


def test_adam_groups_match_torch_adamw_step_for_step():
    torch.manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(5, 3)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(())),
    ]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = MuonAdam([dict(kind="adam", params=ps, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.04)])
    ref = torch.optim.AdamW(qs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.04, fused=True)
    for step in range(25):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        if step == 10:  # a scheduled lr change applies to both
            ours.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.003
        ours.step()
        ref.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), f"diverged at step {step}"


def test_a_bf16_table_steps_as_the_records_fused_adam_steps_it():
    """The records keep their embedding tables as bf16 parameters stepped by fused Adam(W) (fp32 arithmetic,
    bf16 moments, one rounding per step); one group may mix them with fp32 parameters."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(64, 16).bfloat16()), torch.nn.Parameter(torch.randn(16))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = MuonAdam([dict(kind="adam", params=ps, lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.085)])
    ref = torch.optim.AdamW(qs, lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.085, fused=True)
    start = ps[0].detach().clone()
    for step in range(10):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), f"diverged at step {step}"
    assert ps[0].dtype == ours.state[ps[0]]["exp_avg"].dtype == ours.state[ps[0]]["exp_avg_sq"].dtype == torch.bfloat16
    assert not torch.equal(ps[0], start)
    # what the fused kernel's single rounding is not: the same AdamW step computed in bf16 op by op
    p = torch.nn.Parameter(start.clone())
    torch.manual_seed(0)
    p.grad = torch.randn_like(p)
    torch.optim.AdamW([p], lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.085, foreach=False).step()
    q = torch.nn.Parameter(start.clone())
    q.grad = p.grad.clone()
    MuonAdam([dict(kind="adam", params=[q], lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.085)]).step()
    assert not torch.equal(p, q)


def test_embedding_weight_decay_is_its_own_when_set():
    """PR #1611's AdamW groups: the token embedding decays by embed_wd (0.085), the scalars by adam_wd (0.02)."""
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    wd = {
        g["name"]: g["weight_decay"]
        for g in build_optimizer(model, OPTIM | dict(adam_wd=0.02, embed_wd=0.085)).param_groups
    }
    assert wd == {"matrix": 0.0, "embed": 0.085, "scalar": 0.02}
    same = {g["name"]: g["weight_decay"] for g in build_optimizer(model, OPTIM | dict(adam_wd=0.02)).param_groups}
    assert same["embed"] == same["scalar"] == 0.02


@pytest.mark.parametrize(
    "kind,steps,lo,hi", [("quintic", 5, 0.6, 1.2), ("polar_express", 5, 0.8, 1.2), ("polar_express", 4, 0.35, 1.65)]
)
def test_newton_schulz_brings_singular_values_near_one(kind, steps, lo, hi):
    """Measured on random Gaussian matrices of the record's shapes (rectangular, so the smallest singular
    value is a fixed fraction of the largest): quintic-5 [0.68, 1.13], Polar Express-5 [0.86, 1.14],
    Polar Express-4 (the 5-step table truncated, as PR #1298 runs it) [0.42, 1.58]."""
    torch.manual_seed(0)
    for shape in [(1536, 512), (512, 1536), (256, 512)]:
        G = torch.randn(*shape)
        s = torch.linalg.svdvals(newton_schulz(G, ns_coefficients(kind, steps), dtype=torch.float32))
        assert lo < s.min() and s.max() < hi, (shape, s.min().item(), s.max().item())
        s0 = torch.linalg.svdvals(G)
        assert s0.max() / s0.min() > 2.5  # the input was far from orthogonal


def test_row_normalize_gives_unit_rows():
    U = torch.randn(64, 32) * torch.rand(64, 1) * 10
    assert torch.allclose(row_normalize(U).norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(row_normalize(U, form="bf16_eps").norm(dim=1), torch.ones(64), atol=1e-6)


def test_row_norm_forms_are_the_records_expressions():
    """`fp32_clamp` is the MuonEq-R record's / PR #1611's `U / U.float().norm().clamp_min(1e-7).to(U.dtype)`,
    `bf16_eps` PR #1298's `U / (U.norm() + 1e-7)`, on a bf16 update (bf16 momentum) and an fp32 one: the norm
    is rounded to U's dtype in both, so they differ only where + 1e-7 and the clamp do (small rows)."""
    for dtype in (torch.bfloat16, torch.float32):
        U = (torch.randn(256, 64) * torch.rand(256, 1) * 10).to(dtype)
        U[3] = 0
        U[4] *= 1e-5
        meqr = U / U.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(U.dtype)
        pr1298 = U / (U.norm(dim=-1, keepdim=True) + 1e-7)
        assert torch.equal(row_normalize(U), meqr) and torch.equal(row_normalize(U, form="bf16_eps"), pr1298)
        assert row_normalize(U).dtype == dtype and not row_normalize(U)[3].any()
        if dtype == torch.float32:
            assert not torch.equal(meqr[4], pr1298[4])
    with pytest.raises(ValueError, match="row norm form"):
        row_normalize(U, form="bf16")


def test_partition_places_every_parameter_once():
    for cfg in [
        GPTConfig(num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2),
        GPTConfig(
            num_layers=3,
            model_dim=64,
            num_heads=4,
            num_kv_heads=2,
            tie_embeddings=False,
            bigram="xor",
            bigram_buckets=64,
            bigram_dim=32,
            ve_dim=16,
            ve_layers=(2,),
            smear_gate="record",
        ),
    ]:
        m = GPT(cfg)
        groups = partition_params(m.named_parameters())
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in m.named_parameters())
        assert all(n.startswith("blocks.") and ".attn." in n or ".mlp." in n for n in groups["matrix"])
        assert "tok_emb.weight" in groups["embed"]
        assert not any("resid_mix" in n or "skip_weights" in n for n in groups["matrix"])  # 2-D control tensors
    opt = build_optimizer(m, OPTIM)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    assert {g["name"]: g["kind"] for g in opt.param_groups} == {
        "matrix": "muon",
        "embed": "adam",
        "head": "adam",
        "scalar": "adam",
    }


def test_schedules():
    kw = dict(iterations=100, warmdown_iters=20, max_wallclock_ms=0)
    assert lr_scale(0, 0, **kw) == 1.0 and lr_scale(80, 0, **kw) == 1.0
    assert lr_scale(90, 0, **kw) == pytest.approx(0.5) and lr_scale(100, 0, **kw) == 0.0
    wall = dict(iterations=10**6, warmdown_iters=10, max_wallclock_ms=1000.0)
    assert lr_scale(50, 500.0, **wall) == 1.0  # 10 ms/step: warmdown is the last 100 ms
    assert lr_scale(95, 950.0, **wall) == pytest.approx(0.5)
    assert lr_scale(100, 1000.0, **wall) == 0.0
    assert muon_momentum(0, start=0.85, end=0.95, warmup_steps=500) == 0.85
    assert muon_momentum(250, start=0.85, end=0.95, warmup_steps=500) == pytest.approx(0.90)
    assert muon_momentum(5000, start=0.85, end=0.95, warmup_steps=500) == 0.95


def test_warmdown_by_training_fraction_with_a_floor():
    """PR #1611: frac = elapsed / (600 s - 0.5 s reserve); 1 until frac 0.15, linear to the 0.1 floor (reached at
    frac 0.915), then flat; without a cap frac = step / iterations."""
    rec = dict(iterations=20000, warmdown_iters=0, max_wallclock_ms=600_000.0, warmdown_frac=0.85, min_lr=0.1)
    rec["reserve_ms"] = 500.0
    budget = 599_500.0
    assert lr_scale(0, 0.149 * budget, **rec) == 1.0
    assert lr_scale(0, 0.5 * budget, **rec) == pytest.approx(0.5 / 0.85)
    assert lr_scale(0, 0.915 * budget, **rec) == pytest.approx(0.1)
    assert lr_scale(0, 0.99 * budget, **rec) == 0.1 and lr_scale(0, 2 * budget, **rec) == 0.1
    steps = dict(rec, max_wallclock_ms=0.0, iterations=1000)
    assert lr_scale(150, 0.0, **steps) == pytest.approx(1.0) and lr_scale(575, 0.0, **steps) == pytest.approx(0.5)
    assert lr_scale(1000, 0.0, **dict(steps, min_lr=0.0)) == 0.0


# ---- distributed Muon: 2 gloo processes give the same weights as one --------------------------------
def _train_steps(rank: int, world: int, port: int, out: dict | None, steps: int = 4):
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2))
    opt = build_optimizer(m, OPTIM)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 32), generator=g)
        m(x, x.roll(-1, 1)).backward()
        if world > 1:  # what DDP does: average gradients (identical data here, so identical grads)
            for p in m.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
    if world > 1:
        if rank == 0:
            torch.save(m.state_dict(), out)
        dist.barrier()  # no rank tears gloo down while the other still uses it
        dist.destroy_process_group()
        end_spawned_rank()
    else:
        return m.state_dict()


@pytest.mark.parametrize("world", [2])
def test_distributed_muon_matches_single_process(tmp_path, world):
    """4 optimizer steps of a 3-layer model (18 Muon matrices split over 2 ranks by balanced_owners, whose
    split over 8 is checked below). A power-of-two world keeps the test's gradient average exact."""
    single = _train_steps(0, 1, 0, None)
    out = str(tmp_path / "dist.pt")
    mp.spawn(_train_steps, args=(world, free_port(), out), nprocs=world, join=True)
    multi = torch.load(out)
    for k in single:
        assert torch.equal(single[k], multi[k]), k


def test_balanced_owners_split_the_work():
    shapes = [(512, 512), (256, 512), (256, 512), (512, 512), (1536, 512), (512, 1536)] * 11
    owners = balanced_owners(shapes, 8)
    load = [0] * 8
    for (m, n), r in zip(shapes, owners):
        load[r] += m * n * min(m, n)
    assert set(owners) == set(range(8)) and max(load) / min(load) < 1.2
    assert balanced_owners(shapes, 1) == [0] * len(shapes)


def test_muoneq_r_normalises_rows_before_newton_schulz(monkeypatch):
    seen = []
    real = muon_adam.newton_schulz
    monkeypatch.setattr(muon_adam, "newton_schulz", lambda u, *a, **k: seen.append(u.clone()) or real(u, *a, **k))
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = MuonAdam(
        [
            dict(
                kind="muon",
                params=[p],
                lr=0.02,
                momentum=0.95,
                ns_steps=5,
                ns_kind="polar_express",
                row_norm=True,
                weight_decay=0.04,
            )
        ]
    )
    p.grad = torch.randn(32, 16) * torch.rand(32, 1) * 5
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(seen[0].norm(dim=1), torch.ones(32), atol=1e-5)
    # decoupled weight decay with the scheduled lr, then the orthogonalized step
    o = real(seen[0], ns_coefficients("polar_express", 5), dtype=torch.float32) * math.sqrt(2.0)
    assert torch.allclose(p.detach(), before * (1 - 0.02 * 0.04) - 0.02 * o, atol=1e-6)


def test_bf16_momentum_is_parallel_muons_buffer(monkeypatch):
    """`momentum_dtype: bf16` (Parallel Muon, PR #399, the banked records' single-GPU path): the gradient is
    copied to bf16, buf <- mu*buf + g and Nesterov's g + mu*buf round in bf16, Newton-Schulz gets that bf16
    update. fp32 keeps the baseline's fp32 buffer; the two differ."""
    seen = []
    real = muon_adam.newton_schulz
    monkeypatch.setattr(muon_adam, "newton_schulz", lambda u, *a, **k: seen.append(u.clone()) or real(u, *a, **k))
    torch.manual_seed(0)
    grads = [torch.randn(32, 16) for _ in range(3)]
    outs = {}
    for dtype in ("bf16", "fp32"):
        p = torch.nn.Parameter(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))
        group = dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, momentum_dtype=dtype)
        opt = MuonAdam([group])
        seen.clear()
        for g in grads:
            p.grad = g.clone()
            opt.step()
        outs[dtype] = (p.detach().clone(), [u.clone() for u in seen], opt.state[p]["momentum_buffer"])
    buf = torch.zeros(32, 16, dtype=torch.bfloat16)
    for g, u in zip(grads, outs["bf16"][1]):
        gb = g.bfloat16()
        buf = buf * 0.95 + gb  # buf.mul_(momentum).add_(g), in bf16
        assert u.dtype == torch.bfloat16 and torch.equal(u, gb.add(buf, alpha=0.95))  # Nesterov, PR #399's form
    assert torch.equal(outs["bf16"][2], buf) and outs["fp32"][2].dtype == torch.float32
    assert all(u.dtype == torch.float32 for u in outs["fp32"][1])
    assert not torch.equal(outs["bf16"][0], outs["fp32"][0])
    with pytest.raises(ValueError, match="momentum_dtype"):
        MuonAdam([dict(kind="muon", params=[torch.nn.Parameter(torch.randn(4, 4))], momentum_dtype="fp16")])
    with pytest.raises(ValueError, match="row_norm_form"):
        MuonAdam([dict(kind="muon", params=[torch.nn.Parameter(torch.randn(4, 4))], row_norm_form="bf16")])


def test_shape_scale_in_the_update_or_in_the_step_size(monkeypatch):
    """The baseline scales the (bf16) Newton-Schulz update by sqrt(max(1, rows/cols)); Parallel Muon (PR #399)
    applies it in the step size, p.add_(update, alpha=-lr * scale): on a 32x16 matrix (scale sqrt 2) with bf16
    Newton-Schulz the two differ by the update's rounding."""
    seen = []
    real = muon_adam.newton_schulz
    monkeypatch.setattr(muon_adam, "newton_schulz", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    start = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    grad = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    out = {}
    for form in ("update", "step"):
        p = torch.nn.Parameter(start.clone())
        p.grad = grad.clone()
        MuonAdam([dict(kind="muon", params=[p], lr=0.02, shape_scale=form)], ns_dtype=torch.bfloat16).step()
        out[form] = p.detach()
    o = seen[-1]
    assert o.dtype == torch.bfloat16
    assert torch.equal(out["step"], start.add(o.float(), alpha=-0.02 * math.sqrt(2.0)))
    assert torch.equal(out["update"], start.add((o * math.sqrt(2.0)).float(), alpha=-0.02))
    assert not torch.equal(out["step"], out["update"])
    with pytest.raises(ValueError, match="shape_scale"):
        MuonAdam([dict(kind="muon", params=[torch.nn.Parameter(torch.randn(4, 4))], shape_scale="x")])
