"""pgolf: Lightning + Hydra research code for the OpenAI Parameter Golf challenge.

The library never imports `callbacks/` and has no import-time side effects (no CUDA, no process groups,
no file reads), so every module imports on a CPU-only machine.
"""

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: code + compressed model (SPEC §1)

__version__ = "0.1.0"
