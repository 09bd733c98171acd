"""experiment=record_1611 (PR #1611, the final leaderboard's #1): the composed recipe, and a tiny version of the
stack trained on CPU with document-bounded attention, progressive looping and the fraction warmdown."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_training import CONF, FP32_EXPORT, TINY, compose_cfg

from callbacks import build_callbacks
from pgolf.config.validate import validate_train
from pgolf.data.stream import load_val_data
from pgolf.eval.run import run_val_seq_len
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT, count_params
from pgolf.model.varlen import document_cu_seqlens
from pgolf.optim.groups import build_optimizer
from pgolf.quant.artifact import ArtifactError
from pgolf.tools.datasets import ensure_dataset
from pgolf.train.build import build_datamodule, build_module, build_trainer, run_meta


def test_the_composed_recipe_is_the_records():
    cfg = compose_cfg(["experiment=record_1611"])
    validate_train(cfg, CONF)
    t, o = cfg.train, cfg.optim
    assert (t.batch_tokens, t.seq_len, t.max_seg_len, t.doc_attention) == (786_432, 98_304, 2048, True)
    assert (t.warmdown_frac, t.min_lr, t.gptq_reserve_seconds, t.val_every) == (0.85, 0.1, 0.5, 0)
    assert cfg.callbacks.averaging.ema_decay == 0.9965 and cfg.data.vocab_size == 8192
    assert (o.ns_kind, o.ns_steps, o.muon_row_norm, o.muon_wd, o.matrix_lr) == ("polar_express", 5, True, 0.095, 0.026)
    assert (o.momentum_start, o.muon_momentum, o.momentum_warmup_steps) == (0.92, 0.97, 1500)
    assert list(o.betas) == [0.9, 0.99] and (o.embed_wd, o.adam_wd, o.grad_clip) == (0.085, 0.02, 0.3)
    model_cfg = GPTConfig.from_dict(dict(cfg.model))
    with torch.device("meta"):
        gpt = GPT(model_cfg)
    assert count_params(gpt) == 35_945_671
    wd = {g["name"]: (g["base_lr"], g["weight_decay"]) for g in build_optimizer(gpt, dict(o)).param_groups}
    assert wd == {"matrix": (0.026, 0.095), "embed": (0.03, 0.085), "scalar": (0.02, 0.02)}
    assert cfg.export.lqer.enabled and cfg.model.enable_looping_at == 0.35


def test_the_tiny_stack_trains_with_document_attention_looping_and_the_fraction_warmdown(tmp_path, synth_dir, capsys):
    over = ["model=tiny_1611", "model.vocab_size=256", "train.iterations=4", "train.warmdown_iters=0"]
    over += ["train.warmdown_frac=0.5", "train.min_lr=0.25", "train.doc_attention=true", "train.max_seg_len=16"]
    over += ["model.enable_looping_at=0.5", "train.warmup_steps=0", "train.compile=false"]
    cfg = compose_cfg([*TINY, f"data.root={synth_dir.parent}", *FP32_EXPORT, *over])
    ensure_dataset(cfg.data.prepare, cfg.data.root)
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    assert module.doc_attention and module.max_seg_len == 16
    cbs = build_callbacks(cfg, tmp_path / "run", run_meta(cfg, tok))
    scales, looping = [], []

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # once per step, after the schedule's
            scales.append(pl_module.state.lr_scale)
            looping.append(pl_module.gpt.looping_active)

    L.seed_everything(0, verbose=False)
    trainer = build_trainer(cfg, [*cbs.all[:-1], Watch(), cbs.all[-1]], False)
    trainer.fit(module, datamodule=dm)
    out = capsys.readouterr().out
    # steps 1..4 at fractions 0, .25, .5, .75: looping from the first step with frac >= 0.5 (step 3)
    assert looping == [False, False, True, True] and "layer_loop:enabled step:2 frac:0.500" in out
    assert "final_eval: document-bounded windows (attention stops at BOS and every 16 tokens)" in out
    assert scales == pytest.approx([1.0, 1.0, 1.0, 0.5])  # 1 until frac 0.5, then (1 - frac) / 0.5, floor 0.25
    assert (tmp_path / "run" / "final_model.fp32.ptz").is_file()
    x, _, cu = dm.train_stream(0).batch(0)  # the stream builds the segments on the host, with the batch
    assert torch.equal(cu, document_cu_seqlens(x, 1, 16)) and cu.dtype == torch.int32


def test_document_bounded_training_cuts_the_validation_split_by_the_eval_length(synth_dir):
    """PR #1611 cuts the validation split to a multiple of its EVAL_SEQ_LEN (2048), not of its 98,304-token
    training row, which packs whole documents (a cut by the row dropped the last ~79 documents); the seed records
    cut by max(TRAIN_SEQ_LEN, EVAL_SEQ_LEN). The run records its cut, eval.py scores the same targets."""
    base = [*TINY, f"data.root={synth_dir.parent}", "train.seq_len=96", "train.batch_tokens=768"]
    base += ["data.eval_seq_len=16", "train.max_seg_len=16"]
    n = None
    for doc, cut in (("true", 16), ("false", 96)):
        cfg = compose_cfg([*base, f"train.doc_attention={doc}"])
        ensure_dataset(cfg.data.prepare, cfg.data.root)
        dm = build_datamodule(cfg)
        dm.setup("fit")
        n = n or load_val_data(cfg.data.val_pattern, 1).tokens.numel() - 1  # every target of the split
        assert dm.val_seq_len == cut and dm.val_tokens.numel() - 1 == (n // cut) * cut
        _, tok = build_module(cfg, cfg.data.tokenizer_path)
        meta = run_meta(cfg, tok)
        assert meta["data"]["val_seq_len"] == cut and run_val_seq_len(meta) == cut
    assert (n // 16) * 16 > (n // 96) * 96  # the synthetic split tells the two cuts apart
    assert compose_cfg(["experiment=record_1611"]).data.eval_seq_len == 2048
    # artifacts from before the record: None (eval.py cuts as their runs did); a packed row; a forged value
    assert run_val_seq_len({"train": {"seq_len": 96, "doc_attention": True}}) is None
    assert run_val_seq_len({"data": {"val_seq_len": 98304}}) == 98304
    for bad in (-3, 0, True, "16", 16.0, (1 << 20) + 1):
        with pytest.raises(ArtifactError, match="meta.data.val_seq_len must be an integer in 1.."):
            run_val_seq_len({"data": {"val_seq_len": bad}})


def test_eval_py_scores_what_a_document_bounded_runs_round_trip_scored(tmp_path, synth_dir, monkeypatch, one_thread):
    """A document-bounded run whose final eval windows (64) are longer than its cut (data.eval_seq_len 16): the
    round trip scores the split cut by 16 (the sliding mode every target of it), and eval.py on the artifact,
    with no window given, scores the same targets to the same numbers (it cut by its window, 64, before)."""
    from test_resume_flow import fit

    from pgolf.eval.run import evaluate_artifact

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["train.py"])
    over = ["train.seq_len=64", "train.doc_attention=true", "train.max_seg_len=16", "data.eval_seq_len=16"]
    over += ["train.iterations=2", "final_eval.stride=8", "final_eval.modes=[standard,sliding]"]
    cfg = compose_cfg([*TINY, f"data.root={synth_dir.parent}", *over])
    res = fit(cfg, Path("run"))["roundtrip"]
    art = next(Path("run").glob("final_model.*.ptz"))
    modes = {"standard": {}, "sliding": {"stride": 8}}
    data = {k: cfg.data[k] for k in ("val_pattern", "tokenizer_path")}
    ev = evaluate_artifact(artifact=art, modes=modes, data=data, batch_windows=8, out_dir=Path("ev"))["results"]
    for mode in modes:
        assert ev[mode]["tokens"] == res[mode]["tokens"], mode
        assert abs(ev[mode]["val_bpb"] - res[mode]["val_bpb"]) < 1e-6, mode  # as tests/test_cli.py
    assert res["sliding"]["tokens"] > res["standard"]["tokens"]  # the tail past the last whole 64-token window
