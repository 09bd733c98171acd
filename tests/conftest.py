"""Shared fixtures: paths to ../shared data (tests skip cleanly without it), a tiny synthetic corpus."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
SP8192 = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
FINEWEB_SAMPLE = SHARED / "fineweb" / "fineweb10BT_legalprefilter_2800docs.jsonl"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path.name} not present (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def sp1024_path() -> Path:
    return need(SP1024)


@pytest.fixture(scope="session")
def fineweb_sample() -> Path:
    return need(FINEWEB_SAMPLE)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A tiny generated corpus with its own vocab-256 tokenizer, prepared once per session."""
    from pgolf.tools.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synth"))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed_tiny_gpt(vocab: int, layers: int = 2, **kw):
    """A 32-wide GPT (2 layers unless told; other GPTConfig fields in `kw`) moved off its zero init, so every
    position and feature matters."""
    from pgolf.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab, num_layers=layers, model_dim=32, num_heads=4, num_kv_heads=2, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        m.tok_emb.weight.normal_(0.0, 0.1)
    return m.eval()


def python() -> str:
    return sys.executable


def end_spawned_rank() -> None:
    """The end of a test's spawned gloo rank, after `destroy_process_group`: exit status 0 without the
    interpreter's teardown, where a still-joinable thread made the child abort (SIGABRT, "terminate called
    without an active exception") in full-suite runs, after its results were written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a test's gloo rendezvous: a fixed port can still
    be held by an earlier test's process group."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
