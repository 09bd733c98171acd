"""A record's own weights as re-export input: the file a record's `torch.save(base_model.state_dict(),
"final_model.pt")` writes (every record from the baseline to PR #1611), read for `python -m
pgolf.tools.reexport final_model.pt model=NAME`, so pgolf's quantizer can be compared with the record's on
the record's weights. PR #1611's banked layout is mapped to pgolf's names (pgolf/model/banks.py). The other
way, `python -m pgolf.tools.record_weights final_model.float.ptz --out final_model.pt [--layout pr1611]`
writes pgolf's weights as the record's file, for the record's own export.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pgolf.export.weights import check_model_config, check_model_state, load_torch_file, load_weights
from pgolf.io import atomic_write_bytes
from pgolf.model.banks import bank_layout, from_record_1611, to_record_1611
from pgolf.quant.artifact import MAGIC, ArtifactError


def load_input_weights(path: str | Path, model: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) of re-export input: saved float weights or a Lightning `.ckpt` (`load_weights`,
    which carry their own model config), or, with `model` (a model config), a record's bare state dict
    (`load_state_dict_file`). Raises FileNotFoundError, or ArtifactError `<path>: <what>`: also for `model`
    given with weights that carry their own config, or a bare torch.save file without it."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: a directory, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        head = f.read(8)
    zipped = head[:4] == b"PK\x03\x04"  # torch.save's zip: a checkpoint or a bare state dict
    if zipped and path.suffix != ".ckpt":
        if model is None:
            raise ArtifactError(
                f"{path}: a torch.save file holds no model config: name the model it was trained with, "
                "model=<conf/model name> (a record's final_model.pt: e.g. model=record_1611)"
            )
        state, meta = load_state_dict_file(path, model)
    elif model is not None:
        if head == MAGIC or path.suffix == ".ckpt":
            raise ArtifactError(f"{path}: these weights carry their own model config; model= is for a bare state dict")
        raise ArtifactError(
            f"{path}: not a zip-format torch.save file (the format torch.save writes since PyTorch 1.6; load it and "
            "save it again with torch.save), nor a record's quantized model (PGRP, xz, or brotli named *.ptz)"
        )
    else:
        state, meta = load_weights(path)
    check_finite(path, state)
    return state, meta


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Every floating tensor of the weights finite: a NaN or inf weight would be quantized into an artifact
    that scores nothing. Raises ArtifactError `<path>: tensor <name> holds N non-finite values`."""
    for name, t in state.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                raise ArtifactError(f"{path}: tensor {name!r} holds {n} non-finite values (NaN or inf) of {t.numel()}")


def load_state_dict_file(path: str | Path, model: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(pgolf's state dict, meta) of a record's `final_model.pt` for a model of config `model`. Checked as a
    `.ckpt` is (pgolf/export/weights.py: the zip container first, then a weights-only read with the tensors
    mapped from the file), then the structure (a dict of named tensors), and the names and shapes against
    `model` (floats of any dtype: loading converts them). PR #1611's banks (`qo_bank`, `kv_bank`,
    `mlp_up_bank`, `mlp_down_bank`) and SmearGate names become pgolf's per-layer names. meta: `model` and
    `source: state_dict` (no tokenizer identity, seed or training record). Raises ArtifactError
    `<path>: <what>`."""
    path = Path(path)
    try:
        cfg = check_model_config(model, "model")
        sd = load_torch_file(path, "state dict")
        if not isinstance(sd, dict) or not sd:
            raise ArtifactError(f"not a state dict: it holds {type(sd).__name__ if sd is not None else 'None'}")
        bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ArtifactError(f"not a state dict: entry {str(bad[0])[:80]!r} is not a named tensor")
        if "qo_bank" in sd:  # PR #1611 (PR #1530's parameter banks)
            try:
                sd = from_record_1611(sd, cfg.num_layers)
            except ValueError as e:
                raise ArtifactError(f"PR #1611 layout: {e}") from None
        elif any(k in sd for k in bank_layout(1)):
            raise ArtifactError(f"PR #1611 layout: no qo_bank beside {[k for k in bank_layout(1) if k in sd]}")
        shapes = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()}
        check_model_state(cfg, shapes, what="model", dtype_key="dtype", cast_floats=True)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    return sd, {"model": dict(model), "source": "state_dict"}


# ---- the other way: pgolf's weights as a record's final_model.pt ----------------------------------------
LAYOUTS = ("flat", "pr1611")


def record_state_dict(state: dict[str, torch.Tensor], layout: str, num_layers: int) -> dict[str, torch.Tensor]:
    """pgolf's float state dict as a record's `base_model.state_dict()`: `flat` keeps pgolf's names (the
    records' own up to PR #1263), `pr1611` stacks the block matrices into PR #1611's four banks and renames its
    SmearGate (pgolf/model/banks.py `to_record_1611`). Tensors keep their dtypes (the record's
    `load_state_dict` casts them to its parameters'). Raises ValueError for an unknown layout or a state the
    banks cannot be made of."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    return dict(state) if layout == "flat" else to_record_1611(state, num_layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pgolf.tools.record_weights",
        description="Write pgolf's float weights (final_model.float.ptz or a Lightning .ckpt) as a record's "
        "torch.save(base_model.state_dict()), so the record's own export (its GPTQ, LQER, codec) runs on them. "
        "The other way: python -m pgolf.tools.reexport final_model.pt model=NAME ...",
    )
    ap.add_argument("weights", help="final_model.float.ptz or a Lightning .ckpt")
    ap.add_argument("--out", required=True, help="the file to write (e.g. final_model.pt)")
    ap.add_argument("--layout", default="flat", choices=LAYOUTS, help="pr1611: PR #1611's parameter banks")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args(argv)
    sd: dict[str, torch.Tensor] = {}

    def produce() -> bytes:
        state, meta = load_input_weights(a.weights)
        sd.update(record_state_dict(state, a.layout, int(meta["model"]["num_layers"])))
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.getvalue()

    if write_new(Path(a.out), a.force, produce) is None:
        return 2
    n = sum(t.numel() for t in sd.values())
    print(f"record_weights: {Path(a.weights).name} -> {a.out} layout:{a.layout} tensors:{len(sd)} parameters:{n}")
    return 0


def write_new(out: Path, force: bool, produce: Callable[[], bytes]) -> bytes | None:
    """A tool's output: `produce()`'s bytes written atomically to `out`, which may exist only with `force`
    (checked before any work). On OSError or ValueError (ArtifactError included) prints one `error:` line to
    stderr, writes nothing and returns None; else returns the bytes written."""
    try:
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        data = produce()
        atomic_write_bytes(out, data)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return data


if __name__ == "__main__":
    sys.exit(main())
