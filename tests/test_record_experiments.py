"""The record experiments of conf/experiment/: one per seed system, each composing to its record's run (model
and its parameter count, initialisation, optimizer groups and Newton-Schulz form, schedule, averaging, QAT,
export scheme, final evaluations with the record's windows)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.config.runtime import check_final_eval, check_runtime
from pgolf.config.validate import validate_train
from pgolf.export.config import ExportConfig
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT, count_params
from pgolf.optim.groups import build_optimizer, partition_params
from pgolf.optim.newton_schulz import POLAR_EXPRESS, QUINTIC, ns_coefficients

# The records' logged (baseline, V5, #1263, #1298, #1090) or computed (#549, #1019) parameter counts.
PARAMS = {
    "baseline": 17_059_912,
    "v5_1556": 22_368_840,
    "record_549": 26_928_220,
    "record_1019": 27_067_484,
    "record_1263": 26_993_756,
    "record_1298": 26_895_452,
    "nonrecord_1090": 27_092_057,
}
RECORDS = sorted(PARAMS)
EXPORT_LABEL = {
    "baseline": "int8_zlib",  # export=int8_zlib_record, labelled as the reference's log lines
    "v5_1556": "int6_v5_zstd",
    "record_549": "int6_lite_lzma6_record",
    "record_1019": "int6_gptq_lzma_record",
    "record_1263": "int6_gptq_zstd_record",
    "record_1298": "int6_lite_lzma6_record",
    "nonrecord_1090": "mixed_int5_zstd",
}
# {mode: settings after the run's stride, windows and final_eval.settings} as the export callback runs them
REFERENCE = {"stride": 64, "windows": "reference"}
FINAL_EVAL = {
    "baseline": {"standard": {}},
    "v5_1556": {"standard": {}, "sliding": {"stride": 64, "windows": "v5"}},
    "record_549": {"standard": {}, "sliding": REFERENCE, "ttt": {**REFERENCE, "qat": "keep"}},
    "record_1019": {"standard": {}, "sliding": REFERENCE},
    "record_1263": {"standard": {}, "sliding": REFERENCE, "slot_1263": REFERENCE},
    "record_1298": {"standard": {}, "sliding": REFERENCE, "slot_1298": REFERENCE},
    "nonrecord_1090": {"standard": {}, "lora_ttt_1090": {}},
}
# (batch tokens, seq len, grad accum, warmdown, wall clock s, val_every, log_every, averaging, grad clip)
SCHEDULE = {
    "baseline": (524_288, 1024, "auto", 1200, 600, 1000, 200, "none", 0.0),
    "v5_1556": (524_288, 1024, "auto", 3000, 600, 0, 200, "none", 0.0),
    "record_549": (786_432, 2048, "auto", 3500, 600, 4000, 500, "ema", 0.3),
    "record_1019": (786_432, 2048, "auto", 4000, 600, 4000, 500, "ema", 0.3),
    "record_1263": (786_432, 2048, "auto", 3500, 600, 4000, 500, "ema", 0.3),
    "record_1298": (786_432, 2048, "auto", 4000, 600, 4000, 500, "ema", 0.3),
    "nonrecord_1090": (524_288, 2048, 8, 3000, 4850, 1000, 200, "swa", 0.0),
}


CONF = Path(__file__).resolve().parent.parent / "conf"


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def composed(exp: str, *over: str):
    return compose_cfg([f"experiment={exp}", *over])


def model_of(cfg) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))


def test_one_experiment_per_seed_system():
    top = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert top == sorted([*RECORDS, "demo", "record_1611"])  # record_1611: tests/test_record_1611.py


@pytest.mark.parametrize("exp", RECORDS)
def test_experiment_validates_with_the_records_schedule_and_export(exp):
    cfg = composed(exp)
    run = validate_train(cfg, CONF)
    export = check_runtime(cfg)
    assert run.name == exp and export.label == EXPORT_LABEL[exp]
    t = run.train
    batch, seq, accum, warmdown, clock, val_every, log_every, averaging, clip = SCHEDULE[exp]
    assert (t.batch_tokens, t.seq_len, t.grad_accum, t.warmdown_iters) == (batch, seq, accum, warmdown)
    assert (t.max_wallclock_seconds, t.val_every, t.log_every, t.warmup_steps) == (clock, val_every, log_every, 20)
    assert run.callbacks.averaging.kind == averaging and run.optim.grad_clip == clip
    if averaging == "ema":
        assert run.callbacks.averaging.ema_decay == 0.997
    record_line = exp.startswith("record_")
    assert run.model.qat == ("late" if record_line else "always" if exp == "v5_1556" else "off")
    if record_line:
        assert run.callbacks.late_qat_threshold == 0.15


@pytest.mark.parametrize("exp", RECORDS)
def test_final_eval_runs_the_records_windows(exp):
    plan = check_final_eval(OmegaConf.to_container(composed(exp).final_eval, resolve=True))
    assert plan == FINAL_EVAL[exp]


@pytest.mark.parametrize("exp", RECORDS)
def test_parameter_count_is_the_records(exp):
    assert count_params(model_of(composed(exp))) == PARAMS[exp]


@pytest.mark.parametrize("exp", [*RECORDS, "record_1611", "demo"])
def test_precision_policy_of_each_experiment(exp):
    """Every record keeps its embedding tables as bf16 parameters; the banked ones (Parallel Muon, PR #399:
    #549, #1019, #1298, #1611) keep bf16 Muon momentum and clip each rank's local gradients, the others (the
    baseline's Muon: baseline, V5, #1263's non-banked code, #1090) fp32 and the averaged gradients; the demo is
    fp32 throughout."""
    cfg = composed(exp)
    assert cfg.model.embed_dtype == ("fp32" if exp == "demo" else "bf16")
    banked = exp in ("record_549", "record_1019", "record_1298", "record_1611")
    assert cfg.optim.muon_momentum_dtype == ("bf16" if banked else "fp32")
    assert cfg.optim.grad_clip_scope == ("local" if banked else "averaged")  # the banked code runs no DDP
    assert cfg.optim.muon_shape_scale == ("step" if banked else "update")
    tiny = GPT(GPTConfig(vocab_size=64, num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2))  # the groups only
    matrix = build_optimizer(tiny, OmegaConf.to_container(cfg.optim) | {"frozen": []}).param_groups[0]
    assert matrix["kind"] == "muon" and matrix["momentum_dtype"] == cfg.optim.muon_momentum_dtype
    assert matrix["shape_scale"] == cfg.optim.muon_shape_scale


@pytest.mark.parametrize("exp", RECORDS)
def test_newton_schulz_of_each_experiment(exp):
    """PR #1298 ran all 5 Polar Express tuples (MUON_BACKEND_STEPS, default 5); every other record the
    quintic (3.4445, -4.7750, 2.0315) 5 times."""
    o = composed(exp).optim
    coeffs = ns_coefficients(o.ns_kind, o.ns_steps)
    assert coeffs == (list(POLAR_EXPRESS[:5]) if exp == "record_1298" else [QUINTIC] * 5)
    assert o.muon_row_norm == (exp == "record_1298")
    assert o.muon_row_norm_form == ("bf16_eps" if exp == "record_1298" else "fp32_clamp")


def test_v5_trains_with_the_unfloored_fp32_ste_scale():
    m = composed("v5_1556").model
    assert (m.qat, m.qat_clip_quantile, m.qat_scale_floor, m.qat_scale_fp16) == ("always", 0.9999984, False, False)
    assert composed("v5_1556").optim.aux_proj_to_muon


def test_record_1263_depth_scaled_projections_in_muon():
    cfg = composed("record_1263")
    assert cfg.model.aux_proj_depth_scale and cfg.optim.aux_proj_to_muon
    gpt = model_of(cfg)
    for name in ("bigram.proj.weight", "ve_shared.proj.weight"):
        s = torch.linalg.svdvals(dict(gpt.named_parameters())[name].detach().double())
        assert torch.allclose(s, torch.full_like(s, 1 / math.sqrt(22)), atol=1e-6), name
    parts = partition_params(gpt.named_parameters(), aux_proj_to_muon=True)
    assert {"bigram.proj.weight", "ve_shared.proj.weight"} <= set(parts["matrix"])
    for other in ("record_549", "record_1298"):  # gain 1, with the scalars
        c = composed(other)
        assert not c.model.aux_proj_depth_scale and not c.optim.aux_proj_to_muon


def test_nonrecord_1090_split_swiglu_frozen_smear_and_lora_ttt():
    cfg = composed("nonrecord_1090")
    assert cfg.model.mlp_act == "swiglu" and cfg.model.swiglu_split
    gpt = model_of(cfg)
    names = dict(gpt.named_parameters())
    assert names["blocks.0.mlp.gate.weight"].shape == names["blocks.0.mlp.up.weight"].shape == (1024, 512)
    assert not any(n.endswith("mlp.fc.weight") for n in names)
    opt = build_optimizer(gpt, OmegaConf.to_container(cfg.optim, resolve=True))
    stepped = {id(p) for g in opt.param_groups if g["kind"] != "frozen" for p in g["params"]}
    frozen = {id(p) for g in opt.param_groups if g["kind"] == "frozen" for p in g["params"]}
    assert id(names["smear.gate"]) in frozen and id(names["smear.gate"]) not in stepped
    assert stepped | frozen == {id(p) for p in gpt.parameters()}
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert id(names["blocks.0.mlp.gate.weight"]) in {id(p) for p in muon["params"]}
    assert (muon["weight_decay"], muon["ns_steps"], cfg.optim.matrix_lr) == (0.0, 5, 0.04)
    a = cfg.callbacks.averaging
    assert (a.kind, a.swa_every, a.swa_threshold) == ("swa", 200, 1.0)
    assert list(cfg.final_eval.modes) == ["standard", "lora_ttt_1090"]


def export_of(name: str) -> ExportConfig:
    return ExportConfig.from_dict(OmegaConf.to_container(compose_cfg([f"export={name}"]).export, resolve=True))


def test_record_export_schemes():
    r = export_of("int8_zlib_record").rules
    assert r[1]["control_patterns"] == "baseline" and r[3]["divide_by"] == "fp32" and r[4]["scale_floor"] is False
    lite = export_of("int6_lite_lzma6_record")
    assert (lite.codec, lite.level) == ("lzma", 6)
    g = export_of("int6_gptq_lzma_record")
    assert g.prune.total_bytes == 16_672_358 == round(15.9 * 1024 * 1024) and g.rules[4]["divide_by"] == "fp32"
    m = export_of("mixed_int5_zstd").rules
    assert [x["bits"] for x in m[3:]] == [8, 5, 6] and all(x["code_range"] == "full" for x in m[3:])
    v5 = export_of("int6_v5_zstd")
    assert (v5.codec, v5.level) == ("zstd", 22) and v5.rules[4]["bits"] == 6


@pytest.mark.parametrize("exp", ["ablation/no_clip", "ablation/no_muoneq", "ablation/quintic_ns", "ablation/swa"])
def test_ablations_change_one_thing_of_their_record(exp):
    base = "record_1298" if exp in ("ablation/no_muoneq", "ablation/quintic_ns") else "record_1263"
    a, b = (OmegaConf.to_container(composed(e), resolve=True) for e in (exp, base))
    groups = ("model", "optim", "train", "callbacks", "export")
    diff = {(grp, k) for grp in groups for k in a[grp] if a[grp][k] != b[grp][k]}
    assert diff and {grp for grp, _ in diff} <= {"optim", "callbacks"}, diff
