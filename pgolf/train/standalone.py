"""The packed `train_gpt.py`'s entry: the experiment's resolved config, the reference's environment
variables and `key=value` overrides -> one run in the current folder (pgolf/tools/pack.py writes the file;
its bootstrap calls `main`).

As the reference script (openai/parameter-golf `train_gpt.py`) does, it reads `SEED`, `RUN_ID`,
`DATA_PATH` (the shard folder), `TOKENIZER_PATH`, `MAX_WALLCLOCK_SECONDS`, `ITERATIONS`, `VAL_LOSS_EVERY`,
`TRAIN_BATCH_TOKENS`, `TRAIN_SEQ_LEN`, `WARMUP_STEPS`, `WARMDOWN_ITERS`, `TRAIN_LOG_EVERY` and `VAL_BATCH_SIZE`
(`ENV_KEYS`); the reference's other variables (`UNREAD_ENV`: model shape, learning rates), whose keys differ
between experiments, are named in a note when set. It writes its log to `logs/{RUN_ID}.txt`, its resolved
config and its record (`write_run_record`) beside it, and its artifact and `results.json` into the current
folder (a writable one, not a train.py run directory: `check_folder`), and runs alone or under
`torchrun --standalone --nproc_per_node=N` (the process count is taken from torchrun's environment).
Command-line arguments are overrides in Hydra's form, `train.iterations=50 final_eval.modes=[standard,sliding]`,
parsed by Hydra's own override parser (the values `train.py` would get: `{a:1}`, lists, `null`,
interpolations; a key may index a list), applied to the config and checked by the same typed schema as
`train.py` (pgolf/config/); there are no config groups to pick (`model=tiny`): the file holds one resolved
config. The run is `pgolf.train.run.fit`, as under `train.py`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pgolf.config.runtime import check_parts, check_runtime
from pgolf.config.schema import TrainRun
from pgolf.config.typed import ConfigError, PosInt, convert, load
from pgolf.config.validate import MODEL_SHAPE_KEYS, exit_on_config_error, plain
from pgolf.eval.modes import mode_names
from pgolf.export.code import code_record, package_versions
from pgolf.io import atomic_write_bytes, is_run_dir, sha256_file
from pgolf.quant.artifact import load_artifact
from pgolf.runlog import global_rank
from pgolf.train.run import exit_status, fit, prepare

RUN_ID_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The reference's environment variables -> the config keys they set (before the command-line overrides).
ENV_KEYS = {
    "SEED": "seed",
    "DATA_PATH": "data.dir",
    "TOKENIZER_PATH": "data.tokenizer_path",
    "ITERATIONS": "train.iterations",
    "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds",
    "VAL_LOSS_EVERY": "train.val_every",
    "TRAIN_BATCH_TOKENS": "train.batch_tokens",
    "TRAIN_SEQ_LEN": "train.seq_len",
    "WARMUP_STEPS": "train.warmup_steps",
    "WARMDOWN_ITERS": "train.warmdown_iters",
    "TRAIN_LOG_EVERY": "train.log_every",
    "VAL_BATCH_SIZE": "data.val_batch_tokens",
}
# The reference's other variables (model shape, learning rates, optimizer): their keys differ between
# experiments, so a run that has one set says it is not read (the config's key=value is the way to set them).
UNREAD_ENV = (
    "VOCAB_SIZE NUM_LAYERS NUM_KV_HEADS MODEL_DIM NUM_HEADS MLP_MULT TIE_EMBEDDINGS ROPE_BASE LOGIT_SOFTCAP "
    "QK_GAIN_INIT EMBED_LR HEAD_LR TIED_EMBED_LR TIED_EMBED_INIT_STD MATRIX_LR SCALAR_LR MUON_MOMENTUM "
    "MUON_BACKEND_STEPS MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS BETA1 BETA2 ADAM_EPS GRAD_CLIP_NORM "
    "EVAL_SEQ_LEN EVAL_STRIDE"
).split()


def _check_form(arg: str) -> None:
    key, eq, _ = arg.removeprefix("+").partition("=")
    if not eq or not key or key.startswith(("~", "-")):
        raise ConfigError(f"{arg!r} is not an override of the form key=value (e.g. train.iterations=50)")


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """Command-line `key=value` arguments (a leading `+` is accepted) as (dotted key, value) pairs, parsed by
    Hydra's override parser as `train.py`'s are (`[a,b]`, `{a:1}`, `1e-3`, `null`, `${data.root}/x`). A key
    may index a list (`export.rules.3.bits=5`). Raises ConfigError for an argument that is not `key=value`,
    a syntax error (Hydra's message) or a sweep (`a=1,2`: sweeps are `train.py -m`)."""
    for a in args:
        _check_form(a)
    try:
        overrides = OverridesParser.create().parse_overrides(list(args))
    except OverrideParseException as e:
        raise ConfigError(f"{' '.join(args)}: {str(e).splitlines()[0]}") from None
    out = []
    for o in overrides:
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: a sweep; the packed file runs one config (sweeps: train.py -m)")
        out.append((o.key_or_group, o.value()))
    return out


def parse_env(env: Mapping[str, str]) -> list[tuple[str, object]]:
    """(config key, value) of the environment variables of `ENV_KEYS` that are set in `env`: a decimal integer
    as the reference's `int()` reads it (`SEED=010` is 10, not YAML's octal 8), anything else parsed as a YAML
    scalar (a path stays a string whatever characters it holds). Raises ConfigError naming the pair."""
    out = []
    for var, key in ENV_KEYS.items():
        if not env.get(var):
            continue
        if re.fullmatch(r"\s*[+-]?\d+\s*", env[var]):
            out.append((key, int(env[var])))
            continue
        try:
            out.append((key, OmegaConf.to_container(OmegaConf.from_dotlist([f"v={env[var]}"]), resolve=False)["v"]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={env[var]}: {str(e).splitlines()[0]}") from None
    return out


def run_id_of(env: Mapping[str, str]) -> str:
    """The run's RUN_ID: the environment's, else a new uuid4 (the reference's default), then also put into this
    process's environment (when `env` is it) so that a resume hint names it (callbacks/checkpoint.py): the
    resumed run appends to the same `logs/<RUN_ID>.txt`."""
    run_id = env.get("RUN_ID") or str(uuid.uuid4())
    if env is os.environ:
        os.environ["RUN_ID"] = run_id
    return run_id


def unread_note(env: Mapping[str, str]) -> str | None:
    """A note naming the reference's variables of `UNREAD_ENV` set in `env` (not read: silently ignoring them
    would run another experiment than the one asked for); None when there are none."""
    unread = [v for v in UNREAD_ENV if env.get(v)]
    if unread:
        return f"note: {', '.join(unread)}: not read by this script; set the config's keys as key=value arguments"
    return None


def merge_overrides(cfg: DictConfig, over: list[tuple[str, object]]) -> DictConfig:
    """The overrides `over` ((dotted key, value) pairs) applied to `cfg` in order, a dict value merged into a
    dict node. A group picked by name (`model=tiny`) is refused: the packed config has no groups. Raises
    ConfigError naming the key (a list index out of range or not an integer, a key under a plain value)."""
    for key, value in over:
        try:
            node = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        except (OmegaConfBaseException, TypeError, IndexError, ValueError) as e:
            raise ConfigError(f"{key}={value}: {str(e).splitlines()[0]}") from None
        if OmegaConf.is_dict(node) and not isinstance(value, dict):
            raise ConfigError(
                f"{key}={value}: the packed train_gpt.py holds one resolved config, no config groups; "
                f"set its keys one by one ({key}.<name>=value)"
            )
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except (OmegaConfBaseException, TypeError, IndexError, ValueError) as e:
            raise ConfigError(f"{key}={value}: {str(e).splitlines()[0]}") from None
    return cfg


def run_config(packed: Mapping, argv: list[str], env: Mapping[str, str]) -> DictConfig:
    """The run's config: the packed config, then the environment variables of `ENV_KEYS` (`TRAIN_SEQ_LEN` sets
    the final eval's windows too where the recipe evaluates at its training length, as the reference), then the
    overrides `argv`, then the process layout of torchrun (`WORLD_SIZE`, `LOCAL_WORLD_SIZE`): the
    devices of this node, the node count, and with more than one process the packed distributed strategy."""
    cfg = OmegaConf.create(dict(packed["config"]))
    over = parse_env(env)
    if cfg.final_eval.seq_len == cfg.train.seq_len:  # the reference's TRAIN_SEQ_LEN is its eval window too
        over += [("final_eval.seq_len", v) for k, v in over if k == "train.seq_len"]
    cfg = merge_overrides(cfg, over)
    cfg = merge_overrides(cfg, parse_overrides(argv))
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_WORLD_SIZE", world))
        cfg.trainer.devices, cfg.trainer.num_nodes = local, max(world // local, 1)
    if cfg.trainer.devices * cfg.trainer.num_nodes > 1 and cfg.trainer.strategy == "auto":
        cfg.trainer.strategy = packed["distributed_strategy"]
    return cfg


def check_config(cfg: DictConfig) -> None:
    """The typed checks of `train.py` (pgolf/config/): every key, type and range, the export settings and
    the Newton-Schulz steps; `final_eval.modes` must be modes this file packs. Raises ConfigError."""
    d = plain(cfg)
    for key in MODEL_SHAPE_KEYS:
        if key in d.get("model", {}):
            convert(d["model"][key], PosInt, f"model.{key}")
    run = load(TrainRun, d, "")
    known = mode_names()
    for i, mode in enumerate(run.final_eval.modes):
        if mode not in known:
            raise ConfigError(
                f"final_eval.modes[{i}] = {mode!r} is not packed in this file (one of {' | '.join(known)})"
            )
    check_runtime(cfg)
    check_parts(cfg)


def main(packed: Mapping, script: str | Path, argv: list[str] | None = None, env: Mapping | None = None) -> int:
    """Run the packed experiment in the current folder; the exit status (pgolf.train.run.exit_status; 2 for
    a config error). `packed` is the payload (`config`, `distributed_strategy`, `requirements`) and
    `script` the packed file itself, whose length and sha256 are the run's code record."""
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(
            f"usage: [torchrun --standalone --nproc_per_node=N] {Path(script).name} [key=value ...]\n"
            "Trains, exports and evaluates the packed experiment in this folder (logs/, the artifact, "
            f"results.json). Environment: RUN_ID {' '.join(ENV_KEYS)}. Arguments: overrides of its config "
            "in Hydra's form (train.iterations=50)."
        )
        return 0
    note = unread_note(env)
    if note and global_rank() == 0:
        print(note, flush=True)
    code = code_record(Path(script).read_bytes())
    run_id = run_id_of(env)
    logs = Path("logs")
    with exit_on_config_error():
        check_folder(Path.cwd(), Path(script).name)
        check_run_id(run_id)
        cfg = run_config(packed, argv, env)
        try:
            check_config(cfg)
        except ConfigError as e:
            raise ConfigError(str(e) + set_by(str(e), env, argv)) from None
        extras = prepare(cfg, ".")
    versions = package_versions(packed["requirements"])
    config_file = config_path(logs, run_id)
    if config_file.name != f"{run_id}.yaml" and global_rank() == 0:
        print(f"{logs / run_id}.yaml is kept from an earlier run with RUN_ID={run_id}; this run's: {config_file}")
    results = fit(cfg, ".", extras, code, logs / f"{run_id}.txt", config_file, versions)
    if results is not None and global_rank() == 0:
        write_run_record(config_file.with_suffix(".json"), run_id, results, env, argv)
    return exit_status(cfg, results)


def write_run_record(path: Path, run_id: str, results: dict, env: Mapping[str, str], argv: list[str]) -> None:
    """Keep this run's record when a later run in the same folder replaces `results.json` and the artifact
    (as the challenge's seed runs do): `logs/<RUN_ID>.json` (`.N.json` beside a `.N.yaml`, `config_path`)
    holds the log's and config's names, the command (the environment variables of `ENV_KEYS` and `RUN_ID`,
    and the arguments), the artifact's name, length, sha256 and metadata (read back from the file), and
    results.json's contents. `pgolf.tools.submission` reads it. Written atomically; raises OSError."""
    art, name = None, (results.get("export") or {}).get("path")
    if name and Path(name).is_file():
        header, _ = load_artifact(name, tensors=False)
        art = {"name": name, "bytes": Path(name).stat().st_size, "sha256": sha256_file(name), "meta": header.meta}
    set_env = {v: env[v] for v in ("RUN_ID", *ENV_KEYS) if v in env}
    record = {
        "run_id": run_id,
        "log": f"{run_id}.txt",
        "config": path.with_suffix(".yaml").name,
        "command": {"env": set_env, "args": list(argv)},
        "artifact": art,
        "results": results,
    }
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def set_by(message: str, env: Mapping[str, str], argv: list[str]) -> str:
    """` (set by VAR=value)` when `message` is about the config key of an environment variable of `ENV_KEYS`
    that the command line did not override (`TRAIN_SEQ_LEN` also sets the final eval's windows: `run_config`),
    else ''."""
    args = {a.lstrip("+").partition("=")[0] for a in argv}
    for var, key in [*ENV_KEYS.items(), ("TRAIN_SEQ_LEN", "final_eval.seq_len")]:
        if var in env and key not in args and message.startswith(f"{key} "):
            return f" (set by {var}={env[var]})"
    return ""


def check_folder(folder: Path, script: str) -> None:
    """The run writes its artifact, results.json and logs/ into `folder`: not a train.py run directory
    (`pgolf.io.is_run_dir`), whose results it would replace, and writable (and logs/ if it exists). Writes
    nothing. Raises ConfigError naming it."""
    if is_run_dir(folder):
        raise ConfigError(
            f"{folder} is a train.py run directory: this run would replace its results.json and artifact; run "
            f"{script} in another folder"
        )
    for d in (folder, folder / "logs"):
        try:
            if d == folder or d.exists():
                tempfile.TemporaryFile(dir=d).close()
        except OSError as e:
            raise ConfigError(f"{d}: the run cannot write its files there ({e.strerror})") from None


def check_run_id(run_id: str) -> None:
    """`RUN_ID` names the files `logs/{RUN_ID}.txt` and `.yaml`: a plain file name (RUN_ID_FORM) that
    cannot leave `logs/` (`..`, `/`), hide (a leading `.`), read as an option (`-`) or exceed a file
    system's name length. Raises ConfigError naming the value."""
    if not RUN_ID_FORM.fullmatch(run_id):
        raise ConfigError(
            f"RUN_ID={run_id!r} must be a plain file name (it names logs/<RUN_ID>.txt): 1-128 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )


def config_path(logs: Path, run_id: str) -> Path:
    """Where a run writes its resolved config: `logs/{run_id}.yaml`, or, when an earlier run with the same
    `RUN_ID` left one (its log `logs/{run_id}.txt` is appended to, as the reference does), the first free
    `logs/{run_id}.{k}.yaml`, k = 2, 3, ...: an earlier run's config is never overwritten."""
    path, k = logs / f"{run_id}.yaml", 2
    while path.exists():
        path, k = logs / f"{run_id}.{k}.yaml", k + 1
    return path
