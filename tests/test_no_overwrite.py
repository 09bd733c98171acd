"""Nothing the user had is lost: atomic_dir never touches a sibling, eval.py and compare refuse to replace a
file they would write (before any work), and compare names groups whose runs come from different code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.eval.run import evaluate_artifact
from pgolf.io import atomic_dir
from pgolf.quant.artifact import ArtifactError
from pgolf.tools import compare
from pgolf.tools.prepare import prepare
from pgolf.tools.runs import load_runs
from pgolf.tools.synthetic import make_documents

ROOT = Path(__file__).resolve().parents[1]
SHA_A, SHA_B = "a" * 64, "b" * 64


# ---- atomic_dir ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [None, "empty", "full"])
def test_atomic_dir_leaves_a_sibling_named_like_its_backup_alone(tmp_path, existing):
    """`X.old` is the user's: replacing X (absent, pre-created empty, or full) must neither delete nor move it."""
    out, old = tmp_path / "X", tmp_path / "X.old"
    old.mkdir()
    (old / "keep.txt").write_text("user data")
    if existing is not None:
        out.mkdir()
        if existing == "full":
            (out / "previous.txt").write_text("replaced")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert (old / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "X.old"]  # no backup or temporary left


def test_atomic_dir_keeps_the_old_directory_on_error(tmp_path):
    out = tmp_path / "X"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"] and (out / "previous.txt").read_text() == "kept"


def test_prepare_overwrite_keeps_a_users_dot_old_directory(tmp_path, synth_dir):
    docs = make_documents(24, seed=5)
    kw = dict(name="t", tokenizer=synth_dir / "synth_256_bpe_selftrained.model", documents=(docs[4:], docs[:4]))
    out = tmp_path / "data"
    (tmp_path / "data.old").mkdir()
    (tmp_path / "data.old" / "mine.bin").write_bytes(b"\x01\x02")
    prepare([], out, **kw)
    prepare([], out, overwrite=True, **kw)
    assert (tmp_path / "data.old" / "mine.bin").read_bytes() == b"\x01\x02"
    assert (out / "manifest.json").is_file()


# ---- eval.py -----------------------------------------------------------------------------------------------------
def test_evaluate_artifact_refuses_an_existing_result_before_reading_the_artifact(tmp_path):
    """The artifact does not exist: the refusal comes first, names the file and the way out."""
    (tmp_path / "eval_result.json").write_text("user's")
    kw = dict(artifact=tmp_path / "missing.ptz", modes={"standard": {}}, data={}, out_dir=tmp_path)
    with pytest.raises(FileExistsError, match=r"eval_result\.json exists; choose another out_dir=, or pass overwrite"):
        evaluate_artifact(**kw)
    assert (tmp_path / "eval_result.json").read_text() == "user's"
    with pytest.raises(ArtifactError, match="artifact not found"):  # allowed: on to the (missing) artifact
        evaluate_artifact(**kw, overwrite=True)
    audit_only = tmp_path / "a"
    audit_only.mkdir()
    (audit_only / "audit.npz").write_bytes(b"user's")
    with pytest.raises(FileExistsError, match=r"audit\.npz exists"):
        evaluate_artifact(**{**kw, "out_dir": audit_only}, audit=True)
    # without audit=true too: a new eval_result.json would sit beside an earlier evaluation's audit.npz
    with pytest.raises(FileExistsError, match=r"audit\.npz exists"):
        evaluate_artifact(**{**kw, "out_dir": audit_only})
    with pytest.raises(ArtifactError, match="artifact not found"):
        evaluate_artifact(**{**kw, "out_dir": audit_only}, overwrite=True)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        evaluate_artifact(**{**kw, "out_dir": tmp_path / "f"})


def test_a_replaced_evaluation_leaves_no_audit_of_the_earlier_one(tmp_path):
    """overwrite=true without audit: the earlier evaluation's audit.npz went on sitting beside the new result."""
    import numpy as np

    from pgolf.eval.run import write_outputs

    write_outputs(tmp_path, {"mode": "a"}, {"sliding.nll": np.zeros(3)})
    assert (tmp_path / "audit.npz").is_file()
    write_outputs(tmp_path, {"mode": "b"}, None)
    assert json.loads((tmp_path / "eval_result.json").read_text()) == {"mode": "b"}
    assert not (tmp_path / "audit.npz").exists()


def test_eval_py_refuses_an_existing_result_with_one_error_line(tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval_result.json").write_text('{"mine": 1}\n')
    r = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"artifact={tmp_path / 'missing.ptz'}",
            f"out_dir={out}",
            f"hydra.run.dir={tmp_path}/h",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "eval_result.json exists" in err[0] and "overwrite=true" in err[0], r.stderr
    assert (out / "eval_result.json").read_text() == '{"mine": 1}\n'


# ---- compare ------------------------------------------------------------------------------------------------------
def make_run(sweep: Path, job: str, seed: int, bpb: float, sha: str | None = SHA_A, script: bytes | None = None):
    """A finished run directory of group `demo`: config, results, a train.log with a `code_sha256:` line (or
    none), and optionally the train_gpt.py beside it."""
    d = sweep / job
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "seed": seed, "variant": None}))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
    mode = {"mode": "standard", "val_loss": bpb * 2.9, "val_bpb": bpb, "tokens": 1000, "bytes": 4200.0}
    res = {"export": {"model_bytes": 1000, "code_bytes": 500, "total_bytes": 1500}, "roundtrip": {"standard": mode}}
    (d / "results.json").write_text(json.dumps({**res, "total_bytes": 1500, "size_ok": True}))
    log = [f"code_bytes:500 code_sha256:{sha}"] if sha else []
    log += ["step:1/2 train_loss:5.0 train_time:100ms step_avg:100.00ms"]
    (d / "train.log").write_text("\n".join(log) + "\n")
    if script is not None:
        (d / "train_gpt.py").write_bytes(script)
    return d


def test_compare_names_a_group_whose_runs_come_from_different_code(tmp_path):
    sweep = tmp_path / "s"
    make_run(sweep, "0_seed0", 0, 1.30)
    make_run(sweep, "1_seed1", 1, 1.31)
    make_run(sweep, "2_seed2", 2, 1.29, sha=None)  # unknown code (no line, no script): not counted as different
    runs, notes = load_runs([sweep])
    assert not notes and compare.code_notes(runs) == []
    make_run(sweep, "3_seed3", 3, 1.20, sha=None, script=b"print('other code')\n")  # its script's hash
    runs, notes = load_runs([sweep])
    assert not notes  # the configs are the same: only the code tells these runs apart
    rep = compare.build_report(runs)
    (note,) = [n for n in rep.notes if "different code" in n]
    assert note.startswith("group demo mixes runs of different code (train_gpt.py sha256 aaaaaaaaaaaa: s/0_seed0, ")
    assert "s/3_seed3" in note and "not replicates" in note
    assert "different code" in compare.render_text(rep)
    shas = {r["run"]: r["code_sha256"] for r in compare.report_json(rep)["runs"]}
    assert shas["s/0_seed0"] == SHA_A and shas["s/2_seed2"] is None and shas["s/3_seed3"] not in (SHA_A, None)


@pytest.mark.parametrize("name", ["curves.png", "final_bpb.png", "compare.json"])
def test_compare_refuses_any_file_it_would_write_before_reading_runs(tmp_path, capsys, name):
    sweep = tmp_path / "s"
    make_run(sweep, "0_seed0", 0, 1.30)
    out = tmp_path / "cmp"
    out.mkdir()
    (out / name).write_bytes(b"the user's own")
    # a missing run path: the refusal comes before any run is read
    assert compare.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and name in err and "--force" in err and "missing" not in err
    assert (out / name).read_bytes() == b"the user's own" and len(list(out.iterdir())) == 1
    if name.endswith(".png"):  # refused without plots too: it would sit beside a comparison it is not from
        assert compare.main([str(sweep), "--out", str(out), "--no-plots"]) == 2
        assert (out / name).read_bytes() == b"the user's own"
    assert compare.main([str(sweep), "--out", str(out), "--no-plots", "--force"]) == 0
    assert not (out / "curves.png").exists() and not (out / "final_bpb.png").exists()  # replaced: no stale plot
