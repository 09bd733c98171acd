"""Small file helpers shared by data, artifact and checkpoint code: atomic writes, hashing, locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """0666 minus the process umask: the mode `open()` would give a new file."""
    return 0o666 & ~_umask()


def _default_dir_mode() -> int:
    """0777 minus the process umask: the mode `mkdir()` would give a new directory."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, are fsync'ed, and the file is renamed over
    the target; an interrupted write leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes 0600; results should be readable like any new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _default_mode())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory next to `path` to fill; on success it takes the place of `path`, on error
    it is removed and `path` is untouched. Whether an existing `path` may be replaced is the caller's check.

    A directory already at `path` is first moved into a fresh hidden directory of the same parent (a unique
    name from `tempfile.mkdtemp`) and removed only once the new one is in place; nothing but `path` and what
    this call created is ever moved or deleted (a sibling such as `<path>.old` is left alone). Should the
    final rename fail, the old directory is put back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, _default_dir_mode())  # mkdtemp makes 0700; the result should be readable like any directory
    try:
        yield tmp
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            backup = aside / path.name
            path.rename(backup)
            try:
                tmp.rename(path)
            except BaseException:
                backup.rename(path)
                aside.rmdir()
                raise
            shutil.rmtree(aside)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent ranks or jobs prepare a cache only once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_run_dir(p: Path) -> bool:
    """A train.py job's directory: `.hydra/config.yaml` and a train.log or results.json (eval.py's output
    directories have `.hydra/` too, but neither file)."""
    return (p / ".hydra" / "config.yaml").is_file() and ((p / "train.log").is_file() or (p / "results.json").is_file())
