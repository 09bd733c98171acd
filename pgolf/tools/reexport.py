"""Re-export saved float weights with any export config: `python -m pgolf.tools.reexport WEIGHTS [...]`.

The export callback saves the final float weights (after any weight averaging) beside the artifact
(`final_model.float.ptz`: the artifact container, every tensor raw, with the model config, tokenizer
identity and training record). This command loads them (or a Lightning `.ckpt`, or a record's own
`final_model.pt` with `model=NAME`, both weights_only), quantizes
them with the chosen `conf/export/<NAME>.yaml` plus overrides, writes the artifact, and prints the size
lines, the size under other codecs, the pre-quantization and round-trip val_bpb and the gap, so several
quantizers can be compared on the same weights:

    python -m pgolf.tools.reexport outputs/x/y/final_model.float.ptz --export int6_lite_lzma
    python -m pgolf.tools.reexport W --export int6_gptq_lzma export.calibration.count=16 eval.max_tokens=65536
    python -m pgolf.tools.reexport final_model.pt model=record_1611 data=fineweb_sp8192_caseops \
        --export sdclip_gptq_record_1611_pergroup export.calibration.world_size=8 \
        eval.seq_len=2048 eval.doc_max_seg_len=2048
    python -m pgolf.tools.reexport final_model.int6.ptz model=record_1611 data=fineweb_sp8192_caseops \
        --export sdclip_gptq_record_1611_pergroup export.label=record \
        eval.seq_len=2048 eval.doc_max_seg_len=2048

The last form imports a record's quantized model (PR #1611's `final_model.int6.ptz`, pgolf/tools/
record_quantized.py) instead of quantizing: its codes, scales and LQER factors as stored, written with the
export config's codec into a pgolf artifact that eval.py and `inspect --against` read.

Arguments after WEIGHTS are Hydra overrides of `conf/reexport.yaml` (export=..., data=..., model=...,
export.*, eval.*, out_dir=...). Nothing existing is overwritten unless `overwrite=true`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from pgolf.config.runtime import needed_parts
from pgolf.config.validate import plain
from pgolf.data.shards import list_shards
from pgolf.data.stream import StreamLayout, TokenStream, TrainStream, load_val_data
from pgolf.data.tokenizer import (
    TokenizerError,
    TokenizerInfo,
    build_byte_luts,
    check_shards_tokenizer,
    load_tokenizer,
)
from pgolf.eval.core import EvalContext, json_safe
from pgolf.eval.run import doc_max_seg_len, run_val_seq_len
from pgolf.export.code import CODE_KEY, code_of, code_record, project_root
from pgolf.export.config import ExportConfig, ExportContext, ExportReport
from pgolf.export.provenance import provenance
from pgolf.export.roundtrip import roundtrip_evaluate
from pgolf.export.stages import Stopwatch, export_model
from pgolf.export.weights import MAX_SEQ_LEN, model_from_weights
from pgolf.io import atomic_write_bytes, sha256_file
from pgolf.model.config import GPTConfig
from pgolf.quant.artifact import ArtifactError, SizeReport, encode_artifact
from pgolf.quant.artifact import pack as pack_entries
from pgolf.runlog import log0, set_log_file
from pgolf.tools.datasets import ensure_dataset
from pgolf.tools.pack import SCRIPT, compose_conf, pack, unpack
from pgolf.tools.packsource import PackError
from pgolf.tools.record_quantized import has_record_magic, is_record_quantized, load_record_entries
from pgolf.tools.record_weights import load_input_weights


def compose_config(weights: str, overrides: list[str]) -> DictConfig:
    """conf/reexport.yaml with `weights=` and the command line's overrides."""
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        quoted = "'" + hydra_quoted(weights) + "'"  # any file name: commas, spaces, =, quotes
        return compose(config_name="reexport", overrides=[f"weights={quoted}", *overrides])


def hydra_quoted(value: str) -> str:
    """`value` as the inside of a single-quoted Hydra override value: backslashes before a quote or at the end
    doubled, quotes and `${` (an interpolation) escaped."""
    out = re.sub(r"(\\+)(?=')|(\\+)$", lambda m: m.group(0) * 2, value)
    return out.replace("'", "\\'").replace("${", "\\${")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when available), `cpu` or `cuda`; RuntimeError when CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda asked for but CUDA is not available")
    return torch.device(name)


def reexport(cfg: DictConfig) -> dict:
    """Quantize the weights of `cfg.weights` with `cfg.export`, write the artifact and
    `reexport_<label>.json` into `out_dir`, score the float and round-trip models (`cfg.eval`); returns the
    result written. FileExistsError when an output exists and `overwrite` is false; ValueError when the
    tokenizer is not the weights' or no evaluation length is known."""
    weights = Path(cfg.weights)
    export_cfg = ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))
    export_cfg.save_float = False  # the float weights are the input here
    out_dir = Path(cfg.out_dir) if cfg.out_dir else weights.parent / "reexport"
    art, res_path = out_dir / export_cfg.path_name, out_dir / f"reexport_{export_cfg.label}.json"
    for p in (art, res_path) if not cfg.overwrite else ():
        if p.exists():
            raise FileExistsError(f"{p} exists; choose another out_dir= or export.label=, or pass overwrite=true")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else None
    if weights.is_file() and is_record_quantized(weights):
        return import_record_quantized(cfg, weights, model_cfg, export_cfg, out_dir, res_path)
    state, meta = load_input_weights(weights, model_cfg)  # checked before any tensor is allocated
    meta = with_doc_attention(meta, cfg.eval.get("doc_max_seg_len"), weights.name)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    check_data_tokenizer(weights, meta, data)  # before the data is prepared or the model built
    seq_len, cut = eval_lengths(cfg, meta, data, weights.name) if cfg.eval.enabled else (0, 0)
    device = pick_device(cfg.device)
    model = model_from_weights(state, meta)
    ensure_dataset(data.get("prepare"), data.get("root"))
    check_shards_tokenizer(data["train_pattern"], data["tokenizer_path"])  # calibration may read the train shards
    tok = TokenizerInfo.from_path(data["tokenizer_path"])
    if "tokenizer" in meta:
        tok.check_matches(meta["tokenizer"], what=f"weights {weights.name}")
    model = model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_log_file(out_dir / f"reexport_{export_cfg.label}.log")
    log0(f"reexport: weights {weights.name} -> {art} with export {export_cfg.label}")
    ctx = export_context(cfg, export_cfg, meta, data, tok.vocab_size, device)
    code = reexport_code(weights, meta, OmegaConf.to_container(cfg.export, resolve=True))
    tokens, eval_ctx = (None, None)
    if cfg.eval.enabled:
        doc = doc_max_seg_len(meta)  # as trained: document-bounded windows, as eval.py and the training round trip
        if doc is not None:
            log0(f"reexport: document-bounded windows (attention stops at BOS and every {doc} tokens), as trained")
        tokens, eval_ctx = validation(cfg, data, tok, model.cfg.vocab_size, seq_len, device, doc, cut)
    report = export_model(
        model,
        export_cfg,
        out_dir,
        {**output_meta(meta, tok, weights), CODE_KEY: {"bytes": code["bytes"], "sha256": code["sha256"]}},
        val_tokens=tokens if cfg.eval.pre_quant else None,
        eval_ctx=eval_ctx,
        ctx=ctx,
    )
    result = {"weights": str(weights), "export": report.to_dict(), "code": code}
    if tokens is not None:
        result.update(roundtrip_and_gap(report, tokens, eval_ctx))
    log0(
        f"reexport {report.label}: model_bytes:{report.model_bytes} code_bytes:{report.code_bytes} "
        f"total:{report.total_bytes} margin:{report.limit_bytes - report.total_bytes} "
        f"{'OK' if report.size_ok else 'OVER THE LIMIT'}"
    )
    atomic_write_bytes(res_path, (json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n").encode())
    return result


def import_record_quantized(
    cfg: DictConfig, weights: Path, model: dict | None, export_cfg: ExportConfig, out_dir: Path, res_path: Path
) -> dict:
    """A record's own quantized file (PR #1611's `final_model.int6.ptz`, pgolf/tools/record_quantized.py) written
    as a pgolf artifact with `export_cfg`'s codec, level and label: its codes, scales, LQER factors and
    passthrough tensors as the record stored them (no quantization; the export's rules, calibration and LQER
    settings are not used), then scored as a re-export is (`eval`; no pre-quantization score: there are no
    float weights). The artifact counts no code bytes (the record's script is not pgolf's). The file and the
    data config are checked before any data is prepared. Raises ArtifactError, TokenizerError, ValueError."""
    if model is None:
        what = (
            "a record's quantized file holds no model config"
            if has_record_magic(weights)
            else (
                "not a pgolf artifact, saved weights or torch.save file (bad magic bytes); if it is a record's "
                "brotli-compressed quantized model, it holds no model config"
            )
        )
        raise ArtifactError(
            f"{weights}: {what}: name the model it was trained with, model=<conf/model name> (PR #1611's "
            "final_model.int6.ptz: model=record_1611)"
        )
    meta = with_doc_attention(
        {"model": model, "source": "record_quantized"}, cfg.eval.get("doc_max_seg_len"), weights.name
    )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    check_data_tokenizer(weights, meta, data)  # the configs first: decoding a pergroup file takes minutes
    seq_len, cut = eval_lengths(cfg, meta, data, weights.name) if cfg.eval.enabled else (0, 0)
    entries, fmt = load_record_entries(weights, model)
    device = pick_device(cfg.device)
    ensure_dataset(data.get("prepare"), data.get("root"))
    tok = TokenizerInfo.from_path(data["tokenizer_path"])
    out_dir.mkdir(parents=True, exist_ok=True)
    set_log_file(out_dir / f"reexport_{export_cfg.label}.log")
    art = out_dir / export_cfg.path_name
    source = {"file": weights.name, "format": fmt, "bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    log0(
        f"reexport: the record's quantized {weights.name} ({fmt}, {len(entries)} tensors: codes, scales and LQER "
        f"factors as stored) -> {art} with codec {export_cfg.codec}-{export_cfg.level}; code bytes not counted"
    )
    quant = {"label": export_cfg.label, "codec": export_cfg.codec, "level": export_cfg.level, "imported": source}
    art_meta = {**output_meta(meta, tok, weights), "model": model, "quant": quant, "code_bytes": 0}
    clock = Stopwatch()
    with clock.stage("pack"):
        raw = pack_entries(entries, art_meta)
    with clock.stage("compress"):
        blob = encode_artifact(raw, export_cfg.codec, export_cfg.level)
    with clock.stage("write"):
        atomic_write_bytes(art, blob)
    size = SizeReport(model_bytes=len(blob), code_bytes=0, limit=export_cfg.limit_bytes)
    for line in size.lines(export_cfg.size_tag):
        log0(line)
    log0(clock.line(art.name))
    report = ExportReport(
        path=str(art),
        label=export_cfg.label,
        model_bytes=len(blob),
        code_bytes=0,
        total_bytes=size.total,
        limit_bytes=export_cfg.limit_bytes,
        size_ok=size.ok,
        quantize_seconds=0.0,
        write_seconds=clock.timings.get("compress", 0.0) + clock.timings.get("write", 0.0),
        timings=clock.timings,
    )
    result = {"weights": str(weights), "imported": source, "export": report.to_dict()}
    if cfg.eval.enabled:
        doc = doc_max_seg_len(meta)
        if doc is not None:
            log0(f"reexport: document-bounded windows (attention stops at BOS and every {doc} tokens)")
        tokens, eval_ctx = validation(cfg, data, tok, GPTConfig.from_dict(model).vocab_size, seq_len, device, doc, cut)
        result.update(roundtrip_and_gap(report, tokens, eval_ctx))
    atomic_write_bytes(res_path, (json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n").encode())
    return result


def with_doc_attention(meta: dict, n: int | None, name: str) -> dict:
    """`meta` with `train.doc_attention` and `train.max_seg_len` = n (`eval.doc_max_seg_len`): the document-bounded
    attention (PR #1530; PR #1611's 2048-token pieces) a record's model was trained and is scored with, which its
    bare file does not record; the artifact records it, so eval.py scores the same windows. None: `meta` as it
    is. Raises ValueError for n outside 1..MAX_SEQ_LEN, or weights that record their training (pgolf's own:
    their `train` record says how they were trained)."""
    if n is None:
        return meta
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEQ_LEN:
        raise ValueError(f"eval.doc_max_seg_len must be an integer in 1..{MAX_SEQ_LEN}, got {n!r}")
    if "train" in meta:
        raise ValueError(
            f"{name} records its training (train.doc_attention: {meta['train'].get('doc_attention', False)}): "
            "eval.doc_max_seg_len is for a record's file, which records none"
        )
    return {**meta, "train": {"doc_attention": True, "max_seg_len": n}}


def check_data_tokenizer(weights: Path, meta: dict, data: dict) -> None:
    """The data config's tokenizer against the weights', before any data is prepared: the tokenizer the
    weights record (`meta.tokenizer`: name, vocab size, sha256; a `.ckpt` records none) must be the
    configured file when it exists (`TokenizerInfo.check_matches`), or, when a preparation step
    (`data.prepare`) is still to make it, have its file name and `data.vocab_size`; and the configured vocab
    size may not exceed the model's (token ids index the embedding). Raises TokenizerError (a ValueError) in
    one line naming both, and the conf/data configs of the weights' tokenizer when it is another file."""
    rec = meta.get("tokenizer")
    model_vocab = GPTConfig.from_dict(meta["model"]).vocab_size
    path = Path(data["tokenizer_path"])
    what = f"weights {weights.name}"
    try:
        if path.is_file():
            tok = TokenizerInfo.from_path(path)
            if rec is not None:
                tok.check_matches(rec, what=what)
            vocab = tok.vocab_size
        else:
            vocab = data.get("vocab_size")
            if rec is not None and data.get("prepare") not in (None, "none"):
                if vocab != rec["vocab_size"] or path.name != rec["name"]:
                    raise TokenizerError(
                        f"the data config's tokenizer {path.name} (vocab size {vocab}; data.prepare="
                        f"{data['prepare']} would make it) is not the {what}'s {rec['name']} (vocab size "
                        f"{rec['vocab_size']})"
                    )
        if vocab is not None and vocab > model_vocab:
            raise TokenizerError(
                f"the data config's tokenizer {path.name} has vocab size {vocab}, more than the {what}'s model "
                f"({model_vocab})"
            )
    except TokenizerError as e:  # name the data configs of the weights' tokenizer, unless it is this one's
        hint = data_configs_with(rec["name"]) if rec is not None and rec["name"] != path.name else []
        also = "; the data config of that tokenizer: " + " or ".join(f"data={h}" for h in hint) if hint else ""
        raise TokenizerError(f"{e}{also}") from None


def data_configs_with(tokenizer: str) -> list[str]:
    """The conf/data configs whose `tokenizer_path` names the file `tokenizer`."""
    out = []
    for p in sorted((project_root() / "conf" / "data").glob("*.yaml")):
        path = OmegaConf.to_container(OmegaConf.load(p), resolve=False).get("tokenizer_path")
        if isinstance(path, str) and path.rsplit("/", 1)[-1] == tokenizer:
            out.append(p.stem)
    return out


def reexport_code(weights: Path, meta: dict, export: dict) -> dict:
    """The code record a train_gpt.py that makes this artifact would have: `{"bytes", "sha256", "source",
    "training_bytes", "added_parts"}`.

    The float weights record only the training run's code (`meta["code"]`, pgolf/export/code.py), whose packed
    config may leave out optional parts (pgolf/config/runtime.py `needed_parts`: GPTQ, its calibration, SDClip,
    LQER, pruning, ...) the re-export's `export` (a plain export group) needs. When the run's train_gpt.py
    lies beside the weights and its length and sha256 are the recorded ones, its config (the packed payload)
    with `export` replaced is packed with this checkout (pgolf/tools/pack.py) and that file's length is the
    code (`source: packed`; logged with the parts it adds). Otherwise the training run's bytes are kept
    (`source: training`) with a WARNING line naming the parts this export needs beyond a default config's,
    which the training script lacks unless its config used them."""
    rec = code_of(meta)
    out = {**rec, "training_bytes": rec["bytes"], "added_parts": []}
    script = weights.parent / SCRIPT
    why = f"no {SCRIPT} beside the weights"
    if rec["sha256"] is None:
        why = "the weights record no code hash"
    elif script.is_file():
        data = script.read_bytes()
        why = f"{SCRIPT} beside the weights is not the training run's (its length and sha256 differ)"
        if code_record(data) == {"bytes": rec["bytes"], "sha256": rec["sha256"]}:
            try:
                config = unpack(data)[0]["config"]
                packed = pack({**config, "export": export})
            except (PackError, ValueError, KeyError, OSError) as e:
                why = f"its config could not be packed with this export: {e}"
            else:
                added = [p for p in needed_parts(packed.payload["config"]) if p not in needed_parts(config)]
                out.update(packed.code, source="packed", added_parts=added)
                log0(
                    f"reexport: code_bytes:{out['bytes']}: the training run's {SCRIPT} config with export="
                    f"{export['label']}, packed from this checkout (the training run's: {rec['bytes']} bytes; "
                    f"optional parts added: {added or 'none'})"
                )
                return out
    base = plain(compose_conf())
    added = [p for p in needed_parts({**base, "export": export}) if p not in needed_parts(base)]
    out.update(source="training", added_parts=added)
    log0(
        f"WARNING: code bytes {rec['bytes']} are the training run's {SCRIPT} ({why}): a {SCRIPT} that makes this "
        f"artifact also holds the optional parts this export needs, {added or 'none'}, unless the training "
        "config used them"
    )
    return out


def export_context(
    cfg: DictConfig, export_cfg: ExportConfig, meta: dict, data: dict, vocab_size: int, device: torch.device
) -> ExportContext:
    """The seed, the recorded training clock and cap (or `cap_seconds`), the training stream as
    `GolfDataModule.train_stream(0)` reads it on one rank (calibration-length rows), and the sorted training
    shards as rank 0 of a world of 1 (`export.calibration.world_size=8` reads an 8-GPU run's rank-0 files)."""
    cap_s = cfg.cap_seconds if cfg.cap_seconds is not None else meta.get("train", {}).get("max_wallclock_seconds")
    calib_len = export_cfg.calibration.length

    def train_batches():
        n = min(8, export_cfg.calibration.count)
        layout = StreamLayout(calib_len * n, calib_len, world_size=1, grad_accum=1)
        stream = TokenStream(list_shards(data["train_pattern"]), vocab_size)
        return iter(TrainStream(stream, layout, rank=0, start_micro_step=0))

    return ExportContext(
        seed=int(cfg.seed if cfg.seed is not None else meta.get("seed", 0)),
        train_time_ms=(meta.get("training") or {}).get("train_time_ms"),
        cap_ms=1000.0 * float(cap_s) if cap_s else None,
        train_batches=train_batches,
        train_files=lambda: list_shards(data["train_pattern"]),
        rank=0,
        world_size=1,
        device=device,
        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
    )


def eval_lengths(cfg: DictConfig, meta: dict, data: dict, name: str) -> tuple[int, int]:
    """(window length, cut) of the re-export's evaluation: `eval.seq_len`, else the run's final evaluation's or
    training length (as eval.py), else the data's `eval_seq_len`; the validation split is cut to a multiple of
    the length the training run's round trip cut it to, so the same targets are scored. Raises ValueError
    when no length is known (`name`: the weights' file name)."""
    run_seq = (meta.get("final_eval") or {}).get("seq_len") or meta.get("train", {}).get("seq_len")  # as eval.py
    seq_len = int(cfg.eval.seq_len or run_seq or data.get("eval_seq_len") or 0)
    if seq_len <= 0:
        raise ValueError(
            f"{name} records no training seq_len: set eval.seq_len= (the data config has no eval_seq_len either)"
        )
    train_seq = meta.get("train", {}).get("seq_len") or 0
    return seq_len, run_val_seq_len(meta) or max(seq_len, int(train_seq))


def validation(
    cfg: DictConfig,
    data: dict,
    tok: TokenizerInfo,
    model_vocab: int,
    seq_len: int,
    device: torch.device,
    doc: int | None = None,
    cut: int | None = None,
) -> tuple[torch.Tensor, EvalContext]:
    """The validation tokens (the split cut to a multiple of `cut`, default `seq_len`, then to `eval.max_tokens`
    targets, whole windows) and the eval context; `doc`: the document-bounded attention the weights were
    trained with (`pgolf.eval.run.doc_max_seg_len`)."""
    val = load_val_data(
        data["val_pattern"],
        cut or seq_len,
        tok.vocab_size,
        tokenizer=data["tokenizer_path"],
        bytes_pattern=data.get("val_bytes_pattern"),
    )
    tokens = val.tokens
    if cfg.eval.max_tokens:
        n = (min(int(cfg.eval.max_tokens), tokens.numel() - 1) // seq_len) * seq_len
        if n <= 0:
            raise ValueError(f"eval.max_tokens={cfg.eval.max_tokens} is less than one {seq_len}-token window")
        tokens = tokens[: n + 1]
    luts = build_byte_luts(load_tokenizer(data["tokenizer_path"]), model_vocab).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    val_bytes = None if val.bytes is None else val.bytes[: tokens.numel()].to(device)  # a CaseOps byte sidecar
    eval_ctx = EvalContext(
        luts=luts,
        device=device,
        seq_len=seq_len,
        batch_windows=int(cfg.eval.batch_windows),
        autocast_dtype=autocast,
        val_bytes=val_bytes,
        doc_max_seg_len=doc,
    )
    eval_ctx.check_tokens(tokens)
    return tokens, eval_ctx


def output_meta(meta: dict, tok: TokenizerInfo, weights: Path) -> dict:
    """The weights' metadata for the artifact: tokenizer identity and the re-export's own provenance."""
    out = {k: v for k, v in meta.items() if k not in ("kind", "source")}
    out.setdefault("tokenizer", {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256})
    out["reexport"] = {"weights": weights.name, "provenance": provenance()}
    return out


def roundtrip_and_gap(report: ExportReport, tokens: torch.Tensor, eval_ctx: EvalContext) -> dict:
    """The artifact's standard round-trip eval and, with a pre-quantization score, the gap (logged)."""
    rt = roundtrip_evaluate(report, tokens, eval_ctx, {"standard": {}})
    if report.pre_quant is not None:
        post = rt["roundtrip"]["standard"]["val_bpb"]
        rt["quant_gap_bpb"] = gap = post - report.pre_quant["val_bpb"]
        log0(
            f"reexport {report.label}: pre_quant val_bpb:{report.pre_quant['val_bpb']:.6f} "
            f"roundtrip val_bpb:{post:.6f} gap:{gap:+.6f} eval_tokens:{tokens.numel() - 1}"
        )
    return rt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.reexport", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "weights",
        help="final_model.float.ptz saved by training, a Lightning .ckpt, or a record's final_model.pt or "
        "final_model.int6.ptz with model=NAME",
    )
    ap.add_argument("--export", help="an export config of conf/export (same as export=NAME)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of conf/reexport.yaml")
    a = ap.parse_intermixed_args(argv)
    overrides = ([f"export={a.export}"] if a.export else []) + a.overrides
    try:
        cfg = compose_config(a.weights, overrides)
        result = reexport(cfg)
    except (OSError, ValueError, RuntimeError, HydraException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["export"]["size_ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
