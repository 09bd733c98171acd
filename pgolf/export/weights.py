"""Float weights for re-export, and the model an artifact holds.

`save_float_weights` / `load_weights`: the float weights in the project's container (or a Lightning `.ckpt`),
for `python -m pgolf.tools.reexport`. `load_artifact_model`: the artifact -> a fresh GPT with de-quantized
weights (what `eval.py` and the round trip use; no checkpoint, no pickle).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import ArtifactError, read_artifact, write_artifact
from pgolf.quant.rules import QuantEntry, dequantize_state

FLOAT_KIND = "float_weights"


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
    """(state dict, meta) from saved float weights or a Lightning `.ckpt` (loaded with weights_only=True;
    its `gpt.<name>` keys, model config from the hyper-parameters; no tokenizer identity)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".ckpt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable Lightning checkpoint with weights_only=True ({e})") from e
        sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        model_cfg = (ckpt.get("hyper_parameters") or {}).get("model") if isinstance(ckpt, dict) else None
        if not sd or model_cfg is None:
            raise ValueError(f"{path}: checkpoint lacks a state_dict or the model hyper-parameters")
        state = {k.removeprefix("gpt."): v for k, v in sd.items() if k.startswith("gpt.")}
        if not state:
            raise ValueError(f"{path}: checkpoint state_dict has no gpt.* weights")
        return state, {"model": dict(model_cfg), "source": "lightning_checkpoint"}
    entries, meta = read_artifact(path)
    if meta.get("kind") != FLOAT_KIND:
        raise ArtifactError(
            f"{path}: not saved float weights (it is a quantized artifact?): re-export needs the float weights "
            f"({FLOAT_KIND}) that training saves next to the artifact, or a Lightning .ckpt"
        )
    return {k: e.data for k, e in entries.items()}, meta


def model_from_weights(state: dict[str, torch.Tensor], meta: dict) -> GPT:
    model = GPT(GPTConfig.from_dict(meta["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match their model config (missing {missing}, unexpected {unexpected})")
    return model


def load_artifact_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A fresh GPT from an artifact: config from its metadata, de-quantized weights, eval mode."""
    entries, meta = read_artifact(path)
    cfg = GPTConfig.from_dict(meta["model"])
    model = GPT(cfg)
    state = dequantize_state(entries)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: artifact tensors do not match its model config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval(), meta
