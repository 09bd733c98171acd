"""PR #1611's GPTQ calibration as pgolf runs it for `experiment=record_1611`: the `ShuffledSequenceLoader`
windows (pgolf/data/shuffled.py) against a re-implementation written here from the record's description,
Hessians divided by the number of forward batches (not sequences), and GPTQ on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.data.shards import write_shard
from pgolf.data.shuffled import ShuffledSequenceLoader
from pgolf.export.config import ExportConfig, ExportContext
from pgolf.export.gptq_stage import calibration_hessians
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.quant.calibrate import calibrate
from pgolf.quant.gptq import collect_hessians, gptq_quantize, linear_names
from pgolf.quant.settings import CalibrationConfig, GPTQSettings, compliance

CONF = Path(__file__).resolve().parent.parent / "conf"
T = 8  # window length of the synthetic tests (the record: 2048)
SIZES = [50, 9, 30, 5, 100, 17, 64]  # tokens per shard: no phase draw (9), no window (5), phase draws


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """Shard f holds the ids 1000·f + position, so a window names its file and start."""
    d = tmp_path_factory.mktemp("shuffled")
    files = []
    for f, n in enumerate(SIZES):
        files.append(d / f"t_train_{f:06d}.bin")
        write_shard(files[-1], 1000 * f + np.arange(n))
    return files


def spec_draws(sizes: list[int], seq_len: int, rank: int, world: int, n: int) -> list[tuple[int, int]]:
    """(shard index among all files, start) of the first n windows, written from the description of PR
    #1611's loader: rank r owns files r::world and one numpy PCG64 generator seeded with r. For each owned
    file in order: phase = integers(m + 1) with m = min(seq_len - 1, max(0, n_tokens - seq_len - 1)), no draw
    when m = 0; then a permutation of its (n_tokens - 1 - phase) // seq_len windows, used last first. A draw
    picks a file by `choice` with probabilities proportional to the windows it has left; when none is left,
    every file is set up again (same order of generator calls)."""
    rng = np.random.Generator(np.random.PCG64(rank))
    owned = list(range(len(sizes)))[rank::world]

    def setup(k: int) -> list[int]:
        tokens = sizes[k]
        m = min(seq_len - 1, max(0, tokens - seq_len - 1))
        phase = 0 if m == 0 else int(rng.integers(m + 1))
        order = rng.permutation(max(0, (tokens - 1 - phase) // seq_len))
        return [phase + seq_len * int(j) for j in order[::-1]]  # next window first

    queues = {k: setup(k) for k in owned}
    out = []
    for _ in range(n):
        if not any(queues.values()):
            queues = {k: setup(k) for k in owned}
        left = np.array([len(queues[k]) for k in owned], dtype=np.float64)
        k = owned[int(rng.choice(len(owned), p=left / left.sum()))]
        out.append((k, queues[k].pop(0)))
    return out


def loader_draws(loader: ShuffledSequenceLoader, files: list[Path], n: int) -> list[tuple[int, int]]:
    return [(files.index(loader.files[i]), s) for i, s in (loader.draw() for _ in range(n))]


@pytest.mark.parametrize("rank,world", [(0, 1), (0, 2), (1, 2), (2, 3)])
def test_draw_order_equals_the_description(shards, rank, world):
    loader = ShuffledSequenceLoader(shards, T, rank=rank, world_size=world)
    n = 3 * sum(max(0, (s - 1) // T) for s in SIZES) + 5  # several epochs: resets included
    assert loader_draws(loader, shards, n) == spec_draws(SIZES, T, rank, world, n)


def test_windows_are_whole_owned_and_never_past_a_files_count(shards):
    loader = ShuffledSequenceLoader(shards, T, rank=1, world_size=2)
    owned = {1, 3, 5}  # files 1::2 of 7
    counts = loader.remaining()
    epoch = sum(counts)
    assert counts[1] == 0 and epoch > 0  # file 3 (5 tokens) holds no window
    seen = []
    for _ in range(3):
        x, y = loader.next_batch(epoch)  # exactly one epoch per batch
        assert x.shape == y.shape == (epoch, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one token
        files, starts = (x[:, 0] // 1000).tolist(), (x[:, 0] % 1000).tolist()
        assert set(files) <= owned
        # whole windows of seq_len + 1 consecutive tokens inside the file
        want = x[:, :1] + torch.arange(T)
        assert torch.equal(x, want) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert all(s + T + 1 <= SIZES[f] for f, s in zip(files, starts, strict=True))
        # an epoch uses every window of every owned file once, never more
        windows = list(zip(files, starts, strict=True))
        assert len(set(windows)) == epoch
        assert {f: files.count(f) for f in set(files)} == {f: c for f, c in zip([1, 3, 5], counts) if c}
        assert loader.remaining() == [0, 0, 0]
        seen.append(windows)
    assert seen[0] != seen[1]  # a new phase/permutation after each reset


def test_loader_is_deterministic_and_rank_seeded(shards):
    a = ShuffledSequenceLoader(shards, T, rank=0, world_size=2).next_batch(12)[0]
    b = ShuffledSequenceLoader(shards, T, rank=0, world_size=2).next_batch(12)[0]
    c = ShuffledSequenceLoader(shards, T, rank=0, world_size=2, seed=1).next_batch(12)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="owns none"):
        ShuffledSequenceLoader(shards[:1], T, rank=1, world_size=2)
    with pytest.raises(ValueError, match="no 9-token window"):
        ShuffledSequenceLoader([shards[3]], T)
    with pytest.raises(ValueError, match="vocab size"):
        ShuffledSequenceLoader(shards, T, vocab_size=500).next_batch(30)


def tiny_gpt(vocab: int = 64) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def explicit_xtx(m: GPT, seqs: torch.Tensor, name: str) -> torch.Tensor:
    """Σ XᵀX of one linear's input over all of `seqs` [N, T], from a hook written here (float64)."""
    mod = {v: k for k, v in linear_names(m).items()}[name]
    xs = []
    h = mod.register_forward_hook(lambda _m, a, _o: xs.append(a[0].detach().double().reshape(-1, a[0].size(-1))))
    with torch.no_grad():
        m.forward_hidden(seqs)
    h.remove()
    x = torch.cat(xs)
    return x.T @ x


def test_hessians_divided_by_batches_or_sequences():
    """PR #1611 divides Σ XᵀX by its 16 forward batches, PR #1019 by its sequences: 6 sequences in batches of
    4 give 2 batches (the last one short), against an independent Σ XᵀX."""
    m = tiny_gpt()
    seqs = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    Hs, si = collect_hessians(m, seqs, batch=4)
    Hb, bi = collect_hessians(m, seqs, batch=4, norm="batches", out_device="cpu")
    assert (si["divided_by"], si["norm"], bi["divided_by"], bi["norm"], bi["batches"]) == (
        6, "sequences", 2, "batches", 2
    )  # fmt: skip
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.mlp.proj.weight"):
        ref = explicit_xtx(m, seqs, name)
        assert torch.allclose(Hs[name].double(), ref / 6, rtol=1e-5, atol=1e-6)
        assert torch.allclose(Hb[name].double(), ref / 2, rtol=1e-5, atol=1e-6)
        assert Hb[name].device.type == "cpu" and Hb[name].dtype == torch.float32
    with pytest.raises(ValueError, match="norm"):
        collect_hessians(m, seqs, norm="tokens")


def tiny_1611(**over) -> GPT:
    """conf/model/tiny_1611.yaml (every feature of the record) at vocab 64, width 64, bf16 tables as the record,
    with random values in every parameter (gates and zero-initialised projections live)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny_1611"])
    d = {**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": 64, "model_dim": 64, **over}
    torch.manual_seed(0)
    m = GPT(GPTConfig.from_dict(d))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p.float()).to(p.dtype) * 0.2)
    return m.eval()


def bf16_reference_hessians(m: GPT, seqs: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """PR #1611's calibration written here: the model cast to bf16 (every parameter), run with autocast off,
    hooks adding XᵀX (X as float) of each linear's input per forward and the final-norm output's for the tied
    head, divided by the number of forwards. Also checks that every X the hooks see is bf16."""
    import copy

    ref = copy.deepcopy(m).to(torch.bfloat16)
    H: dict[str, torch.Tensor] = {}

    def add(name, x):
        assert x.dtype == torch.bfloat16, (name, x.dtype)
        x = x.detach().reshape(-1, x.size(-1)).float()
        H.setdefault(name, torch.zeros(x.size(1), x.size(1))).addmm_(x.T, x)

    hooks = [mod.register_forward_hook(lambda _m, a, _o, n=n: add(n, a[0])) for mod, n in linear_names(ref).items()]
    n = 0
    with torch.no_grad():
        for i in range(0, seqs.size(0), batch):
            add("tok_emb.weight", ref.forward_hidden(seqs[i : i + batch]))
            n += 1
    for h in hooks:
        h.remove()
    return {k: v / n for k, v in H.items()}


def test_bf16_forward_collects_the_records_hessians():
    """`forward="bf16"` (PR #1611's calibration: its bf16 model, autocast off): every H equals the one of the
    reference above bit for bit, X bf16 everywhere (the BigramHash and VE paths too); the model handed in keeps
    its values, dtypes and hooks; the fp32 forward's Hessians differ by rounding only."""
    seqs = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(3))
    seqs[:, 0] = 1  # a BOS at each row's start, and one inside
    seqs[2, 9] = 1
    for m in (tiny_1611(), tiny_1611(bigram="xor", bigram_buckets=32, bigram_dim=16, ve_dim=16, ve_layers=[3])):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        H, info = collect_hessians(m, seqs, batch=4, output_head=True, norm="batches", forward="bf16")
        want = bf16_reference_hessians(m, seqs, 4)
        assert info["forward"] == "bf16" and H.keys() == want.keys() and len(H) == info["layers"]
        assert all(torch.equal(H[k], want[k]) for k in H)
        after = m.state_dict()
        assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
        assert all(not mod._forward_hooks for mod in m.modules())
        H32, i32 = collect_hessians(m, seqs, batch=4, output_head=True, norm="batches")
        assert i32["forward"] == "autocast"
        for k in H:
            rel = ((H[k] - H32[k]).norm() / H32[k].norm()).item()
            assert 0 < rel < 0.05, (k, rel)
    with pytest.raises(ValueError, match="forward 'fp8'"):
        collect_hessians(m, seqs, forward="fp8")


def test_settings_and_compliance_of_the_new_options():
    assert (GPTQSettings().hessian_norm, GPTQSettings().device) == ("sequences", "cpu")
    assert GPTQSettings().hessian_forward == "autocast"
    with pytest.raises(ValueError, match="hessian_forward 'fp16'"):
        GPTQSettings(hessian_forward="fp16")
    with pytest.raises(ValueError, match="hessian_norm"):
        GPTQSettings(hessian_norm="tokens")
    with pytest.raises(ValueError, match="gptq.device"):
        GPTQSettings(device="cuda")
    with pytest.raises(ValueError, match="world_size"):
        CalibrationConfig(source="train_shuffled", world_size=0)
    with pytest.raises(ValueError, match="multiple of gptq.batch"):
        ExportConfig.from_dict(
            {"rules": [{"name": "m", "ndim": 2, "store": "int", "bits": 6, "method": "gptq"}],
             "gptq": {"batch": 48, "hessian_norm": "batches"}, "calibration": {"source": "train", "count": 50}}
        )  # fmt: skip
    # training data, shuffled or not: compliant only inside the training budget
    assert compliance("train_shuffled", 0.5, 599_000, 600_000)["compliant"]
    late = compliance("train_shuffled", 5.0, 599_000, 600_000)
    assert not late["compliant"] and "after the training deadline" in late["reason"]


def test_the_1611_export_configs_use_the_records_calibration():
    for name in ("sdclip_gptq_1611", "sdclip_gptq_record_1611", "sdclip_gptq_record_1611_pergroup"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"export={name}"])
        e = ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))
        assert (e.gptq.hessian_norm, e.gptq.device, e.gptq.batch, e.gptq.hessian_damp) == ("batches", "cpu", 48, 0.0)
        assert e.gptq.hessian_forward == "bf16"
        assert (e.calibration.source, e.calibration.count, e.calibration.length) == ("train_shuffled", 768, 2048)
        assert e.calibration.count // e.gptq.batch == 16  # GPTQ_CALIBRATION_BATCHES
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["export=int6_gptq_zstd_record"])
    e = ExportConfig.from_dict(OmegaConf.to_container(cfg.export, resolve=True))
    assert (e.gptq.hessian_norm, e.calibration.source) == ("sequences", "train")  # the earlier records unchanged
    assert e.gptq.hessian_forward == "autocast"  # PR #1019 calibrates under torch.autocast


def test_calibration_stage_reads_the_shuffled_windows_of_rank_0(shards):
    """The export stage: rank 0's windows of files 0::world_size (the run's, or calibration.world_size),
    Hessians over them in batches of gptq.batch, divided by the number of batches, on the CPU."""
    m = tiny_gpt(vocab=7000)
    rules = [{"name": "m", "ndim": 2, "store": "int", "bits": 6, "method": "gptq"}, {"name": "o", "store": "fp16"}]
    cfg = ExportConfig.from_dict(
        {"rules": rules, "gptq": {"batch": 3, "hessian_norm": "batches", "hessian_damp": 0.0},
         "calibration": {"source": "train_shuffled", "count": 6, "length": T}}
    )  # fmt: skip
    ctx = ExportContext(seed=5, train_files=lambda: list(shards), world_size=2)
    H, rec = calibration_hessians(m, cfg, ctx)
    want = ShuffledSequenceLoader(shards, T, rank=0, world_size=2).next_batch(6)[0]
    assert set((want[:, 0] // 1000).tolist()) <= {0, 2, 4, 6}
    name = "blocks.1.attn.c_q.weight"
    assert torch.allclose(H[name].double(), explicit_xtx(m, want, name) / 2, rtol=1e-5, atol=1e-6)
    assert H[name].device.type == "cpu"
    assert (rec["source"], rec["seed"], rec["rank"], rec["world_size"], rec["files"]) == ("train_shuffled", 0, 0, 2, 4)
    assert (rec["hessian_norm"], rec["hessian_divisor"], rec["compliant"]) == ("batches", 2, False)  # no cap given
    # calibration.world_size overrides the run's; an explicit seed overrides the rank
    c1 = CalibrationConfig(source="train_shuffled", count=6, length=T, world_size=3, seed=9)
    got, info = calibrate(m, c1, seed=5, train_files=shards, world_size=2)
    ref = ShuffledSequenceLoader(shards, T, rank=0, world_size=3, seed=9).next_batch(6)[0]
    assert torch.equal(got, ref) and (info["world_size"], info["seed"]) == (3, 9)
    with pytest.raises(ValueError, match="needs the training shard files"):
        calibrate(m, c1, seed=0)


@pytest.mark.gpu
def test_gptq_device_cpu_moves_the_hessians_off_the_gpu():
    """Hessians collected on the GPU and moved to the CPU (gptq.device=cpu) before they are divided equal the
    GPU ones moved afterwards (÷ 2 is exact), and GPTQ then runs on the CPU: its codes are those of a CPU run
    on the same H; with `model` they stay on the GPU."""
    m = tiny_gpt().cuda()
    seqs = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    Hc, _ = collect_hessians(m, seqs, batch=2, norm="batches", out_device="cpu")
    Hg, _ = collect_hessians(m, seqs, batch=2, norm="batches")
    name = "blocks.0.mlp.fc.weight"
    assert Hc[name].device.type == "cpu" and Hg[name].device.type == "cuda"
    assert torch.equal(Hc[name], Hg[name].cpu())
    w = m.state_dict()[name].cpu()
    q, s, _ = gptq_quantize(w, Hc[name], 6, (), sigmas=11.5)
    q_ref, s_ref, _ = gptq_quantize(w.clone(), Hg[name].cpu().clone(), 6, (), sigmas=11.5)
    assert q.device.type == "cpu" and torch.equal(q, q_ref) and torch.equal(s, s_ref)


def tiny_run(run_dir, synth_dir, over: list[str]):
    """(trainer, module, datamodule) of test_training's tiny run on the synthetic data with `over`, built as
    train.py builds them (callbacks writing into `run_dir`), seeded, not yet fitted."""
    import lightning as L
    from test_training import TINY, compose_cfg

    from callbacks import build_callbacks
    from pgolf.tools.datasets import ensure_dataset
    from pgolf.train.build import build_datamodule, build_module, build_trainer, run_meta

    cfg = compose_cfg([*TINY, f"data.root={synth_dir.parent}", *over])
    ensure_dataset(cfg.data.prepare, cfg.data.root)
    dm = build_datamodule(cfg)
    module, tok = build_module(cfg, cfg.data.tokenizer_path)
    cbs = build_callbacks(cfg, run_dir, run_meta(cfg, tok))
    L.seed_everything(0, verbose=False)
    return build_trainer(cfg, cbs.all, False), module, dm


def test_a_training_run_exports_with_the_records_calibration(tmp_path, synth_dir, capsys):
    """The export callback hands the run's training shards, rank and world size to the 1611 export: the artifact's
    calibration record names the shuffled windows of rank 0 and the Hessians divided by the batches."""
    import json

    over = ["export=sdclip_gptq_1611", "export.calibration.count=4", "export.calibration.length=16"]
    over += ["export.gptq.batch=2", "export.rules.2.max_numel=64", "export.codec=zstd", "export.level=3"]
    over += ["export.report_codecs=[]", "export.save_float=false", "train.iterations=1", "train.warmup_steps=0"]
    over += ["final_eval.max_tokens=256"]
    trainer, module, dm = tiny_run(tmp_path / "run", synth_dir, over)
    trainer.fit(module, datamodule=dm)
    cal = json.loads((tmp_path / "run" / "results.json").read_text())["export"]["calibration"]
    assert (cal["source"], cal["count"], cal["length"], cal["seed"]) == ("train_shuffled", 4, 16, 0)
    assert (cal["rank"], cal["world_size"], cal["files"]) == (0, 1, 1)
    assert (cal["hessian_norm"], cal["hessian_divisor"], cal["hessian_forward"]) == ("batches", 2, "bf16")
    assert "(batches) forward:bf16 gptq_device:cpu" in capsys.readouterr().out  # the export log's line


def test_a_train_shuffled_calibration_that_cannot_work_stops_before_training(tmp_path, synth_dir):
    """The synthetic training shard holds no 50,001-token window: refused at setup, before any step (it used
    to fail after the whole training run); nothing is exported."""
    over = ["export=int6_gptq_zstd", "export.calibration.source=train_shuffled", "export.calibration.count=2"]
    over += ["export.calibration.length=50000", "train.iterations=2", "train.warmup_steps=0"]
    trainer, module, dm = tiny_run(tmp_path / "run", synth_dir, over)
    with pytest.raises(ValueError, match="hold no 50001-token window") as e:
        trainer.fit(module, datamodule=dm)
    assert "export.calibration.source=train_shuffled (length=50000, world_size=1)" in str(e.value)
    assert trainer.global_step == 0 and not list((tmp_path / "run").glob("*.ptz"))
