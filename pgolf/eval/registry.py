"""Eval modes by name: each mode module declares a `Mode` (its name, settings dataclass, compliance rule and
run function) and `register`s it; `run_mode` parses a mode's config, runs it, times it and returns its
`EvalResult`. pgolf/eval/modes.py imports every mode module, so importing it fills the registry.

A mode's config is a dict of its settings (`conf/eval/<name>.yaml`): the settings dataclass's fields, of
which `seq_len` and `batch_windows` default to the context's. Every problem (unknown mode, unknown key, bad
value) raises `ValueError` in `parse_mode`, before anything runs. A config may also name the registered mode
it runs with `mode:` (default: its own name), so one mode can run under several names in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from pgolf import MAX_SEQ_LEN
from pgolf.config.typed import load
from pgolf.data.tokenizer import bpb
from pgolf.eval.core import EvalContext, EvalResult, Scored, reduce_sums, sync

SHARED = ("seq_len", "batch_windows")  # settings whose default is the context's


@dataclass(frozen=True)
class Mode:
    """name: the key of `conf/eval/<name>.yaml`; settings: the dataclass of its settings (validated in its
    `__post_init__`); run(model, tokens, settings, ctx) -> Scored; rule(settings) -> (compliant, reason);
    defaults: settings values that differ from the dataclass's (several modes sharing one dataclass)."""

    name: str
    settings: type
    run: Callable[[Any, torch.Tensor, Any, EvalContext], Scored]
    rule: Callable[[Any], tuple[bool, str]]
    defaults: dict = field(default_factory=dict)


_MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    """Add a mode to the registry. Raises ValueError when the name is taken."""
    if mode.name in _MODES:
        raise ValueError(f"eval mode {mode.name!r} is registered twice")
    _MODES[mode.name] = mode
    return mode


def mode_names() -> list[str]:
    """The registered modes' names, sorted."""
    return sorted(_MODES)


def get_mode(name: str) -> Mode:
    if name not in _MODES:
        raise ValueError(f"unknown mode {name!r} (one of {' | '.join(mode_names())})")
    return _MODES[name]


def parse_mode(name: str, settings: dict | None, *, seq_len: int, batch_windows: int = 32) -> tuple[Mode, Any]:
    """(the mode, its settings object) for the config `settings` of the eval named `name`. Keys the settings
    dataclass lacks are refused; `seq_len`/`batch_windows` absent or null take the values given here. Raises
    ValueError naming the mode (an unknown key or mode, a bad value, a `seq_len` above MAX_SEQ_LEN)."""
    s = dict(settings or {})
    try:
        mode = get_mode(s.pop("mode", name))
    except ValueError as e:
        raise ValueError(f"eval mode {name}: {e}") from None
    names = {f.name for f in fields(mode.settings)}
    unknown = sorted(set(s) - names)
    if unknown:
        raise ValueError(f"eval mode {name}: unknown settings {unknown} (the settings of {mode.name}: {sorted(names)})")
    shared = {"seq_len": seq_len, "batch_windows": batch_windows}
    shared = {k: v if (x := s.pop(k, None)) is None else x for k, v in shared.items() if k in names}
    kw = {**mode.defaults, **shared, **s}
    # typed as the config schema types a group: a wrong type names the mode and key, before the dataclass's own
    # range checks (whose messages get the mode's name in front)
    st = load(mode.settings, kw, name)
    if getattr(st, "seq_len", 1) > MAX_SEQ_LEN:
        raise ValueError(f"eval mode {name}: seq_len must be at most {MAX_SEQ_LEN} (eval.py's cap), got {st.seq_len}")
    return mode, st


def run_mode(name: str, settings: dict, model, tokens: torch.Tensor, ctx: EvalContext) -> EvalResult:
    """Score `tokens` (the validation stream, 1-D) with the eval named `name` and its config `settings`.

    `model` is a GPT (or a torch.compile wrapper of one, which implies `ctx.compile`); modes that adapt
    weights work on a copy or on adapters, so the model is unchanged afterwards. The wall time includes the
    cross-rank reduction of the sums. The result says how many of the stream's targets the metric scored
    (`targets`, `distinct`, `scoring`) and, for a metric that re-scores or skips targets (the records'),
    carries pgolf's each-target-once figure from the same pass (`once`). Raises ValueError when the mode
    scored no target (a window longer than `tokens`): its val_bpb would read 0.0."""
    mode, st = parse_mode(name, settings, seq_len=ctx.seq_len, batch_windows=ctx.batch_windows)
    compliant, reason = mode.rule(st)
    sync(ctx.device)
    t0 = time.perf_counter()
    scored = mode.run(model, tokens, st, ctx)
    loss_sum, n, nbytes = (float(v) for v in reduce_sums(scored.sums).cpu())
    once = None if scored.once is None else [float(v) for v in reduce_sums(scored.once).cpu()]
    sync(ctx.device)
    seconds = time.perf_counter() - t0
    if n == 0:
        raise ValueError(
            f"eval mode {name} scored no targets ({n:.0f} targets, {nbytes:.0f} bytes) of the {tokens.numel() - 1:,} "
            f"validation targets: a window of seq_len={getattr(st, 'seq_len', '?')} is longer than them"
        )
    val_loss, val_bpb = bpb(loss_sum, n, nbytes)
    # the settings as given win over a mode's facts of the same name (`windows`: the plan, not the count,
    # which is the result's own `windows`)
    info = {k: list(v) if isinstance(v, tuple) else v for k, v in {**scored.info, **asdict(st)}.items()}
    res = EvalResult(name, val_loss, val_bpb, int(n), nbytes, seconds, compliant, reason, info, scored.windows)
    res.windows_per_second = res.windows / seconds if seconds > 0 else 0.0
    res.targets = tokens.numel() - 1
    res.distinct = int(once[1]) if scored.rescores else int(n)
    res.scoring = scoring_line(res.tokens, res.distinct, res.targets)
    if once is not None:
        o_loss, o_bpb = bpb(*once)
        res.once = {"val_loss": o_loss, "val_bpb": o_bpb, "tokens": int(once[1]), "bytes": once[2]}
    return res


def scoring_line(tokens: int, distinct: int, targets: int) -> str:
    """What a metric counts: "each target once", or how many targets it skips and how many scorings repeat."""
    if tokens == distinct == targets:
        return "each target once"
    line = f"{distinct} of {targets} targets scored"
    if tokens > distinct:
        return f"{line} ({tokens} scorings, {tokens - distinct} repeating earlier ones)"
    return f"{line}, each once"
