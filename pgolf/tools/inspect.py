"""`python -m pgolf.tools.inspect PATH [--codecs]`: what an artifact holds.

Prints the model config, tokenizer identity, provenance, calibration source and pruning record, a
per-tensor table (shape, storage, bits, bytes before and after compression, share), the margin to
16,000,000 bytes (code: the packed train_gpt.py recorded in the artifact, its length and sha256), and with
`--codecs` the size of the same payload under every codec, so a user can pick one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pgolf.export.code import code_of
from pgolf.quant.artifact import PREFIX, ArtifactError, SizeReport, codec_sizes, compress, decode_artifact, pack, unpack


# ---- inspect -------------------------------------------------------------------------------------
def _describe_meta(meta: dict) -> list[str]:
    """The metadata's lines: kind, model config, tokenizer, provenance, training, calibration, quantization."""
    lines = []
    if "kind" in meta:
        lines.append(f"kind: {meta['kind']}")
    if "model" in meta:
        lines.append(f"config: {json.dumps(meta['model'], sort_keys=True)}")
    tok = meta.get("tokenizer")
    if tok:
        lines.append(f"tokenizer: {tok.get('name')} vocab_size:{tok.get('vocab_size')} sha256:{tok.get('sha256', '?')}")
    else:
        lines.append("tokenizer: (not recorded)")
    lines += _provenance_lines(meta)
    for key in ("experiment", "seed", "training"):
        if key in meta:
            lines.append(f"{key}: {json.dumps(meta[key], sort_keys=True)}")
    lines += _calibration_lines(meta.get("calibration"))
    q = meta.get("quant")
    if q:
        rules = ", ".join(r.get("name") or str(r.get("pattern")) for r in q.get("rules", []))
        lines.append(f"quant: label {q.get('label')} codec {q.get('codec')}-{q.get('level')} rules [{rules}]")
        if q.get("gptq"):
            lines.append(f"gptq: {json.dumps(q['gptq'], sort_keys=True)}")
    if meta.get("prune"):
        lines.append(f"prune: {json.dumps(meta['prune'], sort_keys=True)}")
    return lines


def _provenance_lines(meta: dict) -> list[str]:
    prov = meta.get("provenance")
    if not prov:
        lines = ["provenance: (not recorded)"]
    else:
        dirty = {True: " (dirty)", False: "", None: ""}.get(prov.get("git_dirty"), "")
        lines = [
            f"provenance: git {prov.get('git_sha', '?')}{dirty} torch {prov.get('torch', '?')} "
            f"lightning {prov.get('lightning', '?')} python {prov.get('python', '?')} device {prov.get('device', '?')} "
            f"date {prov.get('date', '?')}"
        ]
    rx = meta.get("reexport")
    if rx:
        rp = rx.get("provenance", {})
        lines.append(
            f"re-exported: from {rx.get('weights')} with git {rp.get('git_sha', '?')} on {rp.get('device', '?')} "
            f"date {rp.get('date', '?')}"
        )
    return lines


def _calibration_lines(cal: dict | None) -> list[str]:
    if not cal:
        return ["calibration: (not recorded)"]
    keys = ("count", "length", "temperature", "seed", "seconds", "inside_training_budget")
    extra = " ".join(f"{k}:{cal[k]}" for k in keys if k in cal)
    lines = [f"calibration: source:{cal.get('source')} {extra} compliant:{cal.get('compliant')}".rstrip()]
    if cal.get("reason"):
        lines.append(f"calibration reason: {cal['reason']}")
    return lines


def inspect(path: str | Path, codecs: bool = False) -> str:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found")
    data = path.read_bytes()
    raw, codec = decode_artifact(data)
    entries, meta = unpack(raw)
    _, _, _, level, raw_len, _ = PREFIX.unpack_from(data, 0)
    lines = [f"artifact: {path.name}  ({len(data)} bytes, codec {codec}-{level}, raw {raw_len} bytes)"]
    lines += _describe_meta(meta)
    rows = []
    for name, e in entries.items():
        one = pack({name: e}, {})
        comp = len(compress(one, codec, level))
        store = f"int{e.bits}" if e.kind == "int" else e.kind
        bits = e.bits if e.kind == "int" else {"fp16": 16, "fp32": 32}.get(e.kind, 8 * e.data.element_size())
        rows.append((name, "x".join(map(str, e.shape)) or "scalar", store, bits, len(one), comp))
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
    code = code_of(meta)  # the packed train_gpt.py that made the artifact (pgolf/export/code.py)
    n_code = code["bytes"] if code["sha256"] else int(meta.get("code_bytes", 0))
    lines.append(f"code: train_gpt.py {n_code} bytes sha256:{code['sha256'] or 'not recorded'}")
    rep = SizeReport(model_bytes=len(data), code_bytes=n_code)
    lines += rep.lines()
    if codecs:
        for key, n in codec_sizes(raw, ["zlib", "zstd", "lzma"]).items():
            r = SizeReport(model_bytes=n, code_bytes=n_code)
            lines.append(f"codec {key}: model {n} bytes, total {r.total} bytes, margin {r.margin}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--codecs", action="store_true", help="also the payload's size under zlib-9, zstd-22, lzma-9")
    a = ap.parse_args(argv)
    try:
        print(inspect(a.path, codecs=a.codecs))
    except (ArtifactError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
