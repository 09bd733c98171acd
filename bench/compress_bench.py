"""Bytes and seconds of every artifact codec on the same quantized weights: zlib-9, zstd-22, lzma-9, brotli-11
(PR #1611's plain `COMPRESSOR=brotli`), pergroup (PR #1611's per-group container, groups through `lrzip -z -L 9`)
and pergroup_brotli (the same container, groups through brotli-11).

    python bench/compress_bench.py [--model record_1611] [--vocab 8192] [--export sdclip_gptq_1611]
                                   [--codecs zlib zstd ...] [--seed 0] [--json FILE]

The weights: a randomly initialised pgolf GPT of conf/model/<model>.yaml (record_1611 when it exists, else
pr1263), every matrix then perturbed once by Gaussian noise (W + 0.5·std(W)·N(0, 1); 0.02·N(0, 1) for a matrix
initialised to zero), so no matrix is trivially compressible. A trained model's codes compress differently:
these figures compare codecs and time them, they do not predict a record's artifact size. Quantized by the
rules of conf/export/<export>.yaml (sdclip_gptq_1611 by default: int6 SDClip matrices, int7 embedding, int8
gates; its GPTQ rules fall back to round-to-nearest with SDClip scales without calibration Hessians).

One line per codec (`codec:brotli level:11 bytes:... ratio:... encode_s:... decode_s:... exact:True`, and for
the per-group codecs `streams:tok_emb=...,c_k=...,...,remainder=...,permutations=...`), the decode timed on
the file's bytes and checked to give back the payload bit for bit; then the L1 chain's time
on the largest hot matrix (`nn_chain rows:... cols:... seconds:...`). A codec whose tool is missing (lrzip)
prints `codec:pergroup skipped:<why>`.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT, compose, figures_line, save_json
from omegaconf import OmegaConf

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import (
    CODECS,
    DEFAULT_LEVELS,
    PERGROUP_BACKENDS,
    PREFIX,
    ArtifactError,
    check_codec,
    decode_artifact,
    encode_artifact,
)
from pgolf.quant.artifact import pack as pack_payload
from pgolf.quant.pergroup import GROUPS, HOT, STREAM_NAMES, group_of, nn_chain, split_container
from pgolf.quant.rules import quantize_state, rules_from_config

ORDER = ("zlib", "zstd", "lzma", "brotli", "pergroup", "pergroup_brotli")


def default_model() -> str:
    return "record_1611" if (ROOT / "conf" / "model" / "record_1611.yaml").exists() else "pr1263"


def perturbed_state(model: str, vocab: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, model config dict) of the perturbed random model."""
    cfg = compose("train", [f"model={model}"])
    d = OmegaConf.to_container(cfg.model, resolve=False)
    d.pop("_target_", None)
    d["vocab_size"] = vocab
    gcfg = GPTConfig.from_dict(d)
    torch.manual_seed(seed)
    sd = GPT(gcfg).state_dict()
    for k, v in sd.items():
        if v.is_floating_point() and v.ndim == 2:
            std = float(v.float().std())
            sd[k] = v + (0.5 * std if std > 0 else 0.02) * torch.randn_like(v)
    return sd, gcfg.to_dict()


def is_hot(name: str) -> bool:
    """Whether the per-group container reorders this tensor's rows."""
    g = group_of(name)
    return g is not None and GROUPS[g[0]] in HOT


def measure(raw: bytes, codec: str) -> dict:
    level = DEFAULT_LEVELS[codec]
    fig = {"codec": codec, "level": level}
    try:
        check_codec(codec, level)
    except ArtifactError as e:
        return fig | {"skipped": str(e).split(":")[0].replace(" ", "_")}
    t0 = time.perf_counter()
    data = encode_artifact(raw, codec, level)
    t1 = time.perf_counter()
    back, _ = decode_artifact(data)
    t2 = time.perf_counter()
    fig |= {
        "bytes": len(data),
        "ratio": round(len(data) / len(raw), 4),
        "encode_s": round(t1 - t0, 2),
        "decode_s": round(t2 - t1, 2),
        "exact": back == raw,
    }
    if codec in PERGROUP_BACKENDS:  # where the container's bytes go
        streams = split_container(memoryview(data)[PREFIX.size :])
        fig["streams"] = ",".join(f"{n}={len(x)}" for n, x in zip(STREAM_NAMES, streams))
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=default_model(), help="conf/model/<name>.yaml")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--export", default="sdclip_gptq_1611", help="conf/export/<name>.yaml: its quantization rules")
    ap.add_argument("--codecs", nargs="+", default=list(ORDER), choices=sorted(CODECS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()

    sd, model_cfg = perturbed_state(args.model, args.vocab, args.seed)
    rules = OmegaConf.to_container(compose("train", [f"export={args.export}"]).export.rules, resolve=True)
    entries = quantize_state(sd, rules_from_config(rules))
    raw = pack_payload(entries, {"model": model_cfg})
    n_params = sum(v.numel() for v in sd.values())
    head = {"model": args.model, "vocab": args.vocab, "export": args.export, "params": n_params, "raw_bytes": len(raw)}
    print(figures_line(head))
    rows = []
    for codec in args.codecs:
        fig = measure(raw, codec)
        rows.append(fig)
        print(figures_line(fig), flush=True)
    hot = [(e.q.numel(), n) for n, e in entries.items() if e.kind == "int" and e.q.ndim == 2 and is_hot(n)]
    chain = {}
    if hot:
        _, name = max(hot)
        m = entries[name].q.numpy()
        t0 = time.perf_counter()
        nn_chain(m)
        dt = round(time.perf_counter() - t0, 2)
        chain = {"nn_chain": name, "rows": m.shape[0], "cols": m.shape[1], "seconds": dt}
        print(figures_line(chain))
    save_json(args.json, {"setup": head, "codecs": rows, "chain": chain})


if __name__ == "__main__":
    main()
