"""CaseOps data end to end (PR #1729 / the final #1 record PR #1611): `prepare --caseops` shards with a
validation byte sidecar, the sidecar's loading and checks, BPB counted from the sidecar by the eval modes and
the validation batches, and the downloader's CaseOps variant against a local fake of the hub."""

from __future__ import annotations

import json
import math
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import SHARED, need, perturbed_tiny_gpt

from pgolf.data import caseops
from pgolf.data.datamodule import GolfDataModule
from pgolf.data.shards import ShardError, is_byte_sidecar, list_shards, open_shard, sidecar_name, write_shard
from pgolf.data.stream import ValWindows, load_val_data, load_val_tokens
from pgolf.data.tokenizer import BOS_ID, CASEOPS_PIECES, build_byte_luts, is_caseops_tokenizer
from pgolf.eval.core import EvalContext, TargetLog
from pgolf.eval.modes import run_mode
from pgolf.tools import fineweb
from pgolf.tools import prepare as prep

CASEOPS_MODEL = SHARED / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
N_DOCS, N_VAL, SHARD = 60, 10, 8000  # small shards: the val split spans several, each with its sidecar
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def docs(fineweb_sample):
    with open(fineweb_sample, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(N_DOCS), f)]


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory, docs):
    """The first N_DOCS documents of the FineWeb sample prepared with --caseops, the first N_VAL as val."""
    src = tmp_path_factory.mktemp("src") / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path_factory.mktemp("caseops") / "fw"
    tok = need(CASEOPS_MODEL)
    prep.prepare([src], out, name="fineweb", tokenizer=tok, val_docs=N_VAL, shard_tokens=SHARD, caseops_transform=True)
    return out


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory, docs):
    """The 2 shortest of those documents as the val split (about 700 tokens): a vocab-8192 head is costly."""
    out = tmp_path_factory.mktemp("short") / "fw"
    short = sorted(range(N_DOCS), key=lambda i: len(docs[i].encode()))[:2]
    split = ([docs[i] for i in range(N_DOCS) if i not in short][:2], [docs[i] for i in short])
    tok = need(CASEOPS_MODEL)
    prep.prepare([], out, name="fineweb", tokenizer=tok, documents=split, source={"test": 1}, caseops_transform=True)
    return out, split[1]


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


def val_utf8(docs) -> int:
    return sum(len(d.encode()) for d in docs[:N_VAL])


# ---- prepare --caseops -------------------------------------------------------------------------------------
def test_prepare_writes_caseops_shards_and_a_sidecar_of_the_original_bytes(caseops_dir, docs):
    m = manifest(caseops_dir)
    assert m["transform"] == caseops.TRANSFORM == "lossless_caps_caseops_v1"
    assert m["tokenizer"]["file"] == CASEOPS_MODEL.name and m["val"]["docs"] == N_VAL
    side = m["val"]["byte_sidecar"]
    assert len(m["val"]["files"]) > 1 and side["files"] == [sidecar_name(f) for f in m["val"]["files"]]
    assert "byte_sidecar" not in m["train"] and not any(is_byte_sidecar(f) for f in m["train"]["files"])
    assert side["bytes"] == val_utf8(docs)
    assert prep.is_prepared(caseops_dir, CASEOPS_MODEL.name)
    toks, nbytes = [], []
    for f, s in zip(m["val"]["files"], side["files"], strict=True):  # parallel shards: the same cuts
        t, b = np.asarray(open_shard(caseops_dir / f, 8192)), np.asarray(open_shard(caseops_dir / s))
        assert t.shape == b.shape
        toks.append(t), nbytes.append(b.astype(np.int64))
    tokens, nbytes = np.concatenate(toks), np.concatenate(nbytes)
    assert tokens.size == m["val"]["tokens"] and int(nbytes.sum()) == val_utf8(docs)
    starts = np.flatnonzero(tokens == BOS_ID)
    assert starts.size == N_VAL and (nbytes[starts] == 0).all()  # one BOS per document, standing for no text
    sp = spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL))
    for k, (a, z) in enumerate(zip(starts, [*starts[1:], tokens.size], strict=True)):
        assert int(nbytes[a:z].sum()) == len(docs[k].encode())  # per document: its UTF-8 length
        ids, _ = caseops.token_bytes(sp, docs[k])
        assert tokens[a + 1 : z].tolist() == ids  # [BOS] + the CaseOps text's pieces
    assert (tokens == caseops.CONTROL_PIECE_IDS[caseops.TITLE]).any()  # the transform ran
    train = np.concatenate([np.asarray(open_shard(p)) for p in list_shards(str(caseops_dir / "fineweb_train_*.bin"))])
    assert (train == BOS_ID).sum() == N_DOCS - N_VAL
    first = train[1 : np.flatnonzero(train == BOS_ID)[1]].tolist()
    assert first == sp.encode(caseops.encode(docs[N_VAL]))  # train documents are transformed too


def test_caseops_refuses_a_tokenizer_without_the_control_pieces_before_reading(tmp_path, sp1024_path):
    missing = tmp_path / "no_such_docs.jsonl"  # never read: the tokenizer is refused first
    with pytest.raises(caseops.CaseOpsError, match="--caseops: .*not a CaseOps tokenizer"):
        prep.prepare([missing], tmp_path / "o", tokenizer=sp1024_path, caseops_transform=True)
    with pytest.raises(ValueError, match="--caseops needs --tokenizer"):
        prep.prepare([missing], tmp_path / "o", caseops_transform=True)
    assert not (tmp_path / "o").exists()
    argv = ["--input", str(missing), "--out", str(tmp_path / "o"), "--tokenizer", str(sp1024_path), "--caseops"]
    assert prep.main(argv) == 2


def test_the_runtime_knows_the_same_control_pieces(sp1024_path):
    """The runtime (pgolf/data/tokenizer.py) recognises a CaseOps tokenizer without importing the transform."""
    assert CASEOPS_PIECES == {i: ch for ch, i in caseops.CONTROL_PIECE_IDS.items()}
    assert is_caseops_tokenizer(spm.SentencePieceProcessor(model_file=str(need(CASEOPS_MODEL))))
    assert not is_caseops_tokenizer(spm.SentencePieceProcessor(model_file=str(sp1024_path)))


def test_a_byte_count_that_does_not_fit_uint16_is_refused(monkeypatch):
    big = {"": np.array([3, 1]), "x": np.array([3, 70_000])}  # a real piece never stands for 64 KiB
    monkeypatch.setattr(prep.caseops, "token_bytes", lambda sp, d: ([5, 9], big[d]))
    with pytest.raises(ValueError, match="document 1: .*70000 original bytes, more than a uint16"):
        list(prep.caseops_documents(None, ["", "x"]))


def test_write_split_keeps_the_sidecar_parallel_across_shard_cuts(tmp_path):
    docs = [(np.arange(1, 8, dtype=np.uint16), np.arange(0, 7, dtype=np.uint16)) for _ in range(3)]
    stats = prep.write_split(docs, tmp_path, "x_val", 5)
    assert stats["tokens"] == 21 and stats["byte_sidecar"] == {
        "files": [sidecar_name(f) for f in stats["files"]],
        "bytes": 63,
    }
    for f, s in zip(stats["files"], stats["byte_sidecar"]["files"], strict=True):
        t, b = np.asarray(open_shard(tmp_path / f)), np.asarray(open_shard(tmp_path / s))
        assert (b == t - 1).all()  # each count stays with its token
    with pytest.raises(ValueError, match="document 1 has byte counts missing"):
        prep.write_split([docs[0], (docs[1][0], None)], tmp_path / "y", "y_val", 5)


# ---- loading and checking the sidecar ------------------------------------------------------------------------
def test_load_val_data_reads_the_sidecar_the_manifest_names(caseops_dir, docs):
    pattern = str(caseops_dir / "fineweb_val_*.bin")  # matches the sidecar shards too: they are not tokens
    val = load_val_data(pattern, 1, 8192, tokenizer=caseops_dir / CASEOPS_MODEL.name)
    m = manifest(caseops_dir)
    assert val.tokens.numel() == m["val"]["tokens"] and val.bytes.dtype == torch.int32
    assert int(val.bytes.sum()) == val_utf8(docs) and [p.name for p in val.sidecar] == m["val"]["byte_sidecar"]["files"]
    cut = load_val_data(pattern, 64, 8192)  # cut to whole sequences, the sidecar with it
    assert cut.tokens.numel() == cut.bytes.numel() == (m["val"]["tokens"] - 1) // 64 * 64 + 1
    assert torch.equal(cut.bytes, val.bytes[: cut.bytes.numel()])
    with pytest.raises(ShardError, match="have a byte sidecar .*load_val_data"):
        load_val_tokens(pattern, 64)  # the tables would count CaseOps bytes wrong


@pytest.fixture()
def copy_dir(tmp_path, caseops_dir):
    d = tmp_path / "c"
    shutil.copytree(caseops_dir, d)
    return d


def test_a_sidecar_that_does_not_fit_the_tokens_is_refused(copy_dir):
    m = manifest(copy_dir)
    f0, s0 = m["val"]["files"][0], m["val"]["byte_sidecar"]["files"][0]
    b = np.asarray(open_shard(copy_dir / s0)).copy()
    pattern = str(copy_dir / "fineweb_val_*.bin")
    write_shard(copy_dir / s0, b[:-1])
    with pytest.raises(ShardError, match=f"{s0}: the byte sidecar holds {b.size - 1} entries for {b.size}"):
        load_val_data(pattern, 64)
    b[0] = 4  # position 0 is the first document's BOS
    write_shard(copy_dir / s0, b)
    with pytest.raises(ShardError, match="position 0 is a BOS with 4 bytes"):
        load_val_data(pattern, 64)
    (copy_dir / s0).write_bytes(b"\x00" * 10)
    with pytest.raises(ShardError, match="truncated shard"):
        load_val_data(pattern, 64)
    assert (copy_dir / f0).is_file()


def test_sidecar_files_nobody_names_are_refused_and_a_pattern_names_them(copy_dir, docs):
    """The hub's CaseOps export has no pgolf manifest: its sidecar is named by data.val_bytes_pattern."""
    (copy_dir / "manifest.json").unlink()
    pattern, side = str(copy_dir / "fineweb_val_[0-9]*.bin"), str(copy_dir / "fineweb_val_bytes_*.bin")
    with pytest.raises(ShardError, match="byte sidecar shards .* neither a manifest nor data.val_bytes_pattern"):
        load_val_data(pattern, 64)
    with pytest.raises(ShardError, match="neither a manifest nor"):
        load_val_tokens(pattern, 64)
    assert int(load_val_data(pattern, 1, 8192, bytes_pattern=side).bytes.sum()) == val_utf8(docs)
    for p in copy_dir.glob("fineweb_val_bytes_*.bin"):
        p.unlink()
    with pytest.raises(ShardError, match="is a CaseOps tokenizer but the shards have no byte sidecar"):
        load_val_data(pattern, 64, tokenizer=copy_dir / CASEOPS_MODEL.name)
    with pytest.raises(ShardError, match="is a CaseOps tokenizer"):
        load_val_tokens(pattern, 64, tokenizer=copy_dir / CASEOPS_MODEL.name)


# ---- BPB from the sidecar ------------------------------------------------------------------------------------
def test_eval_charges_each_target_its_sidecar_bytes(short_dir):
    """The standard mode's bytes are the sidecar's at every scored target (index b.start + pos + 1), and its
    BPB is Σ nll / (ln 2 · Σ bytes) computed by hand; the sliding mode's `once` windows score every target,
    so their bytes are exactly the validation documents' UTF-8 length. The tokenizer's tables would count the
    CaseOps text instead (its markers as 3-byte characters)."""
    d, val_docs = short_dir
    S, utf8 = 64, sum(len(t.encode()) for t in val_docs)
    model = perturbed_tiny_gpt(8192)
    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL)), 8192)
    val = load_val_data(str(d / "fineweb_val_*.bin"), S, 8192)
    log = TargetLog()
    ctx = EvalContext(luts, CPU, S, batch_windows=4, log=log, val_bytes=val.bytes)  # few padded windows
    ctx.check_tokens(val.tokens)
    res = run_mode("standard", {}, model, val.tokens, ctx)
    assert res.tokens == res.targets == val.tokens.numel() - 1  # every target of the (cut) stream scored
    assert res.bytes == int(val.bytes[1:].sum())
    x, y = val.tokens[:-1].view(-1, S), val.tokens[1:].view(-1, S)
    with torch.no_grad():
        nll = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum").double().item()
    assert res.val_bpb == pytest.approx(nll / (math.log(2) * int(val.bytes[1:].sum())), rel=1e-6)
    audit = log.arrays()
    assert np.array_equal(audit["bytes"], val.bytes[audit["index"] + 1].numpy().astype(np.float32))
    assert luts.target_bytes(x, y).sum().item() > res.bytes  # what the tables would have counted
    full = load_val_data(str(d / "fineweb_val_*.bin"), 1, 8192)
    assert int(full.bytes.sum()) == utf8
    once = run_mode("sliding", {"stride": S}, model, full.tokens, EvalContext(luts, CPU, S, 4, val_bytes=full.bytes))
    assert once.tokens == full.tokens.numel() - 1 and once.bytes == utf8  # every target: the documents' bytes


def test_eval_context_refuses_a_sidecar_that_cannot_be_aligned(caseops_dir):
    luts = build_byte_luts(spm.SentencePieceProcessor(model_file=str(CASEOPS_MODEL)), 8192)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        EvalContext(luts, CPU, 16, val_bytes=torch.ones(4, dtype=torch.float32))
    ctx = EvalContext(luts, CPU, 16, val_bytes=torch.ones(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="10 entries for 11 validation tokens"):
        ctx.check_tokens(torch.zeros(11, dtype=torch.long))


def test_validation_batches_carry_the_targets_bytes(caseops_dir):
    """Training's validation (GolfDataModule): `(x, y, nbytes)` batches, nbytes the sidecar at each target;
    the sidecar follows validation tokens cut from outside (data.val_max_tokens)."""
    args = [str(caseops_dir / "fineweb_train_*.bin"), str(caseops_dir / "fineweb_val_*.bin")]
    dm = GolfDataModule(*args, str(caseops_dir / CASEOPS_MODEL.name), 8192, 4096, 64, val_batch_tokens=256)
    dm.setup("fit")
    assert dm.val_bytes is not None and dm.val_bytes.numel() == dm.val_tokens.numel()
    start = 0
    for x, y, nb in dm.val_dataloader():
        assert x.shape == y.shape == nb.shape and nb.shape[1] == 64
        assert torch.equal(nb.flatten(), dm.val_bytes[start + 1 : start + 1 + nb.numel()])
        assert (nb[y == BOS_ID] == 0).all()
        start += nb.numel()
    assert start == dm.val_tokens.numel() - 1  # every target once
    cut = GolfDataModule(*args, str(caseops_dir / CASEOPS_MODEL.name), 8192, 4096, 64)
    cut.val_tokens = dm.val_tokens[: 3 * 64 + 1]
    cut.setup("fit")
    assert torch.equal(cut.val_bytes, dm.val_bytes[: 3 * 64 + 1])
    ds = ValWindows(dm.val_tokens, 64, 2, val_bytes=dm.val_bytes)
    assert torch.equal(ds[1][2], dm.val_bytes[2 * 64 + 1 : 4 * 64 + 1].view(2, 64))


# ---- the downloader's CaseOps variant, against a local fake of the hub -----------------------------------------
CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


@pytest.fixture()
def caseops_hub(tmp_path, caseops_dir):
    """The prepared CaseOps shards served in the layout of the hub's export: 2 val shards, their sidecars,
    3 train shards, the tokenizer and datasets/manifest.json."""
    root = tmp_path / "hub"
    base = root / "datasets" / CASEOPS_REPO / "resolve" / "main" / "datasets"
    ds = base / "datasets" / CASEOPS_DATASET
    ds.mkdir(parents=True)
    for i in range(2):
        for name in (f"fineweb_val_{i:06d}.bin", f"fineweb_val_bytes_{i:06d}.bin", f"fineweb_train_{i:06d}.bin"):
            shutil.copy(caseops_dir / name, ds / name)
    shutil.copy(caseops_dir / "fineweb_train_000002.bin", ds / "fineweb_train_000002.bin")
    (base / "tokenizers").mkdir()
    shutil.copy(CASEOPS_MODEL, base / "tokenizers" / CASEOPS_MODEL.name)
    tok = {"name": "sp_caseops_8192", "model_path": f"tokenizers/{CASEOPS_MODEL.name}"}
    entry = {"name": CASEOPS_DATASET, "tokenizer_name": tok["name"], "stats": {"files_train": 3, "files_val": 2}}
    (base / "manifest.json").write_text(json.dumps({"datasets": [entry], "tokenizers": [tok]}))
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", base
    srv.shutdown()


def test_download_the_caseops_variant_with_its_sidecars(tmp_path, caseops_hub, caseops_dir):
    endpoint, base = caseops_hub
    out = tmp_path / "data"
    d = fineweb.download("sp8192_caseops", 1, out, endpoint=endpoint, log=lambda *_: None)
    assert d == out / "datasets" / CASEOPS_DATASET
    assert sorted(p.name for p in d.glob("*.bin")) == [
        "fineweb_train_000000.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
        "fineweb_val_bytes_000000.bin",
        "fineweb_val_bytes_000001.bin",
    ]
    assert (out / "tokenizers" / CASEOPS_MODEL.name).read_bytes() == CASEOPS_MODEL.read_bytes()
    assert (out / "manifest.romeerp__parameter-golf-caseops-v1.json").is_file() and not (out / "manifest.json").exists()
    # the data config's patterns (conf/data/fineweb_sp8192_caseops.yaml) read it with its sidecar
    val = load_val_data(str(d / "fineweb_val_[0-9]*.bin"), 1, 8192, bytes_pattern=str(d / "fineweb_val_bytes_*.bin"))
    want = sum(int(np.asarray(open_shard(caseops_dir / f"fineweb_val_bytes_{i:06d}.bin")).sum()) for i in range(2))
    assert int(val.bytes.sum()) == want
    with pytest.raises(fineweb.DownloadError, match="has 3 training shards; asked for 4"):
        fineweb.download("sp8192_caseops", 4, out, endpoint=endpoint, log=lambda *_: None)
    m = json.loads((base / "manifest.json").read_text())
    m["datasets"][0]["stats"]["files_val_bytes"] = 1
    (base / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(fineweb.DownloadError, match="lists 1 byte sidecars for 2 validation shards"):
        fineweb.download("sp8192_caseops", 1, tmp_path / "d2", endpoint=endpoint, log=lambda *_: None)


def test_the_caseops_variant_refuses_a_tokenizer_without_the_pieces(tmp_path, caseops_hub, sp1024_path):
    endpoint, base = caseops_hub
    shutil.copy(sp1024_path, base / "tokenizers" / CASEOPS_MODEL.name)  # the wrong model under the right name
    with pytest.raises(fineweb.DownloadError, match="not a usable CaseOps model .*not a CaseOps tokenizer"):
        fineweb.download("sp8192_caseops", 0, tmp_path / "data", endpoint=endpoint, log=lambda *_: None)
    with pytest.raises(fineweb.DownloadError, match="unknown variant 'sp8192_casefold'"):
        fineweb.download("sp8192_casefold", 0, tmp_path / "data", endpoint=endpoint, log=lambda *_: None)
