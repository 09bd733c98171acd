"""The run directory of `train.py`: one run's, claimed before anything is written into it.

Hydra names the directory (`hydra.run.dir`, or `hydra.sweep.dir` + `subdir` in a multirun; conf/train.yaml's
default has the time to the microsecond, so runs started in the same second get their own) and creates it
before the job starts. `claim` then refuses a directory that holds another run's outputs (its claim file,
results.json, an artifact, checkpoints, metrics, a log with lines in it), so no run replaces another's
artifact, results, checkpoints or metrics or mixes its lines into another's train.log; two runs that start
at the same moment on the same empty directory race for the claim file, created with O_EXCL, and one of
them is refused. The exception is an explicit resume from a checkpoint inside the directory
(`resume=<dir>/checkpoints/last.ckpt`), which continues that run in place. Only rank 0 claims: the other
processes of a job (Lightning's DDP processes, torchrun's, SLURM tasks) write nothing into a run directory
and leave theirs (`leave`): torchrun's and srun's processes resolve the time in `hydra.run.dir` each on its
own, so theirs is not rank 0's (they wrote nothing there before either). A multirun job that runs itself
again under torchrun (pgolf/tools/sweep.py) hands its claim to its rank 0 through the environment
(CLAIM_ENV, the claim's token), which takes it over instead of refusing it.

After the claim, `write_hydra_files` writes `.hydra/` (config.yaml, hydra.yaml, overrides.yaml: what Hydra
writes itself when `hydra.output_subdir` is set; conf/train.yaml sets it to null so that Hydra does not
write into the directory before the claim). When the run stops on a config error (even one found when the
checkpoint is loaded, before any step), `release` puts the directory back as the `snapshot` taken before
the claim recorded it: what the run wrote goes, what it changed gets its bytes back (a resumed run's claim,
`.hydra/`, log and metrics), and the directory goes when nothing else is in it. A run refused at start-up
leaves nothing behind, and the corrected command runs in the same directory. `check_resume`
(pgolf/config/validate.py) refuses a
`resume` checkpoint that does not exist before anything is claimed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pgolf.config.typed import ConfigError
from pgolf.io import atomic_write_bytes

CLAIM = ".pgolf-run.json"  # the claim: {"token", "pid", "started", "overrides"[, "resumed_from"]}
CLAIM_ENV = "PGOLF_RUN_CLAIM"  # the token of a claim this process's parent made for it (a relaunched job)
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
HYDRA_LOG = "train.log"  # Hydra's job log file (<job name>.log), which pgolf's log lines share
HYDRA_OWN = (".hydra",)  # what Hydra itself may have written for this job before it started


def shown(path: str | os.PathLike) -> str:
    """`path` relative to the working directory (`../` where needed): usable as typed, and messages name no
    machine paths."""
    return Path(os.path.relpath(Path(path).resolve(), Path.cwd().resolve())).as_posix()


def other_runs_outputs(run_dir: Path) -> list[str]:
    """The names of the entries of `run_dir` that this job's Hydra did not make (sorted, hidden ones last):
    another run's."""
    out = []
    for p in sorted(run_dir.iterdir(), key=lambda p: (p.name.startswith("."), p.name)):
        if p.name in HYDRA_OWN or (p.name == HYDRA_LOG and p.is_file() and p.stat().st_size == 0):
            continue
        out.append(p.name)
    return out


def inside(path: str | os.PathLike, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def read_claim(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / CLAIM).read_text())
    except (OSError, ValueError):
        return None


def claim(run_dir: str | os.PathLike, resume: str | None, overrides: list[str]) -> str:
    """Claim `run_dir` (created if missing) for this run by writing its claim file. Returns how: `new`;
    `inherited` (the claim is the parent process's, which handed it over: `hand_over`); `resumed` (a
    `resume` checkpoint inside `run_dir` continues that run there; the claim is replaced). Raises
    ConfigError, naming the directory and what is in it, when it holds another run's outputs or another run
    claimed it first."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    held = read_claim(run_dir)
    if held is not None and os.environ.get(CLAIM_ENV) and held.get("token") == os.environ[CLAIM_ENV]:
        return "inherited"
    token = uuid.uuid4().hex
    record = {"token": token, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    record["overrides"] = list(overrides)
    how = "new"
    if resume is not None and inside(resume, run_dir):
        record["resumed_from"] = Path(resume).resolve().relative_to(run_dir.resolve()).as_posix()
        atomic_write_bytes(run_dir / CLAIM, (json.dumps(record, indent=1) + "\n").encode())
        how = "resumed"
    else:
        taken = other_runs_outputs(run_dir)
        if not taken and not create_claim(run_dir, record):  # another run claimed it since the listing
            taken = [CLAIM]
        if taken:
            raise refused(run_dir, taken)
    return how


def create_claim(run_dir: Path, record: dict) -> bool:
    """Create the claim file with `record`, atomically (O_EXCL); False when it exists. The directory is made
    again if another process of the job removed it meanwhile (`leave`, before this claim existed)."""
    for _ in range(3):
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(run_dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=1) + "\n")
        return True
    raise FileNotFoundError(f"run directory {shown(run_dir)} keeps disappearing")


def leave(run_dir: str | os.PathLike) -> None:
    """For a process of the job other than rank 0, which writes no outputs: detach Hydra's log file handler
    under `run_dir` (its root log records stay on its console, out of rank 0's train.log) and remove
    `run_dir` if nothing is in it (the one Hydra made for this process alone)."""
    run_dir = Path(run_dir).resolve()
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == run_dir:
            root.removeHandler(h)
            h.close()
    discard_unused(run_dir)


def hand_over(run_dir: str | os.PathLike) -> None:
    """Let the processes this one starts for the same job (torchrun's rank 0) take over its claim: the
    claim's token goes into the environment they inherit (CLAIM_ENV)."""
    os.environ[CLAIM_ENV] = read_claim(Path(run_dir))["token"]


def refused(run_dir: Path, taken: list[str]) -> ConfigError:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    hint = f", or continue that run with resume={shown(ckpt)}" if ckpt.is_file() else ""
    listed = ", ".join(taken[:6]) + (", ..." if len(taken) > 6 else "")
    return ConfigError(
        f"run directory {shown(run_dir)} already holds another run's outputs ({listed}): a run never writes "
        f"into another run's directory; leave hydra.run.dir at its default (a new time-stamped directory) or "
        f"name a new one{hint}"
    )


@dataclass(frozen=True)
class Snapshot:
    """What a run directory held before a run claimed it (`snapshot`): each file's bytes (None for one that
    start-up never writes: a checkpoint, a link, a large file) and the directories, by their paths relative
    to it."""

    files: dict[str, bytes | None] = field(default_factory=dict)
    dirs: frozenset[str] = frozenset()


SNAPSHOT_MAX_BYTES = 64 << 20  # a larger file (an artifact) is left as it is by `release`
STARTUP_DIRS = (".hydra", "csv")  # where start-up writes, besides the directory itself (the claim, log, script)


def snapshot(run_dir: str | os.PathLike, resume: str | None = None) -> Snapshot | None:
    """What `run_dir` holds now (empty when it does not exist), taken before `claim(run_dir, resume, ...)` so
    that `release` can put it back: the bytes of the files start-up may write (the directory's own files and
    those of STARTUP_DIRS: a resumed run's claim, log, train_gpt.py, `.hydra/`, metrics; a few MB), the names
    of the others (checkpoints are never read). None, reading nothing, when `claim` will refuse the directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return Snapshot()
    if not (resume is not None and inside(resume, run_dir)) and other_runs_outputs(run_dir):
        return None
    files, dirs = {}, set()
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if p.is_dir() and not p.is_symlink():
            dirs.add(rel.as_posix())
            continue
        read = p.is_file() and not p.is_symlink() and (len(rel.parts) == 1 or rel.parts[0] in STARTUP_DIRS)
        files[rel.as_posix()] = p.read_bytes() if read and p.stat().st_size <= SNAPSHOT_MAX_BYTES else None
    return Snapshot(files, frozenset(dirs))


def release(run_dir: str | os.PathLike, how: str | None, before: Snapshot | None = None) -> None:
    """Undo what a run that stops at start-up (a config error) did to `run_dir`, so that the corrected command
    can run there. `how` is `claim`'s answer (None when the run stopped before it: nothing is touched, the
    directory may be another run's); `before` the `snapshot` taken before the claim: every file the run wrote
    since goes and every file it changed gets its bytes back (a resumed claim: the claim, `.hydra/`,
    train_gpt.py, the log and metrics of the run it was to continue). A `new` claim and the `.hydra/` files
    written after it go in any case; then the directory, if nothing else is in it (`discard_unused`)."""
    run_dir = Path(run_dir)
    if how in ("new", "resumed") and before is not None and run_dir.is_dir():
        put_back(run_dir, before)
    if how == "new":
        for name in HYDRA_FILES:
            (run_dir / ".hydra" / name).unlink(missing_ok=True)
        hydra_dir = run_dir / ".hydra"
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()
        (run_dir / CLAIM).unlink(missing_ok=True)
    discard_unused(run_dir)


def put_back(run_dir: Path, before: Snapshot) -> None:
    """Make `run_dir` hold what `before` recorded: the files and directories made since go, the files
    changed since get their bytes back (written atomically); the files it recorded without bytes stay."""
    for p in sorted(run_dir.rglob("*"), key=lambda p: -len(p.parts)):  # a directory's entries before it
        rel = p.relative_to(run_dir).as_posix()
        if p.is_dir() and not p.is_symlink():
            if rel not in before.dirs and not any(p.iterdir()):
                p.rmdir()
        elif rel not in before.files:
            p.unlink()
    for rel, data in before.files.items():
        path = run_dir / rel
        if data is not None and (not path.is_file() or path.read_bytes() != data):
            atomic_write_bytes(path, data)


def settle(run_dir: str | os.PathLike, how: str, cfg: DictConfig, hydra_cfg: DictConfig, subdir: str | None) -> None:
    """After `claim` (`how`; `none` for the job's processes other than rank 0): rank 0 writes `.hydra/`
    (`write_hydra_files`) unless it inherited the claim, the other processes `leave`."""
    if how == "none":
        leave(run_dir)
    elif how in ("new", "resumed"):
        write_hydra_files(run_dir, cfg, hydra_cfg, subdir)
    if how == "resumed":
        print(f"run directory: resuming in {shown(run_dir)}, the directory of the checkpoint resume= names", flush=True)


def write_hydra_files(run_dir: str | os.PathLike, cfg: DictConfig, hydra_cfg: DictConfig, subdir: str | None) -> None:
    """`.hydra/config.yaml` (the job's config, interpolations kept), `hydra.yaml` (`hydra_cfg`, the whole
    `{hydra: ...}` node) and `overrides.yaml` (the job's command-line overrides), as Hydra writes them; not
    when Hydra wrote them itself (`subdir`, its `hydra.output_subdir`, is set)."""
    if subdir is not None:
        return
    out = Path(run_dir) / ".hydra"
    overrides = OmegaConf.create(list(hydra_cfg.hydra.overrides.task))
    for name, node in zip(HYDRA_FILES, (cfg, hydra_cfg, overrides)):
        atomic_write_bytes(out / name, OmegaConf.to_yaml(node).encode())


def discard_unused(run_dir: str | os.PathLike) -> bool:
    """Remove `run_dir` when it holds nothing but an empty Hydra log (a run that stopped on a config error
    before it wrote anything); True when it was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    log = run_dir / HYDRA_LOG
    entries = [p.name for p in run_dir.iterdir()]
    if entries == [HYDRA_LOG] and log.is_file() and log.stat().st_size == 0:
        log.unlink()
        entries = []
    if entries:
        return False
    try:
        run_dir.rmdir()
    except OSError:  # something arrived meanwhile (rank 0's claim): it is not unused
        return False
    return True
