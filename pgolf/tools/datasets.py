"""The data-preparation step the entry points run before training: `data.prepare` names it.

`demo` builds the Shakespeare demo corpus (pgolf/tools/demo.py), `synthetic` the small generated corpus of
the tests (pgolf/tools/synthetic.py); `null` means the shards already exist (FineWeb: pgolf/tools/fineweb.py).
Both builders take a file lock, so every rank of a job may call this; the first one builds, the others wait.
"""

from __future__ import annotations

from pathlib import Path

from pgolf.tools.demo import ensure_demo
from pgolf.tools.synthetic import ensure_synthetic

PREPARE_STEPS = ("demo", "synthetic")


def ensure_dataset(prepare: str | None, root: str | Path | None) -> Path | None:
    """Run the preparation step `prepare` into `root` unless its output is already there.

    Returns the prepared folder, or None for `prepare` null/"none". Raises ValueError for an unknown step."""
    if prepare in (None, "none"):
        return None
    if prepare == "demo":
        return ensure_demo(root) if root is not None else ensure_demo()
    if prepare == "synthetic":
        return ensure_synthetic(root) if root is not None else ensure_synthetic()
    raise ValueError(f"unknown data.prepare={prepare!r} (expected one of {', '.join(PREPARE_STEPS)} or null)")
