"""The submission artifact: quantized tensors + metadata, packed without pickle, compressed, checksummed.

File layout (all integers little-endian):
    magic   8 bytes  b"PGOLFART"
    version u16      2 (1: files written before 2026-12-02, still read)
    codec   u8       1 zlib | 2 zstd | 3 lzma | 4 brotli | 5 pergroup | 6 pergroup_brotli
    level   u8       compressor level / preset / brotli quality (pergroup: the groups' lrzip -L level)
    raw_len u64      length of the decompressed payload
    sha256  32 bytes over (version, codec, level, raw_len, compressed payload)
    payload          version 2, zlib/zstd/lzma/brotli: u32 n + compressed(u32 + header) (n bytes) +
                     compressed(tensor bytes), two streams; version 1, and the pergroup codecs: compressed(raw)
raw = u32 header length + UTF-8 JSON header + tensor bytes. The two streams of version 2 make the tensor
bytes' compressed size independent of the metadata: in one stream, a one-bit change of the header's date
moved lzma-9's size of a record_1611 payload (36 MB) by 206,368 bytes (1.2%), zstd-22's by 27,355 and
brotli-11's by 418, so the same weights gave a different size on every run (bench/results/README.md).
The header lists every tensor (name, kind, dtype, shape, offset, nbytes, quantization info) and carries the
metadata (model config, tokenizer identity, provenance). Tensor bytes are grouped by dtype (int8 codes
together, then fp16, then fp32...) because like values next to each other compress better.

brotli is quality 0..11 with a 2^24-byte window (PR #1611's settings). `pergroup` and `pergroup_brotli` are
PR #1611's per-group container (pgolf/quant/pergroup.py): the block matrices' and the embedding's int8 codes
in 7 role groups, rows reordered, transposed, compressed by `lrzip -z` (ZPAQ, an external program: a missing
one is an error when writing and when reading, never a fallback) or by brotli, and the rest of the payload by
brotli-11; decompression reproduces the raw payload bit for bit, so everything below applies unchanged. Its
reader decompresses the remainder first (the header is at its start), learns from the checked header which
tensors each group holds and how many bytes each stream must give, checks the streams' lengths against that,
runs the caller's `check`, and only then decompresses the groups, each bounded by its expected size.

Reading is bounded and validates before it allocates: the file's size is checked (stat) before it is read
(MAX_FILE_BYTES), then the magic and the checksum (truncation or tampering), the declared payload length,
and the header, decompressed alone (at most MAX_HEADER_BYTES) and checked whole: known keys and types,
unique tensor names, known storage kinds and dtypes, field shapes that agree with their tensor and its
storage kind, byte ranges that tile the payload exactly. A caller's `check` (pgolf/export/weights.py: the
model config and the tensor table it implies) runs next; only then is the tensor payload decompressed,
straight into the tensors, a bounded chunk at a time, and its length checked again (a decompression bomb).
The compressed stream must end exactly where the file does: bytes after its end (or a stream cut before its
end marker) are refused, for every codec, naming the count (zstd: from the frame's block headers, before
anything is decompressed). Every problem is one `ArtifactError` naming the field. No code runs: JSON is
parsed and bytes copied.

`python -m pgolf.tools.inspect PATH [--codecs]` prints what an artifact holds (pgolf/tools/inspect.py).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import brotli
import numpy as np
import torch
import zstandard

from pgolf import ARTIFACT_LIMIT_BYTES, optional
from pgolf.io import atomic_write_bytes
from pgolf.quant import pergroup as _pergroup_part  # noqa: F401  (registers the optional part: pgolf/optional.py)
from pgolf.quant.brotli_io import BrotliReader, brotli_compress
from pgolf.quant.numerics import LQER_MODES, LQERFactors, code_bounds
from pgolf.quant.rules import QuantEntry

MAGIC = b"PGOLFART"
VERSION_SINGLE = 1  # the payload is one compressed stream (written before 2026-12-02)
VERSION = 2  # what pgolf writes: a plain codec's header and tensor bytes compressed as two streams
VERSIONS = (VERSION_SINGLE, VERSION)
SPLIT_CODECS = ("zlib", "zstd", "lzma", "brotli")  # the codecs whose version-2 payload is two streams
SEGMENT = struct.Struct("<I")  # version 2: the first stream's compressed length
PREFIX = struct.Struct("<8sHBBQ32s")
CODECS = {"zlib": 1, "zstd": 2, "lzma": 3, "brotli": 4, "pergroup": 5, "pergroup_brotli": 6}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
DEFAULT_LEVELS = {"zlib": 9, "zstd": 22, "lzma": 9, "brotli": 11, "pergroup": 9, "pergroup_brotli": 11}
LEVELS = {"zlib": range(0, 10), "zstd": range(0, 23), "lzma": range(0, 10), "brotli": range(0, 12)}
LEVELS |= {"pergroup": range(1, 10), "pergroup_brotli": range(0, 12)}  # what a file may declare
PERGROUP_BACKENDS = {"pergroup": "lrzip", "pergroup_brotli": "brotli"}  # codec -> the groups' compressor
MAX_RAW_BYTES = 1 << 30  # 1 GiB: far above any 16 MB artifact, far below a bomb
# An artifact file is never read past this size (checked with stat first): four times the challenge's
# 16,000,000-byte cap, so an over-cap artifact is still read, scored and reported as not compliant.
MAX_FILE_BYTES = 4 * ARTIFACT_LIMIT_BYTES
MAX_HEADER_BYTES = 1 << 20  # a real header (~150 tensors + metadata) is well under 100 KB
MAX_NDIM = 8
MAX_DIM = 1 << 31
MAX_NAME_CHARS = 256
LZMA_MEMLIMIT = 1 << 28  # an xz stream may not ask for more decoder memory (preset 9 needs ~65 MiB)
IN_CHUNK = 1 << 20  # compressed bytes handed to the decompressor per step
OUT_CHUNK = 1 << 24  # decompressed bytes copied into a tensor per step (bounds the transient buffer)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_BLOCK_SLACK = 1024  # blocks a zstd payload may have beyond one per KiB of output (pgolf's: one per 128 KiB)
BROTLI_PROBE = 4096  # the piece size of the search for where a brotli stream ends (`_brotli_trailing`)
DTYPE_ORDER = ("int8", "uint8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool")
ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "float16": 2, "bfloat16": 2, "float32": 4}
ITEMSIZE |= {"float64": 8, "bool": 1}
STORE_FIELDS = {"raw": ("data",), "fp16": ("data",), "fp32": ("data",), "int": ("q", "scale")}
LQER_FIELDS = ("lqer_qa", "lqer_sa", "lqer_qb", "lqer_sb")  # an int matrix's LQER factors (all or none)


def _pg():
    """pgolf/quant/pergroup.py, the optional part `pergroup` (left out of a packed train_gpt.py whose export does
    not use the per-group codecs). Raises ArtifactError when it is not loaded."""
    try:
        return optional.get("pergroup")
    except LookupError as e:
        raise ArtifactError(f"the per-group codecs are not in this program: {e}") from None


class ArtifactError(ValueError):
    """An artifact is unreadable, corrupt, tampered with, oversized, or was asked of a missing codec."""


# ---- compressors (zstandard and brotli are dependencies of the package, imported with the module) -----
def check_codec(codec: str, level: int | None = None) -> int:
    """The level `codec` will use (its default when `level` is None), after checking the codec is known, the
    level in its range (LEVELS) and the codec's external program present (`lrzip` for pergroup). Raises
    ArtifactError naming the problem, before any work."""
    if codec not in CODECS:
        raise ArtifactError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    level = DEFAULT_LEVELS[codec] if level is None else int(level)
    if level not in LEVELS[codec]:
        lo, hi = LEVELS[codec][0], LEVELS[codec][-1]
        raise ArtifactError(f"codec level {level} is out of range for {codec} ({lo}..{hi})")
    if PERGROUP_BACKENDS.get(codec) == "lrzip":
        try:
            _pg().lrzip_path()
        except ValueError as e:  # PerGroupError
            raise ArtifactError(str(e)) from None
    return level


def compress(data: bytes, codec: str, level: int | None = None) -> bytes:
    """`data` compressed by `codec` at `level` (default DEFAULT_LEVELS). pergroup codecs need `data` to be a
    payload of `pack` (they route its tensors). Raises ArtifactError (check_codec; a pergroup payload whose
    header is invalid; lrzip failing)."""
    level = check_codec(codec, level)
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_XZ, preset=level)
    if codec == "brotli":
        return brotli_compress(data, level)
    table, hlen = _payload_table(data)
    try:
        return _pg().encode(data, _routing(table, hlen), PERGROUP_BACKENDS[codec], level)
    except ValueError as e:  # PerGroupError included
        raise ArtifactError(f"{codec}: {e}") from None


def _payload_table(raw: bytes) -> tuple[dict[str, TensorRecord], int]:
    """(tensor table, header length) of a payload to compress with a pergroup codec: its header checked as
    the reader checks it, the tensor bytes tiling from 0 to the sum of their lengths (bytes after that are
    kept, as the remainder's; the reader then refuses them against the declared length)."""
    stream = _Inflate(raw, None, len(raw))
    try:
        hb, header = _read_header(stream, len(raw))
    except ArtifactError as e:
        raise ArtifactError(f"a pergroup codec compresses a pgolf payload (pack): {e}") from None
    try:
        tiled = sum(f["nbytes"] for t in header["tensors"] for f in t["fields"].values())
    except (KeyError, TypeError, AttributeError):
        tiled = len(raw) - 4 - len(hb)  # check_table names what is wrong
    return check_table(header, tiled)[1], len(hb)


def _routing(table: dict[str, TensorRecord], hlen: int) -> list:
    """The per-group routing of a checked table: the int code fields, at their offsets in the raw payload."""
    ints = [(t.name, t.fields["q"]) for t in table.values() if t.kind == "int"]
    return _pg().route((name, q.dtype, q.shape, 4 + hlen + q.offset) for name, q in ints)


def decompress(data: bytes, codec: str, expected_len: int, version: int = VERSION_SINGLE) -> bytes:
    """Decompress at most expected_len bytes; anything longer or shorter, or bytes after the end of the
    stream, is an error (bomb-safe). A pergroup payload is decoded through its header, which is checked
    (check_table) on the way; a version-2 payload of a plain codec (`version`) as its two streams."""
    if codec in PERGROUP_BACKENDS:
        stream = _open_stream(data, codec, expected_len)
        hb, header = _read_header(stream, expected_len)
        stream.set_table(check_table(header, expected_len - 4 - len(hb))[1], len(hb))
        rest = stream.read(expected_len - 4 - len(hb))
        stream.finish()
        return struct.pack("<I", len(hb)) + hb + rest
    if codec == "brotli" or (version != VERSION_SINGLE and codec in SPLIT_CODECS):
        stream = _open_stream(data, codec, expected_len, version)
        out = stream.read(expected_len)
        stream.finish()
        return out
    try:
        if codec == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, expected_len + 1)
        elif codec == "zstd":
            _check_zstd_frame(memoryview(data), expected_len)
            reader = zstandard.ZstdDecompressor().stream_reader(data)
            out = reader.read(expected_len + 1)
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
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
    if codec != "zstd":  # zstd's end was checked from its block headers
        _check_end(codec, d, 0)
    return out


def _trailing(codec: str, n: int) -> ArtifactError:
    return ArtifactError(f"{n} bytes of data after the end of the {codec} stream (corrupt or forged artifact)")


def _check_end(codec: str, d, unread: int) -> None:
    """A zlib or lzma decompressor `d` that gave the whole payload must be at its stream's end, with nothing
    after it (`d.unused_data` plus `unread` bytes never handed to it). Raises ArtifactError."""
    if not d.eof:
        raise ArtifactError(f"corrupt {codec} payload: the stream stops before its end marker (truncated)")
    if len(d.unused_data) + unread:
        raise _trailing(codec, len(d.unused_data) + unread)


def _check_zstd_frame(src: memoryview, raw_len: int) -> None:
    """A zstd payload must be one frame that ends at its last byte, read from its headers alone before
    anything is decompressed (RFC 8878, 3.1.1: magic, frame header, blocks of a 3-byte header each, the last
    one flagged, then a 4-byte checksum if the header says so). pgolf writes one frame of one block per
    128 KiB; more than one block per KiB of `raw_len` plus ZSTD_BLOCK_SLACK is refused, which bounds the
    walk. Raises ArtifactError naming the bytes after the frame, or what is corrupt."""
    head = bytes(src[:18])  # a frame header is at most 18 bytes
    if head[:4] != ZSTD_MAGIC:
        raise ArtifactError("corrupt zstd payload: it does not start with a zstd frame")
    try:
        pos = zstandard.frame_header_size(head)
        checksum = zstandard.get_frame_parameters(head).has_checksum
    except zstandard.ZstdError as e:
        raise ArtifactError(f"corrupt zstd payload: {e}") from None
    for _ in range(raw_len // 1024 + ZSTD_BLOCK_SLACK):
        if pos + 3 > len(src):
            break
        block = int.from_bytes(src[pos : pos + 3], "little")  # bit 0: last; bits 1-2: type; the rest: size
        if block >> 1 & 3 == 3:
            raise ArtifactError("corrupt zstd payload: a block of the reserved type")
        pos += 3 + (1 if block >> 1 & 3 == 1 else block >> 3)  # an RLE block stores one byte
        if block & 1:
            end = pos + 4 * checksum
            if end < len(src):
                raise _trailing("zstd", len(src) - end)
            if end == len(src):
                return
            break
    else:
        raise ArtifactError(f"corrupt zstd payload: more blocks than {raw_len // 1024 + ZSTD_BLOCK_SLACK}")
    raise ArtifactError("corrupt zstd payload: the frame stops before its last block (truncated)")


def _brotli_trailing(src: memoryview) -> int:
    """The bytes after the end of the brotli stream that starts `src` (0 when it does not end before `src`
    does: a corrupt or truncated stream). brotli's decoder refuses input after a stream's end only as
    "decoder failed", saying neither that nor where; so, on that error only, the stream is decoded again
    (output discarded): BROTLI_PROBE-byte pieces find the piece where decoding stops, then that piece is
    fed one byte at a time."""
    pos, done = _brotli_feed(src, 0, BROTLI_PROBE)
    if not done:
        pos, done = _brotli_feed(src, pos, 1)
    return len(src) - pos if done else 0


def _brotli_feed(src: memoryview, fine: int, step: int) -> tuple[int, bool]:
    """(bytes fed when a fresh decoder finished or failed, whether it finished), fed IN_CHUNK bytes at a time
    up to `fine`, then `step` bytes at a time, its output drained OUT_CHUNK at a time and discarded."""
    d, pos = brotli.Decompressor(), 0
    while pos < len(src):
        piece = src[pos : min(pos + IN_CHUNK, fine)] if pos < fine else src[pos : pos + step]
        try:
            out = d.process(piece, output_buffer_limit=OUT_CHUNK)
            while out and not d.can_accept_more_data():
                out = d.process(b"", output_buffer_limit=OUT_CHUNK)
        except brotli.error:
            return pos, False
        pos += len(piece)
        if d.is_finished():
            return pos, True
    return pos, False


# ---- packing -------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return name, t.view(torch.int16).numpy().tobytes()
    return name, t.numpy().tobytes()


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
        if e.lqer is not None:
            for fld in LQER_FIELDS:
                t = getattr(e.lqer, fld.removeprefix("lqer_"))
                dt, b = _tensor_bytes(t.contiguous())
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


# ---- files ---------------------------------------------------------------------------------------
def _digest(version: int, codec_id: int, level: int, raw_len: int, payload: bytes) -> bytes:
    h = hashlib.sha256(struct.pack("<HBBQ", version, codec_id, level, raw_len))
    h.update(payload)
    return h.digest()


def compress_payload(raw: bytes, codec: str, level: int | None = None) -> bytes:
    """The compressed payload a version-2 file holds: for zlib, zstd, lzma and brotli, u32 n + the stream of
    `raw`'s length word and header (n bytes) + the stream of its tensor bytes, so the tensors' compressed size
    does not depend on the metadata (a raw that is not `pack`'s puts everything in the second stream); for the
    pergroup codecs `compress(raw)` (its tensor groups are streams of their own already). Raises ArtifactError
    (`compress`)."""
    if codec not in SPLIT_CODECS:
        return compress(raw, codec, level)
    split = 4 + struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else 0
    if split > len(raw):
        split = 0
    head = compress(raw[:split], codec, level)
    return SEGMENT.pack(len(head)) + head + compress(raw[split:], codec, level)


def encode_artifact(raw: bytes, codec: str, level: int | None = None) -> bytes:
    """An artifact file (version 2) of the raw payload `raw` compressed by `codec` at `level`."""
    level = DEFAULT_LEVELS.get(codec, 0) if level is None else int(level)
    payload = compress_payload(raw, codec, level)
    cid = CODECS[codec]
    return PREFIX.pack(MAGIC, VERSION, cid, level, len(raw), _digest(VERSION, cid, level, len(raw), payload)) + payload


def _prefix(data: bytes | memoryview, max_raw_bytes: int) -> tuple[str, int, int, memoryview, int]:
    """(codec, level, raw_len, compressed payload, version) of a file's bytes, after the magic, version, codec
    id, checksum and declared length are checked."""
    if len(data) < PREFIX.size:
        raise ArtifactError(f"file of {len(data)} bytes is too short to be an artifact (truncated?)")
    magic, version, cid, level, raw_len, digest = PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ArtifactError("not a pgolf artifact (bad magic bytes)")
    if version not in VERSIONS:
        raise ArtifactError(f"unsupported artifact version {version}")
    if cid not in CODEC_NAMES:
        raise ArtifactError(f"unknown codec id {cid}")
    if level not in LEVELS[CODEC_NAMES[cid]]:
        raise ArtifactError(
            f"codec level {level} is out of range for {CODEC_NAMES[cid]} (0..{LEVELS[CODEC_NAMES[cid]][-1]})"
        )
    payload = memoryview(data)[PREFIX.size :]
    if _digest(version, cid, level, raw_len, payload) != digest:
        raise ArtifactError("checksum mismatch: the artifact is truncated or was modified")
    if raw_len > max_raw_bytes:
        raise ArtifactError(
            f"declared payload of {raw_len} bytes exceeds the {max_raw_bytes}-byte limit (decompression bomb?)"
        )
    return CODEC_NAMES[cid], level, raw_len, payload, version


def decode_artifact(data: bytes, max_raw_bytes: int = MAX_RAW_BYTES) -> tuple[bytes, str]:
    """(the whole decompressed payload, codec name) of an artifact file's bytes (nothing in it validated
    beyond the prefix and its length, except a pergroup payload's header, which its decoding needs;
    `load_artifact` is the validating reader). Raises ArtifactError."""
    codec, _, raw_len, payload, version = _prefix(data, max_raw_bytes)
    return decompress(payload, codec, raw_len, version), codec


def _open_stream(src: bytes | memoryview, codec: str, raw_len: int, version: int = VERSION_SINGLE) -> _Inflate:
    """The decompressed payload of a file's compressed bytes as a bounded stream (version 2 of a plain codec:
    its two streams one after the other, `_Segments`)."""
    if version != VERSION_SINGLE and codec in SPLIT_CODECS:
        return _Segments(src, codec, raw_len)
    return _Inflate(src, codec, raw_len)


class _Inflate:
    """The decompressed payload as a stream, produced at most `n` bytes at a time from compressed input fed
    IN_CHUNK bytes at a time, so memory stays bounded whatever the stream declares. `codec` None: `src` is
    the payload itself. A per-group container (pgolf/quant/pergroup.py `PayloadStream`, the optional part
    `pergroup`) streams its remainder (brotli, the header at its start) until the header is known; then, told
    the checked table (`set_table`: the routing, every stream's length checked against it), the routed
    matrices' bytes, decoded all groups at once on the first read that reaches one (so after the caller's
    `check`), spliced in at their offsets. Memory: the decoded matrices (each released once read) plus their
    compressed groups."""

    def __init__(self, src: bytes | memoryview, codec: str | None, raw_len: int):
        self.src, self.codec, self.raw_len = memoryview(src), codec, raw_len
        self.pos, self.tail = 0, b""
        if codec == "zlib":
            self.d = zlib.decompressobj()
        elif codec == "lzma":
            self.d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
        elif codec == "zstd":
            _check_zstd_frame(self.src, raw_len)
            self.d = zstandard.ZstdDecompressor().stream_reader(self.src, read_size=IN_CHUNK)
        elif codec == "brotli":
            self.d = BrotliReader(self.src, IN_CHUNK)
        elif codec in PERGROUP_BACKENDS:
            try:
                self.d = _pg().PayloadStream(
                    self.src, PERGROUP_BACKENDS[codec], lambda rest: _Inflate(rest, "brotli", raw_len)
                )
            except ValueError as e:  # PerGroupError
                raise ArtifactError(str(e)) from None
        elif codec is not None:
            raise ArtifactError(f"unknown codec {codec!r}")

    def set_table(self, table: dict[str, TensorRecord], hlen: int) -> None:
        """Told the checked tensor table once the header is read (the per-group stream routes by it)."""
        if self.codec in PERGROUP_BACKENDS:
            try:
                self.d.set_table(_routing(table, hlen), hlen)
            except ValueError as e:  # PerGroupError
                raise ArtifactError(str(e)) from None

    def _feed(self) -> bytes:
        chunk = self.src[self.pos : self.pos + IN_CHUNK]
        self.pos += len(chunk)
        return chunk

    def _produce(self, n: int) -> bytes:
        """Up to n (> 0) bytes; b"" only at the end of the stream."""
        if self.codec is None:
            out = bytes(self.src[self.pos : self.pos + n])
            self.pos += len(out)
            return out
        if self.codec in ("zstd", "brotli") or self.codec in PERGROUP_BACKENDS:
            return self.d.read(n)
        for _ in range(len(self.src) // IN_CHUNK + 3):  # each round feeds input or returns
            if self.codec == "zlib":
                if self.d.eof:  # what follows is in unused_data (and, stale, in the tail)
                    return b""
                data = self.tail or self._feed()
                out = self.d.decompress(data, n)
                self.tail = self.d.unconsumed_tail
                if out or self.d.eof or not data:
                    return out
            else:
                if self.d.eof:
                    return b""
                data = self._feed() if self.d.needs_input else b""
                if self.d.needs_input and not data:
                    return b""
                out = self.d.decompress(data, max_length=n)
                if out:
                    return out
        return b""

    def produce(self, n: int) -> bytes:
        try:
            return self._produce(n)
        except ArtifactError:
            raise
        except ValueError as e:  # PerGroupError
            raise ArtifactError(str(e)) from None
        except Exception as e:  # zlib.error, lzma.LZMAError (incl. memlimit), zstandard.ZstdError, brotli.error
            if self.codec == "brotli" and (n := _brotli_trailing(self.src)):
                raise _trailing("brotli", n) from None
            raise ArtifactError(f"corrupt {self.codec} payload: {e}") from e

    def readinto(self, out: memoryview) -> None:
        """Fill `out` (a byte view) exactly; fewer bytes than it holds is an ArtifactError."""
        filled = 0
        while filled < len(out):
            chunk = self.produce(min(OUT_CHUNK, len(out) - filled))
            if not chunk:
                where = "pergroup stream remainder: " if self.codec in PERGROUP_BACKENDS else ""
                raise ArtifactError(
                    f"{where}payload decompresses to fewer bytes than the declared {self.raw_len} (corrupt artifact)"
                )
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(memoryview(buf))
        return bytes(buf)

    def finish(self) -> None:
        """The stream must end exactly at the declared length (anything more: a decompression bomb), and the
        compressed bytes with it (zlib, lzma: nothing after the stream's end; zstd: checked when opened;
        brotli: its reader refuses more input)."""
        if self.produce(1):
            raise ArtifactError(
                f"payload decompresses to more bytes than the declared {self.raw_len} (corrupt artifact or "
                "decompression bomb)"
            )
        self.end_of_stream()

    def end_of_stream(self) -> None:
        """A plain codec's stream that gave all it holds ends at its end marker, with nothing after it (zstd:
        both checked from its frame when opened; brotli: its reader refuses more input). Raises ArtifactError."""
        if self.codec in ("zlib", "lzma"):
            _check_end(self.codec, self.d, len(self.src) - self.pos)
        elif self.codec == "brotli" and not self.d.d.is_finished():
            raise ArtifactError("corrupt brotli payload: the stream stops before its end marker (truncated)")


class _Segments(_Inflate):
    """A version-2 payload of a plain codec (u32 n + the header's stream of n bytes + the tensor bytes'
    stream) read as one stream: the first stream to its end (which must be a proper end, nothing after it
    in its n bytes), then the second; `finish` checks the second's end. Each
    stream is bounded as `_Inflate` bounds one, and the sum by the declared length."""

    def __init__(self, src: bytes | memoryview, codec: str, raw_len: int):
        src = memoryview(src)
        if len(src) < SEGMENT.size:
            raise ArtifactError(f"{codec} payload of {len(src)} bytes is too short for its two streams (truncated)")
        (n,) = SEGMENT.unpack_from(src)
        if SEGMENT.size + n > len(src):
            raise ArtifactError(
                f"{codec} payload: its first stream's declared {n} bytes run past the payload's {len(src)}"
            )
        self.src, self.codec, self.raw_len = src, codec, raw_len
        self.parts = [_Inflate(src[SEGMENT.size : SEGMENT.size + n], codec, raw_len)]
        self.rest = src[SEGMENT.size + n :]

    def set_table(self, table: dict[str, TensorRecord], hlen: int) -> None:
        """Told once the header is read: the first stream must have held exactly it (u32 + `hlen` bytes), as the
        writer splits it; any other split is refused (a forged file), whatever the two streams give together."""
        if self.rest is None or self.parts[0].produce(1):
            raise ArtifactError(
                f"{self.codec} payload: its first stream must hold exactly the header's {4 + hlen} bytes, it holds "
                f"{'fewer' if self.rest is None else 'more'} (corrupt or forged artifact)"
            )

    def _produce(self, n: int) -> bytes:
        while True:
            out = self.parts[-1].produce(n)
            if out or self.rest is None:
                return out
            self.parts[-1].end_of_stream()  # the first stream ends properly before the second begins
            self.parts.append(_Inflate(self.rest, self.codec, self.raw_len))
            self.rest = None

    def end_of_stream(self) -> None:
        self.parts[-1].end_of_stream()


# ---- the header ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldRecord:
    """One stored array of a tensor: dtype name, shape, and its bytes [offset, offset + nbytes) in the
    tensor payload (the bytes after the header)."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the header's table: name, storage kind, shape and dtype of the tensor it restores,
    integer bits (kind int), quantization info, and its stored fields (data | q + scale)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    orig_dtype: str
    bits: int
    info: dict
    fields: dict[str, FieldRecord]


@dataclass(frozen=True)
class ArtifactHeader:
    """What an artifact declares, validated, before any tensor is allocated: the metadata, the tensor table
    (in file order), codec and level, file size, declared payload length and header length (bytes)."""

    meta: dict
    tensors: dict[str, TensorRecord]
    codec: str
    level: int
    file_bytes: int
    raw_len: int
    header_bytes: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data after the header (the fields tile exactly these)."""
        return self.raw_len - 4 - self.header_bytes


def _int(v, what: str, lo: int = 0, hi: int | None = None) -> int:
    """`v` as an integer in [lo, hi] (not a bool, not a float), else ArtifactError naming `what`."""
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ArtifactError(f"{what} must be an integer {rng}, got {v!r}")
    return v


def _shape(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise ArtifactError(f"{what} must be a list of at most {MAX_NDIM} sizes, got {v!r}")
    return tuple(_int(d, f"{what}[{i}]", 0, MAX_DIM) for i, d in enumerate(v))


def _keys(d, want: set[str], what: str, optional: frozenset[str] = frozenset()) -> dict:
    """`d` as a JSON object with exactly the keys `want` (and any of `optional`), else ArtifactError."""
    if not isinstance(d, dict):
        raise ArtifactError(f"{what} must be a JSON object, got {type(d).__name__}")
    missing, unknown = sorted(want - set(d)), sorted(set(d) - want - optional)
    if missing:
        raise ArtifactError(f"{what}: missing keys {missing}")
    if unknown:
        raise ArtifactError(f"{what}: unknown keys {unknown}")
    return d


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _field(f, what: str) -> FieldRecord:
    _keys(f, {"dtype", "shape", "offset", "nbytes"}, what)
    if f["dtype"] not in DTYPE_ORDER:
        raise ArtifactError(f"{what}.dtype: unsupported tensor dtype {f['dtype']!r} (one of {', '.join(DTYPE_ORDER)})")
    shape = _shape(f["shape"], f"{what}.shape")
    rec = FieldRecord(f["dtype"], shape, _int(f["offset"], f"{what}.offset"), _int(f["nbytes"], f"{what}.nbytes"))
    if _numel(shape) * ITEMSIZE[rec.dtype] != rec.nbytes:
        raise ArtifactError(f"{what}: tensor of shape {list(shape)} {rec.dtype} does not fit its {rec.nbytes} bytes")
    return rec


def _record(rec, what: str) -> TensorRecord:
    """One entry of the header's `tensors` list, checked: types, kind, fields and their agreement."""
    _keys(rec, {"name", "kind", "shape", "orig_dtype", "bits", "fields"}, what, optional={"info"})
    name = rec["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ArtifactError(f"{what}.name must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    what = f"tensor {name!r}"
    kind = rec["kind"]
    if kind not in STORE_FIELDS:
        raise ArtifactError(f"{what}: unknown storage kind {kind!r} (one of {', '.join(STORE_FIELDS)})")
    shape = _shape(rec["shape"], f"{what}.shape")
    orig = rec["orig_dtype"]
    if orig not in DTYPE_ORDER:
        raise ArtifactError(f"{what}.orig_dtype: unsupported tensor dtype {orig!r}")
    bits = _int(rec["bits"], f"{what}.bits", 2, 8) if kind == "int" else _int(rec["bits"], f"{what}.bits", 0, 64)
    info = rec.get("info", {})
    if not isinstance(info, dict):
        raise ArtifactError(f"{what}.info must be a JSON object")
    lq = isinstance(rec["fields"], dict) and kind == "int" and any(k in rec["fields"] for k in LQER_FIELDS)
    want = set(STORE_FIELDS[kind]) | (set(LQER_FIELDS) if lq else set())
    fields = {k: _field(f, f"{what}.fields.{k}") for k, f in _keys(rec["fields"], want, f"{what}.fields").items()}
    if lq:
        lqi = info.get("lqer")
        if not isinstance(lqi, dict) or lqi.get("mode") not in LQER_MODES:
            raise ArtifactError(f"{what}.info.lqer must say the factors' mode ({LQER_MODES})")
        if len(shape) != 2:
            raise ArtifactError(f"{what}: LQER factors need a 2-D tensor, got shape {list(shape)}")
        _check_lqer_fields(fields, lqi, shape, what)
    out = TensorRecord(name, kind, shape, orig, bits, info, fields)
    _check_storage(out, what)
    return out


def _check_lqer_fields(fields: dict[str, FieldRecord], lqi: dict, shape: tuple[int, ...], what: str) -> None:
    """The LQER factors' declared dtypes and shapes against the matrix [rows, cols] and `info.lqer` (group or
    bits), before any of them is read (pgolf/quant/lqer.py; PR #1797's asymmetric form or the symmetric one).
    Raises ArtifactError naming the field."""
    rows, cols = shape
    qa, sa, qb, sb = (fields[k] for k in LQER_FIELDS)
    if len(qa.shape) != 2 or qa.shape[0] != rows or not 1 <= qa.shape[1] <= min(rows, cols):
        raise ArtifactError(f"{what}.fields.lqer_qa must be [{rows}, r <= {min(rows, cols)}], got {list(qa.shape)}")
    r = qa.shape[1]
    if lqi["mode"] == "asym":
        group = _int(lqi.get("group"), f"{what}.info.lqer.group", 1, r * cols)
        if (r * cols) % group:
            raise ArtifactError(f"{what}.info.lqer.group {group} must divide r*cols = {r * cols}")
        want_sa = (1,) if sa.shape == (1,) else ()  # one 0-d scale; [1] in artifacts written before 2026-11-30
        want_sb = ((r * cols) // group,)
    else:
        _int(lqi.get("bits"), f"{what}.info.lqer.bits", 2, 8)
        want_sa, want_sb = (rows,), (r,)
    for k, f, dt, want in (
        ("lqer_qa", qa, "int8", (rows, r)),
        ("lqer_qb", qb, "int8", (r, cols)),
        ("lqer_sa", sa, "float16", want_sa),
        ("lqer_sb", sb, "float16", want_sb),
    ):
        if f.dtype != dt or f.shape != want:
            raise ArtifactError(f"{what}.fields.{k} must be {dt} {list(want)}, got {f.dtype} {list(f.shape)}")


def _check_storage(t: TensorRecord, what: str) -> None:
    """The stored fields agree with the tensor: what `dequantize_entry` (pgolf/quant/rules.py) needs."""
    want = {"raw": t.orig_dtype, "fp16": "float16", "fp32": "float32"}
    if t.kind in want:
        d = t.fields["data"]
        if d.dtype != want[t.kind] or d.shape != t.shape:
            raise ArtifactError(
                f"{what}.fields.data: {t.kind} storage of a {list(t.shape)} {t.orig_dtype} tensor must be "
                f"{list(t.shape)} {want[t.kind]}, got {list(d.shape)} {d.dtype}"
            )
        return
    q, s = t.fields["q"], t.fields["scale"]
    if q.dtype != "int8" or q.shape != t.shape:
        raise ArtifactError(f"{what}.fields.q must be {list(t.shape)} int8, got {list(q.shape)} {q.dtype}")
    rows_ok = len(t.shape) >= 1 and s.shape == t.shape[:1]
    if s.dtype not in ("float16", "float32") or not (s.shape == (1,) or rows_ok):
        raise ArtifactError(
            f"{what}.fields.scale must be float16/float32 of shape [1] or [rows={t.shape[:1]}], got "
            f"{list(s.shape)} {s.dtype}"
        )


def check_table(header, payload_bytes: int) -> tuple[dict, dict[str, TensorRecord]]:
    """(meta, tensor table) of a parsed JSON header, every key checked; the fields' byte ranges must tile
    [0, payload_bytes) exactly (no overlap, no gap, nothing after). Raises ArtifactError naming the field."""
    _keys(header, {"format", "meta", "tensors"}, "artifact header")
    if header["format"] != "pgolf-artifact-v1":
        raise ArtifactError(f"artifact header has an unknown format {header['format']!r}")
    if not isinstance(header["meta"], dict):
        raise ArtifactError("artifact header: meta must be a JSON object")
    if not isinstance(header["tensors"], list):
        raise ArtifactError("artifact header: tensors must be a list")
    table: dict[str, TensorRecord] = {}
    for i, rec in enumerate(header["tensors"]):
        t = _record(rec, f"tensors[{i}]")
        if t.name in table:
            raise ArtifactError(f"tensor {t.name!r} is listed twice in the artifact header")
        table[t.name] = t
    spans = sorted((f.offset, f.nbytes, f"{t.name}.{k}") for t in table.values() for k, f in t.fields.items())
    for off, n, what in spans:
        if off + n > payload_bytes:
            raise ArtifactError(
                f"tensor {what}: bytes [{off}, {off + n}) lie outside the payload ({payload_bytes} bytes)"
            )
    pos = 0
    for off, n, what in spans:
        if off != pos:
            raise ArtifactError(
                f"tensor {what}: bytes start at {off}, expected {pos} (overlapping or gapped tensor bytes)"
            )
        pos += n
    if pos != payload_bytes:
        raise ArtifactError(f"the tensor payload holds {payload_bytes - pos} bytes after the last tensor")
    return header["meta"], table


def _read_header(stream: _Inflate, raw_len: int) -> tuple[bytes, object]:
    """(the header's bytes, its parsed JSON), its length bounded first."""
    if raw_len < 4:
        raise ArtifactError("payload too short for a header")
    (hlen,) = struct.unpack("<I", stream.read(4))
    if hlen > MAX_HEADER_BYTES or 4 + hlen > raw_len:
        raise ArtifactError(
            f"header length {hlen} is oversized (limit {MAX_HEADER_BYTES}) or beyond the payload ({raw_len} bytes)"
        )
    hb = stream.read(hlen)
    try:
        return hb, json.loads(hb.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, a number over 4300 digits, deep nesting
        raise ArtifactError(f"artifact header is not valid JSON: {str(e)[:200]}") from None


def _parse_header(stream: _Inflate, raw_len: int) -> tuple[dict, dict[str, TensorRecord], int]:
    hb, header = _read_header(stream, raw_len)
    meta, table = check_table(header, raw_len - 4 - len(hb))
    stream.set_table(table, len(hb))
    return meta, table, len(hb)


def _read_tensors(
    stream: _Inflate, table: dict[str, TensorRecord], sink: Callable[[str, QuantEntry], None] | None = None
) -> dict[str, QuantEntry]:
    """Every field decompressed straight into its own array, in payload order; then the stream must end.
    Returns the entries in table order, or, with `sink`, hands each entry to `sink(name, entry)` as soon
    as its last field is read, keeps none and returns {}."""
    arrays: dict[tuple[str, str], torch.Tensor] = {}
    left = {t.name: len(t.fields) for t in table.values()}
    out: dict[str, QuantEntry] = {}
    for _, name, k in sorted((f.offset, t.name, k) for t in table.values() for k, f in t.fields.items()):
        f = table[name].fields[k]
        npdt = np.int16 if f.dtype == "bfloat16" else np.bool_ if f.dtype == "bool" else np.dtype(f.dtype)
        arr = np.empty(f.shape, dtype=npdt)
        stream.readinto(memoryview(arr.reshape(-1)).cast("B"))
        t = torch.from_numpy(arr)
        arrays[name, k] = t.view(torch.bfloat16) if f.dtype == "bfloat16" else t
        left[name] -= 1
        if left[name] == 0:
            rec = table[name]
            fields = {fk: arrays.pop((name, fk)) for fk in rec.fields}
            lq = {fk.removeprefix("lqer_"): fields.pop(fk) for fk in LQER_FIELDS if fk in fields}
            factors = None
            if lq:
                i = rec.info["lqer"]
                if i["mode"] == "asym":
                    lq["sa"] = lq["sa"].reshape(())  # one scale: 0-d (artifacts written before 2026-11-30 hold [1])
                factors = LQERFactors(mode=i["mode"], group=int(i.get("group", 0)), bits=int(i.get("bits", 0)), **lq)
                try:
                    factors.check(*rec.shape, what=f"tensor {name!r}.lqer")
                except ValueError as err:
                    raise ArtifactError(str(err)) from None
            if rec.kind == "int" and fields["q"].numel():
                lo, hi = code_bounds(rec.bits, full_range=True)
                qlo, qhi = int(fields["q"].min()), int(fields["q"].max())
                if qlo < lo or qhi > hi:
                    raise ArtifactError(
                        f"tensor {name!r}: int{rec.bits} codes must lie in [{lo}, {hi}], found [{qlo}, {qhi}]"
                    )
            entry = QuantEntry(
                rec.kind, rec.shape, rec.orig_dtype, bits=rec.bits, info=rec.info, lqer=factors, **fields
            )
            if sink is None:
                out[name] = entry
            else:
                sink(name, entry)
    stream.finish()
    return {n: out[n] for n in table if n in out}


def unpack(raw: bytes) -> tuple[dict[str, QuantEntry], dict]:
    """(entries, meta) of a decompressed payload, header and table checked first. Raises ArtifactError."""
    stream = _Inflate(raw, None, len(raw))
    meta, table, _ = _parse_header(stream, len(raw))
    return _read_tensors(stream, table), meta


def write_artifact(
    path: str | Path, entries: dict[str, QuantEntry], meta: dict, codec: str, level: int | None = None
) -> int:
    """Pack, compress and write atomically; returns the file size in bytes."""
    data = encode_artifact(pack(entries, meta), codec, level)
    atomic_write_bytes(path, data)
    return len(data)


def read_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes, its size checked before it is read (and
    again while reading, should it grow). Raises ArtifactError."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: artifact not found") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
    if not path.is_file():
        raise ArtifactError(f"{path}: not a regular file")
    if st.st_size > max_bytes:
        raise ArtifactError(f"{path}: file of {st.st_size} bytes exceeds the {max_bytes}-byte cap on artifact files")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise ArtifactError(f"{path}: file grew past the {max_bytes}-byte cap on artifact files while read")
    return data


def load_artifact(
    path: str | Path,
    *,
    check: Callable[[ArtifactHeader], None] | None = None,
    tensors: bool = True,
    sink: Callable[[str, QuantEntry], None] | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> tuple[ArtifactHeader, dict[str, QuantEntry]]:
    """(validated header, entries) of an artifact file. The file's size (at most `max_file_bytes`), prefix,
    checksum and header are checked, then `check(header)` runs (raising ArtifactError to refuse it), all
    before any tensor is allocated; with `tensors=False` nothing more is decompressed and the entries are
    {}; with `sink`, each entry goes to `sink(name, entry)` once read and the entries returned are {}.
    Memory: the file's bytes plus the stored tensors (at most the declared payload; with `sink`, only the
    entries not yet complete) plus one OUT_CHUNK; a pergroup file adds its routed matrices, decoded at once
    (twice their size while a group is split). Every problem is an ArtifactError `<path>: <what, naming the
    field>`."""
    data = read_file(path, max_file_bytes)
    try:
        codec, level, raw_len, payload, version = _prefix(data, MAX_RAW_BYTES)
        stream = _open_stream(payload, codec, raw_len, version)
        meta, table, hlen = _parse_header(stream, raw_len)
        header = ArtifactHeader(meta, table, codec, level, len(data), raw_len, hlen)
        if check is not None:
            check(header)
        return header, (_read_tensors(stream, table, sink) if tensors else {})
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def read_artifact(path: str | Path, **kw) -> tuple[dict[str, QuantEntry], dict]:
    """(entries, meta) of an artifact file: `load_artifact` (same keywords)."""
    header, entries = load_artifact(path, **kw)
    return entries, header.meta


def codec_sizes(raw: bytes, codecs: list[str], levels: dict[str, int] | None = None) -> dict[str, int]:
    """File size of the same raw payload under each codec (default levels DEFAULT_LEVELS: zstd-22, lzma-9,
    zlib-9, brotli-11, pergroup-9, pergroup_brotli-11)."""
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
