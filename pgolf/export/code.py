"""Counted code: the packed `train_gpt.py` of the run's experiment, by its length and its sha256.

The challenge counts the UTF-8 length of `train_gpt.py` (openai/parameter-golf README). pgolf's
`train_gpt.py` is written by the packer (`python -m pgolf.tools.pack`): one file holding the runtime
modules that the experiment imports and its resolved config. That file is the code of a run, whichever
way it ran: `train.py` packs its experiment in memory and hands the record in; the packed script reads
its own file. A run carries it as `meta["code"] = {"bytes": N, "sha256": HEX}`, which the export counts
against the limit and every artifact records.

The runtime is a set of folders: `pgolf/` except `pgolf/tools/` (command-line tools the runtime never
imports), and `callbacks/`; the packer takes its modules from those folders only (`code_files`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RUNTIME_DIRS = ("pgolf", "callbacks")
ENTRY_POINTS = ("train.py", "eval.py")
TOOLS_DIR = "pgolf/tools"
CODE_KEY = "code"  # the run meta's and the artifact metadata's key of the code record


def project_root() -> Path:
    """The repository root (the folder that holds train.py, conf/ and pgolf/)."""
    return Path(__file__).resolve().parents[2]


def code_files(root: Path | None = None) -> list[Path]:
    """The runtime's `.py` files: the entry points, `callbacks/`, and `pgolf/` minus `pgolf/tools/`."""
    root = root or project_root()
    files = [root / f for f in ENTRY_POINTS if (root / f).is_file()]
    for d in RUNTIME_DIRS:
        for p in sorted((root / d).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if "__pycache__" not in p.parts and not rel.startswith(TOOLS_DIR + "/"):
                files.append(p)
    return files


def code_record(script: bytes) -> dict:
    """`{"bytes": len(script), "sha256": hex digest}` of a packed `train_gpt.py` (its bytes as written)."""
    return {"bytes": len(script), "sha256": hashlib.sha256(script).hexdigest()}


def code_of(meta: Mapping | None) -> dict:
    """The code record of a run's meta (or an artifact's metadata): `{"bytes", "sha256"}`. A library call
    that was handed no packed code (a test exporting a bare model) counts 0 code bytes and has no hash."""
    rec = (meta or {}).get(CODE_KEY)
    if rec is None:
        return {"bytes": 0, "sha256": None}
    return {"bytes": int(rec["bytes"]), "sha256": rec.get("sha256")}


def recorded_code_bytes(meta: Mapping) -> int | None:
    """The code bytes an artifact's metadata records: `meta.code.bytes` (the packed train_gpt.py's length, `code_of`),
    else the older `meta.code_bytes`; None when it records neither, or 0 bytes (metadata stripped or forged, or no
    code handed to the export): the challenge counts the code with the model (openai/parameter-golf README), so such
    an artifact's size cannot be checked (eval.py and inspect say so). The values were validated when the artifact
    was read (pgolf/export/weights.py `read_model_artifact`)."""
    if CODE_KEY in meta:
        n = code_of(meta)["bytes"]
    elif "code_bytes" in meta:
        n = int(meta["code_bytes"])
    else:
        return None
    return n or None  # 0 bytes: no code was handed over (a bare library export, a re-export of a .ckpt)


def code_bytes(meta: Mapping | None = None) -> int:
    """The counted code bytes of a run's meta: the length of its packed `train_gpt.py` (0 without one)."""
    return code_of(meta)["bytes"]


def package_versions(dists: Iterable[str]) -> dict[str, str]:
    """{distribution: installed version} of the packages a packed script imports (its requirements.txt);
    "missing" for one that is not installed."""
    out = {}
    for d in sorted(dists):
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "missing"
    return out


def public_version(version: str) -> str:
    """`version` without its PEP 440 local version label (`2.13.0+cu128` -> `2.13.0`): the label names a build
    of one index (the CPU or a CUDA wheel), which pip does not find on PyPI; `==2.13.0` lets pip resolve the
    platform's build."""
    return version.split("+", 1)[0]


def requirement_pins(versions: Mapping[str, str]) -> list[str]:
    """requirements.txt lines (`dist==version`) of `versions` ({distribution: version}, as `package_versions`
    records them), the local version label dropped (`public_version`). A distribution that was "missing" is
    named without a version. The recorded versions keep their labels (provenance)."""
    return [d if v == "missing" else f"{d}=={public_version(v)}" for d, v in versions.items()]
