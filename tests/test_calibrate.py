"""GPTQ calibration data (PR #1019): seeded self-generation through the KV cache, the training-stream
path, and the compliance rule (training data only inside the training time budget)."""

from __future__ import annotations

import pytest
import torch

from pgolf.data.shards import list_shards
from pgolf.data.stream import StreamLayout, TokenStream, TrainStream
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import calibrate, generate, train_sequences
from pgolf.quant.settings import CalibrationConfig, compliance

CFG = dict(
    vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, smear_gate="record", bigram="xor",
    bigram_buckets=64, bigram_dim=16, ve_dim=8, ve_layers=(1,), xsa_last_n=2, rope_dims=4, rope_ntk_base_len=8,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(**CFG))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return m.eval()


def test_generation_is_seeded_and_batched(model):
    a = generate(model, count=5, length=12, temperature=0.8, seed=3, batch=2)
    b = generate(model, count=5, length=12, temperature=0.8, seed=3, batch=2)
    c = generate(model, count=5, length=12, temperature=0.8, seed=4, batch=2)
    assert a.shape == (5, 12) and a.dtype == torch.long and 0 <= a.min() and a.max() < 64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training is False


def test_greedy_generation_follows_the_full_forward(model):
    """Temperature 0: every generated token is the argmax of one full forward of the finished sequence at
    the previous position, so the cached decoding inside generation matches the model (NTK active: 12 > 8)."""
    seqs = generate(model, count=3, length=12, temperature=0.0, seed=0, batch=3)
    with torch.no_grad():
        logits = model(seqs)
    assert torch.equal(seqs[:, 1:], logits[:, :-1].argmax(-1))


def test_train_sequences_are_contiguous_stream_spans(synth_dir):
    files = list_shards(str(synth_dir / "synth_train_*.bin"))
    stream = TokenStream(files)
    layout = StreamLayout(batch_tokens=4 * 32, seq_len=32, world_size=1, grad_accum=1)
    seqs = train_sequences(iter(TrainStream(stream, layout, rank=0)), count=6, length=16)
    assert seqs.shape == (6, 16)
    # micro-batch 0 covers stream tokens [0, 128): 8 pieces of 16; the first 6 are the stream's first 96
    assert torch.equal(seqs.reshape(-1), torch.from_numpy(stream.read(0, 96)))
    with pytest.raises(ValueError, match="longer than a training micro-batch"):
        train_sequences(iter(TrainStream(stream, layout, rank=0)), count=1, length=1000)


def test_compliance_rule():
    ar = compliance("ar", 30.0, train_time_ms=599_000, cap_ms=600_000)
    assert ar["compliant"] and ar["inside_training_budget"] is False
    inside = compliance("train", 0.5, train_time_ms=599_000, cap_ms=600_000)
    assert inside["compliant"] and inside["inside_training_budget"]
    late = compliance("train", 6.8, train_time_ms=599_000, cap_ms=600_000)
    assert (
        not late["compliant"]
        and late["inside_training_budget"] is False
        and "after the training deadline" in (late["reason"])
    )
    nocap = compliance("train", 1.0, train_time_ms=10_000, cap_ms=0)
    assert (
        not nocap["compliant"]
        and nocap["inside_training_budget"] is None
        and "no training time cap" in (nocap["reason"])
    )


def test_calibrate_dispatch_and_config_errors(model):
    seqs, info = calibrate(model, CalibrationConfig(source="ar", count=2, length=6, batch=2), seed=1)
    assert seqs.shape == (2, 6) and info["source"] == "ar" and info["seed"] == 1 and info["kv_cache"]
    assert info["seconds"] >= 0 and info["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="needs the training stream"):
        calibrate(model, CalibrationConfig(source="train", count=2, length=6), seed=1)
    with pytest.raises(ValueError, match="source"):
        CalibrationConfig(source="val")
    with pytest.raises(ValueError, match="count >= 1"):
        CalibrationConfig(count=0)
