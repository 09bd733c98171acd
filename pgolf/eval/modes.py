"""Every eval mode, registered: importing this module imports each mode module (which registers its modes
in pgolf/eval/registry.py) and gives the registry's entry points. Callers import `run_mode` from here.

Adding a mode: a module in pgolf/eval/ that defines its settings dataclass and run function and calls
`register(Mode(...))`, its config conf/eval/<name>.yaml, and its import on the line below.
"""

from pgolf.eval import lora_ttt, phased_ttt, sliding, slot, standard, ttt  # noqa: F401  (each registers its modes)
from pgolf.eval.registry import Mode, get_mode, mode_names, parse_mode, register, run_mode

__all__ = ["Mode", "get_mode", "mode_names", "parse_mode", "register", "run_mode"]
