"""GPU-only checks (skipped on CPU machines): bf16 autocast + torch.compile training steps and evaluation."""

from __future__ import annotations

import pytest
import torch

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.optim.groups import build_optimizer

pytestmark = pytest.mark.gpu

OPTIM = dict(matrix_lr=0.04, scalar_lr=0.04, embed_lr=0.05, head_lr=0.008, muon_momentum=0.95)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_compiled_training_learns_and_matches_eager(precision):
    """`bf16`: the records' precision policy (bf16 embedding tables, bf16 Muon momentum) under autocast and
    fullgraph compile: the tables stay bf16 parameters and their lookups bf16."""
    torch.manual_seed(0)
    cfg = GPTConfig(num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2, mlp_act="leaky_relu2", xsa_last_n=4,
                    rope_dims=16, bigram="xor", bigram_buckets=512, bigram_dim=64, smear_gate="record",
                    ve_dim=64, ve_layers=(3,), ln_scale=True, ortho_init=True, embed_dtype=precision)  # fmt: skip
    model = GPT(cfg).cuda()
    opt = build_optimizer(model, OPTIM | dict(muon_momentum_dtype=precision))
    fwd = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randint(0, 1024, (8, 257), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # memorises the fixed batch
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert model.tok_emb.weight.dtype == model.bigram.embed.weight.dtype == model.ve_shared.embed.weight.dtype == want
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.tok_emb(x).dtype == want
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.allclose(fwd(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:]), atol=2e-2)
