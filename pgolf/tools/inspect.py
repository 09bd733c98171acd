"""`python -m pgolf.tools.inspect PATH [--codecs] [--against OTHER]`: what an artifact holds.

Prints the model config, tokenizer identity, provenance, calibration source and pruning record, a
per-tensor table (shape, storage, bits, bytes before and after compression, share), the margin to
16,000,000 bytes (code: the packed train_gpt.py recorded in the artifact, its length and sha256), and with
`--codecs` the size of the same payload under every codec, so a user can pick one. `--against OTHER`
compares the stored tensors of two artifacts of the same model instead (`diff`): per tensor the integer codes
and scales that differ, the LQER factors and the de-quantized weights' relative difference, so two quantizers,
calibrations or machines can be compared on the same weights. Artifacts are validated as eval.py validates
them (pgolf/export/weights.py) before a tensor is read; a bad file is one line `error: ...` on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pgolf.export.code import code_of, recorded_code_bytes
from pgolf.export.weights import check_model_artifact, read_model_artifact
from pgolf.quant.artifact import (
    ArtifactHeader,
    SizeReport,
    codec_sizes,
    compress,
    decode_artifact,
    load_artifact,
    pack,
    read_file,
)
from pgolf.quant.rules import QuantEntry, dequantize_entry
from pgolf.tools.record_quantized import is_record_quantized, load_record_entries


# ---- inspect -------------------------------------------------------------------------------------
def _raw(key: str, value) -> str:
    """A metadata entry that is not in the shape pgolf writes, shown as it is (JSON)."""
    return f"{key}: {json.dumps(value, sort_keys=True)}"


def _describe_meta(meta: dict) -> list[str]:
    """The metadata's lines: kind, model config, tokenizer, provenance, training, calibration, quantization.
    An entry not in the shape pgolf writes is printed as JSON (the metadata is the artifact's word)."""
    lines = []
    if "kind" in meta:
        lines.append(f"kind: {meta['kind']}")
    if "model" in meta:
        lines.append(f"config: {json.dumps(meta['model'], sort_keys=True)}")
    tok = meta.get("tokenizer")  # validated by check_model_artifact
    lines.append(f"tokenizer: {tok['name']} vocab_size:{tok['vocab_size']} sha256:{tok['sha256']}")
    lines += _provenance_lines(meta)
    for key in ("experiment", "seed", "training"):
        if key in meta:
            lines.append(_raw(key, meta[key]))
    lines += _calibration_lines(meta.get("calibration"))
    q = meta.get("quant")
    if (
        isinstance(q, dict)
        and isinstance(q.get("rules", []), list)
        and all(isinstance(r, dict) for r in q.get("rules", []))
    ):
        rules = ", ".join(str(r.get("name") or r.get("pattern")) for r in q.get("rules", []))
        lines.append(f"quant: label {q.get('label')} codec {q.get('codec')}-{q.get('level')} rules [{rules}]")
        if q.get("gptq"):
            lines.append(_raw("gptq", q["gptq"]))
    elif q:
        lines.append(_raw("quant", q))
    if meta.get("prune"):
        lines.append(_raw("prune", meta["prune"]))
    return lines


def _provenance_lines(meta: dict) -> list[str]:
    prov = meta.get("provenance")
    if not prov:
        lines = ["provenance: (not recorded)"]
    elif not isinstance(prov, dict):
        lines = [_raw("provenance", prov)]
    else:
        d = prov.get("git_dirty")
        dirty = " (dirty)" if d is True else "" if d in (False, None) else f" (git_dirty: {json.dumps(d)})"
        lines = [
            f"provenance: git {prov.get('git_sha', '?')}{dirty} torch {prov.get('torch', '?')} "
            f"lightning {prov.get('lightning', '?')} python {prov.get('python', '?')} device {prov.get('device', '?')} "
            f"date {prov.get('date', '?')}"
        ]
    rx = meta.get("reexport")
    if rx and (not isinstance(rx, dict) or not isinstance(rx.get("provenance", {}), dict)):
        lines.append(_raw("re-exported", rx))
    elif rx:
        rp = rx.get("provenance", {})
        lines.append(
            f"re-exported: from {rx.get('weights')} with git {rp.get('git_sha', '?')} on {rp.get('device', '?')} "
            f"date {rp.get('date', '?')}"
        )
    return lines


def _calibration_lines(cal) -> list[str]:
    if not cal:
        return ["calibration: (not recorded)"]
    if not isinstance(cal, dict):
        return [_raw("calibration", cal)]
    keys = ("count", "length", "temperature", "seed", "seconds", "clock_start_ms", "clock_end_ms", "clock")
    keys += ("inside_training_budget",)
    extra = " ".join(f"{k}:{cal[k]}" for k in keys if k in cal)
    lines = [f"calibration: source:{cal.get('source')} {extra} compliant:{cal.get('compliant')}".rstrip()]
    if cal.get("reason"):
        lines.append(f"calibration reason: {cal['reason']}")
    return lines


def inspect(path: str | Path, codecs: bool = False) -> str:
    """The report of the artifact at `path`, validated as eval.py validates it (`check_model_artifact`);
    each tensor's row is computed as it is read and the tensor dropped, so memory stays at one tensor.
    Raises ArtifactError naming the problem."""
    path = Path(path)
    found: dict[str, tuple] = {}  # each tensor's row, by name
    damped: dict[str, float] = {}  # GPTQ's extra damping of a Hessian that was not positive definite
    validated: list[ArtifactHeader] = []

    def check(h: ArtifactHeader) -> None:
        check_model_artifact(h)
        validated.append(h)

    def row(name: str, e: QuantEntry) -> None:
        one = pack({name: e}, {})
        comp = len(compress(one, validated[0].codec, validated[0].level))
        store = f"int{e.bits}" if e.kind == "int" else e.kind
        bits = e.bits if e.kind == "int" else {"fp16": 16, "fp32": 32}.get(e.kind, 8 * e.data.element_size())
        found[name] = (name, "x".join(map(str, e.shape)) or "scalar", store, bits, len(one), comp)
        if isinstance(e.info.get("extra_damp"), (int, float)):
            damped[name] = e.info["extra_damp"]

    header, _ = load_artifact(path, check=check, sink=row)
    meta, codec, level = header.meta, header.codec, header.level
    lines = [f"artifact: {path.name}  ({header.file_bytes} bytes, codec {codec}-{level}, raw {header.raw_len} bytes)"]
    lines += _describe_meta(meta)
    rows = [found[name] for name in header.tensors]
    total_comp = sum(r[5] for r in rows) or 1
    lines.append(
        f"{'tensor':44s} {'shape':>12s} {'store':>6s} {'bits':>4s} {'raw':>10s} {'compressed*':>12s} {'share':>6s}"
    )
    for name, shape, store, bits, rawb, comp in rows:
        lines.append(
            f"{name:44s} {shape:>12s} {store:>6s} {bits:>4d} {rawb:>10d} {comp:>12d} {100 * comp / total_comp:5.1f}%"
        )
    lines.append(
        f"{'total':44s} {'':>12s} {'':>6s} {'':>4s} {sum(r[4] for r in rows):>10d} {total_comp:>12d} {100.0:5.1f}%"
    )
    lines.append("* compressed alone; the whole payload compresses jointly, so the column sums differ from the file")
    if damped:
        lines.append(
            "gptq extra damping (Hessian not positive definite; x mean diag H): "
            + ", ".join(f"{n} {d:g}" for n, d in damped.items())
        )
    code = code_of(meta)  # the packed train_gpt.py that made the artifact (pgolf/export/code.py)
    n_code = recorded_code_bytes(meta)
    if n_code is None:
        lines.append(
            "code: not recorded (no meta.code or meta.code_bytes, or 0 bytes): the total below counts no code and "
            "cannot be checked against the limit"
        )
    else:
        lines.append(f"code: train_gpt.py {n_code} bytes sha256:{code['sha256'] or 'not recorded'}")
    n_code = n_code or 0
    rep = SizeReport(model_bytes=header.file_bytes, code_bytes=n_code)
    lines += rep.lines()
    if codecs:
        raw, _ = decode_artifact(read_file(path))
        for key, n in codec_sizes(raw, ["zlib", "zstd", "lzma"]).items():
            r = SizeReport(model_bytes=n, code_bytes=n_code)
            lines.append(f"codec {key}: model {n} bytes, total {r.total} bytes, margin {r.margin}")
    return "\n".join(lines)


# ---- two artifacts --------------------------------------------------------------------------------
def _differ(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(elements that differ, max |a − b|) of two stored tensors of one shape (compared in float64)."""
    x, y = a.double(), b.double()
    d = (x - y).abs()
    ne = (x != y) & ~(x.isnan() & y.isnan())  # NaN against a number differs; (d > 0) is False for NaN
    return int(ne.sum()), float(d.max()) if d.numel() else 0.0


def _lqer_state(a: QuantEntry, b: QuantEntry) -> str:
    if a.lqer is None and b.lqer is None:
        return "-"
    if (a.lqer is None) != (b.lqer is None):
        return "only A" if b.lqer is None else "only B"
    fa, fb = a.lqer, b.lqer
    if (fa.mode, fa.group) != (fb.mode, fb.group) or fa.qa.shape != fb.qa.shape or fa.qb.shape != fb.qb.shape:
        return "other form"
    n = sum(_differ(getattr(fa, f), getattr(fb, f))[0] for f in ("qa", "sa", "qb", "sb"))
    return "same" if n == 0 else f"{n} differ"


def diff(path_a: str | Path, path_b: str | Path) -> str:
    """Tensor by tensor comparison of two artifacts of one model (both validated as eval.py validates them):
    for an int tensor the codes that differ (count, share, max |Δq|), how many scales differ (`other`: per row
    against per tensor), the LQER factors (`same`, `N differ` counting factor and scale elements, `only A`/
    `only B`, `other form`); for every tensor the relative Frobenius difference of the de-quantized weights
    ‖W_A − W_B‖/‖W_A‖ (`abs ‖W_A − W_B‖` where W_A is all zero); then a summary line. B may be a record's own
    quantized file (PR #1611's `final_model.int6.ptz`, pgolf/tools/record_quantized.py), read with A's model
    config. Raises ArtifactError for a bad file, ValueError when the artifacts do not hold the same tensors
    with the same shapes."""
    head, ea = read_model_artifact(path_a)
    if is_record_quantized(path_b):  # a record's own final_model.int6.ptz, read as A's model
        eb = load_record_entries(path_b, head.meta["model"])[0]
    else:
        eb = read_model_artifact(path_b)[1]
    if ea.keys() != eb.keys() or any(ea[k].shape != eb[k].shape for k in ea):
        odd = sorted(ea.keys() ^ eb.keys()) or [k for k in ea if ea[k].shape != eb[k].shape]
        raise ValueError(f"the artifacts do not hold the same tensors (first difference: {odd[0]})")
    lines = [f"A: {Path(path_a).name}", f"B: {Path(path_b).name}"]
    cols = ("store A/B", 11), ("codes differ", 16), ("max|dq|", 7), ("scales", 7), ("lqer", 10), ("rel dW", 12)
    lines.append(f"{'tensor':44s} " + " ".join(f"{c:>{w}s}" for c, w in cols))
    n_codes = n_diff = n_int = n_int_diff = n_float_diff = n_store = 0
    lqer_rows: list[str] = []
    for name in ea:
        a, b = ea[name], eb[name]
        store = f"{a.kind if a.kind != 'int' else f'int{a.bits}'}/{b.kind if b.kind != 'int' else f'int{b.bits}'}"
        wa, wb = dequantize_entry(a).double(), dequantize_entry(b).double()
        d, na = float((wa - wb).norm()), float(wa.norm())
        rel = f"{d / na:.2e}" if na > 0 else f"abs {d:.2e}"  # A all zero: the absolute difference, marked
        codes = scales = lq = "-"
        dq = ""
        if a.kind == "int" and b.kind == "int" and a.bits == b.bits:
            nd, mx = _differ(a.q, b.q)
            n_int += 1
            n_codes += a.q.numel()
            n_diff += nd
            n_int_diff += nd > 0
            codes, dq = f"{nd} ({100 * nd / max(a.q.numel(), 1):.2f}%)", f"{mx:g}"
            scales = str(_differ(a.scale, b.scale)[0]) if a.scale.shape == b.scale.shape else "other"
            lq = _lqer_state(a, b)
            if lq != "-":
                lqer_rows.append(f"{name}: {lq}")
        elif a.kind != "int" and b.kind != "int":
            nd = _differ(a.data, b.data)[0]
            n_float_diff += nd != 0
            codes = f"{nd} values"
        else:  # stored differently (e.g. fp16 against int codes): counted, and LQER only one side has is shown
            n_store += 1
            lq = _lqer_state(a, b)
            if lq != "-":
                lqer_rows.append(f"{name}: {lq}")
        lines.append(f"{name:44s} {store:>11s} {codes:>16s} {dq:>7s} {scales:>7s} {lq:>10s} {rel:>12s}")
    share = 100 * n_diff / max(n_codes, 1)
    lines.append(
        f"codes: {n_diff} of {n_codes} differ ({share:.3f}%) in {n_int_diff} of {n_int} int tensors; "
        f"float tensors that differ: {n_float_diff}; stored differently: {n_store}; "
        f"LQER: {'; '.join(lqer_rows) or 'none'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--codecs", action="store_true", help="also the payload's size under zlib-9, zstd-22, lzma-9")
    ap.add_argument(
        "--against",
        metavar="OTHER",
        help="compare the stored tensors with another artifact's (or a record's final_model.int6.ptz)",
    )
    a = ap.parse_args(argv)
    try:
        print(diff(a.path, a.against) if a.against else inspect(a.path, codecs=a.codecs))
    except (ValueError, OSError) as e:  # ArtifactError is a ValueError: one line, no traceback
        print(f"error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
