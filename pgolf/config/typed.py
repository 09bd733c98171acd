"""Reading a config section into a dataclass: unknown keys refused by name, types and ranges checked.

A schema is a dataclass whose field annotations say what each key holds: `int`, `float`, `bool`, `str`,
`None`, `Literal[...]`, unions of these, `list[T]`, `tuple[T, ...]`, `dict[str, T]`, a nested dataclass,
`Any`, and `Annotated[T, Range(...)]` for a bound (`PosInt`, `Fraction`, ...). `load` turns a plain mapping
(an `OmegaConf.to_container` of the composed config) into that dataclass and raises `ConfigError` with one
line naming the key on the first problem:

    train.warmdown_iter is not a key of group train (did you mean warmdown_iters?)
    train.seq_len must be an integer >= 1, got 0

Lightweight on purpose (the standard library only): the entry points validate before importing torch or
Lightning. An annotation it does not know (a class of the runtime) is accepted unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

MISSING_VALUE = "???"  # OmegaConf's mandatory-value marker, as `to_container(throw_on_missing=False)` keeps it
FP32_MAX = 3.4028234663852886e38  # the largest float32: float settings become fp32 tensors (and LRs, scales)


class ConfigError(ValueError):
    """A config problem, one line naming the key; the entry points print `config error: <message>` and
    exit with status 2 before any data preparation or training."""


@dataclass(frozen=True)
class Range:
    """Bounds on a number: `Annotated[int, Range(ge=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def astuple(self) -> tuple:
        return self.ge, self.gt, self.le, self.lt

    def __contains__(self, v: float) -> bool:
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def __str__(self) -> str:
        ge, gt, le, lt = (None if v is None else int(v) if float(v).is_integer() else v for v in self.astuple())
        lo = (f"[{ge}", f">= {ge}") if ge is not None else None
        lo = (f"({gt}", f"> {gt}") if gt is not None else lo
        hi = (f"{le}]", f"<= {le}") if le is not None else None
        hi = (f"{lt})", f"< {lt}") if lt is not None else hi
        if lo and hi:
            return f"in {lo[0]}, {hi[0]}"
        return (lo or hi)[1]


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
Fraction = Annotated[float, Range(ge=0, le=1)]
Momentum = Annotated[float, Range(ge=0, lt=1)]


def join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def unknown_key(key: str, known: list[str], where: str) -> ConfigError:
    """`<where>.<key> is not a key of group <where> (did you mean <closest>?)`."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "its keys: " + ", ".join(known)
    group = f"group {where}" if where else "the root config"
    return ConfigError(f"{join(where, key)} is not a key of {group} ({hint})")


def describe(tp) -> str:
    """A type in words, for messages: `an integer >= 1`, `one of csv | wandb | none`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        bounds = [str(m) for m in tp.__metadata__ if isinstance(m, Range)]
        return " ".join([describe(args[0]), *bounds])
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    """The value does not have the annotated type (turned into a ConfigError by the caller)."""


def convert(value, tp, where: str):
    """`value` checked against the annotation `tp` (and converted: int -> float, list -> tuple, mapping ->
    dataclass). Raises ConfigError naming `where`."""
    try:
        return _convert(value, tp, where)
    except _Mismatch:
        hint = ""
        if isinstance(value, bool) and tp is str:  # `off`, `on`, `yes`, `no` unquoted
            hint = " (YAML reads a bare off/on/yes/no as false/true: quote it)"
        elif isinstance(value, float) and not math.isfinite(value):
            hint = " (not a finite number)"
        elif isinstance(value, int | float) and _declared_float(tp) and abs(value) > FP32_MAX:
            hint = " (beyond fp32's range, 3.4e38)"
        raise ConfigError(f"{where} must be {describe(tp)}, got {value!r}{hint}") from None


def _convert(value, tp, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        out = _convert(value, args[0], where)
        for r in tp.__metadata__:
            if isinstance(r, Range) and out is not None and out not in r:
                raise _Mismatch
        return out
    if origin in (Union, types.UnionType):
        if isinstance(value, Mapping) and all(dataclasses.is_dataclass(a) for a in args):
            return _tagged(value, args, where)
        for a in args:
            try:
                return _convert(value, a, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:  # inf, nan and values beyond fp32 are no setting's value (an inf LR trained to a nan loss)
        if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= FP32_MAX:
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):  # `name=2024` parses as a number
            return str(value)
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        return _sequence(value, tp, where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        vt = args[1] if len(args) == 2 else Any
        return {k: convert(v, vt, join(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return load(tp, value, where)
    return value  # a class this module does not know: accepted unchecked


def _tagged(value: Mapping, schemas, where: str):
    """A union of dataclasses is chosen by the value of their `kind: Literal[...]` field."""
    kinds = {k: sc for sc in schemas for k in typing.get_args(schema_fields(sc)["kind"][0])}
    if value.get("kind") not in kinds:
        raise ConfigError(f"{join(where, 'kind')} must be one of {' | '.join(kinds)}, got {value.get('kind')!r}")
    return load(kinds[value["kind"]], value, where)


def _sequence(value, tp, where: str):
    if not isinstance(value, list | tuple):
        raise _Mismatch
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(convert(v, a, join(where, i)) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    et = args[0] if args else Any
    items = [convert(v, et, join(where, i)) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def schema_fields(schema) -> dict[str, tuple[Any, bool]]:
    """{field name: (annotation, required)} of a dataclass, its annotations resolved (`Annotated` kept).
    When they cannot be resolved (a name its module imports only for type checking), every field is `Any`."""
    try:
        hints = typing.get_type_hints(schema, include_extras=True)
    except (NameError, TypeError):
        hints = {}
    out = {}
    for f in dataclasses.fields(schema):
        if f.init:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out[f.name] = (hints.get(f.name, Any), required)
    return out


def load(schema, data: Mapping, where: str, *, construct: bool = True):
    """`data` read into the dataclass `schema` (or, with `construct=False`, only checked: the converted
    keyword arguments are returned). Keys of `data` that are not fields, missing required fields, `???`
    values and values of the wrong type or out of range raise ConfigError naming `where.key`; so does a
    ValueError of the dataclass's own checks (`__post_init__`; a message that starts with a field name
    gets `where.` in front of it, any other `where: `). A class attribute `OPEN = "<field>"` collects the
    keys that are not fields into that dict field instead of refusing them."""
    spec = schema_fields(schema)
    open_field = getattr(schema, "OPEN", None)
    known = [n for n in spec if n != open_field]
    kw, rest = {}, {}
    for k, v in data.items():
        if k in known:
            if v == MISSING_VALUE:
                raise ConfigError(f"{join(where, k)} must be set (it is ??? in the config)")
            kw[k] = convert(v, spec[k][0], join(where, k))
        elif open_field:
            rest[k] = v
        else:
            raise unknown_key(str(k), known, where)
    for name in known:
        if spec[name][1] and name not in kw:
            raise ConfigError(f"{join(where, name)} is missing from {f'group {where}' if where else 'the root config'}")
    if open_field:
        kw[open_field] = rest
    if not construct:
        return kw
    try:
        return schema(**kw)
    except ValueError as e:  # the dataclass's own checks: "<field> ..." becomes "<where>.<field> ..."
        msg = str(e).removeprefix(f"{schema.__name__}: ")
        lead = re.match(r"\w*", msg).group()
        raise ConfigError(
            join(where, msg) if lead in spec or lead in rest or not where else f"{where}: {msg}"
        ) from None


def _declared_float(tp) -> bool:
    """`tp` takes a float and not an int (`float`, `Annotated[float, ...]`, `float | None`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _declared_float(args[0])
    if origin in (Union, types.UnionType):
        return any(_declared_float(a) for a in args) and int not in args
    return tp is float


def floats_as_declared(schema, data: Mapping) -> dict:
    """A copy of the plain config `data` of the dataclass `schema` in which every integer given for a field
    declared a float is that float (`model.mlp_mult=2` and `=2.0` are one recipe: `convert` reads both as
    2.0, and a packed config, hashed as code, must not tell them apart). Nested dataclasses are followed;
    keys the schema does not know, and other values, are copied as they are."""
    spec = schema_fields(schema)
    out = {}
    for k, v in data.items():
        tp = spec[k][0] if k in spec else Any
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
        if isinstance(v, int) and not isinstance(v, bool) and _declared_float(tp):
            v = float(v)
        elif isinstance(v, Mapping) and isinstance(inner, type) and dataclasses.is_dataclass(inner):
            v = floats_as_declared(inner, v)
        out[k] = v
    return out
