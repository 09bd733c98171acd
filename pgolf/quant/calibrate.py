"""Calibration sequences for GPTQ's Hessians (PR #1019) and whether using them was compliant.

Two sources, chosen by the export config's `calibration.source`:

* `ar`: autoregressive self-generation by the trained (unquantized) model, as PR #1019: `count` sequences of
  `length` tokens, the first token uniform over the vocabulary, then multinomial sampling at `temperature`
  from a generator seeded with `seed`, `batch` sequences at a time. It uses the KV-cache decoding path
  (`GPT.decode`), so each step runs one token through the model instead of the whole prefix; the RoPE
  table is the one of a `length`-token forward (see `GPT.new_cache`). No training or validation data is
  read, so it is compliant whenever it runs.
* `train`: `count` sequences of `length` tokens from the start of the training stream (as PR #1263
  calibrated on 32 training batches).
* `train_shuffled`: `count` windows of `length` tokens drawn by PR #1611's `ShuffledSequenceLoader`
  (pgolf/data/shuffled.py) from rank 0's shard files `files[0::world_size]`, RNG seed = the rank (0) unless
  `seed` is set: the inputs (first `length` tokens) of each `length + 1`-token window, in draw order, so
  forwards of 48 rows are the record's calibration batches (16 × 48 × 2048 as PR #1611 runs it).
Reading training data after the training window closed is not allowed (PRs #535/#569/#593/#609), so the two
training-data sources are compliant only if training time plus calibration time fits under the training cap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import torch

from pgolf import optional
from pgolf.data import shuffled as _shuffled_part  # noqa: F401  (registers the optional part shuffled_calibration)
from pgolf.quant.gptq import cpu_threads
from pgolf.quant.settings import CalibrationConfig


@torch.no_grad()
def generate(
    model,
    count: int,
    length: int,
    temperature: float = 0.8,
    seed: int = 0,
    batch: int = 8,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Self-generated token sequences [count, length] (int64, CPU) from `model` (a GPT), as PR #1019."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    # Decode steps are matmuls with `batch` rows: on CPU one thread is as fast and never waits for a
    # descheduled second one (measured on the shared 2-core machine: 139 tok/s on 1 thread, 8 on 2).
    try:
        with cpu_threads(1, device):
            out = [
                _generate_batch(model, min(batch, count - b0), length, temperature, device, autocast_dtype, gen)
                for b0 in range(0, count, batch)
            ]
    finally:
        model.train(was_training)
    return torch.cat(out)


def _generate_batch(model, b, length, temperature, device, autocast_dtype, gen) -> torch.Tensor:
    cache = model.new_cache(b, length, device, dtype=autocast_dtype or torch.float32)
    tok = torch.randint(0, model.cfg.vocab_size, (b, 1), generator=gen, device=device)  # first token uniform
    seq = torch.empty(b, length, dtype=torch.long, device=device)
    seq[:, 0:1] = tok
    for t in range(1, length):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.decode(tok, cache)[:, -1].float()  # [b, V]
        if temperature == 0:
            tok = logits.argmax(dim=-1, keepdim=True)
        else:
            tok = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=gen)
        seq[:, t : t + 1] = tok
    return seq.cpu()


def train_sequences(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int, length: int) -> torch.Tensor:
    """The first `count` contiguous `length`-token sequences of a training stream of (x, y) micro-batches.
    Each micro-batch's inputs are one contiguous span; it is cut into `length`-token pieces."""
    rows, have = [], 0
    for x, *_ in batches:  # (x, y) or, with document-bounded attention, (x, y, cu_seqlens)
        flat = x.reshape(-1)
        k = flat.numel() // length
        if k == 0:
            raise ValueError(
                f"calibration.length {length} is longer than a training micro-batch ({flat.numel()} tokens)"
            )
        rows.append(flat[: k * length].view(k, length))
        have += k
        if have >= count:
            break
    if have < count:
        raise ValueError(f"the training stream gave {have} calibration sequences, {count} requested")
    return torch.cat(rows)[:count].long().cpu()


def shuffled_sequences(
    files: Sequence[str | os.PathLike],
    count: int,
    length: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The inputs [count, length] (int64, CPU) of the first `count` windows PR #1611's
    `ShuffledSequenceLoader` draws for `rank` of `world_size` from the sorted training shard `files` (seed:
    the rank unless given), in draw order (pgolf/data/shuffled.py, the optional part `shuffled_calibration`).
    ValueError when the rank owns no whole window; LookupError when the part is not in this program."""
    loader = optional.get("shuffled_calibration").ShuffledSequenceLoader(
        files, length, rank, world_size, seed, vocab_size
    )
    x, _ = loader.next_batch(count)
    return x


def calibrate(
    model,
    cfg: CalibrationConfig,
    *,
    seed: int,
    train_batches: Iterable | None = None,
    train_files: Sequence[str | os.PathLike] | None = None,
    rank: int = 0,
    world_size: int = 1,
    device=None,
    autocast_dtype=None,
) -> tuple[torch.Tensor, dict]:
    """(sequences [count, length], info) from the configured source; info has the timing. `train_batches`
    feed `train`; `train_files` (the sorted training shards), `rank` and `world_size` (overridden by
    `cfg.world_size`) feed `train_shuffled`. ValueError when the source's input is missing."""
    if cfg.source == "none":
        raise ValueError("calibration.source is none, but GPTQ needs calibration sequences (ar, train, train_shuffled)")
    t0 = time.perf_counter()
    world = int(cfg.world_size or world_size)
    if cfg.source == "train_shuffled":
        seed = int(cfg.seed) if cfg.seed is not None else rank
    else:
        seed = int(cfg.seed if cfg.seed is not None else seed)
    if cfg.source == "ar":
        seqs = generate(model, cfg.count, cfg.length, cfg.temperature, seed, cfg.batch, device, autocast_dtype)
    elif cfg.source == "train_shuffled":
        if not train_files:
            raise ValueError("calibration.source=train_shuffled needs the training shard files")
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
        seqs = shuffled_sequences(train_files, cfg.count, cfg.length, rank, world, seed, vocab)
    else:
        if train_batches is None:
            raise ValueError("calibration.source=train needs the training stream (a data module)")
        seqs = train_sequences(train_batches, cfg.count, cfg.length)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    info = {
        "source": cfg.source,
        "count": int(seqs.size(0)),
        "length": int(seqs.size(1)),
        "seconds": round(secs, 3),
        "tokens_per_s": round(seqs.numel() / max(secs, 1e-9), 1),
    }
    if cfg.source == "ar":
        info.update(temperature=cfg.temperature, seed=seed, batch=cfg.batch, kv_cache=True)
    elif cfg.source == "train_shuffled":
        info.update(seed=seed, rank=rank, world_size=world, files=len(train_files[rank::world]))
    return seqs, info
