"""Finished training runs read from their directories, for `pgolf.tools.compare` and `pgolf.tools.submission`.

A run directory holds `.hydra/` (config, overrides), `results.json` (export sizes, the round-trip eval
modes, the float model's `pre_quant` diagnostic), `train.log` (the reference's `step:...` lines) and any
`eval_result.json` of a later `python eval.py ... out_dir=RUN/eval` up to two levels below it (one of
another file, or of a `max_tokens` prefix, is left out with a warning). Runs are
grouped by experiment and variant (`pgolf.train.identity.RunIdentity`, or `--by KEY...`); a group's runs
should differ only in their seed.

A packed `train_gpt.py` (pgolf/tools/pack.py) run in a folder leaves, per run, `logs/<RUN_ID>.txt` (its
log), `.yaml` (its resolved config) and `.json` (its record: command, artifact, results;
`pgolf.train.standalone.write_run_record`); `load_packed_run` reads one such run from its record.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pgolf.io import is_run_dir
from pgolf.train.identity import RunIdentity, identity_of_dir

TRAIN_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:([\d.]+)ms")
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+) train_time:([\d.]+)ms")
STOP_LINE = re.compile(r"^stopping_early: wallclock_cap train_time:([\d.]+)ms step:(\d+)/")
CODE_LINE = re.compile(r"^code_bytes:(\d+) code_sha256:([0-9a-f]{64})$", re.M)  # pgolf/train/build.py log_header
RECORD_MAX_BYTES = 1 << 24  # a packed run's record, read whole


class CompareError(ValueError):
    """A run directory or a comparison request that cannot be used (missing, no runs, unknown key or group)."""


@dataclass
class Run:
    path: Path
    identity: RunIdentity
    config: dict
    results: dict
    modes: dict[str, dict] = field(default_factory=dict)  # mode -> EvalResult dict
    sources: dict[str, str] = field(default_factory=dict)  # mode -> where it was read
    train_curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, time ms)
    val_curve: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, loss, bpb, ms)
    stopped: tuple[int, float] | None = None  # (step, ms) of a `stopping_early: wallclock_cap` line
    record: dict | None = None  # a packed run's record (logs/<RUN_ID>.json); None for a train.py run
    logged_code: str | None = None  # the sha256 of the packed train_gpt.py its log's last `code_sha256:` names

    @property
    def seed(self) -> int:
        return self.identity.seed

    @property
    def label(self) -> str:
        """The run directory as `<sweep or time>/<job>`, a packed run as `<folder>/logs/<RUN_ID>` (no machine
        paths in tables)."""
        if self.record is not None:
            return f"{self.path.resolve().name}/logs/{self.record['stem']}"
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def key(self) -> tuple[str, str]:
        """What tells runs apart (two runs may share a label): the resolved directory and the record's stem."""
        return str(self.path.resolve()), self.record["stem"] if self.record is not None else ""

    @property
    def log_file(self) -> Path:
        """The run's log of the reference's lines: `train.log`, or a packed run's `logs/<RUN_ID>.txt`."""
        return self.path / "logs" / self.record["log"] if self.record is not None else self.path / "train.log"

    @property
    def export(self) -> dict:
        return self.results.get("export", {})

    @property
    def artifact_bytes(self) -> int | None:
        return self.export.get("total_bytes", self.results.get("total_bytes"))

    @property
    def code_bytes(self) -> int | None:
        """The length of the run's packed train_gpt.py, counted in `artifact_bytes` (pgolf/export/code.py)."""
        return self.export.get("code_bytes")

    @property
    def steps(self) -> int | None:
        """Optimizer steps: results.json's `training`, else the last step the log shows."""
        if "steps" in self.results.get("training", {}):
            return self.results["training"]["steps"]
        return self.last_logged[0]

    @property
    def train_time_ms(self) -> float | None:
        """Training time on the challenge clock, at the end of training."""
        if "train_time_ms" in self.results.get("training", {}):
            return self.results["training"]["train_time_ms"]
        return self.last_logged[1]

    @property
    def last_logged(self) -> tuple[int | None, float | None]:
        points = [(s, t) for s, _, t in self.train_curve] + [(s, t) for s, _, _, t in self.val_curve]
        if self.stopped is not None:
            points.append(self.stopped)
        return max(points) if points else (None, None)


def find_runs(paths: list[str | Path], max_depth: int = 4) -> list[Path]:
    """Run directories among `paths`: each path is a run directory or is searched for them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CompareError(f"{p}: no such file or directory")
        if not p.is_dir():
            raise CompareError(
                f"{p.name}: not a run directory, a folder of runs, a folder of packed runs or a packed run's record "
                "(<folder>/logs/<RUN_ID>.json)"
            )
        if is_run_dir(p):
            found.append(p)
            continue
        level, hits = [p], []
        for _ in range(max_depth):
            nxt = []
            for d in level:
                for c in sorted(x for x in d.iterdir() if x.is_dir() and not x.name.startswith(".")):
                    (hits if is_run_dir(c) else nxt).append(c)
            level = nxt
        if not hits:
            raise CompareError(f"{p}: no training run directories (.hydra/config.yaml + train.log) in it or below it")
        found += hits
    out, seen = [], set()
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _config(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra's resolvers: keep it unresolved
        return OmegaConf.to_container(cfg, resolve=False)


def parse_train_log(text: str) -> tuple[list, list, tuple[int, float] | None]:
    """The reference's lines: train curve, validation curve, and where a wall-clock stop happened."""
    train, val, stop = [], [], None
    for line in text.splitlines():
        if m := TRAIN_LINE.match(line):
            train.append((int(m[1]), float(m[2]), float(m[3])))
        elif m := VAL_LINE.match(line):
            val.append((int(m[1]), float(m[2]), float(m[3]), float(m[4])))
        elif m := STOP_LINE.match(line):
            stop = (int(m[2]), float(m[1]))
    return train, val, stop


def read_log(run: Run, text: str) -> None:
    """A run's log into `run`: its curves, its wall-clock stop and the code it ran (`logged_code`)."""
    run.train_curve, run.val_curve, run.stopped = parse_train_log(text)
    found = CODE_LINE.findall(text)
    run.logged_code = found[-1][1] if found else None


def parse_metrics_csv(text: str) -> list:
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        if r.get("train_loss") and r.get("step"):
            rows.append((int(float(r["step"])), float(r["train_loss"]), float(r.get("train_time_ms") or "nan")))
    return rows


def eval_result_files(run_dir: Path) -> list[Path]:
    files = [run_dir / "eval_result.json", *run_dir.glob("*/eval_result.json"), *run_dir.glob("*/*/eval_result.json")]
    return sorted({f for f in files if f.is_file()}, key=lambda f: (f.stat().st_mtime, str(f)))


def _result_modes(run: Run, where: str) -> None:
    pre = run.results.get("export", {}).get("pre_quant")
    if pre:
        run.modes["pre_quant"], run.sources["pre_quant"] = pre, f"{where} (float model)"
    for mode, r in run.results.get("roundtrip", {}).items():
        run.modes[mode], run.sources[mode] = r, where


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    res_file = run_dir / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    run = Run(run_dir, identity_of_dir(run_dir), _config(run_dir), results)
    _result_modes(run, "results.json")
    artifact = Path(str(results.get("export", {}).get("path") or "")).name
    for f in eval_result_files(run_dir):  # later evaluations of the artifact (eval.py) take precedence
        rel = str(f.relative_to(run_dir))
        try:
            doc = json.loads(f.read_text())
        except (ValueError, RecursionError):
            raise ValueError(f"{rel}: not an eval result (not JSON)") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results", {}), dict):
            raise ValueError(f"{rel}: not an eval result (no results object)")
        if artifact and doc.get("artifact") != artifact:  # the float weights, or another run's artifact
            warnings.warn(f"{run.label}: {rel} scores {doc.get('artifact')}, not {artifact}: left out", stacklevel=2)
            continue
        if doc.get("max_tokens") is not None:  # a quick look at a prefix never stands in for the full score
            msg = f"{run.label}: {rel} scores the first {doc['max_tokens']} validation targets (max_tokens): left out"
            warnings.warn(msg, stacklevel=2)
            continue
        for mode, r in doc.get("results", {}).items():
            if mode in run.modes and run.sources[mode] != rel:
                msg = f"{run.label}: mode {mode!r} from {rel} replaces the one from {run.sources[mode]}"
                warnings.warn(msg, stacklevel=2)
            run.modes[mode], run.sources[mode] = r, rel
    log = run_dir / "train.log"
    if log.is_file():
        read_log(run, log.read_text(errors="replace"))
    elif (run_dir / "csv" / "metrics.csv").is_file():
        run.train_curve = parse_metrics_csv((run_dir / "csv" / "metrics.csv").read_text())
    return run


def is_packed_folder(p: Path) -> bool:
    """A folder where a packed train_gpt.py ran: the script and its `logs/` (not a train.py run directory,
    which keeps its packed script too)."""
    return (p / "train_gpt.py").is_file() and (p / "logs").is_dir() and not is_run_dir(p)


def is_packed_record(p: Path) -> bool:
    """A packed run's record, `<folder>/logs/<RUN_ID>.json` (a relative path too)."""
    p = p.absolute()
    return p.suffix == ".json" and p.parent.name == "logs" and is_packed_folder(p.parent.parent)


def packed_runs(folder: Path) -> tuple[list[Path], list[Path]]:
    """(records, orphan logs) of a packed folder: every `logs/*.json` record, and every `logs/*.txt` that no
    record names (a run that did not finish, or one from before records were kept). Raises ValueError naming
    a record that is not a JSON object, or a log that two records name (a reused RUN_ID)."""
    named = records_by_log(folder)
    for log, recs in named.items():
        if len(recs) > 1:
            raise ValueError(
                f"{log}: the log of {len(recs)} runs ({', '.join(recs)}: RUN_ID was reused); a submission needs "
                "each run's own log: give the records of the other runs one by one"
            )
    records = sorted((folder / "logs").glob("*.json"))
    return records, [log for log in sorted((folder / "logs").glob("*.txt")) if log.name not in named]


def records_by_log(folder: Path, strict: bool = True) -> dict[str, list[str]]:
    """{log name: the names of the records in `folder/logs` that name it}. A record that is not a JSON object
    raises ValueError, or with `strict=False` is left out."""
    named: dict[str, list[str]] = {}
    for r in sorted((folder / "logs").glob("*.json")):
        try:
            log = read_record(r).get("log")
        except ValueError:
            if strict:
                raise
            continue
        named.setdefault(str(log), []).append(r.name)
    return named


def read_record(path: Path) -> dict:
    """A packed run's record (a JSON object of at most RECORD_MAX_BYTES). Raises ValueError naming it."""
    if not path.is_file() or path.stat().st_size > RECORD_MAX_BYTES:
        raise ValueError(f"{path.name}: not a file of at most {RECORD_MAX_BYTES:,} bytes, not a packed run's record")
    try:
        doc = json.loads(path.read_text())
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise ValueError(f"{path.name}: not a packed run's record (not a JSON object)")
    return doc


def _plain_name(value, what: str, record: Path) -> str:
    if not isinstance(value, str) or not value or Path(value).name != value or value.startswith("."):
        raise ValueError(f"{record.name}: its {what} {value!r} is not a file name in logs/")
    return value


_NUM = (int, float)
# The fields of a packed run's record that the tools read, and their types (null or absent passes, but for
# REQUIRED_FIELDS); a mode of `results.roundtrip` and `results.export.pre_quant` is checked by MODE_FIELDS.
RECORD_FIELDS = {
    "run_id": (str,),
    "log": (str,),
    "config": (str,),
    "command": (dict,),
    "command.env": (dict,),
    "command.args": (list,),
    "artifact": (dict,),
    "artifact.name": (str,),
    "artifact.bytes": (int,),
    "artifact.sha256": (str,),
    "artifact.meta": (dict,),
    "artifact.meta.code": (dict,),
    "artifact.meta.code.bytes": (int,),
    "artifact.meta.code.sha256": (str,),
    "artifact.meta.seed": (int,),
    "artifact.meta.requirements": (dict,),
    "artifact.meta.provenance": (dict,),
    "results": (dict,),
    "results.export": (dict,),
    "results.export.path": (str,),
    "results.export.label": (str,),
    "results.export.model_bytes": (int,),
    "results.export.code_bytes": (int,),
    "results.export.total_bytes": (int,),
    "results.export.limit_bytes": (int,),
    "results.export.size_ok": (bool,),
    "results.export.pre_quant": (dict,),
    "results.training": (dict,),
    "results.training.steps": (int,),
    "results.training.train_time_ms": _NUM,
    "results.compliance": (dict,),
    "results.compliance.reasons": (list,),
    "results.size_ok": (bool,),
    "results.total_bytes": (int,),
    "results.roundtrip": (dict,),
}
REQUIRED_FIELDS = ("results", "log", "config", "results.roundtrip", "results.training.train_time_ms")
MODE_FIELDS = {"val_loss": _NUM, "val_bpb": _NUM, "tokens": _NUM, "bytes": _NUM, "compliant": (bool,)}


def _typed(value, types: tuple) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def _field(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def check_results(results, name: str) -> None:
    """The fields of a run's results (results.json, or a packed record's `results`) that the tools read have
    their types (the `results.` entries of RECORD_FIELDS, MODE_FIELDS). Raises ValueError naming the file."""
    fields = {k: v for k, v in RECORD_FIELDS.items() if k.startswith("results")}
    _check_fields({"results": results}, f"{name}: not a run's results", fields, ("results", "results.roundtrip"))


def check_record(doc: dict, name: str) -> None:
    """The fields of a packed run's record (`pgolf.train.standalone.write_run_record`) that the tools read
    have their types (RECORD_FIELDS; REQUIRED_FIELDS present): the environment and arguments strings, every
    eval mode with numeric val_loss and val_bpb (MODE_FIELDS). Raises ValueError naming the record and the
    field."""
    _check_fields(doc, f"{name}: not a packed run's record", RECORD_FIELDS, REQUIRED_FIELDS)


def _check_fields(doc: dict, what: str, fields: dict, required) -> None:
    def bad(key: str) -> ValueError:
        return ValueError(f"{what} ({key} is missing or has the wrong type)")

    for dotted, types in fields.items():
        value = _field(doc, dotted)
        if (value is None and dotted in required) or (value is not None and not _typed(value, types)):
            raise bad(dotted)
    strings = [
        ("command.env", list((_field(doc, "command.env") or {}).values())),
        ("command.args", _field(doc, "command.args") or []),
        ("results.compliance.reasons", _field(doc, "results.compliance.reasons") or []),
    ]
    for dotted, values in strings:
        if not all(isinstance(v, str) for v in values):
            raise bad(dotted)
    modes = {f"results.roundtrip.{m}": r for m, r in doc["results"]["roundtrip"].items()}
    if _field(doc, "results.export.pre_quant") is not None:
        modes["results.export.pre_quant"] = doc["results"]["export"]["pre_quant"]
    for where, r in modes.items():
        if not isinstance(r, dict):
            raise bad(where)
        for key, types in MODE_FIELDS.items():
            if (r.get(key) is None and key in ("val_loss", "val_bpb")) or (
                r.get(key) is not None and not _typed(r[key], types)
            ):
                raise bad(f"{where}.{key}")


def _packed_config(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"logs/{path.name}: missing (the run's resolved config)")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # YAML or OmegaConf: the file is not a config this run wrote
        raise ValueError(f"logs/{path.name}: not a run's resolved config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or not _typed(cfg.get("seed"), (int,)):
        raise ValueError(f"logs/{path.name}: not a run's resolved config (no integer seed)")
    return cfg


def load_packed_run(record: str | Path) -> Run:
    """One run of a packed train_gpt.py from its record `<folder>/logs/<RUN_ID>.json`: the config from the
    `.yaml` it names, the results and curves from the record and the log it names. Group: the config's
    `name` (and `variant`). Raises ValueError (or OSError) naming the file that is missing or malformed."""
    record = Path(record).absolute()
    folder = record.parent.parent
    doc = read_record(record)
    check_record(doc, record.name)
    doc = {**doc, "stem": record.stem}
    _plain_name(doc.get("log"), "log", record)
    cfg = _packed_config(folder / "logs" / _plain_name(doc.get("config"), "config", record))
    ident = RunIdentity(str(cfg.get("name", "?")), cfg["seed"], str(cfg.get("variant") or ""), ())
    run = Run(folder, ident, cfg, doc["results"], record=doc)
    _result_modes(run, f"logs/{record.name}")
    if run.log_file.is_file():
        read_log(run, run.log_file.read_text(errors="replace"))
    return run


def lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CompareError(f"--by {dotted}: no such key in the run's config")
        node = node[part]
    return node


def regroup(run: Run, keys: list[str]) -> Run:
    items = tuple((k, str(lookup(run.config, k))) for k in keys)
    variant = ",".join(f"{k}={v}" for k, v in items)
    run.identity = RunIdentity(run.identity.experiment, run.identity.seed, variant, items)
    return run


def results_file(run: Run) -> Path:
    """Where the run's results were read: results.json, or a packed run's record."""
    return run.path / "logs" / f"{run.record['stem']}.json" if run.record is not None else run.path / "results.json"


def load_runs(paths: list[str | Path], by: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """Finished runs (with results) and notes about the directories that were left out. A path is a run
    directory, a folder searched for them, a folder of packed runs (its records) or a packed run's record."""
    runs, notes, found, rest = [], [], [], []
    for p in map(Path, paths):
        if p.is_dir() and is_packed_folder(p):
            try:
                records, orphans = packed_runs(p)
            except ValueError as e:
                raise CompareError(f"{p.resolve().name}/logs/{e}") from None
            found += records
            notes += [f"skipped {p.resolve().name}/logs/{o.name}: no record (unfinished or failed)" for o in orphans]
        elif p.is_file() and is_packed_record(p):
            found.append(p)
        else:
            rest.append(p)
    for d in found + (find_runs(rest) if rest else []):
        try:
            run = load_packed_run(d) if d.is_file() else load_run(d)
        except (OSError, ValueError) as e:
            notes.append(f"skipped {d.parent.name}/{d.name}: {e}")
            continue
        if not run.modes:
            notes.append(f"skipped {run.label}: no results (unfinished or failed run)")
            continue
        runs.append(regroup(run, by) if by else run)
    notes += mixed_config_notes(runs)
    groups: dict[tuple[str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.identity.group, r.seed), []).append(r)
    keep = []
    for (g, seed), rs in groups.items():
        if len(rs) > 1:  # the same seed twice is not an independent sample: keep the newest
            rs = sorted(rs, key=lambda r: results_file(r).stat().st_mtime)
            notes.append(f"group {g} has seed {seed} {len(rs)} times: kept {rs[-1].label} only")
        keep.append(rs[-1])
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(keep, key=lambda r: order[id(r)]), notes


def flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True)
    return out


def config_differences(runs: list[Run]) -> str | None:
    """The config keys (flattened, the seed aside) in which `runs` differ, the first six named
    (`a.b, c and 3 more`); None when they differ only in the seed."""
    return differences([r.config for r in runs])


def differences(configs: list[dict]) -> str | None:
    """The keys (flattened, the seed aside) in which `configs` differ, as `config_differences` names them."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - {"seed"})
    diff = [k for k in keys if len({f.get(k) for f in flats}) > 1]
    if not diff:
        return None
    return ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")


def mixed_config_notes(runs: list[Run]) -> list[str]:
    """Warn when the runs of one group differ in more than their seed (they are not replicates)."""
    notes = []
    for g in dict.fromkeys(r.identity.group for r in runs):
        shown = config_differences([r for r in runs if r.identity.group == g])
        if shown:
            notes.append(
                f"group {g} mixes runs whose configs differ in {shown}: not replicates of one config "
                "(name the variants with variant=..., or group with --by KEY)"
            )
    return notes
