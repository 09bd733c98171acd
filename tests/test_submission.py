"""pgolf.tools.submission without training: machine paths scrubbed at path-component boundaries, and a
submission folder built from hand-made run directories (a fake packed script, an artifact that records its
hash) that holds no absolute path of the machine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.export.code import code_record
from pgolf.quant.artifact import write_artifact
from pgolf.tools import submission
from pgolf.tools.pack import SCRIPT
from pgolf.tools.submission import SubmissionError, find_machine_paths, prefix_pattern, scrub_obj, scrub_paths

ROOT = Path(__file__).resolve().parent.parent
ARTIFACT = "final_model.int8_zlib.ptz"


# ---- scrubbing ----------------------------------------------------------------------------------------------
def test_a_prefix_is_replaced_only_as_whole_path_components():
    known = {"/tmp/pg": "."}
    assert scrub_paths("x=/tmp/pg/a x=/tmp/pg_work/b", known) == "x=./a x=<path>/b"
    assert scrub_paths("/tmp/pg/", known) == "./"  # followed by `/`
    assert scrub_paths("out /tmp/pg\nnext /tmp/pg", known) == "out .\nnext ."  # end of line, end of text
    assert scrub_paths("\"/tmp/pg\" '/tmp/pg/c' `/tmp/pg`", known) == "\".\" './c' `.`"  # quotes
    assert scrub_paths("(/tmp/pg) /tmp/pg:3 [/tmp/pg,/tmp/pg;]", known) == "(.) .:3 [.,.;]"
    # the prefix inside a longer name, or further down another path, is that other path
    assert scrub_paths("/tmp/pgx/c /tmp/pg.old/d /tmp/pg-2/e", known) == "<path>/c <path>/d <path>/e"
    assert scrub_paths("/var/tmp/pg/f /var/tmp/pg", known) == "<path>/f <path>/pg"
    assert scrub_paths("data/tmp/pg/g", known) == "data/tmp/pg/g"  # a relative path is not a machine path
    assert scrub_paths("x=/tmp/pg/a", {"/tmp/pg/": "."}) == "x=./a"  # a trailing slash does not matter


def test_the_longest_prefix_wins_in_one_pass_and_the_root_is_never_a_prefix():
    known = {"/tmp/pg": ".", "/tmp/pg/run": "RUN", "/home/ann": "~"}
    text = "/tmp/pg/run/x /tmp/pg/runner/y /tmp/pg/run /home/ann/.cache/z /home/anna/w"
    assert scrub_paths(text, known) == "RUN/x ./runner/y RUN ~/.cache/z <path>/w"
    # a replacement is not scanned again for the other prefixes (one after the other gave `xZ/c`)
    assert scrub_paths("/a/b/c", {"/a/b": "x/a", "/a": "Z"}) == "x/a/c"
    assert scrub_paths("a /b/c / d", {"/": "~", "": "E"}) == "a <path>/c / d"
    assert prefix_pattern(["/", ""]) is None


def test_scrub_obj_scrubs_every_string_and_keeps_json_valid():
    sub = {"blurb": 'made in "/tmp/pg/x"', "/tmp/pg/key": [1, "/tmp/pg", None, 2.5], "n": {"p": "/srv/a/b"}}
    out = scrub_obj(sub, {"/tmp/pg": "."})
    assert out == {"blurb": 'made in "./x"', "./key": [1, ".", None, 2.5], "n": {"p": "<path>/b"}}
    assert json.loads(json.dumps(out)) == out


# ---- a folder from hand-made runs ---------------------------------------------------------------------------
PACKED_CONFIG = {"data": {"dir": "./data/datasets/fineweb10B_sp1024", "tokenizer_path": "./data/tokenizers/sp.model"}}


@pytest.fixture
def script(monkeypatch) -> bytes:
    """A stand-in for a packed train_gpt.py (it compiles; pgolf.tools.pack's format is that module's test):
    the submission reads its payload through `unpack`, which answers with the data paths of a packed config."""
    text = b"import sys\nsys.exit('a stand-in for a packed train_gpt.py')\n"

    def unpack(s: bytes) -> tuple[dict, dict]:
        assert s == text
        return {"entry": "pgolf.train.standalone", "config": PACKED_CONFIG}, {}

    monkeypatch.setattr(submission, "unpack", unpack)
    return text


def eval_result(bpb: float) -> dict:
    tokens, nbytes = 1000, 4200.0
    loss = bpb * math.log(2) * nbytes / tokens
    return {"mode": "standard", "val_loss": loss, "val_bpb": bpb, "tokens": tokens, "bytes": nbytes, "compliant": True}


def fake_run(
    sweep: Path, seed: int, script: bytes, log_lines: list[str], data_dir: Path, variant: str = "leaky", bpb=1.2
) -> Path:
    """A finished run directory as train.py leaves it, with `log_lines` (may name `{run}`) in its train.log."""
    d = sweep / f"{seed}_seed{seed}"
    (d / ".hydra").mkdir(parents=True)
    cfg = {"name": "tiny", "seed": seed, "variant": variant, "trainer": {"devices": 1}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    overrides = ["model=tiny", f"data.dir={data_dir}", "train.note='a  b'", f"seed={seed}"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    code = code_record(script)
    meta = {"code": code, "requirements": {"torch": "2.13.0+cu128"}, "provenance": {"device": "cpu", "torch": "2.13"}}
    size = write_artifact(d / ARTIFACT, {}, meta, "zlib") + code["bytes"]
    export = {"path": f"{d}/{ARTIFACT}", "total_bytes": size, "model_bytes": size - code["bytes"]}
    res = {"export": {**export, "code_bytes": code["bytes"]}, "roundtrip": {"standard": eval_result(bpb + seed / 1e3)}}
    (d / "results.json").write_text(json.dumps({**res, "size_ok": True}))
    head = [f"code_bytes:{code['bytes']} code_sha256:{code['sha256']}", "world_size:1 local_rank:0"]
    steps = [f"step:{s}/4 train_loss:{5 - s / 10:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s in (1, 2, 3, 4)]
    (d / "train.log").write_text("\n".join([*head, *(x.format(run=d) for x in log_lines), *steps]) + "\n")
    (d / SCRIPT).write_bytes(script)
    return d


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home" / "ann"
    h.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


def test_submission_folder_holds_no_machine_path(tmp_path, home, script):
    sweep = tmp_path / "multirun" / "tiny"
    lines = [
        "artifact: {run}/" + ARTIFACT,
        "scratch: {run}_work/tmp.bin",
        "run_dir:{run}",
        'quoted "{run}" end',
        f"cache {home}/.cache/pgolf/x.bin",
        f"code {ROOT}/pgolf/train/build.py",
        f"other {tmp_path}/elsewhere/file.txt",
    ]
    runs = [fake_run(sweep, seed, script, lines, tmp_path / "data" / "shards") for seed in (0, 1)]
    out = tmp_path / "records" / "2026-05-01_Tiny"
    submission.assemble(runs, out, name="Tiny", github_id="ann", blurb=f"made in {ROOT} from {home}/notes.md")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", SCRIPT, "train_seed0.log", "train_seed1.log"]
    for f in out.iterdir():
        text = f.read_text()
        assert find_machine_paths(text) == [], (f.name, find_machine_paths(text))
        for p in (tmp_path, ROOT, home):
            assert str(p) not in text, (f.name, p)
    log = (out / "train_seed1.log").read_text().splitlines()
    assert log[2:9] == [
        "artifact: ./" + ARTIFACT,
        "scratch: <path>/tmp.bin",
        "run_dir:.",
        'quoted "." end',
        "cache ~/.cache/pgolf/x.bin",
        "code ./pgolf/train/build.py",
        "other <path>/file.txt",
    ]
    sub = json.loads((out / "submission.json").read_text())
    assert sub["blurb"] == "made in . from ~/notes.md" and sub["seeds"] == [0, 1]
    assert sub["code_sha256"] == code_record(script)["sha256"] and (out / SCRIPT).read_bytes() == script
    readme = (out / "README.md").read_text()
    assert "python train.py -m model=tiny data.dir=<path>/shards train.note='a  b' seed=0,1" in readme
    assert "SEED=1 RUN_ID=seed1 DATA_PATH=./data/datasets/fineweb10B_sp1024" in readme
    assert (out / "requirements.txt").read_text().splitlines()[1:] == ["torch==2.13.0"]


def test_a_machine_path_the_scrubbing_cannot_read_stops_the_folder(tmp_path, home, script):
    sweep = tmp_path / "multirun" / "tiny"
    runs = [fake_run(sweep, s, script, ["url file://{run}/x.bin"], tmp_path / "d") for s in (0, 1)]
    out = tmp_path / "records" / "x"
    with pytest.raises(SubmissionError, match=r"train_seed0.log: the machine path .*0_seed0 is left after scrubbing"):
        submission.assemble(runs, out, name="x", github_id="y")
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []


def test_without_scipy_a_baseline_comparison_stops_with_one_line(tmp_path, home, script, monkeypatch, capsys):
    runs = [fake_run(tmp_path / "new", s, script, [], tmp_path / "d", bpb=1.19 + s / 1e4) for s in (0, 1)]
    base = [fake_run(tmp_path / "base", s, script, [], tmp_path / "d", variant="base") for s in (0, 1)]
    out = tmp_path / "records" / "x"
    args = [*map(str, runs), "--out", str(out), "--name", "x", "--github-id", "y", "--baseline", *map(str, base)]
    assert submission.main(args) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["comparison"]["baseline_group"] == "tiny[base]" and 0 < sub["comparison"]["p_gain"] < 0.05
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    args[args.index(str(out))] = str(tmp_path / "records" / "y")
    assert submission.main(args) == 2
    assert capsys.readouterr().err == "error: the Welch t-test needs scipy: pip install pgolf[analysis]\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]
