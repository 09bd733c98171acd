"""One global SGD phase of phased TTT at PR #1611's geometry: `python bench/global_sgd_bench.py
[--model tiny_1611] [--packing flat,rows] [--tokens 70000] [--threads 2]`.

Random documents of 300-3,000 tokens (BOS-led) on a randomly initialised model of `conf/model/<model>.yaml`;
`pgolf.eval.phased_ttt.global_sgd` with the record's settings (chunks of 32,768 tokens as 16 sequences of
2,048, document-bounded attention, the last chunk skipped) in each `global_packing`. Prints seconds per step
and the process's peak RSS for each packing, each in its own process (the peak is per process). On the CPU
`flat`'s 32,768-token rows are attended in groups of whole segments (pgolf/model/doc_attention.py); one mask
of the whole row would be 32,768² entries per head. Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch
from common import compose, model_from_cfg

from pgolf.data.tokenizer import ByteLUTs
from pgolf.eval.core import EvalContext
from pgolf.eval.lora_ttt import documents
from pgolf.eval.phased_ttt import PhasedSettings, global_sgd


def one(model: str, packing: str, n_tokens: int, threads: int) -> str:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = model_from_cfg(compose("train", [f"model={model}"]))
    V = m.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(2, V, (n_tokens,), generator=g)
    bos = torch.cumsum(torch.randint(300, 3000, (n_tokens // 300,), generator=g), 0)
    toks[0] = 1
    toks[bos[bos < n_tokens - 1000]] = 1
    docs = documents(toks, 1)
    st = PhasedSettings(global_packing=packing)
    ones = torch.ones(V, dtype=torch.int16)
    luts = ByteLUTs(ones, torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
    t0 = time.perf_counter()
    steps = global_sgd(m, toks, docs, st, EvalContext(luts, torch.device("cpu"), st.global_seq_len))
    secs = (time.perf_counter() - t0) / max(steps, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return (
        f"{model} {packing}: {len(docs)} documents, {steps} steps of {st.global_chunk_tokens} tokens, "
        f"{secs:.1f} s/step, peak RSS {rss:.2f} GiB ({threads} threads)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny_1611")
    ap.add_argument("--packing", default="flat,rows")
    ap.add_argument("--tokens", type=int, default=70000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one packing
    a = ap.parse_args()
    if a.one:
        print(one(a.model, a.packing, a.tokens, a.threads), flush=True)
        return
    for packing in a.packing.split(","):
        args = ["--model", a.model, "--packing", packing, "--tokens", str(a.tokens), "--threads", str(a.threads)]
        subprocess.run([sys.executable, __file__, "--one", *args], check=True)


if __name__ == "__main__":
    main()
