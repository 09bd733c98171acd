"""Float weights for re-export, and the model an artifact holds, read only after the artifact is validated.

`save_float_weights` / `load_weights`: the float weights in the project's container (or a Lightning `.ckpt`),
for `python -m pgolf.tools.reexport`. `read_model_artifact` / `load_artifact_model`: the artifact -> its
validated header and tensors -> a fresh GPT with de-quantized weights (what `eval.py`, `inspect` and the
round trip use; no checkpoint, no pickle).

Before a tensor is allocated or the model built, `check_model_artifact` checks the metadata against sane
limits (`model`: every field's type, CONFIG_INT_LIMITS, numbers a float32 holds, GPTConfig's own consistency
checks, at most MAX_MODEL_PARAMS parameters and MAX_VIRTUAL_LAYERS layers a forward; `tokenizer`;
`train.seq_len`; at most MAX_WINDOW_LOGITS logits an eval window; the code record) and the tensor table against
the state the config implies (`expected_state`: the model built on the `meta` device, nothing allocated): the
same names, each once, the same shapes and original dtypes. Every problem is one ArtifactError naming the
field.

A Lightning `.ckpt` passes the same checks (`load_checkpoint`): its zip container is checked from its own
directory before torch reads it (entry count, directory and pickle sizes bounded, every record stored), the
pickle is read weights-only with the tensors mapped from the file (`mmap`), not copied, and the model config
of its hyper-parameters and the shapes of its `gpt.*` tensors are checked as an artifact's before the model
is built.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from pgolf import MAX_SEQ_LEN, MAX_WINDOW_LOGITS, window_over_logits
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import (
    MAX_FILE_BYTES,
    ArtifactError,
    ArtifactHeader,
    load_artifact,
    write_artifact,
)
from pgolf.quant.rules import QuantEntry, dequantize_entry

FLOAT_KIND = "float_weights"
# A 16,000,000-byte artifact holds at most 64M dense 2-bit codes (2 bits is the fewest pgolf quantizes to);
# more parameters than 2^26 cannot be a legal artifact, and this bounds eval's memory (4 bytes a parameter).
MAX_MODEL_PARAMS = 1 << 26
# A training row: PR #1611 trains on packed rows of 98,304 tokens (786,432 / 8 ranks); eval never allocates one.
MAX_TRAIN_SEQ_LEN = 1 << 20
MAX_CODE_BYTES = MAX_FILE_BYTES
# Float weights are raw fp32 (4 bytes a parameter, zstd-3): their file cap follows the parameter cap.
MAX_FLOAT_FILE_BYTES = 4 * MAX_MODEL_PARAMS + MAX_FILE_BYTES
# Bounds on the integer fields of an artifact's model config: far above every record (11 layers, width 512,
# vocab 1024..8192), far below anything that cannot fit 16,000,000 bytes.
CONFIG_INT_LIMITS = {
    "vocab_size": (1, 1 << 17),
    "num_layers": (1, 64),
    "model_dim": (2, 8192),
    "num_heads": (1, 256),
    "num_kv_heads": (1, 256),
    "rope_dims": (0, 8192),
    "rope_ntk_base_len": (0, MAX_SEQ_LEN),
    "bigram_buckets": (0, 1 << 20),
    "bigram_dim": (1, 8192),
    "ve_dim": (0, 8192),
    "xsa_last_n": (0, 64),
    "recur_start": (0, 64),
    "recur_end": (0, 64),
    "recur_times": (1, 16),
    "qat_bits": (2, 8),
    "num_loops": (0, 16),
    "loop_start": (0, 64),
    "loop_end": (0, 64),
    "parallel_start_layer": (0, 64),
    "gate_window": (0, 8192),
}
GENERIC_INT_LIMITS = (-1, 1 << 20)  # an integer field not named above (a token id, a count)
MAX_VIRTUAL_LAYERS = 256  # layers a forward runs, depth recurrence and loops included (records: 11..17)
FP32 = torch.finfo(torch.float32)  # the range the model computes in: max 3.4e38, smallest normal (tiny) 1.2e-38
MAX_MLP_MULT = 64.0
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# A Lightning checkpoint's zip (torch.save): one record per tensor storage (weights, optimizer states,
# averages) plus a few, its directory ~80 bytes a record, and the pickle of the object tree (the tensors' bytes
# are records of their own). conf/model/tiny.yaml's checkpoint: 73 records, a 5,794-byte directory, an
# 11,534-byte pickle; these limits are far above any model of at most MAX_MODEL_PARAMS parameters.
MAX_CKPT_RECORDS = 1 << 16
MAX_CKPT_DIRECTORY_BYTES = 1 << 24
MAX_CKPT_PICKLE_BYTES = 1 << 26
ZIP_EOCD = struct.Struct("<4s4xHHII")  # end of central directory: signature, entries here, entries, size, offset
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, offset of the zip64 end record, disks
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # ..., entries here, entries, directory size, directory offset


def save_float_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Every tensor stored raw (lossless) in the artifact container with the model config and tokenizer
    identity; zstd level 3, fast. Not a submission artifact: it only feeds `python -m pgolf.tools.reexport`."""
    entries = {
        k: QuantEntry(
            kind="raw",
            shape=tuple(t.shape),
            orig_dtype=str(t.dtype).removeprefix("torch."),
            data=t.detach().cpu().contiguous(),
        )
        for k, t in state.items()
    }
    write_artifact(path, entries, {**meta, "kind": FLOAT_KIND}, "zstd", 3)
    return Path(path)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) from saved float weights or a Lightning `.ckpt` (`load_checkpoint`: its `gpt.<name>`
    keys, the model config of its hyper-parameters; no tokenizer identity). Either is checked as a model
    artifact (`check_model_artifact`: bounded config, at most MAX_MODEL_PARAMS parameters, the tensor table
    against the config) before any tensor is allocated; saved float weights are a file of at most
    MAX_FLOAT_FILE_BYTES. Raises FileNotFoundError, or ArtifactError `<path>: <what>`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".ckpt":
        return load_checkpoint(path)
    header, entries = load_artifact(path, check=_check_float_weights, max_file_bytes=MAX_FLOAT_FILE_BYTES)
    return {k: e.data for k, e in entries.items()}, header.meta


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(the `gpt.*` weights without the prefix, meta) of a Lightning `.ckpt` from pgolf's training. Checked in
    this order, each problem one ArtifactError `<path>: <what>`: the zip container (`check_checkpoint_zip`),
    the pickle read by `torch.load(weights_only=True, mmap=True)` (a refused global, e.g. `os.system`, is
    named; the tensors stay views of the mapped file), the checkpoint's structure (`state_dict`,
    `hyper_parameters.model`), the model config (`check_model_config`) and the tensors' names and shapes
    against it (`check_model_state`: the model built on the meta device). meta: `model`, `source`, and the
    document-bounded attention the run trained with (`train.doc_attention` / `max_seg_len`) when recorded."""
    path = Path(path)
    try:
        state, hparams = _checkpoint_parts(load_torch_file(path))
        cfg = check_model_config(hparams["model"], "hyper_parameters.model")
        shapes = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}
        check_model_state(cfg, shapes, what="hyper_parameters.model", dtype_key="dtype", cast_floats=True)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    meta = {"model": dict(hparams["model"]), "source": "lightning_checkpoint"}
    if hparams.get("doc_attention"):  # pgolf.eval.run.doc_max_seg_len checks the values
        meta["train"] = {"doc_attention": hparams["doc_attention"], "max_seg_len": hparams.get("max_seg_len")}
    return state, meta


def load_torch_file(path: Path, what: str = "checkpoint"):
    """The object a torch.save zip file holds, its container checked first (`check_checkpoint_zip`), then read
    by `torch.load(weights_only=True, mmap=True)`: tensors stay views of the mapped file; a global the
    weights-only unpickler refuses (e.g. `os.system`) is named. Raises ArtifactError (`what`: the file's kind,
    in the message of one that does not load)."""
    check_checkpoint_zip(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: say which, without torch's advice
        lines = [ln for ln in str(e).splitlines()[1:] if ln.strip() and not ln.startswith("Check the doc")]
        raise ArtifactError(f"refused by weights-only loading: {(lines or ['unpickling failed'])[0][:300]}") from None
    except Exception as e:  # a corrupt record, a tensor view outside its storage, ...
        raise ArtifactError(f"not a loadable {what} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def check_checkpoint_zip(path: Path) -> None:
    """A `.ckpt`'s zip container, read from its own end records before anything bigger: torch.save's zip
    format (a legacy or foreign file is refused), at most MAX_CKPT_RECORDS records and a central directory
    of at most MAX_CKPT_DIRECTORY_BYTES (both the zip and the zip64 end records), every record stored, not
    compressed (torch.save stores; a compressed record could inflate to any size), and the pickle at most
    MAX_CKPT_PICKLE_BYTES. Raises ArtifactError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - ZIP_EOCD.size - 0xFFFF))  # the end record, then a comment of at most 64 KiB
        tail = f.read()
        i = tail.rfind(b"PK\x05\x06")
        if i < 0 or len(tail) - i < ZIP_EOCD.size:
            raise ArtifactError("not a zip-format PyTorch checkpoint (torch.save's format; a legacy or other file)")
        _, _, records, dir_bytes, _ = ZIP_EOCD.unpack_from(tail, i)
        ends = [(records, dir_bytes)]
        if i >= ZIP64_LOCATOR.size and tail[i - ZIP64_LOCATOR.size : i - ZIP64_LOCATOR.size + 4] == b"PK\x06\x07":
            offset = ZIP64_LOCATOR.unpack_from(tail, i - ZIP64_LOCATOR.size)[2]
            f.seek(min(offset, size))
            rec = f.read(ZIP64_EOCD.size)
            if len(rec) < ZIP64_EOCD.size or rec[:4] != b"PK\x06\x06":
                raise ArtifactError("corrupt checkpoint zip: its zip64 end record is missing")
            ends.append(ZIP64_EOCD.unpack(rec)[7:9])
    for records, dir_bytes in ends:
        if records > MAX_CKPT_RECORDS or dir_bytes > MAX_CKPT_DIRECTORY_BYTES:
            raise ArtifactError(
                f"checkpoint zip declares {records} records in a {dir_bytes}-byte directory, over the limits of "
                f"{MAX_CKPT_RECORDS} records and {MAX_CKPT_DIRECTORY_BYTES} bytes"
            )
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"corrupt checkpoint zip ({_first_line(e)})") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArtifactError(f"checkpoint record {info.filename!r} is compressed; torch.save stores its records")
        if info.filename.endswith("data.pkl") and info.file_size > MAX_CKPT_PICKLE_BYTES:
            raise ArtifactError(
                f"checkpoint pickle {info.filename!r} of {info.file_size} bytes exceeds the limit of "
                f"{MAX_CKPT_PICKLE_BYTES}"
            )


def _checkpoint_parts(ckpt) -> tuple[dict[str, torch.Tensor], dict]:
    """(the `gpt.*` tensors without the prefix, the hyper-parameters) of a loaded checkpoint, its structure
    checked: a Lightning checkpoint of pgolf's GPT. Raises ArtifactError naming what is missing."""
    if not isinstance(ckpt, dict):
        raise ArtifactError(f"not a Lightning checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    sd, hparams = ckpt.get("state_dict"), ckpt.get("hyper_parameters")
    if not isinstance(sd, dict) or not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict):
        keys = sorted(map(str, ckpt))[:8]
        raise ArtifactError(
            "not a Lightning checkpoint of pgolf's GPT: it needs a dict `state_dict` and a dict "
            f"`hyper_parameters.model` (its keys: {keys})"
        )
    state = {k.removeprefix("gpt."): v for k, v in sd.items() if isinstance(k, str) and k.startswith("gpt.")}
    if not state:
        raise ArtifactError("checkpoint state_dict has no gpt.* weights")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ArtifactError(f"checkpoint state_dict: gpt.{bad[0]} is not a tensor")
    return state, hparams


def _check_float_weights(header: ArtifactHeader) -> None:
    if header.meta.get("kind") != FLOAT_KIND:
        raise ArtifactError(
            f"not saved float weights (it is a quantized artifact?): re-export needs the float weights "
            f"({FLOAT_KIND}) that training saves next to the artifact, or a Lightning .ckpt"
        )
    check_model_artifact(header, require_tokenizer=False)


def model_from_weights(state: dict[str, torch.Tensor], meta: dict) -> GPT:
    """A fresh GPT of `meta["model"]` holding `state` (from `load_weights`, which checked both). Raises
    ValueError when they do not fit."""
    model = GPT(GPTConfig.from_dict(meta["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match their model config (missing {missing}, unexpected {unexpected})")
    return model


# ---- validation of an artifact's metadata and tensor table ----------------------------------------------
def _int(v, what: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ArtifactError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _number(v, what: str) -> float:
    """A number the model can hold in float32: 0, or of magnitude in [FP32.tiny, FP32.max]."""
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise ArtifactError(f"{what} must be a finite number, got {v!r}")
    if v and not FP32.tiny <= abs(v) <= FP32.max:
        raise ArtifactError(f"{what} must be 0 or a float32 magnitude in [{FP32.tiny:.3g}, {FP32.max:.3g}], got {v!r}")
    return v


def check_model_config(d, what: str = "meta.model") -> GPTConfig:
    """The `GPTConfig` of an artifact's model config, every field's type and bound checked first (numbers: 0 or
    float32 magnitudes, `rope_base` >= 1; a field left out takes GPTConfig's default, as `GPTConfig.from_dict`
    does). Raises ArtifactError naming the field."""
    if not isinstance(d, dict):
        raise ArtifactError(f"{what} must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ArtifactError(f"{what}: unknown fields {unknown}")
    for name, v in d.items():
        f, key = fields[name], f"{what}.{name}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if name in CONFIG_INT_LIMITS:
            _int(v, key, *CONFIG_INT_LIMITS[name])
        elif isinstance(default, int) and not isinstance(default, bool):
            _int(v, key, *GENERIC_INT_LIMITS)
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ArtifactError(f"{key} must be true or false, got {v!r}")
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise ArtifactError(f"{key} must be a string, got {v!r}")
        elif isinstance(default, tuple | list):  # ve_layers: layer indices; any other list: of scalars
            if not isinstance(v, list) or len(v) > CONFIG_INT_LIMITS["num_layers"][1]:
                raise ArtifactError(f"{key} must be a list of at most 64 entries, got {v!r}")
            for i, x in enumerate(v):
                if name == "ve_layers":
                    _int(x, f"{key}[{i}]", 0, CONFIG_INT_LIMITS["num_layers"][1])
                elif not isinstance(x, int | float | str | bool) or (isinstance(x, float) and not math.isfinite(x)):
                    raise ArtifactError(f"{key}[{i}] must be a number, string or bool, got {x!r}")
        elif v is not None or default is not None:  # numbers (a None default: null or a number)
            _number(v, key)
    if "mlp_mult" in d and not 0 < d["mlp_mult"] <= MAX_MLP_MULT:
        raise ArtifactError(f"{what}.mlp_mult must be in (0, {MAX_MLP_MULT:g}], got {d['mlp_mult']!r}")
    if "rope_base" in d and not d["rope_base"] >= 1:  # below 1, base^(-2i/d) x position overflows float32
        raise ArtifactError(f"{what}.rope_base must be >= 1, got {d['rope_base']!r}")
    try:
        cfg = GPTConfig(**d)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ArtifactError(f"{what}: {str(e).removeprefix('GPTConfig: ')}") from None
    if len(cfg.layer_schedule) > MAX_VIRTUAL_LAYERS:
        raise ArtifactError(
            f"{what}: {len(cfg.layer_schedule)} layers per forward, over the limit of {MAX_VIRTUAL_LAYERS}"
        )
    return cfg


def expected_state(cfg: GPTConfig, what: str = "meta.model") -> dict[str, tuple[tuple[int, ...], str]]:
    """{state-dict name: (shape, dtype name)} of `GPT(cfg)`, from the model built on the `meta` device: no
    tensor is allocated and no random number drawn, so a forged config costs nothing before it is refused
    (the first call imports torch._dynamo, ~1-2 s, which torch's meta kernels use). Raises ArtifactError
    `<what>: ...` when the model cannot be built from `cfg`."""
    try:
        with torch.device("meta"):
            model = GPT(cfg)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        raise ArtifactError(f"{what}: the model cannot be built ({str(e).splitlines()[0][:200]})") from None
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def _check_tokenizer(tok, cfg: GPTConfig) -> None:
    if not isinstance(tok, dict) or set(tok) != {"name", "vocab_size", "sha256"}:
        keys = sorted(tok) if isinstance(tok, dict) else type(tok).__name__
        raise ArtifactError(f"meta.tokenizer must hold exactly name, vocab_size and sha256, got {keys}")
    if not isinstance(tok["name"], str) or not 0 < len(tok["name"]) <= 256:
        raise ArtifactError(f"meta.tokenizer.name must be a file name, got {tok['name']!r}")
    n = _int(tok["vocab_size"], "meta.tokenizer.vocab_size", 1, CONFIG_INT_LIMITS["vocab_size"][1])
    if n > cfg.vocab_size:  # token ids index the embedding
        raise ArtifactError(f"meta.tokenizer.vocab_size {n} exceeds the model's vocab_size {cfg.vocab_size}")
    if not isinstance(tok["sha256"], str) or not SHA256_HEX.fullmatch(tok["sha256"]):
        raise ArtifactError(f"meta.tokenizer.sha256 must be 64 lowercase hex digits, got {tok['sha256']!r}")


def _check_meta(meta: dict, cfg: GPTConfig, require_tokenizer: bool) -> None:
    """The metadata evaluation reads besides the model config: tokenizer, train.seq_len, final_eval.seq_len,
    code record."""
    if "tokenizer" in meta or require_tokenizer:
        if "tokenizer" not in meta:
            raise ArtifactError("metadata has no tokenizer identity (meta.tokenizer)")
        _check_tokenizer(meta["tokenizer"], cfg)
    train = meta.get("train", {})
    if not isinstance(train, dict):
        raise ArtifactError(f"meta.train must be a JSON object, got {type(train).__name__}")
    if train.get("seq_len") is not None:
        _int(train["seq_len"], "meta.train.seq_len", 1, MAX_TRAIN_SEQ_LEN)
    final = meta.get("final_eval", {})
    if not isinstance(final, dict):
        raise ArtifactError(f"meta.final_eval must be a JSON object, got {type(final).__name__}")
    if final.get("seq_len") is not None:
        _int(final["seq_len"], "meta.final_eval.seq_len", 1, MAX_SEQ_LEN)
    # eval.py's default window: the round trip's, else the training length
    if over := window_over_logits(cfg.vocab_size, final.get("seq_len"), train.get("seq_len")):
        key, n, logits = over
        raise ArtifactError(
            f"meta.model.vocab_size {cfg.vocab_size} x meta.{key}.seq_len {n} = {logits:,} logits a "
            f"window, over the limit of {MAX_WINDOW_LOGITS:,} (eval memory)"
        )
    if "code" in meta:
        code = meta["code"]
        if not isinstance(code, dict) or "bytes" not in code:
            raise ArtifactError("meta.code must be a JSON object with bytes (and sha256)")
        _int(code["bytes"], "meta.code.bytes", 0, MAX_CODE_BYTES)
        if code.get("sha256") is not None and not SHA256_HEX.fullmatch(str(code["sha256"])):
            raise ArtifactError(f"meta.code.sha256 must be 64 lowercase hex digits, got {code['sha256']!r}")
    if "code_bytes" in meta:
        _int(meta["code_bytes"], "meta.code_bytes", 0, MAX_CODE_BYTES)


def check_model_artifact(header: ArtifactHeader, *, require_tokenizer: bool = True) -> GPTConfig:
    """Check an artifact's metadata and tensor table against its model config, before anything is
    allocated (the `check` of `load_artifact`); returns the config. Raises ArtifactError naming the field:
    a missing or forged config, a model over MAX_MODEL_PARAMS, a tokenizer identity that is missing (with
    `require_tokenizer`) or malformed, a non-positive or oversized `train.seq_len` or `final_eval.seq_len`, an
    eval window (`final_eval.seq_len`, else `train.seq_len`) of more than MAX_WINDOW_LOGITS logits (x vocab), a
    negative code size, a tensor the model lacks, a missing tensor, a shape or original dtype that is not the
    model's."""
    meta = header.meta
    if "model" not in meta:
        raise ArtifactError("metadata has no model config (meta.model)")
    cfg = check_model_config(meta["model"])
    _check_meta(meta, cfg, require_tokenizer)
    check_model_state(cfg, {name: (t.shape, t.orig_dtype) for name, t in header.tensors.items()})
    return cfg


def check_model_state(
    cfg: GPTConfig,
    tensors: dict[str, tuple[tuple[int, ...], str]],
    *,
    what: str = "meta.model",
    dtype_key: str = "orig_dtype",
    cast_floats: bool = False,
) -> None:
    """Check {name: (shape, dtype name)} against the state `GPT(cfg)` has (`expected_state`, nothing
    allocated): at most MAX_MODEL_PARAMS parameters, the same names (none missing, none extra), the same
    shapes and dtypes (`cast_floats`: any floating dtype for a floating one, which loading converts). Raises
    ArtifactError naming the tensor (`what`: the config's name in messages; `dtype_key`: the dtype's)."""
    want = expected_state(cfg, what)
    n = sum(math.prod(shape) for shape, _ in want.values())
    if n > MAX_MODEL_PARAMS:
        raise ArtifactError(f"{what} implies {n:,} parameters, over the limit of {MAX_MODEL_PARAMS:,}")
    for name, (shape, dtype) in tensors.items():
        if name not in want:
            raise ArtifactError(f"tensor {name!r} is not a parameter of the model config")
        want_shape, want_dtype = want[name]
        if tuple(shape) != want_shape:
            raise ArtifactError(f"tensor {name!r} has shape {list(shape)}; the model config implies {list(want_shape)}")
        floats = cast_floats and _is_float(dtype) and _is_float(want_dtype)
        if dtype != want_dtype and not floats:
            raise ArtifactError(f"tensor {name!r}: {dtype_key} must be the model's {want_dtype}, got {dtype!r}")
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ArtifactError(f"tensors missing for the model config: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _is_float(dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32", "float64")


def read_model_artifact(
    path: str | Path, *, tensors: bool = True, max_file_bytes: int = MAX_FILE_BYTES
) -> tuple[ArtifactHeader, dict[str, QuantEntry]]:
    """(validated header, entries) of a model artifact: `load_artifact` with `check_model_artifact`, so the
    metadata and the table are checked before any tensor is allocated; `tensors=False` reads the header
    only. Raises ArtifactError `<path>: <what>`."""
    return load_artifact(path, check=check_model_artifact, tensors=tensors, max_file_bytes=max_file_bytes)


def load_artifact_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A fresh GPT from an artifact, eval mode: the artifact validated first (`check_model_artifact`), then
    the model built from its config, then each tensor de-quantized and copied in as soon as it is read
    (peak memory: the model plus the stored tensors not yet complete). Raises ArtifactError."""
    return _load_model(path, check_model_artifact, device)


def load_written_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A fresh GPT, eval mode, from the artifact this run just wrote (the end-of-training round trip): the
    file read by the format's own bounded, checked reader (`load_artifact`), the model built from the config
    the run recorded, each tensor de-quantized into it as it is read. The hostile-input model checks of
    `load_artifact_model` (bounded config fields, the tensor table against a meta-device model) are for
    artifacts from elsewhere (eval.py, inspect); leaving them out keeps them out of the packed train_gpt.py.
    Raises ArtifactError for a file that is not a readable artifact, KeyError/RuntimeError for one whose
    tensors do not fit its own config."""
    return _load_model(path, lambda header: GPTConfig.from_dict(header.meta["model"]), device)


def _load_model(path: str | Path, config_of, device) -> tuple[GPT, dict]:
    """Read `path` with `load_artifact`; `config_of(header)` (run before any tensor is read) gives the model's
    GPTConfig; each tensor is de-quantized into the fresh model as soon as it is read."""
    built: dict = {}  # the model and its parameters by name, once the header is accepted

    def build(header: ArtifactHeader) -> None:
        built["model"] = GPT(config_of(header))
        built["params"] = built["model"].state_dict(keep_vars=True)

    def copy_in(name: str, entry: QuantEntry) -> None:
        with torch.no_grad():
            built["params"][name].copy_(dequantize_entry(entry))

    header, _ = load_artifact(path, check=build, sink=copy_in)
    return built["model"].to(device).eval(), header.meta
