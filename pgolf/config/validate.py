"""Validation of the composed configs of train.py and eval.py, before torch or Lightning is imported.

`validate_train` / `validate_eval` read the composed DictConfig into `TrainRun` / `EvalRun`
(pgolf/config/schema.py): a key that a group lacks, whether it comes from an experiment file or a
`+group.key=value` override, a missing or `???` value, a wrong type or a value out of range is a
`ConfigError` naming the key. `check_overrides` gives a command-line override of a key that does not exist
the same message before Hydra composes (Hydra would refuse it too, suggesting `+key`, which is no help for
a typo). `exit_on_config_error` turns a ConfigError into `config error: <message>` on stderr, exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pgolf import MAX_WINDOW_LOGITS, window_over_logits
from pgolf.config.schema import RESERVED_TRAINER_KEYS, EvalRun, TrainerConfig, TrainRun
from pgolf.config.typed import MISSING_VALUE, ConfigError, PosInt, convert, join, load, schema_fields, unknown_key

MODEL_SHAPE_KEYS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads")


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """Print a ConfigError raised inside the block as one line and exit with status 2."""
    try:
        yield
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def eval_modes(conf_dir: str | Path) -> list[str]:
    """The evaluation modes: one `conf/eval/<name>.yaml` each (sorted names)."""
    return sorted(p.stem for p in (Path(conf_dir) / "eval").glob("*.yaml"))


def plain(cfg: DictConfig) -> dict:
    """The composed config without Hydra's own node, interpolations resolved, `???` kept as the string."""
    out = {}
    try:
        for k in cfg:
            if k == "hydra":
                continue
            if OmegaConf.is_missing(cfg, k):
                out[k] = MISSING_VALUE
            else:
                v = cfg[k]
                out[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        return out
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def validate_train(cfg: DictConfig, conf_dir: str | Path) -> TrainRun:
    """The composed conf/train.yaml as a `TrainRun`; `final_eval.modes` must name files of conf/eval/.
    Raises ConfigError."""
    d = plain(cfg)
    for key in MODEL_SHAPE_KEYS:  # GPTConfig divides by these before its own checks could name them
        if key in d.get("model", {}):
            convert(d["model"][key], PosInt, f"model.{key}")
    run = load(TrainRun, d, "")
    # the artifact's eval window, as eval.py's artifact check bounds it (pgolf/export/weights.py)
    if over := window_over_logits(run.model.vocab_size, run.final_eval.seq_len, run.train.seq_len):
        key, _, n = over
        raise ConfigError(
            f"model.vocab_size x {key}.seq_len = {n:,} logits a window, over {MAX_WINDOW_LOGITS:,} (eval memory)"
        )
    known = eval_modes(conf_dir)
    for i, mode in enumerate(run.final_eval.modes):
        if mode not in known:
            raise ConfigError(f"final_eval.modes[{i}] = {mode!r} is not an eval mode (one of {' | '.join(known)})")
    return run


def validate_eval(cfg: DictConfig, conf_dir: str | Path) -> EvalRun:
    """The composed conf/eval.yaml as an `EvalRun`; every selected mode (its `mode:` key, else its name)
    must name a file of conf/eval/. Raises ConfigError."""
    if OmegaConf.is_missing(cfg, "artifact"):
        raise ConfigError("artifact must be set: python eval.py artifact=PATH/final_model.<label>.ptz")
    run = load(EvalRun, plain(cfg), "")
    if not run.eval:
        raise ConfigError("eval selects no mode: eval=standard or eval=[standard,sliding,...]")
    known = eval_modes(conf_dir)
    for name, settings in run.eval.items():
        mode = settings.get("mode", name)
        if mode not in known:
            raise ConfigError(f"eval.{name}: {mode!r} is not an eval mode (one of {' | '.join(known)})")
    return run


def check_overrides(args: list[str], root: type, conf_dir: str | Path) -> None:
    """Refuse a command-line override (`group.key=value`, `+group.key=value`, `~group.key`) of a key that a
    typed group of `root` lacks, naming the group and the closest key. Group selections (`model=tiny`,
    `experiment=...`) must name a key of `root` or a folder of `conf_dir`; Hydra's own overrides and
    the keys of untyped groups (export, eval: checked after composing) pass; so does anything Hydra's
    parser rejects (Hydra reports it). Raises ConfigError."""
    try:
        args = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-")]
        overrides = OverridesParser.create().parse_overrides(args)
    except OverrideParseException:  # a syntax error: Hydra's own message is the better one
        return
    searchpath = any(o.key_or_group.startswith("hydra.searchpath") for o in overrides)
    for o in overrides:
        if o.is_hydra_override() or o.package is not None or "/" in o.key_or_group:
            continue
        parts = o.key_or_group.split(".")
        if len(parts) == 1 and (Path(conf_dir) / parts[0]).is_dir():
            if not searchpath:  # options of other config folders: Hydra finds them
                check_group_option(o, Path(conf_dir) / parts[0])
            continue
        check_key_path(parts, root, "")


def check_group_option(o, folder: Path) -> None:
    """A group selection (`experiment=nosuch`, a list `eval=[a,b]`, a choice sweep `model=a,b`) names options
    of its folder of `conf/`: else one line with the options and the closest, where Hydra prints many lines.
    Other values (null, interpolations, range sweeps) are left to Hydra. Raises ConfigError."""
    if o.is_delete():
        return
    if o.is_sweep_override():
        values = list(o.sweep_string_iterator()) if isinstance(o.value(), ChoiceSweep) else []
    else:
        v = o.value()
        values = [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
    options = sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    listed = f"one of {' | '.join(options)}"
    if not o.is_sweep_override() and o.value() is None:
        raise ConfigError(f"{o.key_or_group}=null: a group selection names an option ({listed})")
    for v in values:
        if "$" in v or v in options:
            continue
        close = difflib.get_close_matches(v, options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{o.key_or_group}={v}: no such option of {o.key_or_group} ({listed}){hint}")


def check_key_path(parts: list[str], schema: type, where: str) -> None:
    """Follow `parts` down the dataclass `schema` as far as it is typed. Raises ConfigError."""
    spec = schema_fields(schema)
    open_field = getattr(schema, "OPEN", None)
    head, rest = parts[0], parts[1:]
    if schema is TrainerConfig and head in RESERVED_TRAINER_KEYS:
        raise ConfigError(f"{join(where, head)} is set by pgolf: {RESERVED_TRAINER_KEYS[head]}")
    if head not in spec or head == open_field:
        if open_field:
            return
        raise unknown_key(head, [n for n in spec if n != open_field], where)
    if not rest:
        return
    members = [a for a in _members(spec[head][0]) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    for m in members:  # a union of dataclasses (the logger kinds): the first that has the key
        if rest[0] in schema_fields(m) or m is members[-1]:
            check_key_path(rest, m, join(where, head))
            return


def _members(tp) -> list:
    """The types an annotation allows (through Annotated and unions)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _members(args[0])
    if args and origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _members(a)]
    return [tp]


def check_resume(resume: str | None) -> None:
    """`resume` (a path, or None) names a checkpoint file that exists: train.py checks it before claiming the
    run directory, the packed train_gpt.py before any data is prepared. Raises ConfigError."""
    if resume is not None and not Path(resume).is_file():
        raise ConfigError(
            f"resume={resume}: no such checkpoint file (resume names a .ckpt: a run directory's checkpoints/last.ckpt)"
        )
