"""The record export (PRs #549/#1019/#1263/#1298): export configs, the record's tensor classes, export with GPTQ +
calibration + pruning, the saved float weights, and the re-export command on the same weights."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.data.tokenizer import TokenizerInfo
from pgolf.export.code import code_bytes
from pgolf.export.config import ExportConfig, ExportContext, ExportReport
from pgolf.export.stages import Stopwatch, export_model
from pgolf.export.weights import load_artifact_model, load_weights, save_float_weights
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.artifact import read_artifact
from pgolf.quant.rules import dequantize_state, pick_rule, rules_from_config
from pgolf.tools.inspect import inspect
from pgolf.tools.reexport import compose_config, main, reexport

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPORTS = sorted(p.stem for p in (CONF / "export").glob("*.yaml"))


def export_cfg(name: str, *over: str) -> ExportConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"export={name}", *over])
    return ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))


@pytest.mark.parametrize("name", EXPORTS)
def test_every_export_config_builds(name):
    c = export_cfg(name)
    # the label names the scheme, but the baseline's own export prints the reference's lines (final_int8_zlib_...)
    assert c.label == ("int8_zlib" if name == "int8_zlib_record" else name) and c.limit_bytes == 16_000_000
    assert {"int6_gptq_zstd", "int6_gptq_lzma", "int6_lite_lzma", "int6_rtn_zstd", "int8_zlib"} <= set(EXPORTS)


def test_record_schemes_are_what_the_references_used():
    z, lz = export_cfg("int6_gptq_zstd"), export_cfg("int6_gptq_lzma")
    assert (z.codec, z.level, z.calibration.source, z.prune.enabled) == ("zstd", 22, "train", False)  # PR #1263
    assert (lz.codec, lz.level, lz.calibration.source, lz.prune.enabled) == ("lzma", 9, "ar", True)  # PR #1019
    assert (lz.calibration.count, lz.calibration.length, lz.calibration.temperature) == (64, 2048, 0.8)
    lite = export_cfg("int6_lite_lzma")
    assert lite.rules[3]["clip"] == "search" and lite.rules[3]["method"] == "rtn"  # PR #1298's GPTQ-lite


def test_record_tensor_classes_follow_spec_order():
    """The records' tensor classes (PR #549) on the #1263 model's names (two layers are enough: every name
    repeats per block)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        m = compose(config_name="train", overrides=["model=pr1263"]).model
    over = {"num_layers": 2, "ve_layers": [1], "xsa_last_n": 2}
    cfg = GPTConfig.from_dict({**OmegaConf.to_container(m, resolve=True), **over})
    sd = GPT(cfg).state_dict()
    rules = rules_from_config(export_cfg("int6_gptq_zstd").rules)
    got = {name: pick_rule(name, t, rules).name for name, t in sd.items()}
    for name in ("c_q", "c_k", "c_v", "proj"):
        assert got[f"blocks.1.attn.{name}.weight"] == "attn_mlp"
    assert got["blocks.0.mlp.fc.weight"] == got["blocks.0.mlp.proj.weight"] == "attn_mlp"
    for name in ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"):
        assert got[name] == "embed"
    # <= 65,536 elements go first to fp16, as in the reference: the projections and every control tensor
    for name in ("bigram.proj.weight", "ve_shared.proj.weight", "bigram.scale", "smear.gate", "skip_weights"):
        assert got[name] == "small", name
    for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
        assert got[f"blocks.0.{name}"] == "small"
    assert pick_rule("blocks.0.resid_mix", torch.zeros(300, 300), rules).name == "control"  # a large control
    assert rules[3].bits == 6 and rules[4].bits == 8


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown keys"):
        ExportConfig.from_dict({"codex": "zstd"})
    with pytest.raises(ValueError, match=r"export.prune: unknown keys \['target'\]"):
        ExportConfig.from_dict({"prune": {"target": 1}})
    with pytest.raises(ValueError, match="needs calibration data"):
        export_cfg("int6_gptq_zstd", "export.calibration.source=none")
    with pytest.raises(ValueError, match="codec"):
        ExportConfig.from_dict({"report_codecs": ["bzip2"]})


# ---- export + re-export on a tiny model, with record rules made to reach its small matrices -----------
SMALL = ["export.rules.1.max_numel=64"]  # so the 64x64 matrices are int6 / int8, not fp16
TINY_MODEL = dict(
    vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, smear_gate="record", bigram="xor",
    bigram_buckets=128, bigram_dim=32, xsa_last_n=2, mlp_act="leaky_relu2",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(synth_dir):
    torch.manual_seed(0)
    m = GPT(GPTConfig(**TINY_MODEL))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok = TokenizerInfo.from_path(synth_dir / "synth_256_bpe_selftrained.model")
    meta = {
        "seed": 7,
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "sha256": tok.sha256},
        "train": {"seq_len": 32, "max_wallclock_seconds": 600},
        "training": {"steps": 3, "train_time_ms": 1000.0},
        "provenance": {"git_sha": "abc", "git_dirty": False, "torch": torch.__version__},
    }
    return m.eval(), meta


def test_export_with_gptq_selfgen_calibration_and_pruning(tmp_path, tiny):
    model, meta = tiny
    n_code = code_bytes()
    # zstd-22 instead of the config's lzma-9 keeps the many pruning probes fast on small payloads
    over = [*SMALL, "export.calibration.count=3", "export.calibration.length=16", "export.codec=zstd"]
    over += ["export.level=22", "export.report_codecs=[zlib]"]
    probe = export_cfg("int6_gptq_lzma", *over, "export.prune.enabled=false", "export.save_float=false")
    unpruned = export_model(model, probe, tmp_path / "a", meta, ctx=ExportContext(seed=7))
    total = n_code + unpruned.model_bytes - 300  # force pruning: 300 bytes under the unpruned size
    cfg = export_cfg("int6_gptq_lzma", *over, f"export.prune.total_bytes={total}")
    ctx = ExportContext(seed=7, train_time_ms=1000.0, cap_ms=600_000.0)
    rep = export_model(model, cfg, tmp_path / "b", meta, ctx=ctx)
    assert rep.model_bytes + rep.code_bytes <= total < unpruned.total_bytes  # decimal bytes, code counted
    assert rep.prune["fits"] and rep.prune["zeroed"] > 0 and rep.prune["model_bytes"] == rep.model_bytes
    assert set(rep.codec_sizes) == {"zstd-22", "zlib-9"} and rep.codec_sizes["zstd-22"] == rep.model_bytes
    stages = ["save_float", "calibration", "hessians", "quantize", "gptq", "prune", "pack", "compress", "write"]
    assert list(rep.timings) == [*stages, "codec_report"]  # in the order the stages ran
    assert rep.write_seconds == rep.timings["compress"] + rep.timings["write"]
    entries, m = read_artifact(rep.path)
    cal = m["calibration"]
    assert (cal["source"], cal["count"], cal["length"], cal["seed"], cal["compliant"]) == ("ar", 3, 16, 7, True)
    assert cal["inside_training_budget"] is True and m["prune"]["zeroed"] == rep.prune["zeroed"]
    assert (
        entries["blocks.0.attn.c_q.weight"].bits == 6 and entries["blocks.0.attn.c_q.weight"].info["method"] == "gptq"
    )
    assert entries["tok_emb.weight"].bits == 8 and entries["blocks.0.attn_scale"].kind == "fp16"
    # the round trip model is the de-quantized artifact; the float weights are saved losslessly
    rt, _ = load_artifact_model(rep.path)
    deq = dequantize_state(entries)
    assert all(torch.equal(v, deq[k]) for k, v in rt.state_dict().items())
    state, fmeta = load_weights(rep.float_path)
    assert fmeta["kind"] == "float_weights" and fmeta["tokenizer"] == meta["tokenizer"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    out = inspect(rep.path, codecs=True)
    want = [
        "tokenizer: synth_256_bpe_selftrained.model vocab_size:256",
        "provenance: git abc",
        "calibration: source:ar",
    ]
    want += ["compliant:True", "prune: {", "int6", "margin", "codec zstd-22:", "codec lzma-9:", "codec zlib-9:"]
    for s in want:
        assert s in out, s
    assert f"codec zstd-22: model {rep.model_bytes} bytes" in out


def test_bf16_tables_are_quantized_from_their_bf16_values_and_come_back_bf16(tmp_path, tiny):
    """`embed_dtype: bf16` (the records' precision policy): the artifact records bf16 as the tables' original
    dtype and the round trip rounds the dequantized table to bf16, as the records' `(q * s).to(bf16)`; the
    codes are those of the same values held in fp32, and the float weights are saved as bf16."""
    model, meta = tiny
    cfg16 = GPTConfig(**{**TINY_MODEL, "ve_dim": 32, "ve_layers": [1], "embed_dtype": "bf16"})
    torch.manual_seed(0)
    m16 = GPT(cfg16)
    with torch.no_grad():
        for p in m16.parameters():
            p.add_((torch.randn(p.shape) * 0.05).to(p.dtype))
    m32 = GPT(GPTConfig(**{**cfg16.to_dict(), "embed_dtype": "fp32"}))
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    tables = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
    assert {k for k, v in m16.state_dict().items() if v.dtype == torch.bfloat16} == set(tables)
    over = ["export.rules.2.max_numel=1000", "export.calibration.source=ar", "export.calibration.count=3"]
    over += ["export.calibration.length=16", "export.gptq.batch=3", "export.report_codecs=[]", "export.codec=zlib"]
    cfg = export_cfg("sdclip_gptq_1611", *over)  # tables over 1,000 values: int7 GPTQ (int6 the others)
    reps = {n: export_model(m.eval(), cfg, tmp_path / n, meta) for n, m in (("bf16", m16), ("fp32", m32))}
    e16, _ = read_artifact(reps["bf16"].path)
    e32, _ = read_artifact(reps["fp32"].path)
    for k in tables:
        assert (e16[k].orig_dtype, e32[k].orig_dtype) == ("bfloat16", "float32")
        assert e16[k].kind == e32[k].kind == "int" and e16[k].bits == (7 if k == "tok_emb.weight" else 6)
        for f in ("q", "scale", "data"):  # the same GPTQ codes and scales
            a, b = getattr(e16[k], f), getattr(e32[k], f)
            assert (a is None) == (b is None) and (a is None or torch.equal(a.float(), b.float())), (k, f)
    rt, _ = load_artifact_model(reps["bf16"].path)
    deq = dequantize_state(e32)
    for k, v in rt.state_dict().items():
        assert torch.equal(v, deq[k].to(v.dtype)), k
        assert v.dtype == (torch.bfloat16 if k in tables else torch.float32), k
    state, _ = load_weights(reps["bf16"].float_path)
    assert all(torch.equal(v, state[k]) and v.dtype == state[k].dtype for k, v in m16.state_dict().items())


def test_stopwatch_times_named_stages_in_order(monkeypatch):
    clock = Stopwatch()
    ticks = iter([10.0, 10.25049, 20.0])
    monkeypatch.setattr("pgolf.export.stages.time.perf_counter", lambda: next(ticks))
    with clock.stage("pack"):
        pass
    clock.record("gptq", 1.23456)
    with pytest.raises(RuntimeError), clock.stage("write"):  # a stage that fails records nothing
        raise RuntimeError("disk full")
    assert clock.timings == {"pack": 0.25, "gptq": 1.235}
    assert clock.line("a.ptz") == "export_time: pack:0.25s gptq:1.24s -> a.ptz"


def test_export_report_is_built_by_keyword():
    with pytest.raises(TypeError):
        ExportReport("a.ptz", "int8_zlib", 1, 2, 3, 16_000_000, True, 0.0, 0.0)  # type: ignore[misc]
    r = ExportReport(
        path="a.ptz", label="x", model_bytes=1, code_bytes=2, total_bytes=3, limit_bytes=16_000_000, size_ok=True,
        quantize_seconds=0.5, write_seconds=0.25,
    )  # fmt: skip
    assert list(r.to_dict()) == [
        "path", "label", "model_bytes", "code_bytes", "total_bytes", "limit_bytes", "size_ok", "quantize_seconds",
        "write_seconds", "pre_quant", "calibration", "prune", "codec_sizes", "timings", "float_path",
    ]  # fmt: skip


def test_train_data_calibration_after_the_deadline_is_flagged(tmp_path, tiny, synth_dir, capsys):
    from pgolf.data.shards import list_shards
    from pgolf.data.stream import StreamLayout, TokenStream, TrainStream

    model, meta = tiny
    stream = TokenStream(list_shards(str(synth_dir / "synth_train_*.bin")))
    batches = lambda: iter(TrainStream(stream, StreamLayout(64, 32, 1, 1), rank=0))
    cfg = export_cfg("int6_gptq_zstd", *SMALL, "export.calibration.count=4", "export.calibration.length=32")
    ctx = ExportContext(seed=0, train_time_ms=599_999.0, cap_ms=600_000.0, train_batches=batches)
    rep = export_model(model, cfg, tmp_path, meta, ctx=ctx)
    cal = read_artifact(rep.path)[1]["calibration"]
    assert cal["source"] == "train" and cal["compliant"] is False and cal["inside_training_budget"] is False
    assert rep.calibration == cal
    # no challenge clock given (a re-export): the stamps are the recorded training time plus the stage's seconds
    assert cal["clock"] == "derived" and cal["clock_start_ms"] == 599_999.0
    want_end = 599_999.0 + 1000.0 * (cal["seconds"] + cal["hessian_seconds"])
    assert cal["clock_end_ms"] == pytest.approx(want_end, abs=0.11) and cal["clock_end_ms"] > 600_000.0
    out = capsys.readouterr().out
    assert "compliant:false" in out and "WARNING: calibration not compliant: training data read after" in out


def test_reexport_compares_quantizers_on_the_same_weights(tmp_path, tiny, synth_dir, capsys, monkeypatch):
    model, meta = tiny
    w = save_float_weights(
        tmp_path / "final_model.float.ptz", model.state_dict(), {**meta, "model": model.cfg.to_dict()}
    )
    common = ["data=synthetic", f"data.root={synth_dir.parent}", f"out_dir={tmp_path / 'out'}", *SMALL]
    common += ["eval.batch_windows=8", "export.calibration.count=2", "export.calibration.length=16"]
    results = {}
    for name in ("int6_rtn_zstd", "int6_lite_lzma", "int6_gptq_lzma"):
        results[name] = reexport(compose_config(str(w), [f"export={name}", *common]))
    out = capsys.readouterr().out
    pre = {r["export"]["pre_quant"]["val_bpb"] for r in results.values()}
    assert len(pre) == 1  # the same float weights every time
    pre = pre.pop()
    for name, r in results.items():
        assert r["quant_gap_bpb"] == pytest.approx(r["roundtrip"]["standard"]["val_bpb"] - pre)
        assert (tmp_path / "out" / f"final_model.{name}.ptz").is_file()
        assert json.loads((tmp_path / "out" / f"reexport_{name}.json").read_text())["export"]["label"] == name
        assert (
            f"reexport {name}: pre_quant val_bpb:" in out and f"Total submission size {name.replace('_', '+')}" in out
        )
    assert results["int6_gptq_lzma"]["export"]["calibration"]["source"] == "ar"
    # nothing is overwritten without overwrite=true; a CLI error names the file
    assert main([str(w), "--export", "int6_rtn_zstd", *common]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(w), "--export", "int6_rtn_zstd", *common, "overwrite=true", "eval.enabled=false"]) == 0
    # a score that is not finite is written as null: the file stays strict JSON
    monkeypatch.setattr("pgolf.tools.reexport.roundtrip_and_gap", lambda *a: {"quant_gap_bpb": float("nan")})
    assert main([str(w), "--export", "int6_rtn_zstd", *common, "overwrite=true"]) == 0
    text = (tmp_path / "out" / "reexport_int6_rtn_zstd.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))["quant_gap_bpb"] is None
    # a quantized artifact is not float weights
    art = tmp_path / "out" / "final_model.int6_rtn_zstd.ptz"
    assert main([str(art), "--export", "int6_rtn_zstd", *common, f"out_dir={tmp_path / 'o2'}"]) == 2
    assert "not saved float weights" in capsys.readouterr().err


def test_reexport_reads_a_lightning_checkpoint(tmp_path, synth_dir):
    """A real `.ckpt` from Trainer.save_checkpoint loads with weights_only=True (gpt.* keys, model config)."""
    import lightning as L

    from pgolf.train.module import GolfModule

    torch.manual_seed(0)
    module = GolfModule(model=dict(TINY_MODEL), optim={"kind": "adam"})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state, meta = load_weights(path)
    assert meta["model"]["num_layers"] == 2 and set(state) == set(module.gpt.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in module.gpt.state_dict().items())
    res = reexport(
        compose_config(
            str(path),
            ["export=int6_rtn_zstd", "data=synthetic", f"data.root={synth_dir.parent}", "eval.seq_len=32",
             "eval.batch_windows=8", "eval.pre_quant=false"],
        )
    )  # fmt: skip
    assert res["roundtrip"]["standard"]["tokens"] > 0 and "quant_gap_bpb" not in res


class FakeClock:
    """A challenge clock at 590 s that advances 4 s per block it is run over."""

    def __init__(self):
        self.ms, self.runs = 590_000.0, 0

    def elapsed_ms(self):
        return self.ms

    @contextmanager
    def running(self):
        self.runs += 1
        yield
        self.ms += 4_000.0


@pytest.mark.parametrize("cap_s", [600, 592])
def test_train_data_calibration_is_stamped_on_the_challenge_clock(tmp_path, tiny, synth_dir, capsys, cap_s):
    """Calibration and Hessians run on the clock that timed training: the artifact and the log give when
    they started and ended on it, and compliance is `end <= cap` (PR #1611's gptq_reserve_seconds)."""
    from pgolf.data.shards import list_shards
    from pgolf.data.stream import StreamLayout, TokenStream, TrainStream

    model, meta = tiny
    stream = TokenStream(list_shards(str(synth_dir / "synth_train_*.bin")))
    batches = lambda: iter(TrainStream(stream, StreamLayout(64, 32, 1, 1), rank=0))
    cfg = export_cfg("int6_gptq_zstd", *SMALL, "export.calibration.count=2", "export.calibration.length=32")
    clock = FakeClock()
    ctx = ExportContext(
        seed=0, train_time_ms=589_000.0, cap_ms=1000.0 * cap_s, train_batches=batches,
        clock_ms=clock.elapsed_ms, run_clock=clock.running,
    )  # fmt: skip
    rep = export_model(model, cfg, tmp_path, meta, ctx=ctx)
    cal = read_artifact(rep.path)[1]["calibration"]
    assert clock.runs == 1 and cal["clock"] == "challenge"
    assert (cal["clock_start_ms"], cal["clock_end_ms"]) == (590_000.0, 594_000.0)
    assert cal["compliant"] is (cap_s == 600) and cal["inside_training_budget"] is (cap_s == 600)
    out = capsys.readouterr().out
    assert f"gptq:challenge_clock start:590.000s end:594.000s cap:{cap_s:.1f}s (challenge)" in out
    assert "clock_start_ms:590000.0 clock_end_ms:594000.0 clock:challenge" in inspect(rep.path)


def test_reexport_scores_document_bounded_weights_as_trained(tmp_path, tiny, synth_dir, capsys):
    """Weights trained with `train.doc_attention` are scored in document-bounded windows by the re-export, as by
    eval.py and the training round trip (pgolf.eval.run.doc_max_seg_len): the pre-quantization figure differs
    from plain causal windows on the same weights and tokens."""
    _, meta = tiny
    torch.manual_seed(0)
    model = GPT(GPTConfig(**(TINY_MODEL | {"smear_gate": "none", "bigram": "none"})))  # document-bounded capable
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised projections would hide the attention
    common = ["data=synthetic", f"data.root={synth_dir.parent}", *SMALL, "eval.batch_windows=8"]
    common += ["export=int6_rtn_zstd", "eval.max_tokens=256"]
    pre = {}
    for doc in (False, True):
        m = {**meta, "model": model.cfg.to_dict(), "train": {**meta["train"], "doc_attention": doc, "max_seg_len": 8}}
        w = save_float_weights(tmp_path / f"w{doc}" / "final_model.float.ptz", model.state_dict(), m)
        r = reexport(compose_config(str(w), [*common, f"out_dir={tmp_path / f'out{doc}'}"]))
        pre[doc] = r["export"]["pre_quant"]["val_bpb"]
    out = capsys.readouterr().out
    assert out.count("reexport: document-bounded windows (attention stops at BOS and every 8 tokens)") == 1
    assert pre[True] != pre[False]
