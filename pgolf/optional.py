"""Optional parts of the runtime, by name: full GPTQ with its calibration, selective pruning, W&B logging and
weight averaging. A part's module registers it at import (`register`); the runtime gets it with `get`, and
the module that uses a part imports the part's module only to register it. Which configs need which part is
one table, pgolf/config/runtime.py's `PART_RULES`. So the packer (pgolf/tools/pack.py) can leave out the
modules of the parts a packed config does not need, as it does for the eval modes it does not run; a packed
train_gpt.py refuses, before training, an override that needs a part it does not hold.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

PARTS: dict[str, Any] = {}  # name -> the registered function or class


def register(name: str) -> Callable[[Any], Any]:
    """Decorator: register the decorated function, class or module as part `name` (returned unchanged). Raises
    ValueError when another object already holds the name."""

    def deco(obj):
        old = PARTS.get(name)
        if old is not None and _origin(old) != _origin(obj):
            raise ValueError(f"optional part {name!r} is registered twice ({_origin(old)}, {_origin(obj)})")
        PARTS[name] = obj
        return obj

    return deco


def _origin(obj) -> str:
    """Where a registered object comes from: `module.qualname`, or a module's own name (a module can be a part)."""
    if isinstance(obj, ModuleType):
        return obj.__name__
    return f"{obj.__module__}.{obj.__qualname__}"


def owner(name: str) -> str:
    """The module that registered part `name` (KeyError when none did)."""
    obj = PARTS[name]
    return obj.__name__ if isinstance(obj, ModuleType) else obj.__module__


def get(name: str) -> Any:
    """The object registered as part `name`. Raises LookupError naming the part when its module was not
    loaded (a packed train_gpt.py whose config did not use it)."""
    obj = PARTS.get(name)
    if obj is None:
        raise LookupError(
            f"optional part {name!r} is not in this program: this train_gpt.py was packed for a config that does "
            "not use it; pack the experiment with the setting instead (python -m pgolf.tools.pack ...)"
        )
    return obj
