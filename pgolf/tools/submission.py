"""Assemble a challenge submission folder from a group of seed runs (the challenge README's submission rules).

`python -m pgolf.tools.submission RUN_OR_SWEEP_DIR... --out records/track_10min_16mb/2026-05-01_MyRun
--name "My run" --github-id me [--mode sliding] [--baseline BASELINE_RUN_DIRS...]` writes, into a new folder:

* `train_gpt.py`: the packed script of the runs (pgolf/tools/pack.py; `train.py` keeps it in each run
  directory), which trains, exports and evaluates the experiment from inside the folder with
  `torchrun --standalone --nproc_per_node=N train_gpt.py`;
* `README.md`: what was run, the per-seed results table (every eval mode), mean ± std, the compliance of
  every eval mode, the method (the experiment's description and the recipe's resolved settings), the size
  accounting, the command and environment that reproduce each run, and (with
  `--baseline`) Δ and the Welch test of `pgolf.tools.compare` against the baseline group;
* `submission.json`: the fields the record folders use (author, github_id, name, blurb, date, track,
  val_loss/val_bpb mean and std, seeds, seed_results with per-seed val_loss/val_bpb/artifact_bytes/steps/
  step_avg_ms/eval_seconds, bytes_total, bytes_code (the length of train_gpt.py), hardware
  (`<processes>x<device>`), pytorch_version) plus `eval_mode` (the scored mode), `eval_modes` (every mode's
  mean, std, per-seed values and compliance) and `code_sha256`;
* `train_seed<SEED>.log`: each run's train log;
* `requirements.txt`: the packages train_gpt.py imports, pinned to the versions the runs recorded, without
  local version labels (`torch==2.13.0` for `2.13.0+cu128`: `public_version`).

No text file of the folder holds a path of the machine: the repository (and, in a train log, the run's own
directory) becomes `.` and the home directory `~`, where they stand as whole path components (`/tmp/pg` is
not a prefix of `/tmp/pg_work`); any other absolute path becomes `<path>/<its last component>`; a known
machine path still there after that (as in `file:///home/...`) stops the folder with an error.

Every run given is a run of the submission; none is dropped. A run directory is given, or found in a given
sweep folder. Runs of a packed `train_gpt.py` made in one folder (as the challenge's seed runs are:
`SEED=... RUN_ID=... torchrun ... train_gpt.py`, each leaving `logs/<RUN_ID>.txt`, `.yaml` and `.json`) are
given as the folder (every run in it) or as their records, `<folder>/logs/<RUN_ID>.json`; such a run's
artifact is measured when it is still the file in the folder, else its sizes are the ones its record and its
log's size lines give (they must agree), which the README says.

The tool refuses, with one line naming the runs and nothing written: runs whose directories hold
different train_gpt.py files (checked first, over every run), the same run twice, a run without
results.json (or record) or eval results, a packed run's log without its record or named by two records
(a reused RUN_ID), packed runs of different recipes (their overrides differ in more than what the packer
resets), runs of several groups or one seed twice, a run whose size check failed or whose results
`compliance` is not compliant, a recorded byte count or sha256 (results.json, the artifact's code record,
an eval_result.json of the artifact, a packed run's log) that the files disagree with, a packed run whose
seed or scores its log does not give, the last packed run of a folder without its own artifact, an
artifact + train_gpt.py over the track's 16,000,000 bytes (or a run's own lower limit) and, on the
10min_16mb track, a run that trained more than 600 s without a wall-clock cap of at most 600 s. The sizes
written are measured from the files (but see above).

Before writing, the folder is verified: the script compiles, and its sha256 is the code hash that every
run recorded in its artifact and its log (`code_sha256:`); runs of different code do not form one
submission. The scored mode is `--mode`, or else the eval mode with the lowest mean val_bpb among those
that are compliant in every run (the float `pre_quant` diagnostic is never a score). The folder is built
next to `--out` and renamed into place; an existing non-empty `--out` is never touched.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.export.code import CODE_KEY, code_record, public_version, requirement_pins
from pgolf.export.roundtrip import log_key
from pgolf.io import atomic_dir, sha256_file
from pgolf.quant.artifact import ArtifactError, load_artifact
from pgolf.tools.compare import DIAGNOSTIC_MODES, ModeStats, compare_to, mode_order, mode_stats
from pgolf.tools.fineweb import VARIANTS
from pgolf.tools.pack import RUN_KEYS, SCRIPT, packed_config, unpack
from pgolf.tools.runs import (
    CODE_LINE,
    RECORD_MAX_BYTES,
    CompareError,
    check_results,
    config_differences,
    differences,
    eval_result_files,
    find_runs,
    is_packed_folder,
    is_packed_record,
    is_run_dir,
    load_packed_run,
    load_run,
    packed_runs,
    parse_train_log,
    records_by_log,
)
from pgolf.tools.stats import MissingScipyError

TRACK = "10min_16mb"
TRACKS = (TRACK, "non_record_16mb")  # the challenge's records/track_<name> folders
# The size lines every run's log ends with (pgolf/train/run.py log_final_size): model and code bytes.
MODEL_LINE = re.compile(r"^Serialized model \S+: (\d+) bytes$", re.M)
CODE_SIZE_LINE = re.compile(r"^Code size: (\d+) bytes$", re.M)
SEED_LINE = re.compile(r"^seed:(\d+)$", re.M)  # pgolf/train/build.py log_header
HEADER_LINE = re.compile(r"^train_batch_tokens:\S+ .*$", re.M)  # the same header, with the wall-clock cap
CAP_LINE = re.compile(r"^train_batch_tokens:\S+ .*\bmax_wallclock_seconds:(\S+)", re.M)
TRACK_SECONDS = 600  # the 10min_16mb track: training within 10 minutes (challenge README)
# Arguments of a packed run that locate its data on the machine it ran on; the README's commands drop them
# and set DATA_PATH/TOKENIZER_PATH to the packed folders instead.
DATA_KEYS = ("data.root", "data.dir", "data.tokenizer_path", "data.train_pattern", "data.val_pattern")
DATA_KEYS += ("data.val_bytes_pattern", "data.prepare")
WORLD_LINE = re.compile(r"^world_size:(\d+) ", re.M)

# A character of a path component: what ends a path in text is whitespace, `/` or one of these delimiters.
COMPONENT = r"[^\s/'\"`:,;()\[\]{}<>|=]"
# An absolute path: a slash not inside a word, a URL (`//`), a relative path or after an interpolation
# (`${data.root}/datasets`), then two or more components.
ABS_PATH = re.compile(rf"(?<![\w.~/}}-])/(?:{COMPONENT}+/)+{COMPONENT}*")


class SubmissionError(ValueError):
    pass


def prefix_pattern(prefixes) -> re.Pattern | None:
    """A regex matching any of `prefixes` as whole path components: not preceded by a component character or
    `/` (so `/tmp/pg` is not found inside `/var/tmp/pg`), and followed by `/`, the end of the text or a
    character that ends a path (so `/tmp/pg` is not found inside `/tmp/pg_work`); the longest prefix is
    tried first. Trailing slashes are dropped; empty prefixes and the root `/` are ignored (None if none
    is left)."""
    kept = sorted({p.rstrip("/") for p in prefixes} - {""}, key=lambda p: (-len(p), p))
    if not kept:
        return None
    alternatives = "|".join(map(re.escape, kept))
    return re.compile(rf"(?<!{COMPONENT})(?<!/)(?:{alternatives})(?!{COMPONENT})")


def scrub_paths(text: str, replace: dict[str, str] | None = None) -> str:
    """Remove machine paths from `text`: each known prefix of `replace` ({prefix: replacement}, e.g. a run
    directory -> `.`) is replaced where it stands as whole path components (`prefix_pattern`), in one pass,
    longest first; then any other absolute path is reduced to `<path>/<its last component>`."""
    table = {p.rstrip("/"): r for p, r in (replace or {}).items()}
    pattern = prefix_pattern(table)
    if pattern is not None:
        text = pattern.sub(lambda m: table[m.group(0)], text)
    return ABS_PATH.sub(lambda m: "<path>/" + (Path(m.group(0)).name or ""), text)


def scrub_obj(obj, replace: dict[str, str] | None = None):
    """`obj` (JSON-like: dicts, lists, strings, numbers) with `scrub_paths` applied to every string, keys too,
    so that the JSON written from it stays valid."""
    if isinstance(obj, str):
        return scrub_paths(obj, replace)
    if isinstance(obj, dict):
        return {scrub_obj(k, replace): scrub_obj(v, replace) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub_obj(v, replace) for v in obj]
    return obj


def find_machine_paths(text: str) -> list[str]:
    """The absolute paths (two or more components, not URLs) that `text` holds."""
    return ABS_PATH.findall(text)


def requirements(root: Path | None = None) -> list[str]:
    """The runtime dependencies pinned in the project's pyproject.toml."""
    root = root or Path(__file__).resolve().parents[2]
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:  # Python 3.10
        block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', block[1]) if block else []


def label_of(d: Path) -> str:
    """A run directory as `<sweep or time>/<job>`, a packed run's record as `<folder>/logs/<RUN_ID>` (as
    `Run.label`; no machine paths in messages)."""
    if is_packed_record(d):
        return f"{d.absolute().parent.parent.resolve().name}/logs/{d.stem}"
    d = d.absolute()
    return "/".join(x for x in (d.parent.name, d.name) if x)


def packed_found(folder: Path) -> list[Path]:
    """The records of every run in a packed folder (`pgolf.tools.runs.packed_runs`). A log without a record
    raises SubmissionError: a run given (in its folder) is a run of the submission."""
    name = folder.resolve().name
    try:
        records, orphans = packed_runs(folder)
    except ValueError as e:
        raise SubmissionError(f"{name}/logs/{e}") from None
    if orphans:
        raise SubmissionError(
            f"{name}/logs/{orphans[0].name}: a run without its record logs/{orphans[0].stem}.json (unfinished, "
            "failed, or made by an older train_gpt.py); give the runs' records one by one (<folder>/logs/<RUN_ID>.json)"
        )
    if not records:
        raise SubmissionError(f"{name}: a folder of packed runs without any run record (logs/<RUN_ID>.json)")
    return records


def run_dirs(paths) -> list[Path]:
    """The runs of `paths`, each given (a run directory: `.hydra/config.yaml` and a train.log or
    results.json; a packed run's record `<folder>/logs/<RUN_ID>.json`) or found in a given sweep folder
    (`pgolf.tools.runs.find_runs`) or folder of packed runs (every `logs/<RUN_ID>.json`: `packed_found`).
    Nothing is dropped: a run reached twice (given twice, or given and also found in a given folder) raises
    SubmissionError naming it; a path that is none of these raises CompareError."""
    dirs: list[Path] = []
    where: dict[Path, str] = {}
    for p in map(Path, paths):
        kind = "sweep"
        if p.is_file() and is_packed_record(p):
            found = [p]
        elif p.is_dir() and is_packed_folder(p):
            found, kind = packed_found(p), "folder"
        else:
            folder = p.absolute().parent.parent if p.suffix == ".json" and p.parent.name == "logs" else p
            if (folder / "logs").is_dir() and any((folder / "logs").glob("*.json")) and not is_run_dir(folder):
                if not (folder / SCRIPT).is_file():
                    raise SubmissionError(
                        f"{label_of(folder)}: a folder of packed runs without its {SCRIPT} (the script that ran is "
                        "the submission's code): put it back beside logs/"
                    )
            found = [p] if p.is_dir() and is_run_dir(p) else find_runs([p])
        for d in found:
            key = d.resolve()
            how = f"as {label_of(p)}" if d == p else f"in the {kind} {label_of(p)}"
            if key in where:
                raise SubmissionError(f"{label_of(d)}: the same run given twice ({where[key]} and {how}); give it once")
            where[key] = how
            dirs.append(d)
    return dirs


def read_scripts(dirs: list[Path]) -> bytes:
    """The train_gpt.py that every run directory holds, checked to be one file before anything else is read
    (runs of different code do not form one submission). Raises SubmissionError naming the runs."""
    scripts = {}
    for d in dirs:
        f = (d.absolute().parent.parent if d.is_file() else d) / SCRIPT
        if not f.is_file():
            raise SubmissionError(f"{label_of(d)}: no {SCRIPT} (a run made before the packer cannot be submitted)")
        scripts[(label_of(d), str(f.resolve()))] = f.read_bytes()
    if len(set(scripts.values())) > 1:
        shas = ", ".join(f"{k[0]}: {code_record(v)['sha256'][:12]}" for k, v in scripts.items())
        raise SubmissionError(f"the runs were made by different code ({shas}); give runs of one {SCRIPT}")
    return next(iter(scripts.values()))


def load_given(dirs: list[Path]) -> list:
    """The finished runs of `dirs` (`pgolf.tools.runs.load_run`), every one of them: a directory without
    results.json or without any eval result (an unfinished or failed run) raises SubmissionError naming it."""
    runs = []
    for d in dirs:
        if d.is_dir() and not (d / "results.json").is_file():
            raise SubmissionError(f"{label_of(d)}: no results.json (an unfinished or failed run); leave it out")
        try:
            if d.is_dir():
                check_results(json.loads((d / "results.json").read_text()), "results.json")
            run = load_packed_run(d) if d.is_file() else load_run(d)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            raise SubmissionError(f"{label_of(d)}: unreadable run ({e})") from None
        if not run.modes:
            raise SubmissionError(f"{run.label}: its results hold no eval result (a failed run); leave it out")
        runs.append(run)
    return runs


def check_seeds(runs) -> None:
    """One group, each seed once (the same seed twice is not an independent sample). Raises SubmissionError."""
    groups = list(dict.fromkeys(r.identity.group for r in runs))
    if len(groups) != 1:
        raise SubmissionError(f"the runs form {len(groups)} groups ({', '.join(groups)}); give the runs of one")
    by_seed: dict[int, list[str]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r.label)
    for seed, labels in by_seed.items():
        if len(labels) > 1:
            raise SubmissionError(
                f"group {groups[0]} has seed {seed} {len(labels)} times ({', '.join(labels)}); give each seed once"
            )


@dataclass(frozen=True)
class Artifact:
    """A run's artifact as measured on disk."""

    name: str
    model_bytes: int  # the file's length
    total_bytes: int  # the file's length + the length of train_gpt.py (what the challenge counts)
    meta: dict  # its validated metadata
    measured: bool = True  # False: a later packed run in its folder replaced the file; as its run recorded it


def artifact_of(run, code_bytes: int) -> Artifact:
    """The run's artifact (results.json's `export.path`, in the run directory), its header validated
    (`load_artifact`, no tensor read) and its size measured from the file. Raises SubmissionError naming the
    run when it is absent or unreadable."""
    name = Path(run.export.get("path") or "").name
    if not name:
        raise SubmissionError(f"{run.label}: results.json names no artifact (export.path)")
    path = run.path / name
    if run.record is not None:
        rec = run.record.get("artifact") or {}
        if rec.get("name") != name or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("meta"), dict):
            raise SubmissionError(f"{run.label}: its record names no artifact {name} (artifact: name, bytes, meta)")
        if not path.is_file() or sha256_file(path) != rec.get("sha256"):
            problem = replaced_problem(run, path, rec["meta"])
            if problem:
                raise SubmissionError(f"{run.label}: its artifact {name} is {problem}")
            return Artifact(name, rec["bytes"], rec["bytes"] + code_bytes, rec["meta"], measured=False)
    if not path.is_file():
        raise SubmissionError(f"{run.label}: its artifact {name} is not in the run directory")
    try:
        header, _ = load_artifact(path, tensors=False)
    except ArtifactError as e:
        raise SubmissionError(f"{run.label}: its artifact {name} is unreadable ({e})") from None
    n = path.stat().st_size
    return Artifact(name, n, n + code_bytes, header.meta)


def replaced_problem(run, path: Path, meta: dict) -> str | None:
    """Why a packed run's artifact file, which is not the one its record names (another sha256, or gone),
    cannot count as replaced by a later run in the folder, or None when it can: a readable artifact with other
    metadata (another run's: its seed, its training) was written by a later run, even one that ended before
    its results.json; the same metadata with other bytes is an altered file; a missing or unreadable file is
    a problem only for the folder's last run (its results are the folder's results.json)."""
    if path.is_file():
        try:
            header, _ = load_artifact(path, tensors=False)
        except ArtifactError:
            header = None
        if header is not None:
            return "not the one it recorded (same metadata, other bytes)" if header.meta == meta else None
    if last_run_of(run):
        what = "unreadable" if path.is_file() else "missing"
        return f"{what}, and no later run replaced it (the folder's results.json is this run's)"
    return None


def last_run_of(run) -> bool:
    """Whether the packed folder's results.json holds this run's results (it was the folder's last run)."""
    f = run.path / "results.json"
    try:
        if not f.is_file() or f.stat().st_size > RECORD_MAX_BYTES:
            return False
        canonical = json.dumps(json.loads(f.read_text()), sort_keys=True)  # NaN == NaN as text
        return canonical == json.dumps(run.results, sort_keys=True)
    except (ValueError, RecursionError):
        return False


def recorded_sizes(run, art: Artifact) -> list[tuple[str, object, int]]:
    """(where, recorded value, measured value) of every byte count and sha256 that the run's records give
    about its artifact: results.json's `export` and top level, the artifact's code record and each
    eval_result.json of this artifact file."""
    e, res = run.export, run.results
    code_bytes = art.total_bytes - art.model_bytes
    out = [
        ("results.json export.model_bytes", e.get("model_bytes"), art.model_bytes),
        ("results.json export.code_bytes", e.get("code_bytes"), code_bytes),
        ("results.json export.total_bytes", e.get("total_bytes"), art.total_bytes),
        ("results.json total_bytes", res.get("total_bytes"), art.total_bytes),
        (f"the artifact's {CODE_KEY}.bytes", (art.meta.get(CODE_KEY) or {}).get("bytes"), code_bytes),
    ]
    for key in ("sha256", "artifact_sha256"):
        if e.get(key) is not None and art.measured:
            out.append((f"results.json export.{key}", e[key], sha256_file(run.path / art.name)))
    if not art.measured:  # as its run recorded it: the record's results and the log's last size lines agree
        log = run.log_file.read_text(errors="replace") if run.log_file.is_file() else ""
        for where, line in (("Serialized model", MODEL_LINE), ("Code size", CODE_SIZE_LINE)):
            found = line.findall(log)
            logged = int(found[-1]) if found else "missing"
            out.append((f"its log's {where} line", logged, art.model_bytes if line is MODEL_LINE else code_bytes))
        return [(w, v, m) for w, v, m in out if v is not None]
    for f in eval_result_files(run.path):
        doc = json.loads(f.read_text())
        if doc.get("artifact") == art.name:
            where = str(f.relative_to(run.path))
            out += [(f"{where} artifact_bytes", doc.get("artifact_bytes"), art.model_bytes)]
            out += [(f"{where} total_bytes", doc.get("total_bytes"), art.total_bytes)]
    return [(w, v, m) for w, v, m in out if v is not None]


def check_size(run, art: Artifact) -> None:
    """Refuse (SubmissionError naming the run and why) a run whose size check failed or whose artifact
    verdict is not compliant (results.json's `size_ok`, `export.size_ok`, `compliance`), whose recorded
    sizes or hashes disagree with the artifact file (an older results.json next to a newer artifact), or
    whose measured artifact + code is over the limit (`export.limit_bytes`, else 16,000,000 decimal bytes:
    the challenge README)."""
    res, e = run.results, run.export
    src = "its record's results" if run.record is not None else "results.json"
    for where, ok in (("size_ok", res.get("size_ok")), ("export.size_ok", e.get("size_ok"))):
        if ok is False:
            raise SubmissionError(f"{run.label}: its size check failed ({src} {where}: false)")
    comp = res.get("compliance") or {}
    failed = [k for k, v in comp.items() if v is False]
    if failed or comp.get("reasons"):
        why = "; ".join(comp.get("reasons") or []) or ", ".join(f"{k}: false" for k in failed)
        raise SubmissionError(f"{run.label}: not compliant ({src} compliance: {why})")
    for where, recorded, measured in recorded_sizes(run, art):
        where = where.replace("results.json", src) if run.record is not None else where
        if recorded != measured:
            if art.measured:
                why = f"the files measure {measured} ({art.name} + {SCRIPT}); results.json is not this artifact's"
            else:
                why = f"its record gives {measured} ({art.name}, since replaced by a later run); its records disagree"
            raise SubmissionError(f"{run.label}: {where} is {recorded}, but {why}")
    limit = min(int(e.get("limit_bytes") or ARTIFACT_LIMIT_BYTES), ARTIFACT_LIMIT_BYTES)  # never above the track's
    if art.total_bytes > limit:
        raise SubmissionError(
            f"{run.label}: {art.name} + {SCRIPT} is {art.total_bytes:,} bytes, over the {limit:,}-byte limit"
        )


@dataclass(frozen=True)
class Code:
    """The runs' packed script, verified, and what they recorded about it."""

    script: bytes
    sha256: str
    versions: dict[str, str]  # {distribution: version} the runs imported (their artifacts' `requirements`)
    world_size: int  # processes per run (the runs' `world_size:` log line)
    artifacts: dict[tuple[str, str], Artifact]  # Run.key -> its artifact (measured, or as its packed run recorded)
    world_sizes: dict[tuple[str, str], int] = field(default_factory=dict)  # Run.key -> its log's last world_size


def verify_code(runs, script: bytes, track: str = TRACK) -> Code:
    """The runs' train_gpt.py (`script`, the one file every run directory holds: `read_scripts`), checked: it
    compiles, its sha256 is the code hash recorded in every run's artifact and train.log, every artifact
    records its run's seed, a packed run's record agrees with its log (`check_packed_log`), every run's
    artifact passes `check_size` and, on the 10min_16mb `track`, every run trained within 10 minutes
    (`check_train_time`). Raises SubmissionError."""
    try:
        compile(script.decode("utf-8"), SCRIPT, "exec")
    except (SyntaxError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{SCRIPT} does not compile: {e}") from None
    sha = code_record(script)["sha256"]
    versions, worlds, artifacts, world_sizes = [], [], {}, {}
    for r in runs:
        art = artifact_of(r, len(script))
        meta = art.meta
        recorded = (meta.get(CODE_KEY) or {}).get("sha256")
        if recorded != sha:
            raise SubmissionError(f"{r.label}: its artifact records code {recorded}, not {SCRIPT}'s {sha}")
        if meta.get("seed") is not None and meta["seed"] != r.seed:
            raise SubmissionError(
                f"{r.label}: its artifact records seed {meta['seed']}, but the run's seed is {r.seed}"
            )
        if r.record is not None and not r.log_file.is_file():
            raise SubmissionError(f"{r.label}: its log logs/{r.log_file.name} is missing")
        log = r.log_file.read_text(errors="replace") if r.log_file.is_file() else ""
        logged = [m[2] for m in CODE_LINE.finditer(log)]
        if not logged or set(logged) != {sha}:
            raise SubmissionError(
                f"{r.label}: its {r.log_file.name} records code {logged or 'none'}, not {SCRIPT}'s {sha}"
            )
        if r.record is not None:
            check_packed_log(r, log)
        else:
            check_run_log(r, log)
        check_size(r, art)
        if track == TRACK:
            check_train_time(r, log)
        artifacts[r.key] = art
        versions.append(meta.get("requirements") or {})
        found = [int(m[1]) for m in WORLD_LINE.finditer(log)]
        worlds += found
        if found:
            world_sizes[r.key] = found[-1]
    if any(v != versions[0] for v in versions):
        raise SubmissionError("the runs recorded different package versions; give runs of one environment")
    return Code(script, sha, versions[0], max(worlds, default=1), artifacts, world_sizes)


def last_attempt(log: str) -> str:
    """The log from the header of its last (re)start on (`train_batch_tokens:` or, without it, `seed:` line):
    a resumed run's log holds the preempted attempt before it."""
    starts = [m.start() for m in HEADER_LINE.finditer(log)] or [m.start() for m in SEED_LINE.finditer(log)]
    return log[starts[-1] :] if starts else log


def check_packed_log(r, log: str) -> None:
    """No other record of a packed run's folder names its log (a reused RUN_ID; a resumed run's log holds its
    first part too, without a record), and the record's `SEED` is the config's seed; then `check_run_log`.
    Raises SubmissionError naming the run."""
    named = records_by_log(r.path, strict=False).get(r.record["log"], [])
    others = [n for n in named if n != f"{r.record['stem']}.json"]
    if others:
        raise SubmissionError(
            f"{r.label}: its log logs/{r.log_file.name} is also the log of {', '.join(others)} (RUN_ID was reused); "
            "a submission needs each run's own log"
        )
    env_seed = (r.record.get("command") or {}).get("env", {}).get("SEED")
    try:
        env_ok = env_seed is None or int(env_seed) == r.seed
    except ValueError:
        env_ok = False
    if not env_ok:
        raise SubmissionError(f"{r.label}: its config's seed {r.seed} is not its command's (SEED={env_seed})")
    check_run_log(r, log)


def check_run_log(r, log: str) -> None:
    """A run's results against its log (train.log, or a packed run's logs/<RUN_ID>.txt): every `seed:` line
    is the config's seed; in its last attempt (`last_attempt`), every eval mode read from the results has its
    val_loss and val_bpb in its own `_exact` line (`final_<label>_roundtrip_exact`, ...; 8 decimals), the
    float model's in the `DIAGNOSTIC pre_quant` line (4 decimals), the training time is within a
    millisecond of the last step line's (or the wall-clock stop's) and the steps are that line's. Raises
    SubmissionError naming the run."""
    seeds = {int(m) for m in SEED_LINE.findall(log)}
    if seeds != {r.seed}:
        raise SubmissionError(f"{r.label}: its config's seed {r.seed} is not the seed its log gives ({sorted(seeds)})")
    log = last_attempt(log)
    label = r.export.get("label") or ""
    for mode, res in r.results.get("roundtrip", {}).items():
        if r.sources.get(mode, "").endswith("eval_result.json"):
            continue  # a later eval.py of the artifact (its own sizes are checked against the file)
        line = f"{log_key(label, mode)}_exact val_loss:{res['val_loss']:.8f} val_bpb:{res['val_bpb']:.8f}"
        if not re.search(rf"^{re.escape(line)}$", log, re.M):
            raise SubmissionError(
                f"{r.label}: its {mode} val_bpb {res['val_bpb']:.8f} is not in its log's "
                f"`{log_key(label, mode)}_exact` line"
            )
    pre = r.export.get("pre_quant")
    if pre and f"DIAGNOSTIC pre_quant val_loss:{pre['val_loss']:.4f} val_bpb:{pre['val_bpb']:.4f} " not in log:
        raise SubmissionError(f"{r.label}: its pre_quant val_bpb {pre['val_bpb']:.4f} is not its log's")
    train, _, stopped = parse_train_log(log)
    last = max([(s, t) for s, _, t in train] + ([stopped] if stopped else []), default=None)
    training = r.results.get("training") or {}
    ms, steps = training.get("train_time_ms"), training.get("steps")
    if last is not None and ms is not None and abs(ms - last[1]) > 1:  # the log prints whole milliseconds
        raise SubmissionError(f"{r.label}: its train_time_ms {ms} is not its log's last step line's ({last[1]:.0f} ms)")
    if last is not None and steps is not None and steps != last[0]:
        raise SubmissionError(f"{r.label}: its steps {steps} are not its log's last step ({last[0]})")


def check_train_time(r, log: str) -> None:
    """The 10min_16mb track trains within 10 minutes: a run that trained longer than TRACK_SECONDS on the
    challenge clock is refused unless its wall-clock cap (`train.max_wallclock_seconds`, 0 = none) was at most
    TRACK_SECONDS (the clock stops training at the first step boundary past the cap, as the reference does);
    the cap is the one the header of the log's last attempt (`log`) printed, else the config's. Raises
    SubmissionError naming the run."""
    ms = r.train_time_ms
    train = r.config.get("train")
    cap = train.get("max_wallclock_seconds") if isinstance(train, dict) else None
    logged = CAP_LINE.findall(last_attempt(log))
    if logged:  # the cap the run printed when it started (its config file could be edited later)
        try:
            cap = float(logged[-1])
        except ValueError:
            cap = None
    capped = isinstance(cap, (int, float)) and 0 < cap <= TRACK_SECONDS
    if ms is not None and ms > TRACK_SECONDS * 1000 and not capped:
        raise SubmissionError(
            f"{r.label}: it trained {ms / 1000:.1f} s without a wall-clock cap of at most {TRACK_SECONDS} s "
            f"(train.max_wallclock_seconds={cap}); the {TRACK} track trains within 10 minutes"
        )


def requirement_lines(code: Code) -> list[str]:
    """requirements.txt: the packages the script imports at the runs' versions, local labels dropped
    (`public_version`; the builds the runs used are named in the comment line); without recorded versions,
    the project's pinned runtime requirements."""
    if not code.versions:
        return ["# pgolf runtime requirements (pyproject.toml)", *requirements()]
    builds = ", ".join(f"{d} {v}" for d, v in code.versions.items() if public_version(v) != v)
    head = "# the packages train_gpt.py imports, at the versions the runs used" + (
        f" (builds: {builds})" if builds else ""
    )
    return [head, *requirement_pins(code.versions)]


def pick_mode(runs, stats: dict[str, ModeStats], mode: str | None) -> str:
    if mode is not None:
        if mode not in stats:
            raise SubmissionError(f"--mode {mode}: the runs have no such eval mode (they have {', '.join(stats)})")
        if mode in DIAGNOSTIC_MODES:
            raise SubmissionError(f"--mode {mode}: a diagnostic of the float weights, never a score")
        if stats[mode].n != len(runs):
            raise SubmissionError(f"--mode {mode}: {len(runs) - stats[mode].n} of the {len(runs)} runs lack it")
        return mode
    ok = [s for m, s in stats.items() if m not in DIAGNOSTIC_MODES and s.compliant and s.n == len(runs)]
    if not ok:
        raise SubmissionError("no eval mode is compliant in every run; pick one with --mode (it will be marked)")
    return min(ok, key=lambda s: s.bpb_mean).mode


def run_command(runs) -> str | None:
    """The pgolf command line that made the runs (the Hydra overrides they share, shell-quoted), as one
    multirun over their seeds (`-m seed=A,B,C`), or one run for a single seed; None for runs of a packed
    train_gpt.py (their config is the packed one, with no overrides of pgolf's conf/)."""
    if any(r.record is not None for r in runs):
        return None
    per_run = []
    for r in runs:
        f = r.path / ".hydra" / "overrides.yaml"
        per_run.append([o for o in (yaml.safe_load(f.read_text()) or []) if o.split("=")[0] != "seed"])
    common = [o for o in per_run[0] if all(o in p for p in per_run)]
    multi = ["-m"] if len(runs) > 1 else []
    return shlex.join(["python", "train.py", *multi, *common, f"seed={','.join(str(r.seed) for r in runs)}"])


def seed_results_of(runs, s: ModeStats, mode: str, code: Code) -> dict[str, dict]:
    """Per seed (as a string): the scored mode's val_loss/val_bpb, sizes (measured from the files: the
    artifact, and artifact + train_gpt.py as `artifact_bytes`), steps and step time."""
    by_seed = {r.seed: r for r in runs}
    seed_results = {}
    for seed in s.seeds:
        r = by_seed[seed]
        steps, ms = r.steps, r.train_time_ms
        art = code.artifacts[r.key]
        seed_results[str(seed)] = {
            "val_loss": round(r.modes[mode]["val_loss"], 8),
            "val_bpb": round(r.modes[mode]["val_bpb"], 8),
            "artifact_bytes": art.total_bytes,
            "model_bytes": art.model_bytes,
            "steps": steps,
            "train_time_ms": ms,
            "step_avg_ms": round(ms / steps, 2) if steps and ms is not None else None,
            # the scored mode's evaluation time (PR #1611's eval_time_s: the 10-minute eval budget is reviewed)
            "eval_seconds": round(r.modes[mode]["seconds"], 1) if r.modes[mode].get("seconds") is not None else None,
        }
    return seed_results


def eval_modes_of(stats: dict[str, ModeStats]) -> dict[str, dict]:
    """Per eval mode: mean and std of val_bpb/val_loss, the per-seed val_bpb and the compliance."""
    eval_modes = {}
    for m, st in stats.items():
        eval_modes[m] = {
            "val_bpb_mean": round(st.bpb_mean, 8),
            "val_bpb_std": round(st.bpb_std, 8) if st.n > 1 else None,
            "val_loss_mean": round(st.loss_mean, 8),
            "val_loss_std": round(st.loss_std, 8) if st.n > 1 else None,
            "val_bpb": {str(k): round(v, 8) for k, v in zip(st.seeds, st.bpb)},
            "compliant": st.compliant,
            "diagnostic": m in DIAGNOSTIC_MODES,
            "reasons_not_compliant": st.reasons,
        }
    return eval_modes


def comparison_of(baseline_runs, s: ModeStats, mode: str) -> dict:
    """The significance test of the scored mode against the baseline group (SubmissionError without its mode)."""
    bgroup = baseline_runs[0].identity.group
    bs = mode_stats(baseline_runs, bgroup, mode)
    if bs is None:
        raise SubmissionError(f"the baseline runs have no {mode!r} results")
    c = compare_to(bs, s)
    return {
        "baseline_group": bgroup,
        "baseline_seeds": bs.seeds,
        "baseline_val_loss": round(bs.loss_mean, 8),
        "baseline_val_bpb": round(bs.bpb_mean, 8),
        "delta_bpb": round(c.delta_bpb, 8),
        "delta_nats": round(c.delta_nats, 8),
        "t_statistic": round(c.rule.t, 4) if c.rule.t == c.rule.t else None,
        "welch_df": round(c.rule.df, 4) if c.rule.df == c.rule.df else None,
        "p_gain": c.gain.p if c.gain.p == c.gain.p else None,
        "p_gain_over_margin": c.rule.p if c.rule.p == c.rule.p else None,
        "margin_nats": 0.005,
        "rule_met": c.rule_met,
        "rule": c.why,
    }


def build(
    runs, baseline_runs, code: Code, *, name, github_id, author, blurb, mode, date, track, hardware
) -> tuple[dict, str]:
    """(submission.json contents, README.md text) of one group's seed runs and their verified code,
    optionally tested against a baseline."""
    group = runs[0].identity.group
    stats = {m: s for m in mode_order(runs) if (s := mode_stats(runs, group, m)) is not None}
    mode = pick_mode(runs, stats, mode)
    s = stats[mode]
    prov = next((p for p in (code.artifacts[r.key].meta.get("provenance") for r in runs) if p), {})
    sizes = [code.artifacts[r.key].total_bytes for r in runs]  # measured; each within the limit (check_size)
    seed_results = seed_results_of(runs, s, mode, code)
    steps_all = [v["steps"] for v in seed_results.values() if v["steps"]]
    avg_all = [v["step_avg_ms"] for v in seed_results.values() if v["step_avg_ms"]]
    sub = {
        "author": author or github_id,
        "github_id": github_id,
        "name": name,
        "blurb": blurb
        or f"{group}: {len(runs)}-seed mean val_bpb {s.bpb_mean:.8f} ({mode} eval of the round-tripped artifact).",
        "date": date,
        "track": track,
        "eval_mode": mode,
        "val_loss": round(s.loss_mean, 8),
        "val_bpb": round(s.bpb_mean, 8),
        "val_loss_std": round(s.loss_std, 8) if s.n > 1 else None,
        "val_bpb_std": round(s.bpb_std, 8) if s.n > 1 else None,
        "compliant": s.compliant,  # the scored mode's rules; every run's size and verdict were checked
        "seeds": s.seeds,
        "seed_results": seed_results,
        "eval_modes": eval_modes_of(stats),
        "artifact_bytes_mean": round(sum(sizes) / len(sizes)) if sizes else None,
        "artifact_bytes_max": max(sizes) if sizes else None,
        "bytes_total": max(sizes) if sizes else None,
        "bytes_code": len(code.script),
        "code_sha256": code.sha256,
        "size_ok": True,  # refused otherwise (check_size), measured from the files
        "train_steps_mean": round(sum(steps_all) / len(steps_all), 2) if steps_all else None,
        "step_avg_ms_mean": round(sum(avg_all) / len(avg_all), 2) if avg_all else None,
        "hardware": hardware or f"{code.world_size}x{prov.get('device', 'unknown')}",  # the records': 8xH100 ...
        "pytorch_version": prov.get("torch", "unknown"),
        "git_sha": prov.get("git_sha", "unknown"),
        "git_dirty": prov.get("git_dirty"),
        "experiment": runs[0].identity.experiment,
        "variant": runs[0].identity.variant,
    }
    if baseline_runs:
        sub["comparison"] = comparison_of(baseline_runs, s, mode)
    return sub, readme(sub, stats, runs, mode, code)


def fmt_int(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def fmt_p(p: float | None) -> str:
    return "–" if p is None else (f"{p:.2e}" if p < 1e-3 else f"{p:.4f}")


def readme(sub: dict, stats: dict[str, ModeStats], runs, mode: str, code: Code) -> str:
    modes = list(stats)
    lines = [f"# {sub['name']}", "", sub["blurb"], ""]
    lines += [
        f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(sub['seeds'])} seeds, `{mode}` eval of the round-tripped "
        f"artifact; std {sub['val_bpb_std'] if sub['val_bpb_std'] is not None else '–'}), val_loss "
        f"{sub['val_loss']:.8f} nats. Largest artifact: {fmt_int(sub['bytes_total'])} bytes "
        f"(code {fmt_int(sub['bytes_code'])}); "
        f"limit 16,000,000: {'OK' if sub['size_ok'] else 'OVER THE LIMIT'}.",
        "",
        "## Results",
        "",
    ]
    head = ["seed", "steps", "step_avg ms", "artifact bytes", f"{mode} val_loss", *(f"{m} val_bpb" for m in modes)]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for seed in sub["seeds"]:
        v = sub["seed_results"][str(seed)]
        cells = [str(seed), str(v["steps"]), str(v["step_avg_ms"]), fmt_int(v["artifact_bytes"])]
        cells += [f"{v['val_loss']:.8f}"]
        cells += [f"{sub['eval_modes'][m]['val_bpb'].get(str(seed), float('nan')):.8f}" for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    mean = ["mean ± std", "", "", "", f"{sub['val_loss']:.8f}"]
    mean += [f"{stats[m].bpb_mean:.8f} ± {stats[m].bpb_std:.8f}" for m in modes]
    lines += ["| " + " | ".join(mean) + " |", ""]
    recorded = [str(r.seed) for r in runs if not code.artifacts[r.key].measured]
    if recorded:
        rest = "; the others are measured from the files." if len(recorded) < len(runs) else "."
        lines += [
            f"Artifact bytes of seed(s) {', '.join(recorded)}: as their runs recorded them (`logs/<RUN_ID>.json` and "
            "the log's size lines), their artifact files being no longer in the folder (replaced by a later run, "
            "or removed)" + rest,
            "",
        ]
    lines += ["Eval modes (val_bpb of the round-tripped artifact unless marked):", ""]
    for m in modes:
        st = stats[m]
        note = "diagnostic: the float model before quantization" if m in DIAGNOSTIC_MODES else ""
        comp = "compliant" if st.compliant else "NOT compliant: " + "; ".join(st.reasons)
        star = " (scored)" if m == mode else ""
        lines.append(f"- `{m}`{star}: {st.bpb_mean:.8f} ± {st.bpb_std:.8f}, {comp}{'; ' + note if note else ''}")
    later = sorted({r.sources[mode] for r in runs if r.sources.get(mode, "").endswith("eval_result.json")})
    if later:
        lines += [
            "",
            f"The `{mode}` scores come from a later `python eval.py` of the artifact ({', '.join(later)}), not from "
            "the run's own round trip; its settings are that file's.",
        ]
    lines += method_lines(runs)
    if "comparison" in sub:
        lines += significance_lines(sub["comparison"])
    lines += reproduce_lines(sub, packed_commands(runs, code), run_command(runs), data_source(runs, code))
    return "\n".join(lines) + "\n"


# The config groups that make the recipe (model, training, export, evaluation); the seed and the data paths are
# in the README's commands.
METHOD_GROUPS = ("model", "optim", "train", "callbacks", "export", "final_eval")
EXPERIMENTS = Path(__file__).resolve().parents[2] / "conf" / "experiment"


def experiment_description(name: str) -> str | None:
    """The leading comment of `conf/experiment/<name>.yaml` in this checkout (what the recipe reproduces and
    its sources), as one paragraph; None when there is no such file or comment."""
    path = EXPERIMENTS / f"{name}.yaml"
    try:
        if not name or not path.is_file() or not path.resolve().is_relative_to(EXPERIMENTS.resolve()):
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # a name no file can have (too long, a NUL)
        return None
    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            words.append(text)
    return " ".join(w for w in words if w) or None


def method_lines(runs) -> list[str]:
    """README's method section (the challenge asks a submission's README to explain it in reasonable detail):
    the experiment's description (`experiment_description`) and the recipe's resolved settings, the runs'
    config groups `METHOD_GROUPS`, as YAML in a collapsed block."""
    cfg = runs[0].config
    lines = ["", "## Method", ""]
    name = runs[0].identity.experiment
    desc = experiment_description(name)
    if desc:
        lines += [
            f"Experiment `{name}` (pgolf's `conf/experiment/{name}.yaml`; overrides in the settings below): {desc}",
            "",
        ]
    recipe = scrub_obj({k: cfg[k] for k in METHOD_GROUPS if k in cfg})  # machine paths out before YAML escapes
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True).rstrip()
    lines += ["<details><summary>The recipe's settings (the runs' resolved config)</summary>", ""]
    return lines + ["```yaml", text, "```", "", "</details>"]


def significance_lines(c: dict) -> list[str]:
    """README's significance section from submission.json's `comparison`."""
    return [
        "",
        "## Significance",
        "",
        f"Against `{c['baseline_group']}` (seeds {c['baseline_seeds']}, val_loss {c['baseline_val_loss']:.8f}): "
        f"Δ val_loss {c['delta_nats']:+.8f} nats, Δ val_bpb {c['delta_bpb']:+.8f}. One-sided Welch t-test on "
        f"the per-seed val_loss, H1: gain > {c['margin_nats']} nats: t = {c['t_statistic']}, "
        f"df = {c['welch_df']}, p = {fmt_p(c['p_gain_over_margin'])}; p(gain > 0) = {fmt_p(c['p_gain'])}. "
        f"Challenge rule (≥ 0.005 nats at p < 0.01): {'met' if c['rule_met'] else 'not met (' + c['rule'] + ')'}.",
    ]


def packed_data(code: Code) -> tuple[str, str]:
    """(shard folder, tokenizer) as the packed config names them, under ./data (pgolf/tools/pack.py)."""
    payload, _ = unpack(code.script)
    data = OmegaConf.create(payload["config"]).data
    return str(data.dir), str(data.tokenizer_path)


def packed_commands(runs, code: Code) -> list[str]:
    """One command per seed that runs train_gpt.py from inside the folder, with its environment (the data
    paths are the script's defaults, under ./data), shell-quoted. A packed run's command is the one its
    record gives (its environment variables and arguments), with the data paths so replaced."""
    shards, tokenizer = packed_data(code)
    data = {"DATA_PATH": shards, "TOKENIZER_PATH": tokenizer}
    out = []
    for r in runs:
        env, args, nproc = {"SEED": str(r.seed), "RUN_ID": f"seed{r.seed}"}, [], code.world_size
        if r.record is not None:
            command = r.record.get("command") or {}
            env = {"SEED": str(r.seed), "RUN_ID": r.record.get("run_id", "")} | dict(command.get("env") or {})
            args = [a for a in command.get("args") or [] if not run_only(a.lstrip("+").partition("=")[0])]
            nproc = code.world_sizes.get(r.key) or code.world_size
        env |= data
        run = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", SCRIPT]
        out.append(shlex.join([f"{k}={v}" for k, v in env.items()] + run + args))
    return out


def run_only(key: str) -> bool:
    """A key of a packed run's argument that the README's command drops: where the data was on the machine
    (DATA_KEYS: the command sets DATA_PATH and TOKENIZER_PATH) or what the packer resets between the runs of
    one recipe (`pgolf.tools.pack.RUN_KEYS`: `resume=...`, the progress bar, ...)."""
    return key in DATA_KEYS or any(key == k or key.startswith(k + ".") for k in RUN_KEYS)


def data_source(runs, code: Code) -> str:
    """README's sentence on the runs' data: the challenge's FineWeb export when the shard folder is one of
    its datasets (`pgolf.tools.fineweb.VARIANTS`), else the runs' own data, named by folder and tokenizer
    (and the pgolf corpus that prepared it, e.g. `data=demo`)."""
    shards, tokenizer = packed_data(code)
    folder = Path(shards).name
    variant = next((k for k, v in VARIANTS.items() if v.dataset == folder), None)
    where = f"the shards in `{shards}` and the tokenizer at `{tokenizer}`"
    if variant == "sp1024":
        return (
            f"the challenge's FineWeb export `{folder}` ({where}: `python3 data/cached_challenge_fineweb.py "
            "--variant sp1024` of openai/parameter-golf)"
        )
    if variant is not None:
        fetch = f"python -m pgolf.tools.fineweb --variant {variant}"
        return f"the FineWeb export `{folder}` of `{VARIANTS[variant].repo}` ({where}: `{fetch}` of pgolf)"
    data = runs[0].config.get("data", {})
    made = f"pgolf's `data={data['prepare']}` corpus, which " if data.get("prepare") else ""
    return f"the runs' own data, not FineWeb ({made}the runs read from `{data.get('dir')}`; {where})"


def reproduce_lines(sub: dict, packed: list[str], cmd: str, data: str) -> list[str]:
    """README's reproduce and environment sections."""
    return [
        "",
        "## Reproduce",
        "",
        f"From inside this folder, with {data}:",
        "",
        "```bash",
        "pip install -r requirements.txt",
        *packed,
        "```",
        "",
        f"`{SCRIPT}` ({sub['bytes_code']:,} bytes, sha256 `{sub['code_sha256']}`) holds the runtime and the resolved "
        "config (compressed, in one ASCII string literal); each run writes `logs/<RUN_ID>.txt`, the artifact and "
        "`results.json` here. The reference's `ITERATIONS`, `MAX_WALLCLOCK_SECONDS`, `VAL_LOSS_EVERY`, "
        "`TRAIN_BATCH_TOKENS`, `TRAIN_SEQ_LEN`, `WARMUP_STEPS`, `WARMDOWN_ITERS`, `TRAIN_LOG_EVERY`, `VAL_BATCH_SIZE` "
        "and `key=value` arguments override the config.",
        *(pgolf_lines(cmd) if cmd is not None else []),
        "",
        "## Environment",
        "",
        f"- hardware: {sub['hardware']}",
        f"- PyTorch {sub['pytorch_version']}; code at git {sub['git_sha']}"
        + (" (uncommitted changes)" if sub["git_dirty"] else ""),
        "- requirements: `requirements.txt`; train logs: " + ", ".join(f"`train_seed{s}.log`" for s in sub["seeds"]),
    ]


def pgolf_lines(cmd: str) -> list[str]:
    return [
        "",
        "The same runs from the pgolf repository (which packs this file from `conf/`):",
        "",
        "```bash",
        cmd,
        "```",
        "",
        "Each job writes its directory with the resolved config, `train.log`, `csv/metrics.csv`, the artifact and "
        "`results.json`; `python eval.py artifact=<job dir>/<artifact>` re-scores an artifact.",
    ]


def assemble(
    run_paths,
    out: str | Path,
    *,
    name: str,
    github_id: str,
    author: str | None = None,
    blurb: str | None = None,
    mode: str | None = None,
    baseline: list | None = None,
    date: str | None = None,
    track: str = TRACK,
    hardware: str | None = None,
) -> Path:
    out = Path(out)
    if track not in TRACKS:
        raise SubmissionError(f"--track {track}: not a track of the challenge (one of {' | '.join(TRACKS)})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file, not a folder"
        raise SubmissionError(f"{out} already exists and {what}; choose another --out")
    dirs = run_dirs(run_paths)
    script = read_scripts(dirs)  # first: runs of different code refuse, whatever else is wrong with them
    with warnings.catch_warnings(record=True) as caught:  # what the reading noted (runs.load_run): notes
        warnings.simplefilter("always")
        runs = load_given(dirs)
    check_recipes(runs)
    code = verify_code(runs, script, track)
    check_seeds(runs)
    baseline_runs = []
    if baseline:
        baseline_runs = load_given(run_dirs(baseline))
        try:
            check_seeds(baseline_runs)
            for r in baseline_runs:  # the comparison's scores are checked against their logs too
                log = r.log_file.read_text(errors="replace") if r.log_file.is_file() else ""
                check_packed_log(r, log) if r.record is not None else check_run_log(r, log)
        except SubmissionError as e:
            raise SubmissionError(f"--baseline: {e}") from None
    notes = (
        [str(w.message) for w in caught]
        + config_notes(runs)
        + [
            f"{r.label}: its artifact {code.artifacts[r.key].name} is no longer in its folder (replaced by a later "
            "run, or removed); its sizes are the ones its record and its log give"
            for r in runs
            if not code.artifacts[r.key].measured
        ]
    )
    runs = sorted(runs, key=lambda r: r.seed)
    sub, text = build(
        runs,
        baseline_runs,
        code,
        name=name,
        github_id=github_id,
        author=author,
        blurb=blurb,
        mode=mode,
        date=date or time.strftime("%Y-%m-%d"),
        track=track,
        hardware=hardware,
    )
    with atomic_dir(out) as tmp:  # an existing `out` is empty (checked above)
        write_folder(tmp, runs, sub, text, code)
    for n in notes:
        print(f"note: {n}")
    if len(runs) < 3:
        print(f"note: {len(runs)} seed(s); records show the gain over >= 3 seeds (challenge README)")
    for n in track_notes(out, track, code.world_size):
        print(f"note: {n}")
    if not blurb:
        print("note: no --blurb: the summary is generated; the challenge asks the README to explain the submission")
    return out


def track_notes(out: Path, track: str, world_size: int) -> list[str]:
    """Notes on where a records folder goes and what its track asks: the challenge keeps them in
    `records/track_<track>/<date>_<name>/`, and the 10-minute track trains on 8 GPUs (8xH100)."""
    notes = []
    if Path(out).resolve().parent.name != f"track_{track}":
        notes.append(f"the challenge keeps a {track} folder in records/track_{track}/<date>_<name>/")
    if track == TRACK and world_size != 8:
        notes.append(f"the runs trained on {world_size} process(es); the {track} track trains on 8xH100")
    return notes


# What is logged along the way, not what is trained or scored (TRAIN_LOG_EVERY, VAL_BATCH_SIZE): seed runs may differ
LOG_KEYS = ("train.log_every", "data.val_batch_tokens")


def without(cfg: dict, keys) -> dict:
    """`cfg` (nested dicts) without the dotted `keys` (a copy where one is present)."""
    out = cfg
    for key in keys:
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            out = copy.deepcopy(out) if out is cfg else out
            node = out
            for part in path:
                node = node[part]
            del node[last]
    return out


def check_recipes(runs) -> None:
    """Runs of a packed train_gpt.py take overrides (`ITERATIONS`, `key=value`) that a train.py run would
    have packed into another file: such runs form one submission only when they ran one recipe, their
    configs equal once the packer resets what may differ between the runs of one recipe (the seed, data
    folders, logger, progress bar, checkpointing, process layout: `pgolf.tools.pack.packed_config`). Raises
    SubmissionError naming the keys."""
    if not any(r.record is not None for r in runs):
        return  # train.py runs of one train_gpt.py (checked) share the recipe it holds
    recipes = []
    for r in runs:
        try:
            recipes.append(packed_config(r.config)[0])
        except Exception:  # noqa: BLE001 - a config the packer refuses (a machine path) is compared as it is
            recipes.append(r.config)
    shown = differences([without(c, LOG_KEYS) for c in recipes])
    if shown:
        data = "; the names of the shard folder and tokenizer are part of it" if "data." in shown else ""
        raise SubmissionError(
            f"the runs ran different recipes (their configs differ in {shown}: overrides of one {SCRIPT}{data}); "
            "give the runs of one recipe"
        )


def config_notes(runs) -> list[str]:
    """A note when the runs' configs differ in more than their seed. They share one train_gpt.py (checked),
    which holds the recipe, so such keys are the ones the packer resets (logger, progress bar, checkpointing,
    data folders, devices: pgolf/tools/pack.py) or Hydra's own; the note names them."""
    shown = config_differences(runs)
    return [f"the runs' configs differ in {shown}, outside the recipe that their one {SCRIPT} holds"] if shown else []


def machine_prefixes(run=None) -> dict[str, str]:
    """{absolute machine path: what replaces it} in the folder's text: the repository -> `.`, the home
    directory -> `~` and, for a run's own train log, its run directory (as given and resolved) -> `.`."""
    known = {str(Path(__file__).resolve().parents[2]): ".", str(Path.home()): "~"}
    if run is not None:
        known |= {str(run.path.absolute()): ".", str(run.path.resolve()): "."}
    return known


def checked_text(name: str, text: str, known: dict[str, str]) -> str:
    """`text` for the folder's file `name`, paths scrubbed (`scrub_paths`); SubmissionError if a known machine
    path of two or more components is still in it as whole components (after a `/` that the scrubbing does
    not read as a path start, as in `file:///home/...`; a URL's path is not a machine path)."""
    text = scrub_paths(text, known)
    for p in (p.rstrip("/") for p in known):
        if p.count("/") >= 2 and re.search(rf"(?<!{COMPONENT}){re.escape(p)}(?!{COMPONENT})", text):
            raise SubmissionError(f"{name}: the machine path {p} is left after scrubbing; edit the run's text")
    return text


def write_folder(tmp: Path, runs, sub: dict, text: str, code: Code) -> None:
    """The folder's files: train_gpt.py (as the runs recorded it), train logs per seed, submission.json,
    README.md and requirements.txt, every text file with machine paths scrubbed (`machine_prefixes`,
    `scrub_paths`). SubmissionError when a run has no train.log or a machine path would be left."""
    for r in runs:
        log = r.log_file
        if not log.is_file():
            raise SubmissionError(f"{r.label}: no {log.name}")
        name = f"train_seed{r.seed}.log"
        (tmp / name).write_text(checked_text(name, log.read_text(errors="replace"), machine_prefixes(r)))
    (tmp / SCRIPT).write_bytes(code.script)
    known = machine_prefixes()
    scrubbed = json.dumps(scrub_obj(sub, known), indent=2) + "\n"
    (tmp / "submission.json").write_text(checked_text("submission.json", scrubbed, known))
    (tmp / "README.md").write_text(checked_text("README.md", text, known))
    (tmp / "requirements.txt").write_text("\n".join(requirement_lines(code)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.submission", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="the seed runs (run directories or a sweep directory)")
    ap.add_argument("--out", required=True, help="the new submission folder (must not exist or be empty)")
    ap.add_argument("--name", required=True, help="the submission's name")
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--author", help="default: the GitHub id")
    ap.add_argument("--blurb", help="one-paragraph summary (default: generated)")
    ap.add_argument("--mode", help="the scored eval mode (default: the best mode compliant in every run)")
    ap.add_argument("--baseline", nargs="+", metavar="DIR", help="runs of the SOTA/baseline to test against")
    ap.add_argument("--date", help="default: today")
    ap.add_argument("--track", default=TRACK, choices=TRACKS)
    ap.add_argument("--hardware", help="default: the device recorded in the artifacts")
    args = ap.parse_args(argv)
    try:
        out = assemble(
            args.runs,
            args.out,
            name=args.name,
            github_id=args.github_id,
            author=args.author,
            blurb=args.blurb,
            mode=args.mode,
            baseline=args.baseline,
            date=args.date,
            track=args.track,
            hardware=args.hardware,
        )
    except (SubmissionError, CompareError, MissingScipyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sub = json.loads((out / "submission.json").read_text())
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    n = len(sub["seeds"])
    print(f"val_bpb {sub['val_bpb']:.8f} ({sub['eval_mode']}, {n} seeds), bytes_total {sub['bytes_total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
