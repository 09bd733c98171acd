"""Checks where shards and a tokenizer meet (the shards' manifest names the tokenizer that made them), and the
bigram baseline scoring exactly the standard eval's targets."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from pgolf.data.datamodule import GolfDataModule
from pgolf.data.stream import load_val_tokens
from pgolf.data.tokenizer import TokenizerError, TokenizerInfo, check_shards_tokenizer
from pgolf.eval.run import evaluate_artifact
from pgolf.export.config import ExportConfig
from pgolf.export.stages import export_model
from pgolf.model.config import GPTConfig
from pgolf.model.gpt import GPT
from pgolf.tools import bigram
from pgolf.tools.prepare import train_tokenizer
from pgolf.tools.synthetic import make_documents

SYNTH_TOKENIZER = "synth_256_bpe_selftrained.model"


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A vocab-256 tokenizer of the same settings as the synthetic corpus's, trained on other documents: it
    encodes the same ids into other text, so every figure computed with it is silently wrong."""
    lines = (ln for d in make_documents(100, seed=5) for ln in d.splitlines())
    return train_tokenizer(lines, tmp_path_factory.mktemp("other") / "other_256_bpe", 256, byte_fallback=False)


def test_a_tokenizer_that_did_not_make_the_shards_is_refused(synth_dir, other_tokenizer):
    val = str(synth_dir / "synth_val_*.bin")
    good, bad = TokenizerInfo.from_path(synth_dir / SYNTH_TOKENIZER), TokenizerInfo.from_path(other_tokenizer)
    assert good.vocab_size == bad.vocab_size == 256 and good.sha256 != bad.sha256
    assert check_shards_tokenizer(val, synth_dir / SYNTH_TOKENIZER) == [synth_dir / "manifest.json"]
    with pytest.raises(TokenizerError) as e:
        check_shards_tokenizer(val, other_tokenizer)
    msg = str(e.value)
    for part in (str(other_tokenizer), str(synth_dir / SYNTH_TOKENIZER), bad.sha256[:16], good.sha256[:16]):
        assert part in msg  # both files and both hashes
    with pytest.raises(TokenizerError, match="did not make the shards"):  # the val loader of eval.py and training
        load_val_tokens(val, 32, 256, tokenizer=other_tokenizer)
    assert load_val_tokens(val, 32, 256, tokenizer=synth_dir / SYNTH_TOKENIZER).numel() > 32


def test_datamodule_and_bigram_refuse_it_before_any_work(synth_dir, other_tokenizer):
    dm = GolfDataModule(
        str(synth_dir / "synth_train_*.bin"), str(synth_dir / "synth_val_*.bin"), str(other_tokenizer), 256, 1024, 32
    )
    with pytest.raises(TokenizerError, match="did not make the shards"):
        dm.setup("fit")
    assert dm.val_tokens is None and dm.layout is None  # refused before anything was read
    with pytest.raises(TokenizerError, match="did not make the shards"):
        bigram.evaluate(synth_dir, "synth_train_*.bin", "synth_val_*.bin", other_tokenizer, 32)
    argv = ["--data-dir", str(synth_dir), "--train-pattern", "synth_train_*.bin", "--val-pattern", "synth_val_*.bin"]
    assert bigram.main([*argv, "--tokenizer", str(other_tokenizer)]) == 2
    assert bigram.default_tokenizer(synth_dir) == synth_dir / SYNTH_TOKENIZER  # the manifest's, by default


def test_shards_without_a_manifest_are_accepted_with_a_log_line(tmp_path, synth_dir, other_tokenizer, capsys):
    """The challenge's published shards carry no manifest: accepted, and the log says they were not checked."""
    shutil.copy(synth_dir / "synth_val_000000.bin", tmp_path / "fineweb_val_000000.bin")
    assert check_shards_tokenizer(tmp_path / "fineweb_val_*.bin", other_tokenizer) == []
    out = capsys.readouterr().out
    assert f"data_check: {tmp_path} has no manifest.json: tokenizer {other_tokenizer.name} not checked" in out
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(TokenizerError, match=re.escape(f"{tmp_path / 'manifest.json'}: unreadable or without")):
        check_shards_tokenizer(tmp_path / "fineweb_val_*.bin", other_tokenizer)


@pytest.mark.parametrize("split", ["train", "val"])
def test_ids_beyond_the_tokenizers_vocabulary_stop_training_before_any_step(tmp_path, synth_dir, split):
    """Shards without a manifest (the published layout) and a model vocabulary larger than the tokenizer's
    (512 against 256): an id the tokenizer cannot have made (300) is refused against the tokenizer's 256, not
    the model's 512 (it trained to the end with a wrong BPB, and eval.py refused the artifact)."""
    import numpy as np

    from pgolf.data.shards import ShardError, open_shard, write_shard

    for f in synth_dir.glob("synth_*.bin"):
        shutil.copy(f, tmp_path / f.name)
    name = "synth_train_000000.bin" if split == "train" else "synth_val_000000.bin"
    tokens = np.array(open_shard(tmp_path / name), dtype=np.uint16)
    tokens[5] = 300
    (tmp_path / name).unlink()
    write_shard(tmp_path / name, tokens)
    dm = GolfDataModule(
        str(tmp_path / "synth_train_*.bin"),
        str(tmp_path / "synth_val_*.bin"),
        str(synth_dir / SYNTH_TOKENIZER),
        512,
        1024,
        32,
    )
    with pytest.raises(ShardError, match=r"token id 300 at position 5 is >= vocab size 256"):
        dm.setup("fit")  # every shard's ids at set-up, before the stream reads any
    assert dm.vocab_size == 256


def test_a_bad_id_in_a_later_training_shard_is_found_at_set_up(tmp_path, synth_dir):
    """A second training shard that only step ~N would reach: its bad id stops the run at set-up (it stopped
    a run minutes into training, with nothing saved)."""
    import numpy as np

    from pgolf.data.shards import ShardError, open_shard, write_shard

    for f in synth_dir.glob("synth_*.bin"):
        shutil.copy(f, tmp_path / f.name)
    tokens = np.array(open_shard(tmp_path / "synth_train_000000.bin"), dtype=np.uint16)
    tokens[10] = 300
    write_shard(tmp_path / "synth_train_000001.bin", tokens)
    dm = GolfDataModule(
        str(tmp_path / "synth_train_*.bin"),
        str(tmp_path / "synth_val_*.bin"),
        str(synth_dir / SYNTH_TOKENIZER),
        256,
        1024,
        32,
    )
    with pytest.raises(ShardError, match=r"synth_train_000001.bin: token id 300 at position 10 is >= vocab size 256"):
        dm.setup("fit")


def test_a_tokenizer_larger_than_the_model_is_one_data_error_line(synth_dir):
    """model.vocab_size below the tokenizer's: a TokenizerError naming the tokenizer (a traceback blaming the
    model config before)."""
    from pgolf.train.build import build_module

    cfg = OmegaConf.create({"model": {"vocab_size": 100}})  # refused before the rest of the config is read
    with pytest.raises(
        TokenizerError, match=rf"{SYNTH_TOKENIZER}: its vocab size 256 is larger than model.vocab_size 100"
    ):
        build_module(cfg, str(synth_dir / SYNTH_TOKENIZER))


@pytest.mark.parametrize("eval_seq, train_seq", [(32, 32), (64, 32), (32, 100)])
def test_bigram_scores_exactly_the_standard_eval_targets(tmp_path, synth_dir, one_thread, eval_seq, train_seq):
    """The demo's bigram scored 197,120 targets (windows of 512) where its standard eval scores 197,376
    (windows of 256): the bigram now takes the eval's window S and the model's training length T and scores
    the same targets, each once, with the same bytes (with T=100 the stream is cut to whole 100-token
    sequences first: 2,176 targets here, where windows of 32 alone would give 2,240)."""
    tok = TokenizerInfo.from_path(synth_dir / SYNTH_TOKENIZER)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=256, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2))
    meta = {"tokenizer": {"name": tok.name, "vocab_size": 256, "sha256": tok.sha256}, "train": {"seq_len": train_seq}}
    report = export_model(gpt, ExportConfig(), tmp_path / "artifact", meta)
    data = {"tokenizer_path": str(synth_dir / SYNTH_TOKENIZER), "val_pattern": str(synth_dir / "synth_val_*.bin")}
    res = evaluate_artifact(
        artifact=report.path, modes={"standard": {}}, data=data, seq_len=eval_seq, batch_windows=64, out_dir=tmp_path
    )
    r = bigram.evaluate(synth_dir, "synth_train_*.bin", "synth_val_*.bin", data["tokenizer_path"], eval_seq, train_seq)
    assert r["tokens"] == res["tokens"] and r["bytes"] == res["bytes"]
    total = load_val_tokens(data["val_pattern"], 1, 256).numel() - 1  # every validation target
    assert total - r["tokens"] < max(eval_seq, train_seq)  # all but the unscored tail
    assert bigram.DEFAULT_SEQ_LEN == OmegaConf.load(ROOT / "conf" / "train.yaml").train.seq_len  # the demo's


def test_bad_data_found_at_set_up_ends_the_run_with_one_line(tmp_path, synth_dir, capsys):
    """A validation shard holding a token id outside the vocabulary is found when the data module reads it
    (inside Trainer.fit): `fit` (train.py and the packed train_gpt.py) ends with one `data error:` line naming
    the file, position and problem, in the log too, exit status 1, no traceback and no artifact."""
    from test_training import TINY, compose_cfg

    from pgolf.train.run import EXIT_DATA_ERROR, fit, prepare

    root = tmp_path / "synthetic"
    shutil.copytree(synth_dir, root / "shards")
    val = next((root / "shards").glob("synth_val_*.bin"))
    raw = bytearray(val.read_bytes())
    raw[256 * 4 + 2 * 7 : 256 * 4 + 2 * 8] = (300).to_bytes(2, "little")  # token 7 := 300 >= vocab 256
    val.write_bytes(bytes(raw))
    cfg = compose_cfg([*TINY, f"data.root={root}", "data.prepare=null", "train.iterations=1"])
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        fit(cfg, run_dir, prepare(cfg, run_dir), {"bytes": 1, "sha256": "0" * 64}, run_dir / "train.log")
    assert e.value.code == EXIT_DATA_ERROR == 1
    line = f"data error: {val}: token id 300 at position 7 is >= vocab size 256 (shards and tokenizer do not match)"
    assert line in capsys.readouterr().out.splitlines()
    assert line in (run_dir / "train.log").read_text().splitlines()
    assert not list(run_dir.glob("*.ptz"))
    val.unlink()  # no validation shard: the same one line, naming the pattern
    with pytest.raises(SystemExit) as e:
        fit(cfg, run_dir, prepare(cfg, run_dir), {"bytes": 1, "sha256": "0" * 64}, run_dir / "train.log")
    assert e.value.code == 1 and f"data error: {cfg.data.val_pattern}: no shard files match" in capsys.readouterr().out
