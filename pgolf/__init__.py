"""pgolf: Lightning + Hydra research code for the OpenAI Parameter Golf challenge.

Only pgolf/train/run.py (the run that train.py and the packed train_gpt.py call) imports `callbacks/`.
No module has import-time side effects (no CUDA, no process groups, no file reads), so every module imports
on a CPU-only machine. The runtime (everything but pgolf/tools/) never imports a tool: tests/test_imports.py.
"""

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: code + compressed model (challenge README)
MAX_SEQ_LEN = 1 << 14  # 8x the records' 2048: the longest eval window (the config, the command line, metadata)
MAX_WINDOW_LOGITS = 8192 * MAX_SEQ_LEN  # vocab x eval window: the logits of one window (eval memory)

__version__ = "0.1.0"
