"""Where a run came from: git SHA and dirty flag, versions, device and date (recorded in every artifact)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import torch

from pgolf.export.code import project_root


def git_provenance(root: Path | None = None) -> dict:
    """{"git_sha": HEAD or "unknown", "git_dirty": tracked files modified (None when git cannot tell)}."""
    root = root or project_root()

    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": bool(dirty) if dirty is not None else None}


def provenance() -> dict:
    """git SHA and dirty flag, Python, torch and Lightning versions, the device and the local date."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        **git_provenance(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": version("lightning"),  # from the installed metadata: importing Lightning takes seconds
        "device": dev,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
