"""The submission artifact: quantized tensors + metadata, packed without pickle, compressed, checksummed.

File layout (all integers little-endian):
    magic   8 bytes  b"PGOLFART"
    version u16      1
    codec   u8       1 zlib | 2 zstd | 3 lzma
    level   u8       compressor level / preset
    raw_len u64      length of the decompressed payload
    sha256  32 bytes over (version, codec, level, raw_len, compressed payload)
    payload          compressed(raw)
raw = u32 header length + UTF-8 JSON header + tensor bytes. The header lists every tensor (name, kind,
dtype, shape, offset, nbytes, quantization info) and carries the metadata (model config, tokenizer
identity, provenance). Tensor bytes are grouped by dtype (int8 codes together, then fp16, then fp32...)
because like values next to each other compress better.

Loading checks the magic, the checksum (truncation or tampering), the declared sizes against limits
(an oversized header, a decompression bomb) before and while decompressing, and runs no code: it only
parses JSON and copies bytes into tensors.

`python -m pgolf.tools.inspect PATH [--codecs]` prints what an artifact holds (pgolf/tools/inspect.py).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.io import atomic_write_bytes
from pgolf.quant.rules import QuantEntry

MAGIC = b"PGOLFART"
VERSION = 1
PREFIX = struct.Struct("<8sHBBQ32s")
CODECS = {"zlib": 1, "zstd": 2, "lzma": 3}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
DEFAULT_LEVELS = {"zlib": 9, "zstd": 22, "lzma": 9}
MAX_RAW_BYTES = 1 << 30  # 1 GiB: far above any 16 MB artifact, far below a bomb
MAX_HEADER_BYTES = 16 << 20
DTYPE_ORDER = ("int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool")


class ArtifactError(ValueError):
    """An artifact is unreadable, corrupt, tampered with, oversized, or was asked of a missing codec."""


# ---- compressors (zstandard is a dependency of the package, imported with the module) ----------------
def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    if codec not in CODECS:
        raise ArtifactError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    level = DEFAULT_LEVELS[codec] if level is None else int(level)
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    return lzma.compress(data, format=lzma.FORMAT_XZ, preset=level)


def decompress(data: bytes, codec: str, expected_len: int) -> bytes:
    """Decompress at most expected_len bytes; anything longer or shorter is an error (bomb-safe)."""
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, expected_len + 1)
        elif codec == "zstd":
            reader = zstandard.ZstdDecompressor().stream_reader(data)
            out = reader.read(expected_len + 1)
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = d.decompress(data, max_length=expected_len + 1)
        else:
            raise ArtifactError(f"unknown codec {codec!r}")
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"corrupt {codec} payload: {e}") from e
    if len(out) != expected_len:
        raise ArtifactError(
            f"payload decompresses to {'more' if len(out) > expected_len else 'fewer'} bytes than the declared "
            f"{expected_len} (corrupt artifact or decompression bomb)"
        )
    return out


# ---- packing -------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return name, t.view(torch.int16).numpy().tobytes()
    return name, t.numpy().tobytes()


def _from_bytes(buf: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype not in DTYPE_ORDER:
        raise ArtifactError(f"unsupported tensor dtype {dtype!r} in artifact")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ArtifactError(f"invalid tensor shape {shape!r} in artifact")
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype if dtype != "bool" else np.bool_).itemsize
    if int(np.prod(shape, dtype=np.int64)) * itemsize != len(buf):
        raise ArtifactError(f"tensor of shape {shape} {dtype} does not fit its {len(buf)} bytes")
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype=np.int16).copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    arr = np.frombuffer(buf, dtype=np.dtype(dtype if dtype != "bool" else np.bool_)).copy()
    return torch.from_numpy(arr).reshape(shape)


def pack(entries: dict[str, QuantEntry], meta: dict) -> bytes:
    """Serialize quantized entries + metadata into the raw (uncompressed) payload."""
    pieces: list[tuple[str, str, str, bytes, list[int]]] = []  # (dtype, tensor name, field, bytes, shape)
    records = []
    for name, e in entries.items():
        rec = {
            "name": name,
            "kind": e.kind,
            "shape": list(e.shape),
            "orig_dtype": e.orig_dtype,
            "bits": e.bits,
            "info": e.info,
            "fields": {},
        }
        for fld in ("data", "q", "scale"):
            t = getattr(e, fld)
            if t is not None:
                dt, b = _tensor_bytes(t)
                pieces.append((dt, name, fld, b, list(t.shape)))
        records.append(rec)
    by_name = {r["name"]: r for r in records}
    blob = bytearray()
    order = sorted(range(len(pieces)), key=lambda i: (DTYPE_ORDER.index(pieces[i][0]), i))
    for i in order:
        dt, name, fld, b, shape = pieces[i]
        by_name[name]["fields"][fld] = {"dtype": dt, "shape": shape, "offset": len(blob), "nbytes": len(b)}
        blob += b
    header = json.dumps({"format": "pgolf-artifact-v1", "meta": meta, "tensors": records}, sort_keys=True).encode()
    return struct.pack("<I", len(header)) + header + bytes(blob)


def unpack(raw: bytes) -> tuple[dict[str, QuantEntry], dict]:
    if len(raw) < 4:
        raise ArtifactError("payload too short for a header")
    (hlen,) = struct.unpack_from("<I", raw, 0)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(raw):
        raise ArtifactError(f"header length {hlen} is oversized or beyond the payload ({len(raw)} bytes)")
    try:
        header = json.loads(raw[4 : 4 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"artifact header is not valid JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != "pgolf-artifact-v1":
        raise ArtifactError("artifact header has an unknown format")
    blob = memoryview(raw)[4 + hlen :]
    entries: dict[str, QuantEntry] = {}
    for rec in header["tensors"]:
        if rec.get("kind") not in ("raw", "fp16", "fp32", "int"):
            raise ArtifactError(f"tensor {rec.get('name')!r}: unknown storage kind {rec.get('kind')!r}")
        fields = {}
        for fld, f in rec["fields"].items():
            if fld not in ("data", "q", "scale"):
                raise ArtifactError(f"tensor {rec['name']}: unknown field {fld!r}")
            end = f["offset"] + f["nbytes"]
            if f["offset"] < 0 or end > len(blob):
                raise ArtifactError(f"tensor {rec['name']}.{fld}: bytes [{f['offset']}, {end}) lie outside the payload")
            t = _from_bytes(blob[f["offset"] : end], f["dtype"], f["shape"])
            fields[fld] = t
        entries[rec["name"]] = QuantEntry(
            kind=rec["kind"],
            shape=tuple(rec["shape"]),
            orig_dtype=rec["orig_dtype"],
            bits=rec["bits"],
            info=rec.get("info", {}),
            **fields,
        )
    return entries, header["meta"]


# ---- files ---------------------------------------------------------------------------------------
def _digest(version: int, codec_id: int, level: int, raw_len: int, payload: bytes) -> bytes:
    h = hashlib.sha256(struct.pack("<HBBQ", version, codec_id, level, raw_len))
    h.update(payload)
    return h.digest()


def encode_artifact(raw: bytes, codec: str, level: int | None = None) -> bytes:
    level = DEFAULT_LEVELS.get(codec, 0) if level is None else int(level)
    payload = compress(raw, codec, level)
    cid = CODECS[codec]
    return PREFIX.pack(MAGIC, VERSION, cid, level, len(raw), _digest(VERSION, cid, level, len(raw), payload)) + payload


def decode_artifact(data: bytes, max_raw_bytes: int = MAX_RAW_BYTES) -> tuple[bytes, str]:
    if len(data) < PREFIX.size:
        raise ArtifactError(f"file of {len(data)} bytes is too short to be an artifact (truncated?)")
    magic, version, cid, level, raw_len, digest = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ArtifactError("not a pgolf artifact (bad magic bytes)")
    if version != VERSION:
        raise ArtifactError(f"unsupported artifact version {version}")
    if cid not in CODEC_NAMES:
        raise ArtifactError(f"unknown codec id {cid}")
    payload = data[PREFIX.size :]
    if _digest(version, cid, level, raw_len, payload) != digest:
        raise ArtifactError("checksum mismatch: the artifact is truncated or was modified")
    if raw_len > max_raw_bytes:
        raise ArtifactError(
            f"declared payload of {raw_len} bytes exceeds the {max_raw_bytes}-byte limit (decompression bomb?)"
        )
    codec = CODEC_NAMES[cid]
    return decompress(payload, codec, raw_len), codec


def write_artifact(
    path: str | Path, entries: dict[str, QuantEntry], meta: dict, codec: str, level: int | None = None
) -> int:
    """Pack, compress and write atomically; returns the file size in bytes."""
    data = encode_artifact(pack(entries, meta), codec, level)
    atomic_write_bytes(path, data)
    return len(data)


def read_artifact(path: str | Path) -> tuple[dict[str, QuantEntry], dict]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found")
    try:
        raw, _ = decode_artifact(path.read_bytes())
        return unpack(raw)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def codec_sizes(raw: bytes, codecs: list[str], levels: dict[str, int] | None = None) -> dict[str, int]:
    """File size of the same raw payload under each codec (default levels: zstd-22, lzma-9, zlib-9)."""
    out = {}
    for c in codecs:
        lvl = (levels or {}).get(c, DEFAULT_LEVELS.get(c))
        out[f"{c}-{lvl}"] = len(encode_artifact(raw, c, lvl))
    return out


# ---- size accounting ---------------------------------------------------------------------------
@dataclass
class SizeReport:
    model_bytes: int
    code_bytes: int
    limit: int = ARTIFACT_LIMIT_BYTES

    @property
    def total(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def ok(self) -> bool:
        return self.total <= self.limit

    @property
    def margin(self) -> int:
        return self.limit - self.total

    def lines(self, label: str = "") -> list[str]:
        tag = f" {label}" if label else ""
        verdict = "OK" if self.ok else f"FAIL: over the {self.limit:,}-byte limit by {-self.margin:,} bytes"
        return [
            f"Serialized model{tag}: {self.model_bytes} bytes",
            f"Code size: {self.code_bytes} bytes",
            f"Total submission size{tag}: {self.total} bytes (limit {self.limit}, margin {self.margin}) {verdict}",
        ]
