"""pgolf.tools.submission without training: machine paths scrubbed at path-component boundaries, and a
submission folder built from hand-made run directories (a fake packed script, an artifact that records its
hash) that holds no absolute path of the machine."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from pgolf.export.code import code_record, public_version
from pgolf.io import sha256_file
from pgolf.quant.artifact import write_artifact
from pgolf.tools import submission
from pgolf.tools.pack import SCRIPT, compose_train
from pgolf.tools.runs import load_packed_run, load_run, load_runs
from pgolf.tools.submission import SubmissionError, find_machine_paths, prefix_pattern, scrub_obj, scrub_paths
from pgolf.train.standalone import write_run_record

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
    sweep: Path,
    seed: int,
    script: bytes,
    log_lines: list[str],
    data_dir: Path,
    variant: str = "leaky",
    bpb=1.2,
    config: dict | None = None,
) -> Path:
    """A finished run directory as train.py leaves it, with `log_lines` (may name `{run}`) in its train.log;
    `config` is added to its .hydra/config.yaml."""
    d = sweep / f"{seed}_seed{seed}"
    (d / ".hydra").mkdir(parents=True)
    cfg = {"name": "tiny", "seed": seed, "variant": variant, "trainer": {"devices": 1}, **(config or {})}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    overrides = ["model=tiny", f"data.dir={data_dir}", "train.note='a  b'", "final_eval.modes=[standard]"]
    overrides.append(f"seed={seed}")
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    code = code_record(script)
    meta = {"code": code, "requirements": {"torch": "2.13.0+cu128"}, "provenance": {"device": "cpu", "torch": "2.13"}}
    meta["seed"] = seed
    size = write_artifact(d / ARTIFACT, {}, meta, "zlib") + code["bytes"]
    export = {"path": f"{d}/{ARTIFACT}", "label": "int8_zlib", "total_bytes": size, "model_bytes": size - code["bytes"]}
    std = eval_result(bpb + seed / 1e3)
    res = {"export": {**export, "code_bytes": code["bytes"]}, "roundtrip": {"standard": std}}
    compliance = {"calibration_ok": True, "size_ok": True, "full_validation": True, "reasons": []}
    (d / "results.json").write_text(json.dumps({**res, "size_ok": True, "total_bytes": size, "compliance": compliance}))
    head = [f"seed:{seed}", f"code_bytes:{code['bytes']} code_sha256:{code['sha256']}", "world_size:1 local_rank:0"]
    steps = [f"step:{s}/4 train_loss:{5 - s / 10:.4f} train_time:{100 * s}ms step_avg:100.00ms" for s in (1, 2, 3, 4)]
    end = [f"final_int8_zlib_roundtrip_exact val_loss:{std['val_loss']:.8f} val_bpb:{std['val_bpb']:.8f}"]
    (d / "train.log").write_text("\n".join([*head, *(x.format(run=d) for x in log_lines), *steps, *end]) + "\n")
    (d / SCRIPT).write_bytes(script)
    return d


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home" / "ann"
    h.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


def test_submission_folder_holds_no_machine_path(tmp_path, home, script, capsys):
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
    assert log[3:10] == [
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
    assert sub["hardware"].startswith("1x") and all("eval_seconds" in r for r in sub["seed_results"].values())
    notes = capsys.readouterr().out
    assert "note: the challenge keeps a 10min_16mb folder in records/track_10min_16mb/<date>_<name>/" in notes
    assert "note: the runs trained on 1 process(es); the 10min_16mb track trains on 8xH100" in notes
    assert sub["code_sha256"] == code_record(script)["sha256"] and (out / SCRIPT).read_bytes() == script
    readme = (out / "README.md").read_text()
    note = "'train.note='\"'\"'a  b'\"'\"''"  # shlex.quote of `train.note='a  b'`
    cmd = f"python train.py -m model=tiny data.dir=<path>/shards {note} 'final_eval.modes=[standard]' seed=0,1"
    assert [x for x in readme.splitlines() if "train.py" in x] == [cmd]  # the sweep only, its arguments quoted
    assert "SEED=1 RUN_ID=seed1 DATA_PATH=./data/datasets/fineweb10B_sp1024" in readme
    assert "FineWeb export `fineweb10B_sp1024`" in readme and "cached_challenge_fineweb.py --variant sp1024" in readme
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
    monkeypatch.delitem(sys.modules, "scipy")
    monkeypatch.delitem(sys.modules, "scipy.stats")
    res = json.loads((base[0] / "results.json").read_text())  # a baseline score its log does not give
    res["roundtrip"]["standard"]["val_bpb"] = 9.0
    (base[0] / "results.json").write_text(json.dumps(res))
    args[args.index(str(tmp_path / "records" / "y"))] = str(tmp_path / "records" / "z")
    assert "error: --baseline: base/0_seed0: its standard val_bpb 9.00000000 is not in its log's" in refused(
        args, capsys
    )


# ---- refusals: every run given is checked, none is dropped --------------------------------------------------
def edit_results(run: Path, **changes) -> None:
    """Change keys of the run's results.json (`export__key` for a key of its `export`)."""
    res = json.loads((run / "results.json").read_text())
    for k, v in changes.items():
        node, key = (res["export"], k[len("export__") :]) if k.startswith("export__") else (res, k)
        node[key] = v
    (run / "results.json").write_text(json.dumps(res))


def refused(args: list, capsys) -> str:
    """The one error line of `main(args)`, checked to exit 2 and write no folder."""
    out = Path(args[args.index("--out") + 1])
    assert submission.main([*map(str, args), "--name", "x", "--github-id", "y"]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_run_over_the_limit_or_not_compliant_or_with_stale_sizes_is_refused(tmp_path, home, script, capsys):
    runs = [fake_run(tmp_path / "sw", s, script, [], tmp_path / "d") for s in (0, 1)]
    out = tmp_path / "records" / "x"
    good = json.loads((runs[1] / "results.json").read_text())
    size = good["export"]["total_bytes"]

    edit_results(runs[1], size_ok=False, total_bytes=17_000_000, export__size_ok=False, export__total_bytes=17_000_000)
    assert "sw/1_seed1: its size check failed (results.json size_ok: false)" in refused([*runs, "--out", out], capsys)
    (runs[1] / "results.json").write_text(json.dumps(good))
    edit_results(runs[1], compliance={**good["compliance"], "full_validation": False, "reasons": ["max_tokens"]})
    assert "sw/1_seed1: not compliant (results.json compliance: max_tokens)" in refused([*runs, "--out", out], capsys)
    # an older results.json next to a newer artifact: its sizes are not the file's
    (runs[1] / "results.json").write_text(json.dumps(good))
    edit_results(runs[1], total_bytes=size + 7, export__total_bytes=size + 7, export__model_bytes=size + 7 - 54)
    err = refused([*runs, "--out", out], capsys)
    assert f"sw/1_seed1: results.json export.model_bytes is {size + 7 - 54}, but the files measure" in err
    (runs[1] / "results.json").write_text(json.dumps(good))
    edit_results(runs[1], export__sha256="0" * 64)
    assert "sw/1_seed1: results.json export.sha256 is 000" in refused([*runs, "--out", out], capsys)
    # measured, not read: artifact + code over the run's limit
    (runs[1] / "results.json").write_text(json.dumps(good))
    edit_results(runs[1], export__limit_bytes=size - 1)
    assert f"sw/1_seed1: {ARTIFACT} + {SCRIPT} is {size:,} bytes, over the {size - 1:,}-byte limit" in refused(
        [*runs, "--out", out], capsys
    )
    (runs[1] / "results.json").write_text(json.dumps(good))
    # another seed's artifact of the same size in the run's folder
    art = (runs[1] / ARTIFACT).read_bytes()
    (runs[1] / ARTIFACT).write_bytes((runs[0] / ARTIFACT).read_bytes())
    assert "sw/1_seed1: its artifact records seed 0, but the run's seed is 1" in refused([*runs, "--out", out], capsys)
    (runs[1] / ARTIFACT).write_bytes(art)
    assert submission.main([*map(str, runs), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["compliant"] and sub["size_ok"] and sub["bytes_total"] == size
    assert sub["seed_results"]["1"]["model_bytes"] == (runs[1] / ARTIFACT).stat().st_size


def test_no_given_run_is_dropped(tmp_path, home, script, capsys):
    a = [fake_run(tmp_path / "a", s, script, [], tmp_path / "d") for s in (0, 1)]
    out = tmp_path / "records" / "x"
    # the same seed from different code: the code check comes first, over every run
    other = fake_run(tmp_path / "z", 1, script + b"# other\n", [], tmp_path / "d")
    assert "the runs were made by different code (a/0_seed0: " in refused([*a, other, "--out", out], capsys)
    # the same seed twice from one code
    again = fake_run(tmp_path / "b", 1, script, [], tmp_path / "d")
    err = refused([*a, again, "--out", out], capsys)
    assert "group tiny[leaky] has seed 1 2 times (a/1_seed1, b/1_seed1); give each seed once" in err
    # the same directory twice, given or also found in a given sweep
    assert "a/1_seed1: the same run given twice (as a/1_seed1 and as a/1_seed1)" in refused(
        [*a, a[1], "--out", out], capsys
    )
    assert "a/0_seed0: the same run given twice (in the sweep" in refused([tmp_path / "a", a[0], "--out", out], capsys)
    # a run without results.json, given or in a given sweep
    (a[1] / "results.json").unlink()
    msg = "a/1_seed1: no results.json (an unfinished or failed run); leave it out"
    assert msg in refused([*a, "--out", out], capsys)
    assert msg in refused([tmp_path / "a", "--out", out], capsys)


def test_configs_that_differ_outside_the_recipe_give_a_note_without_a_missing_option(tmp_path, home, script, capsys):
    loggers = {0: "none", 1: "wandb"}
    runs = [
        fake_run(tmp_path / "a", s, script, [], tmp_path / "d", config={"logger": {"kind": k}})
        for s, k in loggers.items()
    ]
    out = tmp_path / "records" / "x"
    assert submission.main([*map(str, runs), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note: the runs' configs")]
    assert notes == [f"note: the runs' configs differ in logger.kind, outside the recipe that their one {SCRIPT} holds"]


def test_the_reproduce_section_names_the_runs_own_data(tmp_path, home, script, monkeypatch):
    packed = {"data": {"dir": "./data/datasets/shards", "tokenizer_path": "./data/tokenizers/demo.model"}}
    monkeypatch.setattr(submission, "unpack", lambda s: ({"config": packed}, {}))
    demo = {"data": {"dir": "data/demo/shards", "prepare": "demo"}}
    runs = [fake_run(tmp_path / "a", s, script, [], tmp_path / "d", config=demo) for s in (0, 1)]
    out = tmp_path / "records" / "x"
    submission.assemble(runs, out, name="x", github_id="y")
    readme = (out / "README.md").read_text()
    assert "FineWeb:" not in readme and "cached_challenge_fineweb" not in readme
    assert (
        "with the runs' own data, not FineWeb (pgolf's `data=demo` corpus, which the runs read from "
        "`data/demo/shards`; the shards in `./data/datasets/shards` and the tokenizer at "
        "`./data/tokenizers/demo.model`):"
    ) in readme


def test_requirements_drop_local_version_labels():
    assert public_version("2.13.0+cpu") == "2.13.0" == public_version("2.13.0")
    code = submission.Code(b"", "0" * 64, {"numpy": "2.4.6", "torch": "2.13.0+cu128"}, 1, {})
    lines = submission.requirement_lines(code)
    assert lines[1:] == ["numpy==2.4.6", "torch==2.13.0"] and "(builds: torch 2.13.0+cu128)" in lines[0]


# ---- runs of a packed train_gpt.py in one folder --------------------------------------------------------------
@functools.cache
def tiny_config() -> dict:
    """A resolved config of the tiny experiment, as a packed run writes it to logs/<RUN_ID>.yaml."""
    return OmegaConf.to_container(compose_train(["model=tiny", "data=synthetic"]), resolve=True)


def packed_seed_runs(
    folder: Path, seeds, script: bytes, data: Path, args=(), bpb=1.2, config=None, world=8, run_ids=None
) -> None:
    """Runs of a packed train_gpt.py in `folder`, one after the other, as `pgolf.train.standalone.main` leaves
    them: each replaces the artifact and results.json, and keeps logs/<RUN_ID>.txt, .yaml and its record
    (written by the runtime's own `write_run_record`). `config` (dotted key -> value) overrides the config
    of the last seed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCRIPT).write_bytes(script)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    code = code_record(script)
    cwd = Path.cwd()
    try:
        os.chdir(folder)  # the packed script writes into the folder it runs in
        for i, seed in enumerate(seeds):
            run_id = run_ids[i] if run_ids else f"seed{seed}"
            meta = {"code": code, "requirements": {"torch": "2.13.0"}, "provenance": {"device": "cpu"}, "seed": seed}
            model = write_artifact(Path(ARTIFACT), {}, {**meta, "pad": "x" * seed}, "zlib")  # sizes differ
            export = {"path": ARTIFACT, "label": "int8_zlib", "model_bytes": model, "code_bytes": code["bytes"]}
            std = eval_result(bpb + seed / 1e3)
            pre = eval_result(bpb + seed / 1e3 - 0.01)
            res = {"export": {**export, "total_bytes": model + code["bytes"], "pre_quant": pre}, "size_ok": True}
            res |= {"roundtrip": {"standard": std}, "total_bytes": model + code["bytes"]}
            res["compliance"] = {"calibration_ok": True, "size_ok": True, "full_validation": True, "reasons": []}
            res["training"] = {"steps": 4, "train_time_ms": 400.0 + seed}
            Path("results.json").write_text(json.dumps(res))
            cfg = OmegaConf.create(tiny_config())
            cfg.seed, cfg.data.dir = seed, str(data)
            for k, v in (config or {}).items() if seed == seeds[-1] else ():
                OmegaConf.update(cfg, k, v)
            OmegaConf.save(cfg, logs / f"{run_id}.yaml")
            cap = cfg.train.max_wallclock_seconds
            lines = [f"train_batch_tokens:1024 train_seq_len:32 iterations:4 max_wallclock_seconds:{cap}"]
            lines += [f"seed:{seed}", f"code_bytes:{code['bytes']} code_sha256:{code['sha256']}"]
            lines += [f"world_size:{world} grad_accum_steps:1"]
            lines += [f"step:4/4 train_loss:4.0 train_time:{400 + seed}ms step_avg:100.00ms"]
            lines += [f"DIAGNOSTIC pre_quant val_loss:{pre['val_loss']:.4f} val_bpb:{pre['val_bpb']:.4f} eval_time:1ms"]
            lines += [f"Serialized model int8+zlib: {model} bytes", f"Code size: {code['bytes']} bytes"]
            lines += [f"final_int8_zlib_roundtrip_exact val_loss:{std['val_loss']:.8f} val_bpb:{std['val_bpb']:.8f}"]
            with open(logs / f"{run_id}.txt", "a") as f:  # appended to, as the reference does
                f.write("\n".join(lines) + "\n")
            env = {"SEED": str(seed), "RUN_ID": run_id, "DATA_PATH": str(data), "ITERATIONS": "4", "HOME": "h"}
            write_run_record(logs / f"{run_id}.json", run_id, res, env, list(args))
    finally:
        os.chdir(cwd)


def edit_record(folder: Path, stem: str, edit) -> None:
    f = folder / "logs" / f"{stem}.json"
    doc = json.loads(f.read_text())
    edit(doc)
    f.write_text(json.dumps(doc))


def test_packed_runs_in_one_folder_form_a_submission(tmp_path, home, script, capsys):
    folder = tmp_path / "records_run"
    data_args = [f"data.dir={tmp_path / 'data'}", f"+data.tokenizer_path={tmp_path / 't.model'}"]
    args = ["train.log_every=5", *data_args, "resume=checkpoints/last.ckpt"]  # a resumed run's
    packed_seed_runs(folder, (1, 2, 3), script, tmp_path / "data", args=args)
    record = json.loads((folder / "logs" / "seed3.json").read_text())
    assert record["artifact"]["sha256"] == sha256_file(folder / ARTIFACT) and record["config"] == "seed3.yaml"
    assert record["command"] == {
        "env": {"RUN_ID": "seed3", "SEED": "3", "DATA_PATH": str(tmp_path / "data"), "ITERATIONS": "4"},
        "args": args,
    }
    out = tmp_path / "records" / "x"
    assert submission.main([str(folder), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0
    printed = capsys.readouterr().out
    assert f"note: records_run/logs/seed1: its artifact {ARTIFACT} is no longer in its folder" in printed
    assert "records_run/logs/seed3: its artifact" not in printed  # measured: still the folder's file
    names = sorted(p.name for p in out.iterdir())
    logs = [f"train_seed{s}.log" for s in (1, 2, 3)]
    assert names == ["README.md", "requirements.txt", "submission.json", SCRIPT, *logs]
    sub = json.loads((out / "submission.json").read_text())
    assert sub["seeds"] == [1, 2, 3] and sub["seed_results"]["3"]["model_bytes"] == (folder / ARTIFACT).stat().st_size
    sizes = [json.loads((folder / "logs" / f"seed{s}.json").read_text())["artifact"]["bytes"] for s in (1, 2, 3)]
    assert [sub["seed_results"][str(s)]["model_bytes"] for s in (1, 2, 3)] == sizes and len(set(sizes)) == 3
    assert (out / "train_seed2.log").read_text() == (folder / "logs" / "seed2.txt").read_text()
    readme = (out / "README.md").read_text()
    assert "Artifact bytes of seed(s) 1, 2: as their runs recorded them" in readme
    assert "the others are measured from the files." in readme
    assert (  # the run's own command; the data paths are the packed config's, the machine's are dropped
        "SEED=2 RUN_ID=seed2 DATA_PATH=./data/datasets/fineweb10B_sp1024 ITERATIONS=4 "
        "TOKENIZER_PATH=./data/tokenizers/sp.model torchrun --standalone --nproc_per_node=8 train_gpt.py "
        "train.log_every=5\n"
    ) in readme
    reproduce = readme[readme.index("## Reproduce") :]
    assert "python train.py" not in reproduce and str(tmp_path) not in readme  # the packed runs' own commands only
    # the method: the experiment's description (conf/experiment/demo.yaml's comment) and the recipe's settings
    assert "## Method\n\nExperiment `demo` (pgolf's `conf/experiment/demo.yaml`" in readme
    assert ": The demo (also what" in readme and "```yaml\nmodel:" in readme
    # the records one by one pick runs out of the folder, also as relative paths
    cwd = Path.cwd()
    try:
        os.chdir(folder / "logs")
        assert (
            submission.main(["seed1.json", "seed3.json", "--out", "../../two", "--name", "x", "--github-id", "y"]) == 0
        )
    finally:
        os.chdir(cwd)
    assert json.loads((tmp_path / "two" / "submission.json").read_text())["seeds"] == [1, 3]
    runs, notes = load_runs([folder])  # and compare reads them
    assert [r.label for r in runs] == [f"records_run/logs/seed{s}" for s in (1, 2, 3)] and not notes


def test_a_packed_run_without_its_own_record_or_log_is_refused(tmp_path, home, script, capsys):
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1, 2), script, tmp_path / "data")
    out = tmp_path / "records" / "x"
    # a run that did not finish: a log without a record; given in its folder, it counts
    (folder / "logs" / "seed9.txt").write_text("code_bytes:1 code_sha256:" + "0" * 64 + "\n")
    err = refused([folder, "--out", out], capsys)
    assert "f/logs/seed9.txt: a run without its record logs/seed9.json" in err
    assert "give the runs' records one by one (<folder>/logs/<RUN_ID>.json)" in err
    assert load_runs([folder])[1] == ["skipped f/logs/seed9.txt: no record (unfinished or failed)"]
    records = [folder / "logs" / f"seed{s}.json" for s in (1, 2)]
    assert submission.main([*map(str, records), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0
    # a record whose sizes its log does not give
    log = (folder / "logs" / "seed1.txt").read_text()
    lied = re.sub(r"Serialized model int8\+zlib: \d+", "Serialized model x: 5", log)
    (folder / "logs" / "seed1.txt").write_text(lied)
    err = refused([*records, "--out", tmp_path / "o2"], capsys)
    assert "f/logs/seed1: its log's Serialized model line is 5, but its record gives" in err
    # a resumed run's log holds its first part too: one record names it, so it is the run's own log
    (folder / "logs" / "seed1.txt").write_text(log.replace("seed:1\n", "seed:1\nterminated: SIGTERM\n") + log)
    assert submission.main([*map(str, records), "--out", str(tmp_path / "o3"), "--name", "x", "--github-id", "y"]) == 0
    # a reused RUN_ID: two records name one log
    (folder / "logs" / "seed1.txt").write_text(log)
    (folder / "logs" / "seed1.2.json").write_bytes((folder / "logs" / "seed1.json").read_bytes())
    err = refused([*records, "--out", tmp_path / "o4"], capsys)
    assert "f/logs/seed1: its log logs/seed1.txt is also the log of seed1.2.json (RUN_ID was reused)" in err
    (folder / "logs" / "seed9.txt").unlink()
    assert "seed1.txt: the log of 2 runs (seed1.2.json, seed1.json: RUN_ID was reused)" in refused(
        [folder, "--out", tmp_path / "o5"], capsys
    )
    (folder / "logs" / "seed1.2.json").unlink()
    (folder / "logs" / "seed1.json").write_text("[1, 2]")  # not a record
    assert "f/logs/seed1: unreadable run (seed1.json: not a packed run's record" in refused(
        [*records, "--out", tmp_path / "o6"], capsys
    )
    # a file that is no run at all: one line
    for f in (folder / "logs" / "seed2.txt", folder / "results.json"):
        assert "not a run directory" in refused([f, "--out", tmp_path / "o7"], capsys)
    # a packed folder that lost its script: the message says so, given as the folder or as a record
    (folder / "logs" / "seed1.json").write_bytes((folder / "logs" / "seed2.json").read_bytes())
    (folder / SCRIPT).unlink()
    for given in (folder, folder / "logs" / "seed2.json"):
        err = refused([given, "--out", tmp_path / "o8"], capsys)
        assert f"f: a folder of packed runs without its {SCRIPT}" in err, err


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["results"].update(roundtrip="x"), "(results.roundtrip is missing or has the wrong type)"),
        (lambda d: d["results"]["roundtrip"]["standard"].update(val_bpb="1.1"), "(results.roundtrip.standard.val_bpb "),
        (lambda d: d["results"]["roundtrip"]["standard"].update(tokens="9"), "(results.roundtrip.standard.tokens "),
        (lambda d: d.update(artifact="x"), "(artifact is missing or has the wrong type)"),
        (lambda d: d["artifact"]["meta"].update(code="x"), "(artifact.meta.code is missing"),
        (lambda d: d.update(command=["x"]), "(command is missing or has the wrong type)"),
        (lambda d: d["command"].update(env="x"), "(command.env is missing or has the wrong type)"),
        (lambda d: d["command"]["env"].update(SEED=1), "(command.env is missing or has the wrong type)"),
        (lambda d: d["results"].update(training=None), "(results.training.train_time_ms is missing"),
        (lambda d: d["results"]["training"].update(steps="4"), "(results.training.steps is missing"),
        (lambda d: d["results"].update(compliance={"reasons": "x"}), "(results.compliance.reasons is missing"),
        (lambda d: d["results"]["export"].update(limit_bytes="x"), "(results.export.limit_bytes is missing"),
        (lambda d: d["results"]["export"].update(path=3), "(results.export.path is missing"),
        (lambda d: d.update(log=["x"]), "f/logs/seed1.txt: a run without its record"),  # no record names it
        (lambda d: d.update(config="seed1.txt"), "logs/seed1.txt: not a run's resolved config"),
        (lambda d: d.update(config="../x.yaml"), "its config '../x.yaml' is not a file name in logs/"),
        (lambda d: d.update(config="nosuch.yaml"), "logs/nosuch.yaml: missing"),
    ],
)
def test_a_malformed_record_is_one_line(tmp_path, home, script, capsys, edit, match):
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1, 2), script, tmp_path / "data")
    edit_record(folder, "seed1", edit)
    err = refused([folder, "--out", tmp_path / "o"], capsys)
    assert match in err and str(tmp_path) not in err


def set_cap(folder: Path, seconds: float, log: bool = True) -> None:
    """The runs' wall-clock cap in their configs and (`log`) their logs' header lines."""
    for f in (folder / "logs").glob("*.yaml"):
        cfg = OmegaConf.load(f)
        cfg.train.max_wallclock_seconds = seconds
        OmegaConf.save(cfg, f)
        if log:
            t = f.with_suffix(".txt")
            t.write_text(re.sub(r"max_wallclock_seconds:\S+", f"max_wallclock_seconds:{seconds}", t.read_text()))


def test_a_packed_run_must_agree_with_its_log_its_artifact_and_the_track(tmp_path, home, script, capsys, monkeypatch):
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1, 2), script, tmp_path / "data")
    out = tmp_path / "o"
    good = (folder / "logs" / "seed1.json").read_text()
    # a score, another mode's score, a pre_quant score, a training time or a seed that the log does not give
    edit_record(folder, "seed1", lambda d: d["results"]["roundtrip"]["standard"].update(val_bpb=0.9))
    assert "f/logs/seed1: its standard val_bpb 0.90000000 is not in its log's " in refused(
        [folder, "--out", out], capsys
    )
    (folder / "logs" / "seed1.json").write_text(good)
    log = (folder / "logs" / "seed1.txt").read_text()
    (folder / "logs" / "seed1.txt").write_text(log + "final_int8_zlib_sliding_window_exact val_loss:1.0 val_bpb:0.8\n")
    edit_record(folder, "seed1", lambda d: d["results"]["roundtrip"]["standard"].update(val_loss=1.0, val_bpb=0.8))
    assert "standard val_bpb 0.80000000 is not in its log's `final_int8_zlib_roundtrip_exact` line" in refused(
        [folder, "--out", out], capsys
    )
    (folder / "logs" / "seed1.txt").write_text(log)
    (folder / "logs" / "seed1.json").write_text(good)
    edit_record(folder, "seed1", lambda d: d["results"]["export"]["pre_quant"].update(val_bpb=1.5))
    assert "f/logs/seed1: its pre_quant val_bpb 1.5000 is not its log's" in refused([folder, "--out", out], capsys)
    (folder / "logs" / "seed1.json").write_text(good)
    edit_record(folder, "seed1", lambda d: d["results"]["training"].update(train_time_ms=1.5))
    assert "f/logs/seed1: its train_time_ms 1.5 is not its log's last step line's (401 ms)" in refused(
        [folder, "--out", out], capsys
    )
    (folder / "logs" / "seed1.json").write_text(good)
    edit_record(folder, "seed1", lambda d: d["command"]["env"].update(SEED="01"))  # int("01") == 1, as the reference
    assert submission.main([str(folder), "--out", str(tmp_path / "o0"), "--name", "x", "--github-id", "y"]) == 0
    (folder / "logs" / "seed1.json").write_text(good)
    edit_record(folder, "seed1", lambda d: d["command"]["env"].update(SEED="7"))
    assert "f/logs/seed1: its config's seed 1 is not its command's (SEED=7)" in refused([folder, "--out", out], capsys)
    (folder / "logs" / "seed1.json").write_text(good)
    # the last run's artifact (results.json is its) must be the file it recorded
    art = (folder / ARTIFACT).read_bytes()
    (folder / ARTIFACT).write_bytes(b"XXXX" + art[4:])
    err = refused([folder, "--out", out], capsys)
    assert f"f/logs/seed2: its artifact {ARTIFACT} is unreadable, and no later run replaced it" in err
    (folder / ARTIFACT).unlink()
    assert f"f/logs/seed2: its artifact {ARTIFACT} is missing" in refused([folder, "--out", out], capsys)
    meta = json.loads((folder / "logs" / "seed2.json").read_text())["artifact"]["meta"]
    write_artifact(folder / ARTIFACT, {}, meta, "lzma")  # its metadata, other bytes: an altered file
    err = refused([folder, "--out", out], capsys)
    assert f"f/logs/seed2: its artifact {ARTIFACT} is not the one it recorded (same metadata, other bytes)" in err
    # a later run that wrote its artifact and stopped before its results.json: seed 2's sizes are as recorded
    write_artifact(folder / ARTIFACT, {}, {**meta, "seed": 3}, "zlib")
    assert submission.main([str(folder), "--out", str(tmp_path / "o1"), "--name", "x", "--github-id", "y"]) == 0
    assert "recorded them" in (tmp_path / "o1" / "README.md").read_text()
    (folder / ARTIFACT).write_bytes(art)
    # the limit is the track's, whatever the run set
    size = json.loads(good)["results"]["export"]["total_bytes"]
    edit_record(folder, "seed1", lambda d: d["results"]["export"].update(limit_bytes=10**9))
    assert submission.main([str(folder), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0  # within
    with monkeypatch.context() as m:  # a track limit below the run's artifact
        m.setattr(submission, "ARTIFACT_LIMIT_BYTES", size - 1)
        assert f"+ {SCRIPT} is {size:,} bytes, over the {size - 1:,}-byte limit" in refused(
            [folder, "--out", tmp_path / "o2"], capsys
        )
    # over 10 minutes of training without the track's wall-clock cap
    edit_record(folder, "seed1", lambda d: d["results"]["training"].update(train_time_ms=700_000.0))
    log = folder / "logs" / "seed1.txt"
    log.write_text(log.read_text().replace("train_time:401ms", "train_time:700000ms"))
    set_cap(folder, 0)
    assert "f/logs/seed1: it trained 700.0 s without a wall-clock cap of at most 600 s" in refused(
        [folder, "--out", tmp_path / "o3"], capsys
    )
    other_track = ["--out", str(tmp_path / "o5"), "--name", "x", "--github-id", "y", "--track", "non_record_16mb"]
    assert submission.main([str(folder), *other_track]) == 0  # the 10-minute rule is the 10min_16mb track's
    with pytest.raises(SubmissionError, match="--track track_10min_16mb: not a track of the challenge"):
        submission.assemble([folder], tmp_path / "o6", name="x", github_id="y", track="track_10min_16mb")
    set_cap(folder, 600, log=False)  # the config says capped, but the log shows the run's own cap: 0
    assert "it trained 700.0 s without a wall-clock cap" in refused([folder, "--out", tmp_path / "o7"], capsys)
    set_cap(folder, 600)  # capped: the clock stopped it at a step past 600 s
    assert submission.main([str(folder), "--out", str(tmp_path / "o4"), "--name", "x", "--github-id", "y"]) == 0


def test_runs_of_different_recipes_or_the_same_label_are_told_apart(tmp_path, home, script, capsys):
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1, 2, 3), script, tmp_path / "data", config={"train.iterations": 8})
    assert "the runs ran different recipes (their configs differ in train.iterations" in refused(
        [folder, "--out", tmp_path / "o"], capsys
    )
    # what the packer resets (logger, data folders, devices) is not the recipe
    other = tmp_path / "g"
    packed_seed_runs(other, (1, 2), script, tmp_path / "elsewhere", config={"logger.kind": "wandb"}, world=2)
    assert submission.main([str(other), "--out", str(tmp_path / "o1"), "--name", "x", "--github-id", "y"]) == 0
    readme = (tmp_path / "o1" / "README.md").read_text()
    assert "--nproc_per_node=2" in readme and "--nproc_per_node=8" not in readme  # each run's own process count
    # two folders of one name, runs of one RUN_ID: each run keeps its own sizes
    a, b = tmp_path / "a" / "f", tmp_path / "b" / "f"
    packed_seed_runs(a, (1,), script, tmp_path / "data", run_ids=["main"])
    packed_seed_runs(b, (2,), script, tmp_path / "data", run_ids=["main"])
    assert submission.main([str(b), str(a), "--out", str(tmp_path / "o2"), "--name", "x", "--github-id", "y"]) == 0
    sub = json.loads((tmp_path / "o2" / "submission.json").read_text())
    sizes = {s: json.loads((d / "logs" / "main.json").read_text())["artifact"]["bytes"] for s, d in ((1, a), (2, b))}
    assert {s: sub["seed_results"][str(s)]["model_bytes"] for s in (1, 2)} == sizes and len(set(sizes.values())) == 2


def test_a_train_py_run_must_agree_with_its_log_and_mode_choices_are_checked(tmp_path, home, script, capsys):
    runs = [fake_run(tmp_path / "sw", s, script, [], tmp_path / "d") for s in (0, 1)]
    out = tmp_path / "o"
    good = json.loads((runs[1] / "results.json").read_text())
    edit_results(runs[1], roundtrip={"standard": {**good["roundtrip"]["standard"], "val_bpb": 1.0}})
    assert "sw/1_seed1: its standard val_bpb 1.00000000 is not in its log's `final_int8_zlib_roundtrip_exact`" in (
        refused([*runs, "--out", out], capsys)
    )
    (runs[1] / "results.json").write_text(json.dumps(good))
    edit_results(runs[1], training={"steps": 4, "train_time_ms": "x"})
    assert "results.json: not a run's results (results.training.train_time_ms is missing or has the wrong type)" in (
        refused([*runs, "--out", out], capsys)
    )
    edit_results(runs[1], training={"steps": 3, "train_time_ms": 400.0})
    assert "sw/1_seed1: its steps 3 are not its log's last step (4)" in refused([*runs, "--out", out], capsys)
    (runs[1] / "results.json").write_text(json.dumps(good))
    # a validation line after the last step (its clock reads later) and a preempted attempt before a resume
    log = (runs[1] / "train.log").read_text()
    val = "step:4/4 val_loss:4.0 val_bpb:1.3 train_time:450ms step_avg:112.50ms\n"
    first = "train_batch_tokens:8 max_wallclock_seconds:0\nseed:1\nstep:9/9 train_loss:4.0 train_time:4118ms\n"
    (runs[1] / "train.log").write_text(first + "train_batch_tokens:8 max_wallclock_seconds:0\n" + log + val)
    edit_results(runs[1], training={"steps": 4, "train_time_ms": 400.2})
    assert submission.main([*map(str, runs), "--out", str(out), "--name", "x", "--github-id", "y"]) == 0
    # --mode: never the float diagnostic, and only a mode every run has
    ttt = {"artifact": ARTIFACT, "results": {"ttt": eval_result(1.1)}}
    (runs[0] / "eval").mkdir()
    (runs[0] / "eval" / "eval_result.json").write_text(json.dumps(ttt))
    assert "--mode ttt: 1 of the 2 runs lack it" in refused([*runs, "--out", tmp_path / "o2", "--mode", "ttt"], capsys)
    (runs[1] / "eval").mkdir()
    (runs[1] / "eval" / "eval_result.json").write_text(json.dumps(ttt))
    assert submission.main([*map(str, runs), "--out", str(tmp_path / "o4"), "--name", "x", "--github-id", "y"]) == 0
    readme = (tmp_path / "o4" / "README.md").read_text()
    assert "The `ttt` scores come from a later `python eval.py` of the artifact (eval/eval_result.json)" in readme
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1, 2), script, tmp_path / "data")
    assert "--mode pre_quant: a diagnostic of the float weights, never a score" in refused(
        [folder, "--out", tmp_path / "o3", "--mode", "pre_quant"], capsys
    )


def test_each_readme_command_has_its_own_runs_process_count(tmp_path, home, script):
    folder = tmp_path / "f"
    packed_seed_runs(folder, (1,), script, tmp_path / "data", world=2)
    packed = load_packed_run(folder / "logs" / "seed1.json")
    plain = load_run(fake_run(tmp_path / "sw", 0, script, [], tmp_path / "d"))
    code = submission.Code(script, "0" * 64, {}, 8, {}, {packed.key: 2})
    cmds = submission.packed_commands([packed, plain], code)
    assert "--nproc_per_node=2 train_gpt.py" in cmds[0]
    assert "--nproc_per_node=8 train_gpt.py" in cmds[1]  # the runs' count, not the packed run's before it


def test_the_method_section_describes_the_experiment_without_machine_paths():
    """The README's method: the experiment file's comment (none for a name no file can have) and the recipe's
    settings as YAML, with absolute paths scrubbed before YAML quotes or escapes them."""
    assert submission.experiment_description("n" * 300) is None and submission.experiment_description("a\0b") is None
    assert submission.experiment_description("record_1263").startswith("PR #1263")
    cfg = {"model": {"num_layers": 2}, "callbacks": {"extra": {"cb": {"dirpath": "/home/alice/ckpt dir/x"}}}}
    run = SimpleNamespace(config=cfg, identity=SimpleNamespace(experiment="record_1263"))
    text = "\n".join(submission.method_lines([run]))
    assert "Experiment `record_1263`" in text and "num_layers: 2" in text
    assert "/home/alice" not in text and find_machine_paths(text) == []


def test_seed_runs_may_differ_in_what_they_log_but_not_in_their_recipe():
    """TRAIN_LOG_EVERY and VAL_BATCH_SIZE change what a packed run logs along the way, not what it trains or
    scores: runs that differ only there form one submission; a recipe key still refuses."""

    def run(log_every, val_batch, seq_len=64):
        cfg = {"train": {"log_every": log_every, "seq_len": seq_len}, "data": {"val_batch_tokens": val_batch}}
        return SimpleNamespace(record={}, config=cfg)

    submission.check_recipes([run(1, 4096), run(7, 8192)])
    with pytest.raises(SubmissionError, match=r"their configs differ in train.seq_len:"):
        submission.check_recipes([run(1, 4096), run(1, 4096, 32)])
    cfg = {"train": {"log_every": 1, "seq_len": 64}}
    assert (
        submission.without(cfg, ["train.log_every", "x.y"]) == {"train": {"seq_len": 64}} and cfg["train"]["log_every"]
    )


def test_an_existing_out_is_refused_and_left_as_it_was(tmp_path, home, script):
    runs = [fake_run(tmp_path / "sweep", s, script, [], tmp_path / "d") for s in (0, 1)]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    for out, what in ((tmp_path / "folder", "is not empty"), (tmp_path / "afile", "is a file, not a folder")):
        with pytest.raises(SubmissionError, match=f"already exists and {what}; choose another --out"):
            submission.assemble(runs, out, name="x", github_id="y")
    assert (tmp_path / "folder" / "mine.txt").read_text() == (tmp_path / "afile").read_text() == "mine"
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["mine.txt"]
