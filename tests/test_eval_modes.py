"""The registry of eval modes (names = conf/eval/*.yaml, each YAML = its mode's defaults, a mode added from one
module), score-first TTT, LoRA TTT and SLOT: the seeds' settings, reference formulas, reuse of the backbone,
isolation, bad settings, and the audit round trip through evaluate_artifact + pgolf.tools.audit. (1 vs 2
processes for every mode: tests/test_evaluate.py.)"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed_tiny_gpt
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.data.stream import load_val_tokens
from pgolf.data.tokenizer import ByteLUTs, TokenizerInfo, build_byte_luts, load_tokenizer
from pgolf.eval import registry
from pgolf.eval.core import EvalContext, Scored, TargetLog, make_batch, score_windows, window_table
from pgolf.eval.lora_ttt import Adapter, DocLoRA, LoraSettings, chunk_window, documents
from pgolf.eval.modes import Mode, mode_names, parse_mode, register, run_mode
from pgolf.eval.run import evaluate_artifact
from pgolf.eval.slot import SlotSettings, slot_batch
from pgolf.eval.ttt import TTTSettings, all_reduce_grads, train_chunk, ttt_model, ttt_params
from pgolf.eval.windows import sliding_windows
from pgolf.export.config import ExportConfig, ExportReport
from pgolf.export.roundtrip import final_eval_modes, final_eval_plan, roundtrip_evaluate
from pgolf.export.stages import export_model
from pgolf.export.weights import load_artifact_model
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.model.layers import CastedLinear
from pgolf.tools import audit as audit_cli

V, S = 32, 16
CPU = torch.device("cpu")
CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
SMALL = {  # the registered modes at test size
    "ttt": {"stride": 4, "chunk_tokens": 48, "epochs": 2, "batch_seqs": 3, "lr": 0.05},
    "lora_ttt": {"chunk_size": 4, "context": 12, "batch_docs": 3, "lr": 0.05},
    "lora_ttt_1090": {"chunk_size": 4, "context": 4, "batch_docs": 3},
    "slot_1263": {"stride": 4},
    "slot_1298": {"stride": 4},
    "causal_slot": {"stride": 4},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model() -> GPT:
    return perturbed_tiny_gpt(V)


def luts() -> ByteLUTs:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(1, 4, (V,), generator=g).to(torch.int16)
    return ByteLUTs(base, torch.rand(V, generator=g) < 0.4, torch.zeros(V, dtype=torch.bool))


def tokens(n: int = 1 + S * 12) -> torch.Tensor:
    t = torch.randint(2, V, (n,), generator=torch.Generator().manual_seed(3))
    t[::23] = 1  # a BOS every 23 tokens: documents for LoRA TTT
    return t


def run(name, settings, m=None, toks=None, log=None, **kw):
    ctx = EvalContext(**{"luts": luts(), "device": CPU, "batch_windows": 4, "seq_len": S, "log": log, **kw})
    return run_mode(name, settings, m if m is not None else model(), toks if toks is not None else tokens(), ctx)


def parsed(name: str, settings: dict, seq_len: int = S, batch_windows: int = 4):
    return parse_mode(name, settings, seq_len=seq_len, batch_windows=batch_windows)[1]


def nll_of(name, settings, **kw) -> np.ndarray:
    log = TargetLog()
    run(name, settings, log=log, **kw)
    return log.arrays()["nll"]


# ---- the registry and the configs -----------------------------------------------------------------------
def eval_cfg(mode: str) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"eval={mode}", "artifact=x"])
    return OmegaConf.to_container(cfg.eval[mode], resolve=True)


def test_every_registered_mode_has_its_config_and_the_config_writes_out_its_defaults():
    """conf/eval/<name>.yaml exists for every registered mode and for nothing else (config names are how
    modes are selected), and holds exactly the mode's defaults: eval.py and the end-of-training evaluations
    (which run a mode with its registered defaults) score with the same settings."""
    yamls = sorted(p.stem for p in Path(CONF, "eval").glob("*.yaml"))
    assert mode_names() == yamls
    for name in yamls:
        cfg = eval_cfg(name)
        assert parsed(name, cfg, 2048, 32) == parsed(name, {}, 2048, 32), name
        assert set(cfg) == {f.name for f in dataclasses.fields(registry.get_mode(name).settings)} - {
            "seq_len",
            "batch_windows",
        }, f"conf/eval/{name}.yaml lists every setting of its mode but seq_len and batch_windows"


def test_a_mode_is_added_from_one_module(monkeypatch):
    """A mode defined here, registered here, run by run_mode by name, parsed and refused like the others."""
    monkeypatch.setattr(registry, "_MODES", dict(registry._MODES))  # the registry as it was after the test

    @dataclasses.dataclass
    class FirstTarget:
        seq_len: int
        scale: float = 1.0

    def run_first(m, toks, st: FirstTarget, ctx: EvalContext) -> Scored:  # scores target 0 only: -log(1/scale)
        sums = ctx.zeros() + torch.tensor([math.log(st.scale), 1.0, 2.0], dtype=torch.float64)
        return Scored(sums, 1, {"note": "first"})

    register(Mode("first_target", FirstTarget, run_first, rule=lambda st: (st.scale >= 1.0, "a test mode")))
    assert "first_target" in mode_names()
    r = run("first_target", {"scale": math.e})
    assert (r.mode, r.val_loss, r.tokens, r.bytes, r.windows, r.compliant) == ("first_target", 1.0, 1, 2.0, 1, True)
    assert r.val_bpb == pytest.approx(1 / (2 * math.log(2))) and r.settings == {
        "seq_len": S,
        "scale": math.e,
        "note": "first",
    }
    assert run("renamed", {"mode": "first_target", "scale": 0.5}).mode == "renamed"  # one mode, another name
    with pytest.raises(ValueError, match=r"eval mode first_target: unknown settings \['stride'\]"):
        run("first_target", {"stride": 4})
    with pytest.raises(ValueError, match="registered twice"):
        register(Mode("first_target", FirstTarget, run_first, rule=lambda st: (True, "")))


def test_slot_configs_are_the_seed_forms():
    a = parsed("slot_1263", eval_cfg("slot_1263"), 2048, 32)
    assert (a.steps, a.lr, a.lr_min, a.schedule, a.weight_decay) == (16, 0.008, 0.0008, "cosine", 0.01)
    assert (a.logit_bias, a.fit, a.dtype, a.stride, a.compliant) == (True, "scored", "fp32", 64, False)
    assert a.lr_at(0) == pytest.approx(0.008) and a.lr_at(15) == pytest.approx(0.000869, abs=1e-6)  # PR #1263
    b = parsed("slot_1298", eval_cfg("slot_1298"), 2048, 32)
    assert (b.steps, b.lr, b.schedule, b.weight_decay, b.logit_bias, b.fit, b.dtype) == (
        8,
        0.005,
        "constant",
        0.0,
        False,
        "all",
        "hidden",
    )
    assert {b.lr_at(k) for k in range(8)} == {0.005} and not b.compliant
    c = parsed("causal_slot", eval_cfg("causal_slot"), 2048, 32)
    assert c.fit == "context" and c.normalize == "window" and c.compliant


def test_ttt_and_lora_configs_are_the_reference_recipes():
    t = parsed("ttt", eval_cfg("ttt"), 2048, 32)
    assert (t.chunk_tokens, t.lr, t.momentum, t.epochs, t.batch_seqs, t.grad_clip, t.freeze_blocks) == (
        32768,
        0.002,
        0.9,
        3,
        32,
        1.0,
        0,
    )
    assert t.lr_at(0, 1893) == 0.002 and t.lr_at(1892, 1893) == pytest.approx(0.0, abs=1e-12)
    lo = parsed("lora_ttt", eval_cfg("lora_ttt"), 1024)
    assert (lo.rank, lo.lr, lo.beta2, lo.eps, lo.chunk_size, lo.context) == (8, 0.01, 0.95, 1e-10, 256, 1024)
    assert lo.targets == ("q", "v", "head")
    assert (lo.init, lo.scale_by_rank, lo.score_doc_end, lo.score_min_tokens, lo.score_min_chunk) == (
        "uniform",
        False,
        True,
        0,
        1,
    )
    assert (t.windows, t.qat) == ("once", "off") and parsed("sliding", eval_cfg("sliding"), 2048).windows == "once"


def test_lora_1090_config_is_the_pr_1090_form():
    """PR #1090: rank 8 on q and v, A ~ N(0, 0.01²), B ~ N(0, 0.001²), x1/r, 256-target chunks fed alone,
    Adam(lr 0.05) with PyTorch's defaults, documents under 5 tokens and each document's last target (the next
    BOS) and final one-target chunks not scored."""
    lo = parsed("lora_ttt_1090", eval_cfg("lora_ttt_1090"), 2048)
    assert (lo.rank, lo.targets, lo.init, lo.a_std, lo.b_std, lo.scale_by_rank) == (
        8,
        ("q", "v"),
        "normal",
        0.01,
        0.001,
        True,
    )
    assert (lo.chunk_size, lo.context, lo.lr, lo.beta1, lo.beta2, lo.eps) == (256, 256, 0.05, 0.9, 0.999, 1e-8)
    assert (lo.score_min_tokens, lo.score_doc_end, lo.score_min_chunk) == (5, False, 2)
    assert registry.get_mode("lora_ttt_1090").rule(lo)[0]  # compliant: each chunk scored before its step


@pytest.mark.parametrize(
    "name,settings,match",
    [
        ("x", {"mode": "bogus"}, r"eval mode x: unknown mode 'bogus' \(one of causal_slot \| lora_ttt"),
        ("bogus", {}, "eval mode bogus: unknown mode 'bogus'"),
        ("slot_1263", {"fit": "future"}, "fit 'future'"),
        ("slot_1263", {"stride": 4, "stepz": 3}, r"eval mode slot_1263: unknown settings \['stepz'\]"),
        (
            "s",
            {"mode": "causal_slot", "stepz": 3},
            r"eval mode s: unknown settings \['stepz'\] \(the settings of causal_slot",
        ),
        ("lora_ttt", {"batch_windows": 8}, r"unknown settings \['batch_windows'\]"),  # LoRA batches documents
        ("sliding", {"stride": 17}, r"^sliding\.stride 17 must be in 1\.\.16$"),  # named once ('sliding: sliding:')
        ("ttt", {"stride": 17}, r"^ttt\.stride 17 must be in 1\.\.16$"),
        ("slot_1263", {"stride": 17}, r"^slot_1263\.stride 17 must be in 1\.\.16$"),
        ("ttt", {"chunk_tokens": 0}, "chunk_tokens 0"),
        ("ttt", {"stride": 4, "momentum": 5}, r"^ttt\.momentum 5\.0 must be in \[0, 1\)$"),  # SGD diverges
        ("lora_ttt", {"targets": ["q", "k"]}, r"targets \['k'\]"),
        ("lora_ttt", {"chunk_size": 64, "context": 32}, "chunk_size 64"),
        ("sliding", {"seq_len": 16385}, r"eval mode sliding: seq_len must be at most 16384 \(eval.py's cap\)"),
        ("standard", {"seq_len": "abc"}, r"standard.seq_len must be an integer, got 'abc'"),  # was int()'s words
    ],
)
def test_bad_mode_settings_fail_clearly(name, settings, match):
    with pytest.raises(ValueError, match=match):
        run(name, settings)


@pytest.mark.parametrize("plan", ["once", "reference"])
def test_the_window_plan_setting_is_kept_beside_the_window_count(plan):
    """results.json and eval_result.json stored `settings.windows: 139` (the count) for the plan
    `windows: reference`, so the plan a score came from could not be told."""
    r = run("sliding", {"stride": 8, "windows": plan})
    d = r.to_dict()
    assert d["settings"]["windows"] == plan and d["settings"]["stride"] == 8
    assert isinstance(d["windows"], int) and d["windows"] == r.windows > 0


def test_a_name_running_another_mode_logs_its_lines(capsys):
    """`final_eval.settings.sliding.mode=standard` runs the standard mode under the name sliding; its lines
    have no stride (the round trip died with KeyError: 'stride' after training)."""
    from pgolf.export.roundtrip import log_key, log_result

    r = run("sliding", {"mode": "standard"})
    log_result(log_key("int8_zlib", "sliding"), r)
    out = capsys.readouterr().out
    assert f"final_int8_zlib_sliding_window val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} eval_time:" in out


def test_a_mode_that_scores_no_target_is_an_error_not_a_zero():
    """Standard windows longer than the stream score nothing: an error naming the mode, where the result
    was val_bpb 0.0 (and a compliant one in results.json)."""
    assert run("standard", {}, toks=tokens(S + 1)).tokens == S
    with pytest.raises(ValueError, match=rf"eval mode standard scored no targets .* of the {S - 1} validation"):
        run("standard", {}, toks=tokens(S))


# ---- SLOT ----------------------------------------------------------------------------------------------
def test_slot_without_steps_is_sliding():
    sl = nll_of("sliding", {"stride": 4})
    for fit in ("scored", "all", "context"):
        np.testing.assert_allclose(
            nll_of("s", {"mode": "slot_1263", "stride": 4, "steps": 0, "fit": fit}), sl, atol=1e-6
        )


def direct_slot(st: SlotSettings, h, b, W, cap):
    """PR #1263's SLOT written literally: logits = c·tanh(((H+δ)Wᵀ + β)/c) on all S positions, masked loss, AdamW."""
    pos = torch.arange(S).expand(b.x.size(0), S)
    scored = (pos >= b.lo[:, None]) & (pos < b.n[:, None])
    fit = {"scored": scored, "context": pos < b.lo[:, None], "all": torch.arange(b.x.size(0))[:, None] < b.real}
    fit = fit[st.fit].expand_as(scored).float()
    delta = torch.zeros(h.size(0), 1, h.size(2), requires_grad=True)
    bias = torch.zeros(h.size(0), 1, V, requires_grad=True)
    params = [delta, bias] if st.logit_bias else [delta]
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)

    def logits():
        z = (h + delta) @ W.T + (bias if st.logit_bias else 0.0)
        return cap * torch.tanh(z / cap)

    for k in range(st.steps):
        opt.param_groups[0]["lr"] = st.lr_at(k)
        ce = F.cross_entropy(logits().flatten(0, 1), b.y.flatten(), reduction="none").view_as(fit)
        w = fit / fit.sum(1, keepdim=True).clamp_min(1) if st.normalize == "window" else fit / fit.sum()
        opt.zero_grad()
        (ce * w).sum().backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(logits().flatten(0, 1), b.y.flatten(), reduction="none").view_as(fit), scored


@pytest.mark.parametrize("form", ["slot_1263", "slot_1298", "causal_slot"])
def test_slot_batch_equals_the_direct_formula(form):
    """Base logits once per batch + a per-window row per step == (H+δ)Wᵀ + β per step."""
    m, toks = model(), tokens()
    st = parsed(form, SMALL[form])
    wins = sliding_windows(toks.numel() - 1, S, 4)
    for table in (window_table(wins[:3]), window_table(wins[20:24])):  # window 0 + a part-empty batch; later
        b = make_batch(toks, table, S, 4)
        with torch.no_grad():
            h = m.forward_hidden(b.x)
        nll, pos, mask = slot_batch(st, h, b, m.output_weight(), m.cfg.logit_softcap)
        ref, ref_mask = direct_slot(st, h, b, m.output_weight().detach(), m.cfg.logit_softcap)
        got = torch.zeros_like(ref).scatter(1, pos, nll)
        assert torch.equal(torch.zeros_like(ref_mask).scatter(1, pos, mask), ref_mask)
        torch.testing.assert_close(got[ref_mask], ref[ref_mask], atol=2e-5, rtol=0)


def counting(m: GPT) -> list[int]:
    calls = [0]
    inner = m.forward_hidden

    def wrapped(*a, **k):
        calls[0] += 1
        return inner(*a, **k)

    m.forward_hidden = wrapped
    return calls


@pytest.mark.parametrize("form", ["slot_1263", "slot_1298", "causal_slot"])
def test_slot_runs_the_backbone_once_per_batch(form):
    m, toks = model(), tokens()
    calls = counting(m)
    r = run(form, SMALL[form], m=m, toks=toks)
    assert r.settings["steps"] > 0 and calls[0] == math.ceil(r.windows / 4)


# ---- TTT -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embed_dtype", ["fp32", "bf16"])
def test_ttt_without_learning_is_sliding_and_leaves_the_model_alone(embed_dtype):
    """With a bf16 token table (the records' policy) TTT trains it too: its gradient comes back bf16."""
    m = perturbed_tiny_gpt(V, embed_dtype=embed_dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sl = nll_of("sliding", {"stride": 4}, m=m)
    np.testing.assert_array_equal(nll_of("ttt", {**SMALL["ttt"], "lr": 0.0}, m=m), sl)
    np.testing.assert_array_equal(nll_of("ttt", {**SMALL["ttt"], "epochs": 0}, m=m), sl)
    adapted = nll_of("ttt", SMALL["ttt"], m=m)
    assert not np.array_equal(adapted, sl)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # TTT trains a copy
    assert all(p.requires_grad for p in m.parameters())
    if embed_dtype == "bf16":  # the adapting modes run on a bf16 table too
        assert m.tok_emb.weight.dtype == torch.bfloat16
        for name in ("lora_ttt", "slot_1298"):
            nll = nll_of(name, SMALL[name], m=m)
            assert np.isfinite(nll).all() and not np.array_equal(nll, sl), name


def test_ttt_step_is_the_mean_loss_sgd_step_and_frozen_blocks_stay():
    m, toks = model(), tokens()
    st: TTTSettings = parsed("ttt", SMALL["ttt"] | {"freeze_blocks": 1, "epochs": 1, "grad_clip": 0.0})
    params = ttt_params(m, st.freeze_blocks)
    assert all(not p.requires_grad for n, p in m.named_parameters() if n.startswith("blocks.0."))
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = toks[0 : 3 * S].view(3, S), toks[1 : 3 * S + 1].view(3, S)
    m.train()
    grads = torch.autograd.grad(m(x, y), params)  # mean CE over the 3 sequences of the chunk
    opt = torch.optim.SGD(params, lr=0.05, momentum=st.momentum)
    ctx = EvalContext(luts(), CPU, S)
    assert train_chunk(m, opt, toks, 0, 3 * S + 5, st, ctx) == 1  # 3 whole sequences
    named = dict(m.named_parameters())
    for (n, p), g in zip(((n, p) for n, p in named.items() if p.requires_grad), grads):
        torch.testing.assert_close(p.detach(), ref[n] - 0.05 * g, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(named[n].detach(), ref[n]) for n in ref if n.startswith("blocks.0."))
    assert any(not torch.equal(named[n].detach(), ref[n]) for n in ref if n.startswith("blocks.1."))


def qat_model(qat: str = "late") -> GPT:
    """The tiny test GPT with the given QAT mode, its quantizer the plain max-abs int6 one (fp32 row scale, no
    floor), weights moved off their init."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=V, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, qat=qat)
    cfg = dataclasses.replace(cfg, qat_scale_floor=False, qat_scale_fp16=False)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def int6_ste_weight(w: torch.Tensor) -> torch.Tensor:
    """Row-wise int6 round trip: s = max|w_row| / 31, round(w / s) * s."""
    s = w.abs().amax(1, keepdim=True) / 31
    return torch.round(w / s) * s


def test_ttt_with_qat_kept_takes_the_straight_through_int6_step():
    """`qat: keep` on a late-QAT model: TTT's training forward uses the int6 weights and the gradient passes
    straight through to the full-precision weights (PR #549's TTT under late QAT). The first SGD step equals
    θ - lr·∇L(θ̂) computed by hand (the quantized matrices replaced by their int6 values, no QAT), and
    differs from the step with `qat: off`, the default."""
    base, toks = qat_model(), tokens()
    st: TTTSettings = parsed("ttt", SMALL["ttt"] | {"epochs": 1, "grad_clip": 0.0, "qat": "keep"})
    x, y = toks[0 : 3 * S].view(3, S), toks[1 : 3 * S + 1].view(3, S)
    hand = copy.deepcopy(base)
    hand.set_qat("off")
    with torch.no_grad():
        for name, mod in hand.named_modules():
            if isinstance(mod, CastedLinear) and name != "lm_head":
                mod.weight.copy_(int6_ste_weight(mod.weight))
    hand.train()
    names = [n for n, _ in base.named_parameters()]
    grads = torch.autograd.grad(hand(x, y), list(hand.parameters()))
    want = {n: p.detach() - 0.05 * g for (n, p), g in zip(base.named_parameters(), grads)}
    stepped = {}
    for qat in ("keep", "off"):
        m = ttt_model(base, qat)
        opt = torch.optim.SGD(ttt_params(m, 0), lr=0.05, momentum=st.momentum)
        assert train_chunk(m, opt, toks, 0, 3 * S + 5, st, EvalContext(luts(), CPU, S)) == 1
        stepped[qat] = dict(m.named_parameters())
    for n in names:
        torch.testing.assert_close(stepped["keep"][n].detach(), want[n], atol=1e-6, rtol=1e-5)
    moved = max((stepped["keep"][n] - stepped["off"][n]).abs().max().item() for n in names)
    assert moved > 1e-4  # QAT off takes another step
    assert all(not mod.training for mod in base.modules())  # the model TTT was handed is untouched


def test_ttt_qat_keep_scores_in_eval_mode_and_changes_only_adapted_chunks():
    m, toks = qat_model(), tokens()
    off = nll_of("ttt", SMALL["ttt"], m=m, toks=toks)
    keep = nll_of("ttt", SMALL["ttt"] | {"qat": "keep"}, m=m, toks=toks)
    first = 48  # chunk 0 is scored before any training: no fake quant in scoring forwards
    np.testing.assert_array_equal(keep[:first], off[:first])
    assert np.abs(keep[first:] - off[first:]).max() > 1e-5
    r = run("ttt", SMALL["ttt"] | {"qat": "keep"}, m=m, toks=toks)
    assert r.compliant and "QAT fake quant is on in TTT's training forwards" in r.reason
    with pytest.raises(ValueError, match="ttt.qat must be a string, got False .YAML reads a bare off/on/yes/no"):
        run("ttt", {"qat": False})


# ---- LoRA TTT ------------------------------------------------------------------------------------------
def test_lora_1090_init_is_seeded_normal_and_its_delta_is_scaled_by_one_over_rank():
    """A ~ N(0, 0.01²), B ~ N(0, 0.001²) per document from the generator seeded with seed·1000003 + index;
    Δ(x) = (x Aᵀ) Bᵀ / r."""
    cfg = GPTConfig(vocab_size=V, num_layers=4, model_dim=256, num_heads=4, num_kv_heads=2)
    st = parsed("lora_ttt_1090", {}, 2048)
    lora = DocLoRA(cfg, 2, st, [7, 8])
    assert lora.head is None and len(lora.q) == len(lora.v) == 4
    A = torch.cat([a.A.flatten() for a in [*lora.q, *lora.v]])
    B = torch.cat([a.B.flatten() for a in [*lora.q, *lora.v]])
    assert A.std().item() == pytest.approx(0.01, rel=0.02) and abs(A.mean().item()) < 3e-4
    assert B.std().item() == pytest.approx(0.001, rel=0.03) and abs(B.mean().item()) < 3e-5
    again = DocLoRA(cfg, 1, st, [8])  # document 8's init does not depend on the documents beside it
    assert torch.equal(again.q[2].A[0], lora.q[2].A[1]) and torch.equal(again.v[3].B[0], lora.v[3].B[1])
    assert not torch.equal(lora.q[0].A[0], lora.q[0].A[1])
    a: Adapter = lora.q[1]
    x = torch.randn(2, 5, 256)
    want = torch.stack([x[i] @ a.A[i].T @ a.B[i].T / 8 for i in range(2)])
    torch.testing.assert_close(a(x).detach(), want, atol=1e-7, rtol=1e-5)
    u = DocLoRA(cfg, 1, parsed("lora_ttt", {}, 2048), [7])  # PR #77: U(±1/√in), B = 0, no scaling
    assert u.q[0].scale == 1.0 and not u.q[0].B.any() and u.q[0].A.abs().max() <= 1 / 16


def test_lora_1090_feeds_each_chunk_alone():
    """With B = 0 and no learning, PR #1090's scores are the frozen model's on each 4-target chunk alone."""
    toks = tokens()
    got = nll_of("lora_ttt_1090", {**SMALL["lora_ttt_1090"], "lr": 0.0, "b_std": 0.0, "score_doc_end": True})
    want = []
    m = model()
    with torch.no_grad():
        for s, n in documents(toks, 1):
            for c0 in range(s, s + n, 4):
                c1 = min(c0 + 4, s + n)
                want.append(m.token_nll(toks[c0:c1][None], toks[c0 + 1 : c1 + 1][None])[0])
    np.testing.assert_allclose(got, torch.cat(want).numpy(), atol=1e-6, rtol=0)
    assert chunk_window((10, 40), 3, LoraSettings(seq_len=S, chunk_size=4, context=4)) == (22, 4, 0)


def lora_1090_scored(toks: torch.Tensor, chunk: int) -> list[int]:
    """Targets PR #1090's metric scores: per document (tokens from a BOS to the next BOS or the stream's end,
    dl of them, dl >= 5), its dl - 1 next-token predictions, in chunks, a final chunk of one target skipped."""
    t = toks.tolist()
    bos = [i for i, v in enumerate(t) if v == 1]
    out = []
    for k, ds in enumerate(bos):
        dl = (bos[k + 1] if k + 1 < len(bos) else len(t)) - ds
        if dl < 5:
            continue
        pred = dl - 1
        for c0 in range(0, pred, chunk):
            if min(c0 + chunk, pred) - c0 >= 2:
                out += range(ds + c0, ds + min(c0 + chunk, pred))
    return out


def test_lora_1090_scores_the_records_targets_and_pgolfs_figure_beside():
    toks = tokens(1 + S * 12 + 3)  # BOS every 23 tokens (documents of 23 tokens: 22 targets, a final 2-chunk)
    toks[100] = 1  # documents of 8 and 15 tokens ...
    toks[101:104] = torch.tensor([1, 5, 1])  # ... and of 1 and 2 tokens: not scored
    toks[179] = 1  # an 18-token document: 17 targets, a final chunk of one target, not scored
    log = TargetLog()
    r = run("lora_ttt_1090", SMALL["lora_ttt_1090"], toks=toks, log=log)
    want = lora_1090_scored(toks, 4)
    assert log.arrays()["index"].tolist() == want and r.tokens == r.distinct == len(want)
    total = toks.numel() - 1
    assert r.targets == total and r.scoring == f"{len(want)} of {total} targets scored, each once"
    assert toks[np.array(want) + 1].ne(1).all()  # no target whose token is a document's BOS
    assert r.once["tokens"] == total and r.once["bytes"] == float(luts().target_bytes(toks[:-1], toks[1:]).sum())
    assert r.compliant and "leave targets unscored" in r.reason
    # pgolf's figure scores every target once, with the same adaptation: targets both score agree bit for bit
    full = TargetLog()
    run("lora_ttt_1090", {**SMALL["lora_ttt_1090"], "score_doc_end": True, "score_min_tokens": 0}, toks=toks, log=full)
    a = full.arrays()
    common = np.isin(a["index"], want)
    assert common.sum() == len(want)
    np.testing.assert_array_equal(a["nll"][common], log.arrays()["nll"])


def test_documents_start_at_bos_and_end_on_the_next_bos():
    t = torch.tensor([5, 1, 3, 4, 1, 6, 7, 1])
    assert documents(t, 1) == [(0, 1), (1, 3), (4, 3)]  # 7 targets; doc (1,3) ends predicting the BOS at 4
    assert documents(torch.tensor([1, 2, 3]), 1) == [(0, 2)]


def test_lora_window_depends_on_the_chunk_start_only():
    st = LoraSettings(seq_len=S, chunk_size=4, context=12)
    # chunk 3 of a document starting at 10: targets [22, 26); 8 tokens of context before it
    assert chunk_window((10, 40), 3, st) == (14, 12, 8)
    assert chunk_window((10, 14), 3, st) == (14, 10, 8)  # the document ends inside the chunk: same start
    assert chunk_window((10, 40), 0, st) == (10, 4, 0)


def test_lora_documents_are_isolated_and_one_forward_serves_score_and_step():
    base = nll_of("lora_ttt", SMALL["lora_ttt"])
    for batch_docs in (1, 2, 5):  # documents side by side in other combinations: the same scores, bit for bit
        np.testing.assert_array_equal(nll_of("lora_ttt", {**SMALL["lora_ttt"], "batch_docs": batch_docs}), base)
    m, toks = model(), tokens()
    calls = counting(m)
    r = run("lora_ttt", {**SMALL["lora_ttt"], "batch_docs": 1}, m=m, toks=toks)
    assert calls[0] == r.windows  # one forward per document chunk: scored, then the step on that loss
    assert all(p.requires_grad for p in m.parameters())


def test_lora_without_learning_is_the_chunked_document_eval():
    toks = tokens()
    st = LoraSettings(seq_len=S, chunk_size=4, context=12)
    wins = [chunk_window(d, i, st) for d in documents(toks, 1) for i in range(math.ceil(d[1] / 4))]
    log = TargetLog()
    score_windows(model(), toks, wins, EvalContext(luts(), CPU, S, log=log), seq_len=S, batch_windows=4)
    got = nll_of("lora_ttt", {**SMALL["lora_ttt"], "lr": 0.0})
    np.testing.assert_allclose(got, log.arrays()["nll"], atol=1e-6)
    assert not np.allclose(nll_of("lora_ttt", SMALL["lora_ttt"]), got, atol=1e-4)


# ---- audit from outside ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_artifact(tmp_path_factory, synth_dir) -> tuple[ExportReport, dict]:
    """(the export report of a 1-layer vocab-256 model's artifact, trained at seq_len 32, its data config)."""
    tok = TokenizerInfo.from_path(synth_dir / "synth_256_bpe_selftrained.model")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=256, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    meta = {"tokenizer": {"name": tok.name, "vocab_size": 256, "sha256": tok.sha256}, "train": {"seq_len": 32}}
    report = export_model(gpt, ExportConfig(), tmp_path_factory.mktemp("artifact"), meta)
    data = {
        "tokenizer_path": str(synth_dir / "synth_256_bpe_selftrained.model"),
        "val_pattern": str(synth_dir / "synth_val_*.bin"),
    }
    return report, data


def test_roundtrip_scores_the_artifact_as_eval_py_does(synth_artifact, tmp_path, capsys):
    """The end-of-training round trip (pgolf/export/roundtrip.py) and eval.py run the same registered modes."""
    report, data = synth_artifact
    modes = final_eval_modes(["standard", "sliding"], stride=8) | {"causal_slot": {"stride": 8}}
    assert modes["sliding"] == {"stride": 8} and modes["standard"] == {}
    res = evaluate_artifact(artifact=report.path, modes=modes, data=data, batch_windows=8, out_dir=tmp_path)
    tokens = load_val_tokens(data["val_pattern"], 32, 256)
    luts = build_byte_luts(load_tokenizer(data["tokenizer_path"]), 256)
    capsys.readouterr()
    rt = roundtrip_evaluate(report, tokens, EvalContext(luts, CPU, 32, 8), modes)
    out = capsys.readouterr().out
    for m in modes:
        assert rt["roundtrip"][m]["val_bpb"] == res["results"][m]["val_bpb"], m
    label = report.label
    assert f"final_{label}_roundtrip_exact val_loss:" in out and f"final_{label}_causal_slot_exact val_loss:" in out
    assert f"final_{label}_sliding_window val_loss:" in out and " stride:8 " in out


def test_final_eval_runs_the_records_windows_and_prints_pgolfs_figure_beside(synth_artifact, capsys):
    """`final_eval.reference_tail` gives every windowed mode the records' windows; `final_eval.settings` sets
    any mode's settings; the round trip prints the record's metric on the reference's lines and pgolf's
    each-target-once figure from the same pass after them."""
    report, data = synth_artifact
    names = ["standard", "sliding", "causal_slot"]
    modes = final_eval_modes(names, stride=8, reference_tail=True)
    assert modes == {
        "standard": {},
        "sliding": {"stride": 8, "windows": "reference"},
        "causal_slot": {"stride": 8, "windows": "reference"},
    }
    v5 = final_eval_modes(["sliding", "ttt"], 8, settings={"sliding": {"windows": "v5"}, "ttt": {"qat": "keep"}})
    assert v5 == {"sliding": {"stride": 8, "windows": "v5"}, "ttt": {"stride": 8, "qat": "keep"}}
    with pytest.raises(ValueError, match=r"final_eval.settings names modes not in final_eval.modes: \['ttt'\]"):
        final_eval_modes(["sliding"], settings={"ttt": {"qat": "keep"}})
    ev = {"modes": ["sliding", "ttt"], "seq_len": 32, "batch_windows": 8, "stride": 8, "reference_tail": True}
    assert final_eval_plan(ev)["ttt"] == {"stride": 8, "windows": "reference"}
    with pytest.raises(ValueError, match=r"eval mode ttt: unknown settings \['qatt'\]"):
        final_eval_plan(ev | {"settings": {"ttt": {"qatt": "keep"}}})
    tokens = load_val_tokens(data["val_pattern"], 32, 256)
    lt = build_byte_luts(load_tokenizer(data["tokenizer_path"]), 256)
    capsys.readouterr()
    rt = roundtrip_evaluate(report, tokens, EvalContext(lt, CPU, 32, 8), modes)["roundtrip"]
    out = capsys.readouterr().out
    label, total = report.label, tokens.numel() - 1
    assert f"final_{label}_sliding_window_exact val_loss:" in out and f"final_{label}_roundtrip_once" not in out
    line = next(ln for ln in out.splitlines() if ln.startswith(f"final_{label}_sliding_window_once_exact "))
    assert f"tokens:{total} (pgolf's each-target-once figure; the record's metric above: {total} of {total}" in line
    assert rt["sliding"]["tokens"] > total and rt["sliding"]["once"]["tokens"] == total
    model, _ = load_artifact_model(report.path)
    once = run_mode("sliding", {"stride": 8}, model, tokens, EvalContext(lt, CPU, 32, 8))
    assert rt["sliding"]["once"]["val_bpb"] == once.val_bpb and rt["sliding"]["val_bpb"] != once.val_bpb


@pytest.mark.parametrize(
    "name,settings,match",
    [
        ("ttt", {"stride": 8, "freeze_blocks": 2}, r"^eval\.ttt\.freeze_blocks 2 exceeds the model's 1 layers$"),
        (
            "lora_ttt",
            {"bos_id": 256, "chunk_size": 8},
            r"^eval\.lora_ttt\.bos_id 256 is not a token id of the model's vocabulary \(256\)$",
        ),
        ("phased_ttt", {"bos_id": -1}, r"^eval\.phased_ttt\.bos_id -1 is not a token id"),
    ],
)
def test_settings_that_name_a_part_of_the_model_are_checked_before_any_work(
    synth_artifact, tmp_path, monkeypatch, name, settings, match
):
    """`freeze_blocks: 99` on a 2-layer model froze nothing more than all of it, and a `bos_id` outside the
    vocabulary started no document (the LoRA modes then score nothing): both ran and were scored."""
    report, data = synth_artifact
    monkeypatch.setattr("pgolf.eval.run.load_artifact_model", None)  # refused before the model is loaded
    with pytest.raises(ValueError, match=match):
        evaluate_artifact(artifact=report.path, modes={name: settings}, data=data, out_dir=tmp_path)


def test_flip_test_from_outside_with_eval_and_audit_files(synth_artifact, tmp_path, capsys):
    report, data = synth_artifact
    art = report.path
    modes = {
        "sliding": {"stride": 8},
        "causal_slot": {**eval_cfg("causal_slot"), "stride": 8},
        "slot_1263": {**eval_cfg("slot_1263"), "stride": 8},
    }
    kw = dict(artifact=art, modes=modes, batch_windows=8, audit=True)
    res = evaluate_artifact(data=data, out_dir=tmp_path / "a", **kw)
    assert [res["results"][m]["compliant"] for m in modes] == [True, True, False]
    # the headline (first) mode is compliant, the verdict is not: one mode adapts on what it scores
    assert res["compliant"] is False and res["compliance"]["score_before_adapt"] is False
    adapt = [r for r in res["compliance"]["reasons"] if r.startswith("score-before-adapt")]
    assert adapt == [f"score-before-adapt: slot_1263: {res['results']['slot_1263']['reason']}"]
    P = 301
    audit_cli.main(
        ["flip", "--val", data["val_pattern"], "--position", str(P), "--token", "7", "--out", str(tmp_path / "v")]
    )
    with pytest.raises(FileExistsError):  # never overwrites
        audit_cli.write_flipped_shards(data["val_pattern"], P, 9, tmp_path / "v")
    evaluate_artifact(
        data={**data, "val_pattern": str(tmp_path / "v" / "synth_val_*.bin")}, out_dir=tmp_path / "b", **kw
    )
    capsys.readouterr()
    rc = audit_cli.main(
        ["diff", str(tmp_path / "a" / "audit.npz"), str(tmp_path / "b" / "audit.npz"), "--flip", str(P)]
    )
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith(" ")}
    assert rc == 1  # a violation was found ...
    assert "causal:True" in lines["sliding"] and "causal:True" in lines["causal_slot"]
    assert "causal:False" in lines["slot_1263"]  # ... by the seed SLOT form
    a = audit_cli.load_audit(tmp_path / "a" / "audit.npz")
    for m in modes:
        s = audit_cli.summarize(a[m])
        assert s["every_target_once"] and s["val_bpb"] == pytest.approx(res["results"][m]["val_bpb"], rel=1e-6)


# ---- CUDA --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["standard", "sliding", *SMALL])
def test_every_mode_on_cuda_matches_cpu_and_runs_in_bf16(name):
    settings = SMALL.get(name, {"stride": 4} if name == "sliding" else {})
    cpu = run(name, settings)
    cuda = torch.device("cuda")
    lt = luts().to(cuda)
    got = run(name, settings, m=model().to(cuda), luts=lt, device=cuda)
    assert (got.tokens, got.bytes) == (cpu.tokens, cpu.bytes)
    assert got.val_loss == pytest.approx(cpu.val_loss, rel=1e-4)
    for compile in (False, True) if name in ("sliding", "slot_1263") else (False,):  # compiling is slow
        bf = run(
            name, settings, m=model().to(cuda), luts=lt, device=cuda, autocast_dtype=torch.bfloat16, compile=compile
        )
        assert bf.tokens == cpu.tokens and math.isfinite(bf.val_loss)
        assert bf.val_loss == pytest.approx(cpu.val_loss, rel=0.05)


def test_the_flat_gradient_all_reduce_keeps_each_parameters_dtype():
    """A bf16 embedding table (`embed_dtype: bf16`) beside fp32 parameters: the flat buffer is fp32, each
    gradient comes back scaled in its own parameter's dtype; a missing one as zeros."""
    ps = [torch.nn.Parameter(torch.randn(4, 3).bfloat16()), torch.nn.Parameter(torch.randn(5))]
    ps.append(torch.nn.Parameter(torch.randn(2)))
    grads = [torch.randn(4, 3).bfloat16(), torch.randn(5)]
    ps[0].grad, ps[1].grad = grads[0].clone(), grads[1].clone()
    all_reduce_grads(ps, 0.5)
    assert [p.grad.dtype for p in ps] == [torch.bfloat16, torch.float32, torch.float32]
    assert torch.equal(ps[0].grad, (grads[0].float() * 0.5).bfloat16()) and torch.equal(ps[1].grad, grads[1] * 0.5)
    assert torch.equal(ps[2].grad, torch.zeros(2))
