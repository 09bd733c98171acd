"""Counted code: the bytes of the code an artifact needs to train, export and evaluate.

The runtime is a set of folders: `pgolf/` except `pgolf/tools/` (command-line tools the runtime never
imports, like the reference's data/ scripts), `callbacks/`, and the entry points `train.py` and `eval.py`.
tests/test_imports.py asserts that no runtime module imports a tool, so the folder rule is the import rule.
"""

from __future__ import annotations

from pathlib import Path

RUNTIME_DIRS = ("pgolf", "callbacks")
ENTRY_POINTS = ("train.py", "eval.py")
TOOLS_DIR = "pgolf/tools"


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


def code_bytes(root: Path | None = None) -> int:
    """Total size in bytes of `code_files(root)`."""
    return sum(p.stat().st_size for p in code_files(root))
