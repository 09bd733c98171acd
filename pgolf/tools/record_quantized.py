"""A record's own quantized model as pgolf artifact entries: the `final_model.int6.ptz` PR #1611
(records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) writes, so its very
codes, scales and LQER factors can be compared with pgolf's (`python -m pgolf.tools.inspect --against`) and
evaluated by pgolf (eval.py, e.g. phased TTT) after `python -m pgolf.tools.reexport final_model.int6.ptz
model=record_1611 ...` has written them into a pgolf artifact; and the other way, a pgolf artifact written as
the record's file (`python -m pgolf.tools.record_quantized ARTIFACT --out final_model.int6.ptz`), so the record's
own `deserialize` and evaluation (its phased TTT) run on pgolf's codes.

The record's `gptq_mixed_quantize` returns a flat dict `w` of tensors and a dict `m` {weight name: category}:
`passthrough (float16)` (the tensor itself under its name, fp16, or as it is when not floating),
`gptq (int6)` / `gptq (int7)` with `+lqer_asym` or `+lqer` (`<name>.q` int8 codes, `<name>.scale` fp16 row
scales; the asymmetric LQER factors `<name>.lqA_a`, `.lqAs_a`, `.lqB_a`, `.lqBs_a`, the symmetric ones
`.lqA`, `.lqAs`, `.lqB`, `.lqBs`), and `gate_int8_row` (the attention gates `*.attn_gate_w`, int8 per row:
`.gq` codes, `.gs` fp16 row scales).
Its names are the unbanked per-layer ones (`blocks.<i>.attn.c_q.weight`, ...), pgolf's names but for the
SmearGate (pgolf/model/banks.py RENAMES). The file is either

- `COMPRESSOR=brotli` / `lzma`: `torch.save({"w": w, "m": m})`, optionally byte-shuffled (the bytes prefixed
  `BSHF` + stride, then byte j of every stride-sized word together), then brotli or xz;
- `COMPRESSOR=pergroup` (PR #1611's own): the `PGRP` container (pgolf/quant/pergroup.py: magic, 9 stream
  lengths, the 7 role groups of int8 codes through `lrzip -z`, the remainder, the uint16 row orders). The
  remainder is `torch.save({"r": every other tensor, "m": m, "s": {group key: [shape per layer]}})` through
  brotli; a group's matrices are its layers 0, 1, ... in order, each transposed after its rows were put in the
  stored order (the hot groups tok_emb, c_q, mlp.fc).

Reading is bounded and pickle-free: with the model config (`model=`, always given by reexport and inspect)
every decompression is capped at what that model's tensors can take (4 bytes a parameter + 16 MiB; 1 GiB
without it) and a per-group shape manifest must list the model's own shapes before any group or row order is
decompressed (so an `lrzip -d` runs on at most the model's codes: pgolf's bounded decoder, 120 s + 1 s per 50
KB declared); a torch.save is read weights-only from its checked zip container, a tensor larger than its stored
bytes (an expanded view) is refused before it is copied, and every tensor's name, shape, dtype, finiteness,
code range and category is checked against the model config before an entry is made. Problems raise
ArtifactError naming the file and what is wrong.
"""

from __future__ import annotations

import argparse
import io
import lzma
import math
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import torch

from pgolf.export.weights import (
    FLOAT_KIND,
    MAX_FLOAT_FILE_BYTES,
    check_model_config,
    expected_state,
    load_torch_file,
    read_model_artifact,
)
from pgolf.model.banks import RENAMES
from pgolf.quant.artifact import LZMA_MEMLIMIT, MAX_FILE_BYTES, MAX_RAW_BYTES, ArtifactError, load_artifact
from pgolf.quant.artifact import MAGIC as ARTIFACT_MAGIC
from pgolf.quant.brotli_io import BrotliReader, brotli_compress
from pgolf.quant.numerics import LQERFactors
from pgolf.quant.pergroup import (
    GROUPS,
    HOT,
    MAGIC,
    PERMS_LGWIN,
    PerGroupError,
    brotli_decompress,
    decode_matrix,
    encode_matrix,
    group_of,
    lrzip_compress,
    lrzip_decompress,
    lrzip_path,
    nn_chain,
    pack_container,
    split_container,
)
from pgolf.quant.rules import QuantEntry
from pgolf.tools.record_weights import write_new

SHUFFLE_MAGIC = b"BSHF"
XZ_MAGIC = b"\xfd7zXZ\x00"
# The record's group keys, in pgolf/quant/pergroup.py GROUPS order: a block role as `<role>.weight.q`, the
# embedding as `_tok_emb.weight.q`.
RECORD_GROUP_KEYS = {
    "tok_emb": "_tok_emb.weight.q",
    "c_k": "attn.c_k.weight.q",
    "c_q": "attn.c_q.weight.q",
    "c_v": "attn.c_v.weight.q",
    "attn.proj": "attn.proj.weight.q",
    "mlp.fc": "mlp.fc.weight.q",
    "mlp.proj": "mlp.proj.weight.q",
}
CODE_KEYS = (".q", ".scale")  # a GPTQ'd matrix's int8 codes and fp16 scales
GATE_KEYS = (".gq", ".gs")  # an attention gate's (category gate_int8_row)
LQER_KEYS = {"asym": (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"), "sym": (".lqA", ".lqAs", ".lqB", ".lqBs")}
LQER_SYM_BITS = 4  # the record's LQER_FACTOR_BITS, the range of its symmetric fallback's codes
CATEGORY = re.compile(r"(?:gptq \(int([2-8])\)(\+lqer_asym|\+lqer)?|gate_int8_row|passthrough \(float16\))")
FORMATS = ("pergroup", "brotli", "lzma")


def _head(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def is_record_quantized(path: str | Path) -> bool:
    """Whether `path` looks like a record's quantized file rather than a torch.save zip or a pgolf artifact:
    a `PGRP` container, an xz stream (`has_record_magic`), or (by its `.ptz` suffix and not `PGOLFART`/zip) a
    brotli stream, which has no magic bytes."""
    head = _head(path)
    plain = Path(path).suffix == ".ptz" and head[:4] != b"PK\x03\x04" and head != ARTIFACT_MAGIC
    return _record_magic(head) or plain


def has_record_magic(path: str | Path) -> bool:
    """Whether `path` starts as a record's pergroup container (`PGRP`) or xz file does (a brotli one cannot be
    told from other bytes)."""
    return _record_magic(_head(path))


def _record_magic(head: bytes) -> bool:
    return head[:4] == MAGIC or head[:6] == XZ_MAGIC


def read_record_quantized(
    path: str | Path, model: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(w, m, format) of a record's quantized file: the tensors by the record's names, the category of each
    weight, and which of FORMATS it was. With `model` (a config), every decompression is capped by what that
    model's tensors can take and a pergroup manifest must be the model's shapes, before anything is
    decompressed past the remainder. Raises ArtifactError `<path>: <what>`."""
    path = Path(path)
    cap, groups = MAX_RAW_BYTES, None
    try:
        if model is not None:
            want = expected_state(check_model_config(model, "model"), "model")
            cap = min(MAX_RAW_BYTES, 4 * sum(math.prod(s) for s, _ in want.values()) + (16 << 20))
            groups = _model_groups(want)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ArtifactError(f"{size} bytes, over the limit of {MAX_FILE_BYTES} for a quantized model")
        data = path.read_bytes()
        if data[:4] == MAGIC:
            w, m = _read_pergroup(data, cap, groups)
            return w, m, "pergroup"
        fmt = "lzma" if data[:6] == XZ_MAGIC else "brotli"
        obj = _load_torch_bytes(_unshuffle(_inflate(data, fmt, cap)), "quantized state")
        if not isinstance(obj, dict) or set(obj) != {"w", "m"}:
            raise ArtifactError(f"expected the record's {{'w': tensors, 'm': categories}}, got {_describe(obj)}")
        return _tensors(obj["w"], "w"), _categories(obj["m"]), fmt
    except PerGroupError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def load_record_entries(path: str | Path, model: dict) -> tuple[dict[str, QuantEntry], str]:
    """(pgolf's entries, format) of a record's quantized file for a model of config `model`:
    `read_record_quantized`, then `record_entries`. Raises ArtifactError `<path>: <what>`."""
    w, m, fmt = read_record_quantized(path, model)
    try:
        return record_entries(w, m, model), fmt
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None


def _inflate(data: bytes, fmt: str, cap: int = MAX_RAW_BYTES) -> bytearray:
    """brotli or xz of `data`, at most `cap` bytes produced. Raises ArtifactError."""
    out = bytearray()
    try:
        if fmt == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT)
            out += d.decompress(data, max_length=cap + 1)
            if len(out) <= cap and not d.eof:
                raise ArtifactError("truncated xz stream")
            if d.unused_data:
                raise ArtifactError(f"{len(d.unused_data)} bytes after the xz stream")
        else:
            r = BrotliReader(data)
            while len(out) <= cap:
                chunk = r.read(min(1 << 24, cap + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
            if len(out) <= cap and not r.d.is_finished():
                raise ArtifactError("truncated brotli stream")
    except (lzma.LZMAError, brotli.error) as e:
        if fmt == "brotli":  # a brotli stream has no magic bytes: the file may be anything
            raise ArtifactError(
                f"neither a pgolf artifact (bad magic bytes) nor a record's brotli-compressed quantized model ({e})"
            ) from None
        raise ArtifactError(f"not an xz stream of a quantized model ({e})") from None
    if len(out) > cap:
        raise ArtifactError(f"decompresses to more than {cap} bytes")
    return out


def _unshuffle(raw: bytearray) -> bytearray | np.ndarray:
    """Undo the record's byte shuffle (`BSHF`, stride s, then byte j of every s-byte word for j < s; a final
    partial word's bytes go to the first positions) when `raw` carries it."""
    if raw[:4] != SHUFFLE_MAGIC:
        return raw
    if len(raw) < 5:
        raise ArtifactError("byte-shuffled payload without its stride")
    stride, body = raw[4], np.frombuffer(raw, dtype=np.uint8, offset=5)
    if stride < 2:
        return body
    n, out, pos = body.size, np.empty(body.size, dtype=np.uint8), 0
    for j in range(stride):
        k = n // stride + (1 if j < n % stride else 0)
        out[j::stride] = body[pos : pos + k]
        pos += k
    return out


def _load_torch_bytes(raw: bytes | bytearray | np.ndarray, what: str):
    """The object of a torch.save zip held in memory (any buffer, written as it is, not copied), read
    weights-only from its checked container (pgolf/export/weights.py `load_torch_file`); the tensors are copied
    out of the mapped temporary file."""
    with tempfile.TemporaryDirectory(prefix="pgolf-record-") as tmp:
        p = Path(tmp) / "state.pt"
        p.write_bytes(raw)
        obj = load_torch_file(p, what)
        return _detach(obj)


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        if obj.numel() * obj.element_size() > obj.untyped_storage().nbytes():  # a stride-0 (expanded) view
            raise ArtifactError(f"a tensor of shape {list(obj.shape)} is larger than its stored bytes (a forged view)")
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _describe(obj) -> str:
    return f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else type(obj).__name__


def _tensors(w, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(w, dict):
        raise ArtifactError(f"{what} must map names to tensors, got {_describe(w)}")
    bad = next((k for k in w if not isinstance(k, str)), None)
    if bad is not None:
        raise ArtifactError(f"{what} must map names to tensors: a key {str(bad)[:80]!r} is {type(bad).__name__}")
    bad = next((k for k, v in w.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ArtifactError(f"{what} must map names to tensors: {bad[:80]!r} is {type(w[bad]).__name__}")
    return w


def _categories(m) -> dict[str, str]:
    if not isinstance(m, dict):
        raise ArtifactError(f"the categories (m) must map names to strings, got {_describe(m)}")
    bad = next((k for k in m if not isinstance(k, str)), None)
    if bad is not None:
        raise ArtifactError(
            f"the categories (m) must map names to strings: a key {str(bad)[:80]!r} is {type(bad).__name__}"
        )
    bad = next((k for k, v in m.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ArtifactError(f"the categories (m) must map names to strings: {bad[:80]!r} is {m[bad]!r:.80}")
    return m


def _model_groups(want: dict) -> dict[str, list[tuple[int, ...]]]:
    """The shapes a pergroup manifest lists for a model whose state is `want` ({name: (shape, dtype)}): per
    group, its matrices in layer order (pgolf/quant/pergroup.py `group_of`)."""
    routed = sorted((where, name) for name in want if (where := group_of(name)) is not None)
    out: dict[str, list[tuple[int, ...]]] = {g: [] for g in GROUPS}
    for (g, _), name in routed:
        out[GROUPS[g]].append(tuple(want[name][0]))
    return out


def _read_pergroup(
    data: bytes, cap: int = MAX_RAW_BYTES, model_groups: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(w, m) of a PR #1611 `PGRP` file: the remainder first (its shape manifest says what each group holds),
    then each group through `lrzip -d` at exactly its manifest's size, then the rows put back in order."""
    streams = split_container(data)
    rem = _load_torch_bytes(_inflate(bytes(streams[len(GROUPS)]), "brotli", cap), "pergroup remainder")
    if not isinstance(rem, dict) or set(rem) != {"r", "m", "s"}:
        raise ArtifactError(f"pergroup remainder: expected {{'r', 'm', 's'}}, got {_describe(rem)}")
    w, m, manifest = _tensors(rem["r"], "pergroup remainder r"), _categories(rem["m"]), rem["s"]
    if not isinstance(manifest, dict):
        raise ArtifactError(f"pergroup remainder: the shape manifest (s) must be a dict, got {_describe(manifest)}")
    keys = [RECORD_GROUP_KEYS[g] for g in GROUPS]
    unknown = sorted(set(map(str, manifest)) - set(keys))
    if unknown:
        raise ArtifactError(f"pergroup shape manifest: unknown groups {unknown}")
    shapes = {g: _shapes(manifest.get(RECORD_GROUP_KEYS[g], []), g) for g in GROUPS}
    for g in GROUPS if model_groups is not None else ():
        if shapes[g] and shapes[g] != model_groups[g]:
            raise ArtifactError(
                f"pergroup shape manifest of {g}: {shapes[g][:3]}{'...' if len(shapes[g]) > 3 else ''} "
                f"({len(shapes[g])} layers) is not the model's {model_groups[g][:3]} ({len(model_groups[g])} layers)"
            )
    if any(streams[i] for i in range(len(GROUPS))):
        _need_lrzip("reading the record's pergroup file", "or have the record write COMPRESSOR=brotli")
    perm_rows = [s[0] for g in GROUPS if g in HOT for s in shapes[g] if len(s) == 2]
    perms_raw = b""
    if perm_rows:
        perms_raw = brotli_decompress(streams[len(GROUPS) + 1], 2 * sum(perm_rows), "permutations")
    elif len(streams[len(GROUPS) + 1]):
        raise ArtifactError("pergroup permutations stream is not empty, but no hot group holds a matrix")
    perms = np.frombuffer(perms_raw, dtype="<u2").astype(np.int64)
    at = 0
    for g, key in zip(GROUPS, keys, strict=True):
        need = sum(math.prod(s) for s in shapes[g])
        if not need:
            if len(streams[GROUPS.index(g)]):
                raise ArtifactError(f"pergroup stream {g}: bytes for a group the manifest leaves empty")
            continue
        raw = lrzip_decompress(streams[GROUPS.index(g)], need, g)
        off = 0
        for layer, s in enumerate(shapes[g]):
            n = math.prod(s)
            if len(s) == 2:
                order = None
                if g in HOT:
                    order = perms[at : at + s[0]]
                    at += s[0]
                    if not np.array_equal(np.sort(order), np.arange(s[0])):
                        raise ArtifactError(f"pergroup permutations: layer {layer} of {g} is not a permutation")
                arr = decode_matrix(memoryview(raw)[off : off + n], s[0], s[1], order)
            else:
                arr = np.frombuffer(raw, dtype=np.int8, count=n, offset=off).reshape(s).copy()
            off += n
            name = key[1:] if key.startswith("_") else f"blocks.{layer}.{key}"
            if name in w:
                raise ArtifactError(f"pergroup: {name} both in a group and in the remainder")
            w[name] = torch.from_numpy(arr)
    return w, m


def _need_lrzip(what: str, otherwise: str) -> None:
    """ArtifactError naming `what` and `otherwise` when the `lrzip` program is not on PATH."""
    try:
        lrzip_path()
    except PerGroupError:
        raise ArtifactError(
            f"{what} needs the external program lrzip, which is not on PATH: install it (Debian/Ubuntu: apt-get "
            f"install lrzip; `bash run.sh setup` does where it can), {otherwise}"
        ) from None


def _shapes(v, group: str) -> list[tuple[int, ...]]:
    if not isinstance(v, list | tuple):
        raise ArtifactError(f"pergroup shape manifest of {group}: expected a list of shapes, got {_describe(v)}")
    out = []
    for s in v:
        if not isinstance(s, list | tuple | torch.Size) or not 1 <= len(s) <= 2:
            raise ArtifactError(f"pergroup shape manifest of {group}: {s!r} is not a 1-D or 2-D shape")
        if any(not isinstance(d, int) or isinstance(d, bool) or not 0 < d < 1 << 31 for d in s):
            raise ArtifactError(f"pergroup shape manifest of {group}: {s!r} has a dimension out of range")
        out.append(tuple(int(d) for d in s))
    if sum(math.prod(s) for s in out) > MAX_RAW_BYTES:
        raise ArtifactError(f"pergroup shape manifest of {group}: more than {MAX_RAW_BYTES} bytes")
    return out


def record_entries(w: dict[str, torch.Tensor], m: dict[str, str], model: dict) -> dict[str, QuantEntry]:
    """pgolf's artifact entries of the record's quantized tensors `w` and categories `m` for a model of config
    `model`, in the model's state order. Every weight the model has must be categorised once, with the fields
    its category needs (no field left over), in the model's shape; codes must lie in their bit width's range
    (int6 ±31, int7 ±63, the int8 gates ±127, LQER A [-2, 1] and B [-8, 7] or ±7). Raises ArtifactError."""
    want = expected_state(check_model_config(model, "model"), "model")
    back = {v: k for k, v in RENAMES.items()}
    used: set[str] = set()
    out = {}
    for name, (shape, dtype) in want.items():
        rec = back.get(name, name)
        if rec not in m:
            raise ArtifactError(f"the record's file has no entry for {rec} (the model's {name})")
        out[name] = _entry(rec, m[rec], w, shape, dtype, used)
    extra = sorted(set(m) - {back.get(n, n) for n in want})
    if extra:
        raise ArtifactError(f"entries the model config has no parameter for: {extra[:5]}")
    left = sorted(set(w) - used)
    if left:
        raise ArtifactError(f"tensors no category uses: {left[:5]}")
    return out


def _field(w: dict, key: str, used: set[str], dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if key not in w:
        raise ArtifactError(f"{key} is missing")
    t = w[key]
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        want = f"{dtype} {list(shape)}" if shape is not None else str(dtype)
        raise ArtifactError(f"{key} must be {want}, got {t.dtype} {list(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ArtifactError(f"{key} holds non-finite values (NaN or inf)")
    used.add(key)
    return t.contiguous()


def _in_range(t: torch.Tensor, lo: int, hi: int, key: str) -> None:
    if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
        raise ArtifactError(f"{key} holds codes outside [{lo}, {hi}] ({int(t.min())}..{int(t.max())})")


def _entry(rec: str, cat: str, w: dict, shape: tuple[int, ...], dtype: str, used: set[str]) -> QuantEntry:
    found = CATEGORY.fullmatch(cat)
    if found is None:
        raise ArtifactError(f"{rec}: category {cat!r} is not one PR #1611 writes (no Hadamard rotation, ...)")
    if cat.startswith("passthrough"):
        t = w.get(rec)
        want = torch.float16 if t is not None and t.is_floating_point() else getattr(torch, dtype)
        t = _field(w, rec, used, want, shape)
        kind = "fp16" if t.is_floating_point() else "raw"
        return QuantEntry(kind=kind, shape=shape, orig_dtype=dtype, data=t, info={"method": "record"})
    if len(shape) != 2:
        raise ArtifactError(f"{rec}: category {cat!r} for a tensor of shape {list(shape)} (a matrix was expected)")
    gate = cat == "gate_int8_row"
    bits = 8 if gate else int(found.group(1))
    kq, ks = (rec + k for k in (GATE_KEYS if gate else CODE_KEYS))
    q = _field(w, kq, used, torch.int8, shape)
    s = _field(w, ks, used, torch.float16)
    if tuple(s.shape) not in ((shape[0],), (), (1,)):
        raise ArtifactError(f"{ks} must be per row [{shape[0]}] or one value, got {list(s.shape)}")
    lim = (1 << (bits - 1)) - 1
    _in_range(q, -lim, lim, kq)
    method = "int8_row" if bits == 8 else "gptq"
    info: dict = {"method": method, "clip": "sdclip" if bits < 8 else "max", "rule": "record", "source": cat}
    lqer = None
    mode = {"+lqer_asym": "asym", "+lqer": "sym"}.get(found.group(2) or "")
    if mode:
        lqer = _lqer(rec, mode, w, shape, used)
        extra = {"group": lqer.group} if mode == "asym" else {"bits": lqer.bits}
        info["lqer"] = {"mode": mode, "rank": lqer.rank, **extra}
    return QuantEntry(
        kind="int", shape=shape, orig_dtype=dtype, q=q, scale=s.reshape(-1), bits=bits, info=info, lqer=lqer
    )


def _lqer(rec: str, mode: str, w: dict, shape: tuple[int, ...], used: set[str]) -> LQERFactors:
    ka, ksa, kb, ksb = (rec + k for k in LQER_KEYS[mode])
    qa, qb = _field(w, ka, used, torch.int8), _field(w, kb, used, torch.int8)
    sa, sb = _field(w, ksa, used, torch.float16), _field(w, ksb, used, torch.float16)
    if mode == "asym":
        group = qb.numel() // sb.numel() if sb.numel() else 0
        sa = sa.reshape(()) if sa.numel() == 1 else sa  # one scale (0-d in the record)
        f = LQERFactors(mode="asym", qa=qa, sa=sa, qb=qb, sb=sb, group=group)
    else:
        f = LQERFactors(mode="sym", qa=qa, sa=sa, qb=qb, sb=sb, bits=LQER_SYM_BITS)
    try:
        f.check(*shape, what=f"{rec} LQER")
    except ValueError as e:
        raise ArtifactError(str(e)) from None
    return f


# ---- writing: a pgolf artifact in the record's format ---------------------------------------------------
def record_dicts(entries: dict[str, QuantEntry]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(w, m) as the record's `gptq_mixed_quantize` returns them, of pgolf's artifact entries: the record's
    names, `passthrough (float16)` for fp16 (and non-float raw) tensors, `gate_int8_row` for the int8 attention
    gates, `gptq (intN)` with `+lqer_asym` / `+lqer` for every other int matrix (the record de-quantizes them
    all as q·s + A·B). Raises ArtifactError for an entry the record's format cannot hold as it is (fp32 or raw
    float storage, a scale that is neither per row nor one value)."""
    back = {v: k for k, v in RENAMES.items()}
    w: dict[str, torch.Tensor] = {}
    m: dict[str, str] = {}
    for name, e in entries.items():
        rec = back.get(name, name)
        if e.kind == "fp16" or (e.kind == "raw" and not e.data.is_floating_point()):
            w[rec], m[rec] = e.data, "passthrough (float16)"
            continue
        if e.kind != "int":
            raise ArtifactError(f"{name} is stored {e.kind}: PR #1611's format holds floats only as fp16")
        if e.scale.numel() == 1:
            scale = e.scale.to(torch.float16).reshape(())
        elif e.scale.numel() == e.shape[0]:  # per row (a 0-d tensor has one value: the branch above)
            scale = e.scale.to(torch.float16)
        else:
            raise ArtifactError(f"{name}: a scale of {e.scale.numel()} values is neither per row nor one value")
        if scale.dtype != e.scale.dtype and not torch.equal(scale.float(), e.scale.float()):
            raise ArtifactError(f"{name}: its float32 scales are not float16 values (the record stores fp16)")
        gate = e.bits == 8 and rec.endswith(".attn_gate_w") and scale.ndim == 1
        kq, ks = GATE_KEYS if gate else CODE_KEYS
        w[rec + kq], w[rec + ks] = e.q, scale
        m[rec] = "gate_int8_row" if gate else f"gptq (int{e.bits})"
        if e.lqer is not None:
            mode = e.lqer.mode
            if mode == "sym" and e.lqer.bits != LQER_SYM_BITS:
                raise ArtifactError(
                    f"{name}: symmetric LQER factors of {e.lqer.bits} bits; PR #1611's format holds only "
                    f"INT{LQER_SYM_BITS} (it stores no bit width)"
                )
            for key, t in zip(LQER_KEYS[mode], (e.lqer.qa, e.lqer.sa, e.lqer.qb, e.lqer.sb), strict=True):
                w[rec + key] = t
            m[rec] += "+lqer_asym" if mode == "asym" else "+lqer"
    return w, m


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def encode_record_quantized(entries: dict[str, QuantEntry], fmt: str = "pergroup", level: int = 9) -> bytes:
    """The bytes of `final_model.int6.ptz` as PR #1611 writes it with `COMPRESSOR=fmt` (FORMATS): brotli-11
    or xz (preset `level`) of `torch.save({"w", "m"})`, or the `PGRP` container (the 7 role groups' codes
    through `lrzip -z -L level`, the hot groups' rows in the greedy L1 chain order, pgolf/quant/pergroup.py
    `nn_chain`; the remainder `{"r", "m", "s"}` brotli-11 with a 2^24 window; the uint16 orders brotli-11).
    Raises ArtifactError (`record_dicts`; an unknown format; lrzip missing), PerGroupError when lrzip fails."""
    if fmt not in FORMATS:
        raise ArtifactError(f"format {fmt!r} is not one of {FORMATS}")
    w, m = record_dicts(entries)
    if fmt == "brotli":
        return brotli_compress(_torch_bytes({"w": w, "m": m}))
    if fmt == "lzma":
        return lzma.compress(_torch_bytes({"w": w, "m": m}), format=lzma.FORMAT_XZ, preset=level)
    groups: dict[str, list[tuple[int, np.ndarray]]] = {g: [] for g in GROUPS}
    rest: dict[str, torch.Tensor] = {}
    by_key = {k: g for g, k in RECORD_GROUP_KEYS.items()}
    for name, t in sorted(w.items()):  # the record routes every int8 tensor by its name's role
        parts = name.split(".")
        block = parts[0] == "blocks" and parts[1].isdigit()
        g = by_key.get(".".join(parts[2:]) if block else "_" + name)
        if t.dtype == torch.int8 and g is not None:
            groups[g].append((int(parts[1]) if block else 0, t.numpy()))
        else:
            rest[name] = t
    _need_lrzip("writing the record's pergroup file", "or write --format brotli or lzma")  # before the row orders
    mats, manifest = [], {}
    for g in GROUPS:
        layers = sorted(groups[g], key=lambda x: x[0])
        if [i for i, _ in layers] != list(range(len(layers))):
            raise ArtifactError(f"group {g}: layers {[i for i, _ in layers]} are not 0..n-1 (the record's manifest)")
        for _, a in layers:
            if a.ndim == 2 and g in HOT and a.shape[0] > 1 << 16:
                raise ArtifactError(f"group {g}: {a.shape[0]} rows cannot be ordered by uint16 indices")
            mats.append((g, a))
        if layers:
            manifest[RECORD_GROUP_KEYS[g]] = [tuple(a.shape) for _, a in layers]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy and lrzip release the GIL
        orders = list(pool.map(lambda ga: nn_chain(ga[1]) if ga[1].ndim == 2 and ga[0] in HOT else None, mats))
        blobs = {g: bytearray() for g in GROUPS}
        for (g, a), order in zip(mats, orders, strict=True):
            blobs[g] += encode_matrix(a, order) if a.ndim == 2 else a.tobytes()
        streams = list(pool.map(lambda b: lrzip_compress(bytes(b), level) if b else b"", blobs.values()))
    perms = b"".join(o.astype("<u2").tobytes() for o in orders if o is not None)
    streams.append(brotli_compress(_torch_bytes({"r": rest, "m": m, "s": manifest})))
    streams.append(brotli_compress(perms, lgwin=PERMS_LGWIN) if perms else b"")
    return pack_container(streams)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pgolf.tools.record_quantized",
        description="Write a pgolf artifact's quantized model as PR #1611's final_model.int6.ptz, so the record's "
        "own deserialize and evaluation (its TTT) run on pgolf's codes. The other way: python -m "
        "pgolf.tools.reexport final_model.int6.ptz model=NAME ...",
    )
    ap.add_argument("artifact", help="a pgolf artifact (final_model.<label>.ptz)")
    ap.add_argument("--out", required=True, help="the file to write (e.g. final_model.int6.ptz)")
    ap.add_argument("--format", default="pergroup", choices=FORMATS, help="the record's COMPRESSOR (default pergroup)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    entries: dict[str, QuantEntry] = {}

    def produce() -> bytes:
        head = load_artifact(a.artifact, tensors=False, max_file_bytes=MAX_FLOAT_FILE_BYTES)[0]  # header only
        if head.meta.get("kind") == FLOAT_KIND:
            raise ArtifactError(
                f"{a.artifact}: saved float weights, not a quantized artifact: quantize them first (python -m "
                "pgolf.tools.reexport WEIGHTS --export ...), or write them for the record's own export with python "
                "-m pgolf.tools.record_weights"
            )
        entries.update(read_model_artifact(a.artifact)[1])
        return encode_record_quantized(entries, a.format)

    data = write_new(Path(a.out), a.force, produce)
    if data is None:
        return 2
    n_lqer = sum(e.lqer is not None for e in entries.values())
    print(
        f"record_quantized: {Path(a.artifact).name} -> {a.out} format:{a.format} bytes:{len(data)} "
        f"tensors:{len(entries)} lqer:{n_lqer} time:{time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
