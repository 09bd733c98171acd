"""What `eval.py` does, as a function: artifact -> eval modes -> eval_result.json (+ audit.npz).

audit.npz holds, for every mode, `<mode>.index` (target index in the validation stream, int64),
`<mode>.nll` (nats, float32) and `<mode>.bytes` (float32), sorted by index: one entry per scoring of the
mode's metric (a target the record's windows score twice appears twice, in scoring order).
`python -m pgolf.tools.audit` compares two of them (diff two models, or the flip test from outside).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.config.typed import ConfigError
from pgolf.data.stream import load_val_data
from pgolf.data.tokenizer import TokenizerError, TokenizerInfo, build_byte_luts, load_tokenizer
from pgolf.eval.core import EvalContext, TargetLog, gather_log, json_safe, mark_non_finite
from pgolf.eval.modes import parse_mode, run_mode
from pgolf.export.code import code_of, recorded_code_bytes
from pgolf.export.weights import MAX_SEQ_LEN, MAX_TRAIN_SEQ_LEN, load_artifact_model, read_model_artifact
from pgolf.io import atomic_path, atomic_write_bytes
from pgolf.model.config import GPTConfig
from pgolf.quant.artifact import ArtifactError, SizeReport
from pgolf.quant.settings import calibration_verdict, mark_not_compliant
from pgolf.runlog import global_rank, log0


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(accelerator: str) -> torch.device:
    """The device of `trainer.accelerator` (auto: CUDA when there is one). Raises ConfigError for gpu/cuda on
    a machine without CUDA."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator}, but this machine has no CUDA device: run on the CPU with "
                "trainer=cpu"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure: CUDA's torch.OutOfMemoryError, the CPU allocator's RuntimeError,
    Python's MemoryError (eval.py makes it one `error:` line; any other RuntimeError is a bug, left as is)."""
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "DefaultCPUAllocator: can't allocate" in str(e)


def resolve_compile(compile, device: torch.device) -> bool:
    if compile in ("auto", None):
        return device.type == "cuda"
    if isinstance(compile, str):
        if compile.lower() not in ("true", "false"):
            raise ValueError(f"compile={compile!r}: expected auto, true or false")
        return compile.lower() == "true"
    return bool(compile)


POSITIVE_SETTINGS = ("seq_len", "batch_windows", "stride", "chunk_tokens", "chunk_size", "batch_seqs", "batch_docs")
MAX_TOKENS_REASON = "max_tokens: not the full validation set"
NO_CODE_REASON = (
    "size: the artifact records no code size (no meta.code or meta.code_bytes, or 0 bytes), so its total (model + "
    f"the packed train_gpt.py) against the {ARTIFACT_LIMIT_BYTES:,}-byte limit is unknown"
)
RESULT_FILE = "eval_result.json"
AUDIT_FILE = "audit.npz"


def _positive_int(v, what: str, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
        bound = f" and at most {hi}" if hi is not None else ""
        raise ValueError(f"{what} must be a positive integer{bound}, got {v!r}")
    return v


def check_eval_args(*, batch_windows, seq_len, budget_seconds, max_tokens, modes: dict) -> None:
    """Refuse, before any work, a non-positive (or non-integer) `batch_windows`, `seq_len`, `max_tokens`,
    a negative budget, and a mode setting among POSITIVE_SETTINGS that is not a positive integer (null
    keeps the default). Raises ValueError naming the key."""
    _positive_int(batch_windows, "batch_windows")
    if seq_len is not None:
        _positive_int(seq_len, "seq_len", MAX_SEQ_LEN)
    if max_tokens is not None:
        _positive_int(max_tokens, "max_tokens")
    if isinstance(budget_seconds, bool) or not isinstance(budget_seconds, int | float) or not budget_seconds >= 0:
        raise ValueError(f"budget_seconds must be a number >= 0, got {budget_seconds!r}")
    for name, settings in modes.items():
        for key in POSITIVE_SETTINGS:
            if (settings or {}).get(key) is not None:
                _positive_int(settings[key], f"eval.{name}.{key}")


def compliance(
    modes: list[dict],
    total_bytes: int,
    seconds: float,
    budget_seconds: float,
    max_tokens: int | None,
    calibration: str | None = None,
) -> tuple[bool, list[str]]:
    """(the run's verdict, the reasons it is not compliant): every mode of `modes` (results with `mode`,
    `compliant` and `reason`, by their own rule) scores before it adapts, code + model fit
    ARTIFACT_LIMIT_BYTES, the modes ran within the eval budget, the whole validation split was scored (no
    `max_tokens`), and the artifact's GPTQ calibration was compliant (`calibration`: None, or the reason it is
    not, `calibration_verdict` of its record: training data read only inside the training time budget, PRs
    #535/#569/#593/#609). `seconds`: the modes' wall time."""
    reasons = [f"score-before-adapt: {r['mode']}: {r['reason']}" for r in modes if not r["compliant"]]
    if total_bytes > ARTIFACT_LIMIT_BYTES:
        reasons.append(f"size: {total_bytes:,} bytes (model + code) is over the {ARTIFACT_LIMIT_BYTES:,}-byte limit")
    if seconds > budget_seconds:
        reasons.append(f"time: the evaluation took {seconds:.1f}s, over the {budget_seconds}s budget")
    if max_tokens is not None:
        reasons.append(MAX_TOKENS_REASON)
    if calibration is not None:
        reasons.append(calibration)
    return not reasons, reasons


def log_calibration(record) -> None:
    """The artifact's calibration record as one `calibration: source:… compliant:… clock_start_ms:…
    clock_end_ms:… reason:…` line (none without a record)."""
    if record is None:
        return
    if not isinstance(record, dict):
        log0(f"calibration: {record!r}")
        return
    keys = ("source", "compliant", "inside_training_budget", "clock_start_ms", "clock_end_ms", "clock")
    parts = " ".join(
        f"{k}:{str(record[k]).lower() if isinstance(record[k], bool) else record[k]}" for k in keys if k in record
    )
    log0(f"calibration: {parts} reason:{record.get('reason')}")


def evaluate_artifact(
    *,
    artifact,
    modes: dict,
    data: dict,
    accelerator="cpu",
    batch_windows=32,
    seq_len=None,
    budget_seconds=600,
    audit=False,
    compile="auto",
    max_tokens=None,
    out_dir: Path,
    overwrite: bool = False,
) -> dict:
    """Score the artifact with every mode of `modes` ({name: settings}, conf/eval/) on the validation split
    of `data`, write eval_result.json (and audit.npz) to `out_dir` on rank 0; returns the result dict.

    Before any work: the arguments and every mode's settings are checked (ValueError), the artifact's
    header, metadata and tensor table are validated without allocating its tensors (ArtifactError,
    pgolf/export/weights.py), and a tokenizer that is not the artifact's is refused (TokenizerError).
    `max_tokens` (None: the whole split) scores only the first N validation targets, rounded down to whole
    `seq_len` windows (at least one): a quick look, NOT the challenge's metric, so the result and every mode's
    are marked `compliant: false`. The result records the artifact's bytes, its code bytes (recorded in the artifact)
    and their total, and a verdict (`compliant`, `compliance`: score-before-adapt, the 16,000,000-byte cap,
    the eval time budget, the full validation set, the artifact's GPTQ calibration: `calibration_ok`, its
    record copied as `calibration`); an over-cap artifact is still scored. A non-compliant calibration
    also marks every mode's result `compliant: false`, as the end-of-training round trip does. An artifact
    that records no code size (`recorded_code_bytes`) is scored with `code_bytes` and `total_bytes` null and
    is not compliant (NO_CODE_REASON).

    A mode whose val_loss or val_bpb is NaN or infinite is not compliant, nor the result (`mark_non_finite`);
    eval_result.json holds such a figure as null. Settings that name a part of the model are checked against
    its config (`check_mode_model`).

    First of all: ConfigError for a GPU `accelerator` on a machine without CUDA (`pick_device`), then the files
    `out_dir` would receive (`output_files`): FileExistsError when one exists and `overwrite` is false,
    NotADirectoryError when `out_dir` is a file, OSError when it cannot be created or written (`check_outputs`)."""
    if not modes:
        raise ValueError("no eval mode selected (eval=[standard,sliding,...])")
    check_eval_args(
        batch_windows=batch_windows, seq_len=seq_len, budget_seconds=budget_seconds, max_tokens=max_tokens, modes=modes
    )
    device = pick_device(accelerator)
    # every rank, before any work: all stop together; rank 0, which writes, probes (torchrun stops the others)
    check_outputs(Path(out_dir), audit, overwrite, probe=global_rank() == 0)
    header, _ = read_model_artifact(artifact, tensors=False)  # everything checked, no tensor allocated
    meta = header.meta
    doc = doc_max_seg_len(meta)  # before any work: a forged value is refused here
    run_cut = run_val_seq_len(meta)
    try:
        tok = TokenizerInfo.from_path(data["tokenizer_path"])
    except TokenizerError as e:
        want = meta["tokenizer"]
        raise TokenizerError(
            f"{e}; artifact {Path(artifact).name} was built with tokenizer {want.get('name')} (vocab "
            f"{want.get('vocab_size')}): choose its data (data=... data.root=...)"
        ) from None
    tok.check_matches(meta["tokenizer"], what=f"artifact {Path(artifact).name}")
    train_seq = int(meta.get("train", {}).get("seq_len") or 0)
    run_seq = int(meta.get("final_eval", {}).get("seq_len") or 0)  # the round trip's windows (PR #1611: 2048)
    S = _positive_int(seq_len or run_seq or train_seq or data.get("eval_seq_len") or 1024, "seq_len", MAX_SEQ_LEN)
    cfg = GPTConfig.from_dict(meta["model"])
    for name, settings in modes.items():
        check_mode_model(name, parse_mode(name, settings, seq_len=S, batch_windows=batch_windows)[1], cfg)
    use_compile = resolve_compile(compile, device)
    rank, world = init_distributed(device)
    model, meta = load_artifact_model(artifact, device)
    val = load_val_data(
        data["val_pattern"],
        run_cut or max(S, train_seq),  # the run's own cut (older artifacts: as their runs cut)
        tok.vocab_size,
        tokenizer=data["tokenizer_path"],
        bytes_pattern=data.get("val_bytes_pattern"),
    )
    tokens = val.tokens
    if max_tokens is not None:
        keep = min(max(max_tokens // S, 1) * S, tokens.numel() - 1)
        tokens = tokens[: keep + 1]
    val_bytes = None if val.bytes is None else val.bytes[: tokens.numel()].to(device)  # a CaseOps byte sidecar
    luts = build_byte_luts(load_tokenizer(data["tokenizer_path"]), model.cfg.vocab_size).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    ctx = EvalContext(
        luts,
        device,
        S,
        batch_windows,
        autocast_dtype=autocast,
        compile=use_compile,
        val_bytes=val_bytes,
        doc_max_seg_len=doc,
    )
    ctx.check_tokens(tokens)
    t_all = time.perf_counter()
    partial = MAX_TOKENS_REASON if max_tokens is not None else None
    results, arrays = run_all(model, tokens, ctx, modes, audit, budget_seconds, partial)
    total = time.perf_counter() - t_all
    first = next(iter(results.values()))
    n_code = recorded_code_bytes(meta)  # None: the artifact records no code size
    size = SizeReport(header.file_bytes, n_code or 0)
    within = total <= budget_seconds
    calibration = meta.get("calibration")
    cal_why = calibration_verdict(calibration)
    ok, reasons = compliance(list(results.values()), size.total, total, budget_seconds, max_tokens, cal_why)
    score_before_adapt = all(r["compliant"] for r in results.values())
    nan_why = mark_non_finite(results.values())  # after the score-before-adapt verdict: not that rule's reasons
    ok, reasons = ok and not nan_why, reasons + nan_why
    if n_code is None:  # zero counted code bytes would pass the cap unseen
        ok = False
        reasons.append(NO_CODE_REASON)
    total_bytes = size.total if n_code is not None else None
    size_ok = size.ok and n_code is not None
    # every mode scored this artifact, or this prefix: none is compliant (as results.json's round trip)
    for why in (partial, cal_why):  # the calibration's reason ends up first
        if why is not None:
            mark_not_compliant(results.values(), why)
    out = {
        **{k: first[k] for k in ("mode", "val_loss", "val_bpb", "tokens", "bytes", "seconds")},
        "compliant": ok,
        "compliance": {
            "score_before_adapt": score_before_adapt,
            "size_ok": size_ok,
            "within_budget": within,
            "full_validation": max_tokens is None,
            "calibration_ok": cal_why is None,
            "reasons": reasons,
        },
        "calibration": calibration,  # the artifact's GPTQ calibration record (null: no GPTQ)
        "artifact": Path(artifact).name,
        "artifact_bytes": size.model_bytes,
        "code_bytes": n_code,  # null: the artifact records no code size (NO_CODE_REASON)
        "code_sha256": code_of(meta)["sha256"],
        "total_bytes": total_bytes,
        "limit_bytes": size.limit,
        "max_tokens": max_tokens,
        "byte_count": "tokenizer tables" if val_bytes is None else "sidecar",
        "doc_max_seg_len": doc,  # document-bounded windows (as the model was trained), or null
        "world_size": world,
        "eval_seconds_total": total,
        "budget_seconds": budget_seconds,
        "within_budget": within,
        "results": results,
    }
    log0(f"eval_time_total:{total:.1f}s budget:{budget_seconds}s within_budget:{str(within).lower()}")
    log0(
        f"artifact_bytes:{size.model_bytes} code_bytes:{'none' if n_code is None else n_code} "
        f"total_bytes:{'unknown' if total_bytes is None else total_bytes} "
        f"limit_bytes:{size.limit} size_ok:{str(size_ok).lower()}"
    )
    log_calibration(calibration)
    log0(f"compliant:{str(ok).lower()}" + "".join(f" | {r}" for r in reasons))
    if rank == 0:
        write_outputs(out_dir, out, arrays if audit else None)
    return out


def check_mode_model(name: str, st, cfg: GPTConfig) -> None:
    """A mode's settings `st` that name a part of the model `cfg`: `bos_id` (where documents start) a token id
    of its vocabulary, `freeze_blocks` at most its layers. Raises ValueError naming the key."""
    bos = getattr(st, "bos_id", None)
    if bos is not None and not 0 <= bos < cfg.vocab_size:
        raise ValueError(f"eval.{name}.bos_id {bos} is not a token id of the model's vocabulary ({cfg.vocab_size})")
    if getattr(st, "freeze_blocks", 0) > cfg.num_layers:
        raise ValueError(f"eval.{name}.freeze_blocks {st.freeze_blocks} exceeds the model's {cfg.num_layers} layers")


def run_val_seq_len(meta: dict) -> int | None:
    """What the training run that made an artifact cut the validation split to a multiple of (tokens, its
    recorded `data.val_seq_len`, `pgolf.data.stream.val_seq_len`); None for artifacts that predate the record
    (their runs cut by max(train.seq_len, eval window)). eval.py cuts by it, so that it scores the targets the
    run's round trip scored. Raises ArtifactError for a recorded value that is not an integer in
    1..MAX_TRAIN_SEQ_LEN (a training length may be a packed row of documents: PR #1611's 98,304)."""
    data = meta.get("data") or {}
    n = data.get("val_seq_len") if isinstance(data, dict) else None
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_TRAIN_SEQ_LEN:
        raise ArtifactError(f"meta.data.val_seq_len must be an integer in 1..{MAX_TRAIN_SEQ_LEN}, got {n!r}")
    return n


def doc_max_seg_len(meta: dict) -> int | None:
    """The document-bounded attention an artifact's model was trained with (its recorded `train.doc_attention`
    and `train.max_seg_len`, PR #1530 / #1611), which its windows are scored with; None for plain causal.
    Raises ArtifactError for values that are not a bool and an integer in 1..MAX_SEQ_LEN."""
    train = meta.get("train") or {}
    if not isinstance(train, dict) or not train.get("doc_attention"):
        return None
    if train["doc_attention"] is not True:
        raise ArtifactError(f"meta.train.doc_attention must be true or false, got {train['doc_attention']!r}")
    n = train.get("max_seg_len")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SEQ_LEN:
        raise ArtifactError(f"meta.train.max_seg_len must be an integer in 1..{MAX_SEQ_LEN}, got {n!r}")
    return n


def run_all(
    model, tokens, ctx: EvalContext, modes: dict, audit: bool, budget_seconds: float, partial: str | None = None
) -> tuple[dict, dict]:
    """({name: result dict}, audit arrays {"<name>.index|nll|bytes": array}) of every mode, one log line each.
    The results hold each mode's own verdict; `partial` (why `tokens` is not the whole validation split) makes
    every line say `compliant:false` with that reason."""
    results, arrays = {}, {}
    for name, settings in modes.items():
        log = TargetLog() if audit else None
        r = run_mode(name, settings, model, tokens, replace(ctx, log=log))
        results[name] = r.to_dict()
        share = 100 * r.seconds / budget_seconds if budget_seconds else 0.0
        verdict = "compliant:false" + f" ({partial})" if partial else f"compliant:{str(r.compliant).lower()}"
        log0(
            f"{r.line(f'eval_{name}')} tokens:{r.tokens} windows_per_s:{r.windows_per_second:.1f} "
            f"budget_share:{share:.1f}% {verdict}"
        )
        if r.scoring != "each target once":
            log0(f"eval_{name}_scoring {r.scoring}")
        if r.once is not None:
            o = r.once
            log0(
                f"eval_{name}_once val_loss:{o['val_loss']:.8f} val_bpb:{o['val_bpb']:.8f} tokens:{o['tokens']} "
                "(pgolf's each-target-once figure, same pass)"
            )
        if audit:
            arrays.update({f"{name}.{k}": v for k, v in gather_log(log).items()})
    return results, arrays


def output_files(out_dir: Path, audit: bool) -> list[Path]:
    """The files `write_outputs` writes into `out_dir`: eval_result.json, and audit.npz with `audit`."""
    return [out_dir / RESULT_FILE, *([out_dir / AUDIT_FILE] if audit else [])]


def check_outputs(out_dir: Path, audit: bool, overwrite: bool, probe: bool = True) -> None:
    """Refuse, before any work, to write where a user's file would be lost or cannot be written:
    NotADirectoryError when `out_dir` exists and is not a directory, FileExistsError naming the first of
    `output_files` that exists, an audit.npz even without `audit` (it would sit beside a result it is not
    from), unless `overwrite`, with the way out (as `python -m pgolf.tools.reexport` words it); with `probe`
    (the rank that writes), OSError `out_dir ... is not writable` when it cannot be created or a probe file
    cannot be written there (created for the probe, then removed again)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is not a directory; choose another out_dir=")
    for p in () if overwrite else output_files(out_dir, audit=True):  # an audit.npz would sit beside a new result
        if p.exists():
            raise FileExistsError(f"{p} exists; choose another out_dir=, or pass overwrite=true")
    if not probe:
        return
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe"):  # removed on close
            pass
    except OSError as e:
        raise OSError(f"out_dir {out_dir} is not writable ({e.strerror or e}); choose another out_dir=") from None
    finally:  # nothing is left behind by a run that stops before writing: write_outputs makes them again
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


def write_outputs(out_dir: Path, out: dict, arrays: dict | None) -> None:
    """eval_result.json and, with audit arrays, audit.npz, each written atomically (`check_outputs` has
    refused, before the evaluation, to replace a file the caller did not allow to be replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(out), indent=2, allow_nan=False)  # a NaN score: null (strict JSON)
    atomic_write_bytes(out_dir / RESULT_FILE, (text + "\n").encode())
    if arrays is not None:
        with atomic_path(out_dir / AUDIT_FILE) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    else:  # an earlier evaluation's (replaced with overwrite=true) is not this one's
        (out_dir / AUDIT_FILE).unlink(missing_ok=True)
