"""Bytes, quantization gap and stage times of PR #1611's quantizers on a briefly trained record_1611 (issue 16):
int6 GPTQ-lite (PR #414 / #1298's export), SDClip GPTQ (PR #1394's row scales, PR #1611's classes) and SDClip
GPTQ + LQER (PR #1797; PR #1611's export), each artifact under lzma-9, brotli-11 and PR #1611's per-group
container (groups through `lrzip -z -L 9`), in one table.

    python bench/quant_1611_bench.py [--shared ../shared/data] [--work data/quant_1611_bench]
        [--train-docs 500] [--val-docs 100] [--steps 12] [--seq-len 512] [--batch-tokens 2048]
        [--eval-tokens 8192] [--calib-count 16] [--calib-length 512] [--schemes ...] [--codecs ...]
        [--verify-codec brotli] [--weights W] [--json FILE] [--markdown FILE]

Stages, each timed:
1. data: CaseOps sp8192 shards (PR #1729's transform, the record's tokenizer, a validation byte sidecar) of the
   FineWeb sample in `--shared` (`fineweb/…2800docs.jsonl`, `tokenizers/…caseops_v1_reserved.model`): the first
   `--val-docs` documents for validation, the next `--train-docs` for training, written by
   `pgolf.tools.prepare` under `--work` (git-ignored `data/`); kept and reused when already there.
2. train: `python train.py experiment=record_1611` (35,945,671 parameters, the record's optimizer, schedule
   and document-bounded attention) on the CPU for `--steps` steps of `--batch-tokens` tokens in rows of
   `--seq-len`; CPU overrides: trainer=cpu (fp32), no compile, no compile warm-up steps, no wall-clock cap,
   no EMA (the record's 0.9965 would leave ~96% of the initialisation in 12 steps' weights); the run's own
   export is a cheap int8 + zlib-1 one, there only to save the float weights (`final_model.float.ptz`).
   `--weights W` (the float weights of an earlier run on the same data) skips the training.
3. per scheme: `pgolf.tools.reexport` of the float weights (export codec lzma-9, no report codecs) on the
   first `--eval-tokens` validation targets, the same for every scheme; GPTQ's calibration is `--calib-count`
   training sequences of `--calib-length` tokens (the record: 768 x 2048). The pre-quantization score is
   computed once (the first scheme) and is the reference of every gap; the round trip re-reads each artifact.
   The export's stage times (calibration, hessians, quantize and its GPTQ share, lqer, pack, compress) are the
   report's `timings` (pgolf/export/stages.py Stopwatch).
4. per scheme and codec: the artifact's raw payload (decoded from the lzma file) re-encoded with brotli-11 and
   pergroup-9 (lzma's bytes and time are the export's own), each decoded again and checked bit for bit
   (`exact`); codecs are lossless, so the round-trip score and the gap do not depend on the codec. Once
   (`--verify-codec`, on the last scheme) that artifact is also written and scored, to show its round trip
   gives the lzma one's val_bpb. lrzip's ZPAQ decodes as slowly as it encodes: pergroup is decoded (and its
   decompress time measured) on the last scheme only, unless `--decode-all`. The raw payload's header names
   lzma as the codec, so a native pergroup export differs from the re-encoded one by a few header bytes.
5. code bytes: the packed train_gpt.py of `experiment=record_1611 export=<scheme> export.codec=<codec>`
   (pgolf/tools/pack.py; the optional parts gptq, lqer and pergroup are packed only when used).

One `key:value` line per scheme x codec, the setup line first; `--markdown` writes the table.
A 12-step model is far from a trained one: its quantization gap is not the record's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, figures_line, save_json

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.data.tokenizer import TokenizerInfo
from pgolf.eval.run import doc_max_seg_len
from pgolf.export.config import ExportReport
from pgolf.export.roundtrip import roundtrip_evaluate
from pgolf.export.weights import load_weights
from pgolf.io import atomic_write_bytes
from pgolf.quant.artifact import DEFAULT_LEVELS, check_codec, decode_artifact, encode_artifact, read_file
from pgolf.tools import prepare as prep
from pgolf.tools import reexport as rx
from pgolf.tools.pack import compose_train, pack

SAMPLE = Path("fineweb") / "fineweb10BT_legalprefilter_2800docs.jsonl"
TOKENIZER = Path("tokenizers") / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
SCHEMES = {  # conf/export/<name>.yaml -> what it is
    "int6_lite_lzma": "int6 GPTQ-lite",
    "sdclip_gptq_1611": "SDClip GPTQ",
    "sdclip_gptq_record_1611": "SDClip GPTQ + LQER",
}
CODECS = ("lzma", "brotli", "pergroup")
SLOW_DECODE = ("pergroup",)  # lrzip's ZPAQ decodes as slowly as it encodes (~90 s here): checked on one scheme
EXPORT_CODEC = "lzma"  # what the re-export writes; the other codecs re-encode its payload


# ---- 1. data ---------------------------------------------------------------------------------------
def prepare_data(shared: Path, out: Path, train_docs: int, val_docs: int) -> dict:
    """CaseOps shards of the sample's first `val_docs` (validation) and next `train_docs` (training)
    documents in `out` (reused when complete); returns its manifest and the seconds spent."""
    t0 = time.perf_counter()
    tok = shared / TOKENIZER
    if not prep.is_prepared(out, tok.name):
        docs = []
        with open(shared / SAMPLE, encoding="utf-8") as f:
            for _, line in zip(range(val_docs + train_docs), f):
                docs.append(json.loads(line)["text"])
        split = (docs[val_docs:], docs[:val_docs])
        source = {"inputs": [SAMPLE.name], "val_docs": val_docs, "train_docs": train_docs}
        prep.prepare([], out, name="fineweb", tokenizer=tok, documents=split, source=source, caseops_transform=True)
    m = json.loads((out / "manifest.json").read_text())
    return {"manifest": m, "seconds": round(time.perf_counter() - t0, 2)}


def data_overrides(data_dir: Path) -> list[str]:
    """The data group of the record pointed at the prepared folder (a path relative to the repository: the
    packed train_gpt.py refuses absolute paths)."""
    rel = os.path.relpath(data_dir, ROOT)
    return [f"data.dir={rel}", f"data.tokenizer_path={rel}/{TOKENIZER.name}"]


# ---- 2. training -----------------------------------------------------------------------------------
def train(args, data_dir: Path) -> dict:
    """Run train.py (a subprocess, its output into `<run>/bench_train.log`); returns the float weights' path,
    the run's training record and the wall seconds. RuntimeError when the run fails."""
    run = args.work / f"run_{time.strftime('%Y%m%d_%H%M%S')}"
    over = ["experiment=record_1611", "trainer=cpu", "train.compile=false", "train.warmup_steps=0"]
    over += [f"train.iterations={args.steps}", "train.max_wallclock_seconds=0", f"train.seq_len={args.seq_len}"]
    over += [f"train.batch_tokens={args.batch_tokens}", "train.grad_accum=1", "train.log_every=1"]
    over += ["callbacks.averaging.kind=none", "logger=csv", *data_overrides(data_dir)]
    over += ["export=int8_zlib", "export.level=1", "export.fail_over_limit=false"]  # only to save the float weights
    over += ["final_eval.modes=[]", f"final_eval.seq_len={args.seq_len}", f"final_eval.max_tokens={args.seq_len}"]
    over += ["final_eval.batch_windows=1"]  # the eval pads its last batch to batch_windows windows
    over += [f"hydra.run.dir={os.path.relpath(run, ROOT)}"]
    print(f"train: python train.py {' '.join(over)}", flush=True)
    t0 = time.perf_counter()
    run.parent.mkdir(parents=True, exist_ok=True)
    log = args.work / f"{run.name}.train.log"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "train.py", *over], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"train.py failed ({p.returncode}): see {log}")
    losses = [line.split("train_loss:")[1].split()[0] for line in log.read_text().splitlines() if "train_loss:" in line]
    res = json.loads((run / "results.json").read_text())
    return {
        "weights": run / "final_model.float.ptz",
        "overrides": over,
        "training": res["training"],
        "train_losses": [float(x) for x in losses],
        "seconds": round(wall, 1),
        "log": str(log),
    }


def earlier_run(weights: Path) -> dict:
    """What `train` returns, for the float weights of an earlier run: its training record, and the losses of
    the bench's log of that run (`<work>/<run>.train.log`) when there is one."""
    _, meta = load_weights(weights)
    log = weights.parent.parent / f"{weights.parent.name}.train.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    losses = [float(x.split("train_loss:")[1].split()[0]) for x in lines if "train_loss:" in x]
    return {"weights": weights, "training": meta.get("training") or {}, "train_losses": losses, "log": str(log)}


# ---- 3. re-export ----------------------------------------------------------------------------------
def reexport(args, scheme: str, weights: Path, data_dir: Path, pre_quant: bool) -> tuple[dict, float]:
    """`python -m pgolf.tools.reexport WEIGHTS --export SCHEME ...` in this process; (its result, wall s)."""
    over = [f"export={scheme}", "data=fineweb_sp8192_caseops", *data_overrides(data_dir), "device=cpu"]
    over += [f"out_dir={args.work / 'reexport'}", "overwrite=true", *eval_overrides(args)]
    over += [f"eval.pre_quant={str(pre_quant).lower()}", f"export.codec={EXPORT_CODEC}", "export.report_codecs=[]"]
    over += [f"export.level={DEFAULT_LEVELS[EXPORT_CODEC]}", "export.fail_over_limit=false"]
    over += [f"export.calibration.count={args.calib_count}", f"export.calibration.length={args.calib_length}"]
    over += [f"export.gptq.batch={args.calib_batch}"]  # hessian_norm batches: count must be a multiple
    print(f"reexport: python -m pgolf.tools.reexport {weights} {' '.join(over)}", flush=True)
    t0 = time.perf_counter()
    result = rx.reexport(rx.compose_config(str(weights), over))
    return result, time.perf_counter() - t0


def eval_overrides(args) -> list[str]:
    """The validation slice, scored in one batch when it fits 16 windows (the eval pads its last batch to
    `batch_windows` windows: pgolf/eval/core.py)."""
    windows = max(1, min(16, args.eval_tokens // args.seq_len))
    return [f"eval.max_tokens={args.eval_tokens}", f"eval.batch_windows={windows}"]


# ---- 4. codecs -------------------------------------------------------------------------------------
def codec_figures(
    path: Path, codecs: list[str], export_timings: dict, decode_slow: bool
) -> tuple[dict[str, dict], bytes]:
    """{codec: {bytes, encode_s, decode_s, exact}} of the artifact at `path` (written with EXPORT_CODEC) and
    its payload re-encoded with every other codec; and the raw payload. Without `decode_slow` the codecs of
    SLOW_DECODE are not decoded again (decode_s and exact None)."""
    data = read_file(path)
    t0 = time.perf_counter()
    raw, codec = decode_artifact(data)
    out = {codec: {"bytes": len(data), "encode_s": export_timings["compress"], "decode_s": time.perf_counter() - t0}}
    out[codec]["exact"] = True  # the payload the export packed is what was decoded (checksummed)
    for c in codecs:
        if c == codec:
            continue
        check_codec(c, DEFAULT_LEVELS[c])
        t0 = time.perf_counter()
        enc = encode_artifact(raw, c, DEFAULT_LEVELS[c])
        t1 = time.perf_counter()
        out[c] = {"bytes": len(enc), "encode_s": round(t1 - t0, 2), "decode_s": None, "exact": None}
        if decode_slow or c not in SLOW_DECODE:
            back, _ = decode_artifact(enc)
            out[c] |= {"decode_s": round(time.perf_counter() - t1, 2), "exact": back == raw}
    out[codec]["decode_s"] = round(out[codec]["decode_s"], 2)
    return {c: out[c] for c in codecs}, raw


def verify_codec(args, weights: Path, data_dir: Path, result: dict, raw: bytes, codec: str) -> dict:
    """Write `raw` with `codec` beside the lzma artifact and score its round trip on the same tokens; returns
    both val_bpb and whether they are equal."""
    path = Path(result["export"]["path"]).with_suffix(f".{codec}.ptz")
    atomic_write_bytes(path, encode_artifact(raw, codec, DEFAULT_LEVELS[codec]))
    over = ["data=fineweb_sp8192_caseops", *data_overrides(data_dir), "device=cpu", *eval_overrides(args)]
    cfg = rx.compose_config(str(weights), over)
    _, meta = load_weights(weights)
    data = dict(cfg.data)
    tok = TokenizerInfo.from_path(data["tokenizer_path"])
    seq_len, cut = rx.eval_lengths(cfg, meta, data, weights.name)  # the re-export's windows, documents too
    doc = doc_max_seg_len(meta)
    tokens, ctx = rx.validation(cfg, data, tok, tok.vocab_size, seq_len, torch.device("cpu"), doc, cut)
    rep = ExportReport(**{**result["export"], "path": str(path)})
    rt = roundtrip_evaluate(rep, tokens, ctx, {"standard": {}})
    bpb = rt["roundtrip"]["standard"]["val_bpb"]
    ref = result["roundtrip"]["standard"]["val_bpb"]
    return {"codec": codec, "val_bpb": bpb, "lzma_val_bpb": ref, "equal": bpb == ref}


# ---- 5. code bytes ---------------------------------------------------------------------------------
def code_bytes(scheme: str, codec: str) -> int:
    cfg = compose_train(["experiment=record_1611", f"export={scheme}", f"export.codec={codec}"])
    return pack(cfg).code["bytes"]


# ---- the table -------------------------------------------------------------------------------------
COLUMNS = [
    ("scheme", "scheme"),
    ("codec", "codec"),
    ("model_bytes", "model bytes"),
    ("code_bytes", "code bytes"),
    ("total_bytes", "total"),
    ("roundtrip_bpb", "round-trip val_bpb"),
    ("gap_bpb", "gap (bpb)"),
    ("calibration_s", "calibration s"),
    ("hessians_s", "Hessians s"),
    ("quantize_s", "quantize s"),
    ("gptq_s", "of which GPTQ s"),
    ("lqer_s", "LQER s"),
    ("pack_s", "pack s"),
    ("encode_s", "compress s"),
    ("decode_s", "decompress s"),
    ("roundtrip_eval_s", "round-trip eval s"),
]


def fmt(key: str, v) -> str:
    """A table cell: bytes with thousands separators, val_bpb to 4 places, the gap signed to 5, seconds to 2."""
    if v is None:
        return "–"
    if isinstance(v, bool) or isinstance(v, str):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if key == "gap_bpb":
        return f"{v:+.5f}"
    return f"{v:.4f}" if key.endswith("_bpb") else f"{v:.2f}"


def markdown(setup: dict, rows: list[dict], checks: dict) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt(k, r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    lines = [
        "# Quantization check of record_1611 (issue 16)",
        "",
        f"`{setup['command']}`",
        "",
        f"Machine: {setup['machine']}. Load average before/after: {setup['load_before']} / {setup['load_after']}.",
        f"Data: {setup['data']}. Training: {setup['training']}. Evaluation: {setup['evaluation']}. "
        f"Calibration: {setup['calibration']}.",
        "",
        *[head, sep, *body],
        "",
        *[f"- {c}" for c in setup["notes"]],
        "",
        "Checks: " + figures_line(checks),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "quant_1611_bench", help="prepared data and runs")
    ap.add_argument("--train-docs", type=int, default=500)
    ap.add_argument("--val-docs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-count", type=int, default=16)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--calib-batch", type=int, default=8, help="calibration sequences per forward (the record: 48)")
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    ap.add_argument("--verify-codec", default="brotli", help="score this codec's artifact of the last scheme too")
    ap.add_argument("--decode-all", action="store_true", help="decode pergroup for every scheme, not only the last")
    ap.add_argument("--weights", type=Path, help="float weights of an earlier run: no training")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    args.work = args.work.resolve()
    for c in args.codecs:
        check_codec(c, DEFAULT_LEVELS[c])  # a missing lrzip fails now, not after training
    t_all = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    data = prepare_data(args.shared.resolve(), args.work / "caseops_sp8192", args.train_docs, args.val_docs)
    data_dir = args.work / "caseops_sp8192"
    m = data["manifest"]
    print(
        figures_line(
            {"data_s": data["seconds"], "train_tokens": m["train"]["tokens"], "val_tokens": m["val"]["tokens"]}
        )
    )
    trained = earlier_run(args.weights) if args.weights else train(args, data_dir)
    weights = Path(trained["weights"]).resolve()
    if "training" in trained:
        print(
            figures_line({"train_s": trained.get("seconds"), **trained["training"], "losses": trained["train_losses"]})
        )

    rows, schemes, pre, raw, result = [], {}, None, b"", {}
    for i, scheme in enumerate(args.schemes):
        result, wall = reexport(args, scheme, weights, data_dir, pre_quant=i == 0)
        ex = result["export"]
        pre = pre or ex["pre_quant"]
        rt = result["roundtrip"]["standard"]
        t = ex["timings"]
        last = i == len(args.schemes) - 1
        codecs, raw = codec_figures(Path(ex["path"]), args.codecs, t, decode_slow=args.decode_all or last)
        stages = {
            "pre_quant_eval_s": round(ex["pre_quant"]["seconds"], 2) if ex["pre_quant"] else None,
            "calibration_s": t.get("calibration", 0.0),
            "hessians_s": t.get("hessians", 0.0),
            "quantize_s": t.get("quantize", 0.0),
            "gptq_s": t.get("gptq", 0.0),
            "lqer_s": t.get("lqer", 0.0),
            "pack_s": t.get("pack", 0.0),
            "roundtrip_eval_s": round(rt["seconds"], 2),
            "reexport_wall_s": round(wall, 1),
        }
        schemes[scheme] = {"timings": t, "stages": stages, "calibration": ex["calibration"], "codecs": codecs}
        for c, f in codecs.items():
            n_code = code_bytes(scheme, c)
            row = {"scheme": SCHEMES[scheme], "export": scheme, "codec": f"{c}-{DEFAULT_LEVELS[c]}"}
            row |= {"model_bytes": f["bytes"], "code_bytes": n_code, "total_bytes": f["bytes"] + n_code}
            row |= {"fits": f["bytes"] + n_code <= ARTIFACT_LIMIT_BYTES, "prequant_bpb": round(pre["val_bpb"], 6)}
            row |= {"roundtrip_bpb": round(rt["val_bpb"], 6), "gap_bpb": round(rt["val_bpb"] - pre["val_bpb"], 6)}
            row |= {k: v for k, v in stages.items() if k not in ("pre_quant_eval_s", "reexport_wall_s")}
            row |= {"encode_s": f["encode_s"], "decode_s": f["decode_s"], "exact": f["exact"]}
            rows.append(row)
            print(figures_line(row), flush=True)
    decoded = [r["exact"] for r in rows if r["exact"] is not None]
    checks = {"codecs_decoded": len(decoded), "all_decoded_exact": all(decoded)}
    if args.verify_codec and args.verify_codec in args.codecs:
        v = verify_codec(args, weights, data_dir, result, raw, args.verify_codec)
        checks |= {f"{v['codec']}_artifact_roundtrip_bpb": v["val_bpb"], "lzma_roundtrip_bpb": v["lzma_val_bpb"]}
        checks["same_roundtrip"] = v["equal"]
    print(figures_line(checks))
    total_s = round(time.perf_counter() - t_all, 1)
    setup = describe(args, data, trained, pre, total_s, load_before)
    print(figures_line({"total_s": total_s}))
    out = {"setup": setup, "rows": rows, "schemes": schemes, "checks": checks, "training": trained}
    save_json(args.json, repo_relative(out))
    if args.markdown:
        Path(args.markdown).write_text(markdown(setup, rows, checks))


def repo_relative(obj):
    """`obj` through JSON with this checkout's paths written relative to the repository (a recorded result
    names no folder of the machine it ran on)."""
    text = json.dumps(obj, default=str).replace(str(ROOT) + "/", "").replace(str(ROOT.parent) + "/", "../")
    return json.loads(text)


def describe(args, data: dict, trained: dict, pre: dict, total_s: float, load_before: str) -> dict:
    """The setup the table was taken in, in words and figures."""
    m = data["manifest"]
    cmd = "python bench/quant_1611_bench.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in (
            ("steps", args.steps),
            ("seq_len", args.seq_len),
            ("batch_tokens", args.batch_tokens),
            ("eval_tokens", args.eval_tokens),
            ("calib_count", args.calib_count),
            ("calib_length", args.calib_length),
            ("calib_batch", args.calib_batch),
        )
    )
    if args.weights:
        cmd += f" --weights {os.path.relpath(args.weights, ROOT)}"
    tr = trained.get("training") or {}
    losses = trained.get("train_losses") or []
    return {
        "command": cmd,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, fp32, "
        f"{torch.get_num_threads()} threads; the bench took {total_s:.0f} s in all",
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "data": f"CaseOps sp8192 shards of the FineWeb sample: {m['train']['docs']} training documents "
        f"({m['train']['tokens']:,} tokens), {m['val']['docs']} validation documents ({m['val']['tokens']:,} tokens)",
        "training": f"experiment=record_1611 (35,945,671 parameters) for {tr.get('steps', '?')} steps of "
        f"{args.batch_tokens:,} tokens (rows of {args.seq_len}), {tr.get('train_time_ms', 0) / 1000:.0f} s on the "
        f"challenge clock{'' if args.weights is None else ' (an earlier run of this bench, reused by --weights)'}; "
        f"train_loss {losses[0] if losses else '?'} -> {losses[-1] if losses else '?'}",
        "evaluation": f"the first {args.eval_tokens:,} validation targets in windows of {args.seq_len}; "
        f"pre-quantization val_bpb {pre['val_bpb']:.6f}",
        "calibration": f"{args.calib_count} training sequences of {args.calib_length} tokens in forwards of "
        f"{args.calib_batch} (the record: 768 x 2048 in 16 forwards of 48)",
        "notes": [
            "A model trained for a few steps is far from a trained one: these gaps are not the record's "
            "(its logs: pre-quantization 1.0700-1.0712, quantized 1.0796-1.0808).",
            "Codecs are lossless: each codec's bytes decode to the same payload (`exact`), so the round-trip "
            "val_bpb and the gap are the scheme's, whatever the codec.",
            "lzma's compress time is the export's own `compress` stage; brotli and pergroup re-encode the same "
            "payload. The payload header names lzma as the codec: a native export with another codec differs "
            "by a few header bytes.",
            "code bytes: the packed train_gpt.py of experiment=record_1611 with that export and codec.",
            "Times are wall seconds on a 2-core machine shared with other jobs (see the load averages): the same "
            "work can take several times longer in one scheme than in another (GPTQ of the same matrices, or the "
            "Hessians of the same forward), so read them as orders of magnitude.",
            "pergroup's decompress time is measured on the last scheme only (lrzip's ZPAQ is as slow to decode "
            "as to encode); `–` where not measured.",
            "model bytes include the artifact's metadata header (provenance: git SHA, dirty flag), which varies by "
            "about 1 KB between runs of the same weights.",
        ],
    }


if __name__ == "__main__":
    main()
