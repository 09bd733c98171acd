"""Export and round trip as plain functions (the export callback and the re-export command call these).

`export_model`: float-model diagnostic eval, the float weights saved for re-export, calibration and
Hessians when a rule uses GPTQ (SPEC §8.4-8.5), quantization by the configured rules, selective ±1 pruning
to the size target (SPEC §8.6), artifact write (rank 0, atomic) with size accounting against 16,000,000
bytes and a per-codec size report. `load_artifact_model`: the artifact -> a fresh GPT with de-quantized
weights (what `eval.py` and the round trip use; no checkpoint, no pickle). `roundtrip_evaluate`: that
model scored by the configured final eval modes, printed as reference lines. `save_float_weights` /
`load_weights`: the float weights in the project's container (or a Lightning `.ckpt`), for re-export.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pgolf import ARTIFACT_LIMIT_BYTES
from pgolf.artifact import (
    CODECS,
    DEFAULT_LEVELS,
    ArtifactError,
    SizeReport,
    code_bytes,
    codec_sizes,
    encode_artifact,
    pack,
    read_artifact,
    write_artifact,
)
from pgolf.calibrate import CalibrationConfig, calibrate, compliance
from pgolf.evaluate import EvalResult, run_mode
from pgolf.gptq import GPTQSettings, collect_hessians
from pgolf.io import atomic_write_bytes
from pgolf.model import GPT, GPTConfig
from pgolf.prune import PruneConfig, prune_to_target
from pgolf.quant import QuantEntry, dequantize_state, quantize_state, rules_from_config, uses_gptq
from pgolf.runlog import log0

# SPEC §8.1: the baseline int8 + zlib scheme as rules (first match wins).
BASELINE_RULES = [
    {"name": "non_float", "float": False, "store": "raw"},
    {"name": "small_control", "max_numel": 65536, "control": True, "store": "fp32"},
    {"name": "small", "max_numel": 65536, "store": "fp16"},
    {"name": "matrix", "ndim": 2, "store": "int", "bits": 8, "granularity": "row", "clip": 0.9999984},
    {"name": "other", "store": "int", "bits": 8, "granularity": "tensor", "clip": 0.9999984},
]
FLOAT_KIND = "float_weights"


class OverBudgetError(RuntimeError):
    """The artifact (code + compressed model) is over the 16,000,000-byte limit."""


def _section(cls, value, what: str):
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    known = {f.name for f in fields(cls)}
    unknown = set(value) - known
    if unknown:
        raise ValueError(f"export.{what}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    return cls(**dict(value))


@dataclass
class ExportConfig:
    enabled: bool = True
    label: str = "int8_zlib"  # names the log lines: final_{label}_roundtrip
    codec: str = "zlib"
    level: int | None = 9
    rules: list[dict] = field(default_factory=lambda: [dict(r) for r in BASELINE_RULES])
    filename: str = "final_model.{label}.ptz"
    limit_bytes: int = ARTIFACT_LIMIT_BYTES
    fail_over_limit: bool = True
    gptq: GPTQSettings = field(default_factory=GPTQSettings)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    report_codecs: list[str] = field(default_factory=list)  # also report the artifact's size under these
    save_float: bool = True  # save the float weights next to the artifact (for `python -m pgolf.reexport`)
    float_filename: str = "final_model.float.ptz"

    def __post_init__(self):
        self.gptq = _section(GPTQSettings, self.gptq, "gptq")
        self.calibration = _section(CalibrationConfig, self.calibration, "calibration")
        self.prune = _section(PruneConfig, self.prune, "prune")
        self.report_codecs = list(self.report_codecs or [])
        for c in [self.codec, *self.report_codecs]:
            if c not in CODECS:
                raise ValueError(f"export codec {c!r} is not one of {sorted(CODECS)}")
        if self.level is None:
            self.level = DEFAULT_LEVELS[self.codec]
        rules = rules_from_config(self.rules)
        if uses_gptq(rules) and self.calibration.source == "none":
            names = [r.name for r in rules if r.method == "gptq"]
            raise ValueError(
                f"export rules {names} use method gptq, which needs calibration data: set export.calibration.source "
                "to ar (self-generated) or train"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ExportConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"export config: unknown keys {sorted(unknown)}")
        d["rules"] = [dict(r) for r in d.get("rules") or BASELINE_RULES]
        return cls(**d)

    @property
    def path_name(self) -> str:
        return self.filename.format(label=self.label)

    @property
    def size_tag(self) -> str:
        return self.label.replace("_", "+")


@dataclass
class ExportContext:
    """What the export needs from the run besides the weights: the seed (for self-generation), the training
    clock (for calibration compliance), the training stream (train-data calibration), device and autocast."""

    seed: int = 0
    train_time_ms: float | None = None
    cap_ms: float | None = None
    train_batches: Callable[[], Iterable] | None = None
    device: torch.device | None = None
    autocast_dtype: torch.dtype | None = None


@dataclass
class ExportReport:
    path: str
    label: str
    model_bytes: int
    code_bytes: int
    total_bytes: int
    limit_bytes: int
    size_ok: bool
    quantize_seconds: float
    write_seconds: float
    pre_quant: dict | None = None
    calibration: dict | None = None
    prune: dict | None = None
    codec_sizes: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    float_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def git_provenance(root: Path | None = None) -> dict:
    root = root or Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha or "unknown", "git_dirty": bool(dirty) if dirty is not None else None}


def provenance() -> dict:
    import lightning

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {
        **git_provenance(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "device": dev,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluate_modes(
    model, *, tokens, luts, device, autocast_dtype, modes, seq_len, batch_windows, stride=64, reference_tail=False
) -> dict[str, EvalResult]:
    """The final evaluations after training: `standard` and/or `sliding` with the run's settings."""
    out = {}
    for mode in modes:
        settings = {"mode": mode, **({"stride": stride, "reference_tail": reference_tail} if mode == "sliding" else {})}
        out[mode] = run_mode(
            mode,
            settings,
            model,
            tokens,
            luts=luts,
            device=device,
            autocast_dtype=autocast_dtype,
            batch_windows=batch_windows,
            seq_len=seq_len,
        )
    return out


def calibration_hessians(gpt: GPT, cfg: ExportConfig, ctx: ExportContext) -> tuple[dict, dict]:
    """Calibration sequences from the configured source, then the Hessians of every quantized linear;
    returns (hessians, the artifact's `calibration` record) and logs both steps."""
    c = cfg.calibration
    batches = ctx.train_batches() if c.source == "train" and ctx.train_batches is not None else None
    seqs, info = calibrate(
        gpt, c, seed=ctx.seed, train_batches=batches, device=ctx.device, autocast_dtype=ctx.autocast_dtype
    )
    log0(
        f"gptq:calibrating source:{c.source} count:{info['count']} length:{info['length']} "
        f"time:{info['seconds']:.1f}s tokens_per_s:{info['tokens_per_s']:.0f}"
    )
    H, hinfo = collect_hessians(
        gpt,
        seqs,
        batch=cfg.gptq.batch,
        damp=cfg.gptq.hessian_damp,
        device=ctx.device,
        autocast_dtype=ctx.autocast_dtype,
    )
    log0(f"gptq:hessians layers:{hinfo['layers']} tokens:{hinfo['tokens']} time:{hinfo['seconds']:.1f}s")
    used = info["seconds"] + hinfo["seconds"]
    comp = compliance(c.source, used, ctx.train_time_ms, ctx.cap_ms)
    record = {**info, "hessian_seconds": hinfo["seconds"], "hessian_layers": hinfo["layers"], **comp}
    return H, record


def log_calibration(record: dict) -> None:
    inside = record.get("inside_training_budget")
    log0(
        f"calibration: source:{record['source']} inside_training_budget:{'n/a' if inside is None else inside} "
        f"compliant:{str(record['compliant']).lower()} reason:{record['reason']}"
    )
    if not record["compliant"]:
        log0(f"WARNING: calibration not compliant: {record['reason']}")


def export_model(
    gpt: GPT,
    cfg: ExportConfig,
    run_dir: str | Path,
    meta: dict,
    rank: int = 0,
    val: dict | None = None,
    ctx: ExportContext | None = None,
) -> ExportReport:
    """Quantize `gpt` and write the artifact (rank 0). With `val`, first score the float model."""
    ctx = ctx or ExportContext(seed=int(meta.get("seed", 0)))
    run_dir = Path(run_dir)
    pre = None
    if val is not None:
        v = dict(val)
        v["modes"] = ["standard"]
        was_training = gpt.training
        gpt.eval()
        pre = evaluate_modes(gpt, **v)["standard"]
        gpt.train(was_training)
        ms = 1000 * pre.seconds
        log0(f"DIAGNOSTIC pre_quant val_loss:{pre.val_loss:.4f} val_bpb:{pre.val_bpb:.4f} eval_time:{ms:.0f}ms")
    path = run_dir / cfg.path_name
    state = {
        k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in gpt.state_dict().items()
    }
    n_code = code_bytes()
    rules = rules_from_config(cfg.rules)
    quant_meta = {"label": cfg.label, "codec": cfg.codec, "level": cfg.level, "rules": cfg.rules}
    if uses_gptq(rules):
        quant_meta["gptq"] = asdict(cfg.gptq)
    full_meta = {**meta, "model": gpt.cfg.to_dict(), "quant": quant_meta, "code_bytes": n_code}
    model_bytes, timings, calib, prune_meta, prune_report, sizes, float_path = 0, {}, None, None, None, {}, None
    if rank == 0:
        if cfg.save_float:
            t = time.perf_counter()
            fmeta = {k: v for k, v in meta.items() if k != "calibration"}
            float_path = str(
                save_float_weights(run_dir / cfg.float_filename, state, {**fmeta, "model": gpt.cfg.to_dict()})
            )
            timings["save_float"] = round(time.perf_counter() - t, 3)
        hessians = None
        if uses_gptq(rules):
            hessians, calib = calibration_hessians(gpt, cfg, ctx)
            timings["calibration"], timings["hessians"] = calib["seconds"], calib["hessian_seconds"]
        else:
            calib = {"source": "none", **compliance("none", 0.0, ctx.train_time_ms, ctx.cap_ms)}
        full_meta["calibration"] = calib
        log_calibration(calib)
        t = time.perf_counter()
        per_method: dict[str, float] = {}
        entries = quantize_state(state, rules, hessians, cfg.gptq, per_method)
        timings["quantize"] = round(time.perf_counter() - t, 3)
        timings["gptq"] = round(per_method.get("gptq", 0.0), 3)
        if cfg.prune.enabled:
            entries, prune_meta, prune_report = _prune(entries, cfg, full_meta, n_code)
            full_meta["prune"] = prune_meta
            timings["prune"] = prune_report["seconds"]
        t = time.perf_counter()
        raw = pack(entries, full_meta)
        timings["pack"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        data = encode_artifact(raw, cfg.codec, cfg.level)
        timings["compress"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        atomic_write_bytes(path, data)
        timings["write"] = round(time.perf_counter() - t, 3)
        model_bytes = len(data)
        if prune_report is not None and model_bytes != prune_report["model_bytes"]:
            raise RuntimeError(f"pruning measured {prune_report['model_bytes']} bytes but {model_bytes} were written")
        sizes = {f"{cfg.codec}-{cfg.level}": model_bytes}
        t = time.perf_counter()
        for c in cfg.report_codecs:
            if f"{c}-{DEFAULT_LEVELS[c]}" not in sizes:
                sizes.update(codec_sizes(raw, [c]))
        if cfg.report_codecs:
            timings["codec_report"] = round(time.perf_counter() - t, 3)
    rep = SizeReport(model_bytes, n_code, cfg.limit_bytes)
    if rank == 0:
        for line in rep.lines(cfg.size_tag):
            log0(line)
        for key, n in sizes.items():
            r = SizeReport(n, n_code, cfg.limit_bytes)
            log0(f"codec_report {key}: model {n} bytes total {r.total} bytes margin {r.margin}")
        parts = " ".join(f"{k}:{v:.2f}s" for k, v in timings.items())
        log0(f"export_time: {parts} -> {path.name}")
    return ExportReport(
        str(path),
        cfg.label,
        model_bytes,
        n_code,
        rep.total,
        cfg.limit_bytes,
        rep.ok,
        timings.get("quantize", 0.0),
        timings.get("compress", 0.0) + timings.get("write", 0.0),
        pre.to_dict() if pre is not None else None,
        calib,
        prune_report,
        sizes,
        timings,
        float_path,
    )


def _prune(entries: dict[str, QuantEntry], cfg: ExportConfig, full_meta: dict, n_code: int):
    """Selective ±1 pruning so that code + model <= prune.total_bytes (default: the limit), decimal."""
    total = int(cfg.prune.total_bytes or cfg.limit_bytes)
    target = total - n_code
    if target <= 0:
        raise ValueError(f"prune target {total} bytes leaves no room for the model after {n_code} code bytes")

    def size_of(e: dict[str, QuantEntry], record: dict) -> int:
        return len(encode_artifact(pack(e, {**full_meta, "prune": record}), cfg.codec, cfg.level))

    log0(f"prune: target total {total} bytes - code {n_code} = model {target} bytes ({cfg.codec}-{cfg.level})")
    pruned, report = prune_to_target(entries, size_of, target, cfg.prune.bits, log=log0)
    record = {k: report[k] for k in ("target_model_bytes", "candidates", "zeroed", "bits")}
    verdict = "fits" if report["fits"] else "STILL OVER the target with every candidate zeroed"
    log0(
        f"prune: zeroed {report['zeroed']}/{report['candidates']} ±1 entries, model {report['model_bytes_before']} -> "
        f"{report['model_bytes']} bytes, {report['probes']} probes in {report['seconds']:.1f}s ({verdict})"
    )
    return pruned, record, report


# ---- float weights for re-export -----------------------------------------------------------------
def save_float_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Every tensor stored raw (lossless) in the artifact container with the model config and tokenizer
    identity; zstd level 3, fast. Not a submission artifact: it only feeds `python -m pgolf.reexport`."""
    entries = {
        k: QuantEntry("raw", tuple(t.shape), str(t.dtype).removeprefix("torch."), data=t.detach().cpu().contiguous())
        for k, t in state.items()
    }
    write_artifact(path, entries, {**meta, "kind": FLOAT_KIND}, "zstd", 3)
    return Path(path)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) from saved float weights or a Lightning `.ckpt` (loaded with weights_only=True;
    its `gpt.<name>` keys, model config from the hyper-parameters; no tokenizer identity)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".ckpt":
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a loadable Lightning checkpoint with weights_only=True ({e})") from e
        sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        model_cfg = (ckpt.get("hyper_parameters") or {}).get("model") if isinstance(ckpt, dict) else None
        if not sd or model_cfg is None:
            raise ValueError(f"{path}: checkpoint lacks a state_dict or the model hyper-parameters")
        state = {k.removeprefix("gpt."): v for k, v in sd.items() if k.startswith("gpt.")}
        if not state:
            raise ValueError(f"{path}: checkpoint state_dict has no gpt.* weights")
        return state, {"model": dict(model_cfg), "source": "lightning_checkpoint"}
    entries, meta = read_artifact(path)
    if meta.get("kind") != FLOAT_KIND:
        raise ArtifactError(
            f"{path}: not saved float weights (it is a quantized artifact?): re-export needs the float weights "
            f"({FLOAT_KIND}) that training saves next to the artifact, or a Lightning .ckpt"
        )
    return {k: e.data for k, e in entries.items()}, meta


def model_from_weights(state: dict[str, torch.Tensor], meta: dict) -> GPT:
    model = GPT(GPTConfig.from_dict(meta["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match their model config (missing {missing}, unexpected {unexpected})")
    return model


def load_artifact_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, dict]:
    """A fresh GPT from an artifact: config from its metadata, de-quantized weights, eval mode."""
    entries, meta = read_artifact(path)
    cfg = GPTConfig.from_dict(meta["model"])
    model = GPT(cfg)
    state = dequantize_state(entries)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: artifact tensors do not match its model config (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval(), meta


def roundtrip_evaluate(
    report: ExportReport,
    *,
    device,
    autocast_dtype,
    tokens,
    luts,
    modes=("standard",),
    seq_len,
    batch_windows,
    stride=64,
    reference_tail=False,
    compile_model=False,
) -> dict:
    """Re-read the artifact from disk, evaluate it, print the round-trip lines; returns a results dict."""
    model, meta = load_artifact_model(report.path, device)
    fwd = torch.compile(model, dynamic=False, fullgraph=True) if compile_model else model
    res = evaluate_modes(
        fwd,
        tokens=tokens,
        luts=luts,
        device=device,
        autocast_dtype=autocast_dtype,
        modes=modes,
        seq_len=seq_len,
        batch_windows=batch_windows,
        stride=stride,
        reference_tail=reference_tail,
    )
    label = report.label
    for mode, r in res.items():
        key = f"final_{label}_roundtrip" if mode == "standard" else f"final_{label}_sliding_window"
        extra = f" stride:{stride}" if mode == "sliding" else ""
        log0(f"{key} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f}{extra} eval_time:{1000 * r.seconds:.0f}ms")
        log0(f"{key}_exact val_loss:{r.val_loss:.8f} val_bpb:{r.val_bpb:.8f}")
    if not report.size_ok:
        log0(f"FAIL: total submission size {report.total_bytes} bytes exceeds the {report.limit_bytes}-byte limit")
    return {
        "roundtrip": {m: r.to_dict() for m, r in res.items()},
        "size_ok": report.size_ok,
        "total_bytes": report.total_bytes,
    }
