"""pgolf: Lightning + Hydra research code for the OpenAI Parameter Golf challenge.

Only pgolf/train/run.py (the run that train.py and the packed train_gpt.py call) imports `callbacks/`.
No module has import-time side effects (no CUDA, no process groups, no file reads), so every module imports
on a CPU-only machine. The runtime (everything but pgolf/tools/) never imports a tool: tests/test_imports.py.
"""

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: code + compressed model (challenge README)
MAX_SEQ_LEN = 1 << 14  # 8x the records' 2048: the longest eval window (the config, the command line, metadata)
# Logits of one eval window, vocab_size x its length (4 bytes each, batch_windows windows a batch): an sp8192
# model at the longest window (MAX_SEQ_LEN), 8x PR #1611's 8192 x 2048. The fields alone allow 2^31 (256 GiB a
# batch of 32).
MAX_WINDOW_LOGITS = 8192 * MAX_SEQ_LEN


def window_over_logits(vocab_size: int, final_seq_len: int | None, train_seq_len: int | None) -> tuple | None:
    """(key, length, logits) of a run's default eval window (`final_eval.seq_len`, else `train.seq_len`; a
    packed training row longer than MAX_SEQ_LEN is no window) when it holds more than MAX_WINDOW_LOGITS logits,
    else None: the training config and the artifact reader refuse it alike (eval memory)."""
    key, n = ("final_eval", final_seq_len) if final_seq_len else ("train", train_seq_len)
    return (key, n, vocab_size * n) if n and n <= MAX_SEQ_LEN and vocab_size * n > MAX_WINDOW_LOGITS else None


__version__ = "0.1.0"
