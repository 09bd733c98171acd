"""How much an artifact's compressed size depends on its metadata: the same payload with header-only changes
(`variants`), compressed as one stream (artifact version 1) and as pgolf writes it now (version 2: the header
and the tensor bytes as two streams, pgolf/quant/artifact.py `compress_payload`).

    python bench/codec_stability.py ARTIFACT [--codecs lzma zstd brotli] [--json FILE]

One line per codec, layout and variant, then per codec and layout the smallest and largest size. With one
stream the tensor bytes' compressed size follows the bytes before them; with two it cannot (the tensors'
stream is byte-identical across the variants, checked by its sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import time
from concurrent.futures import ProcessPoolExecutor

from common import figures_line, save_json

from pgolf.quant.artifact import DEFAULT_LEVELS, compress, compress_payload, decode_artifact, read_file


def variants(raw: bytes) -> dict[str, bytes]:
    """The payload as it is and three that differ in the header only, each still a valid payload: the lowest
    bit of the first date's minute digit flipped, and one or two spaces after the header's JSON (its length
    word updated; the tensors' offsets count from the header's end). ValueError when the header holds no date."""
    hlen = struct.unpack_from("<I", raw)[0]
    i = raw.find(b'"date": "', 4, 4 + hlen)
    if i < 0:
        raise ValueError("the artifact's header records no date")
    i += len(b'"date": "') + len("YYYY-MM-DDTHH:")  # the minute's first digit
    out = {"as written": raw, "date bit flipped": raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :]}
    for k in (1, 2):
        out[f"+{k} space"] = struct.pack("<I", hlen + k) + raw[4 : 4 + hlen] + b" " * k + raw[4 + hlen :]
    return out


def size(job: tuple[str, str, str, bytes]) -> dict:
    codec, layout, name, raw = job
    t = time.perf_counter()
    data = (compress if layout == "one stream" else compress_payload)(raw, codec, DEFAULT_LEVELS[codec])
    row = {"codec": f"{codec}-{DEFAULT_LEVELS[codec]}", "layout": layout, "variant": name, "bytes": len(data)}
    if layout == "two streams":
        n = struct.unpack_from("<I", data)[0]
        row["tensor_stream_sha256"] = hashlib.sha256(data[4 + n :]).hexdigest()[:16]
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--codecs", nargs="+", default=["lzma", "zstd", "brotli"])
    ap.add_argument("--json")
    args = ap.parse_args()
    raw, _ = decode_artifact(read_file(args.artifact))
    pays = variants(raw)
    print(f"payload:{len(raw)} bytes; variants: {', '.join(pays)} (the header only differs)")
    layouts = ("one stream", "two streams")
    jobs = [(c, layout, name, p) for c in args.codecs for layout in layouts for name, p in pays.items()]
    rows = []
    with ProcessPoolExecutor(2) as ex:
        for row in ex.map(size, jobs):
            rows.append(row)
            print(figures_line(row), flush=True)
    summary = []
    for c in args.codecs:
        for layout in ("one stream", "two streams"):
            got = [r for r in rows if r["codec"].startswith(f"{c}-") and r["layout"] == layout]
            n = [r["bytes"] for r in got]
            line = {"codec": got[0]["codec"], "layout": layout, "min": min(n), "max": max(n), "spread": max(n) - min(n)}
            if layout == "two streams":
                line["tensor_stream_identical"] = len({r["tensor_stream_sha256"] for r in got}) == 1
            summary.append(line)
            print(figures_line(line))
    if args.json:
        save_json(args.json, {"artifact": args.artifact, "payload_bytes": len(raw), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
