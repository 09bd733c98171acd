"""A run directory belongs to one run (pgolf/tools/rundir.py, conf/train.yaml's hydra.run.dir): same-second
runs get their own directory, a directory that holds another run's outputs is refused, two runs racing for
one directory cannot both get it, and an explicit resume continues a run in its own directory."""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.config.typed import ConfigError
from pgolf.tools import rundir
from pgolf.tools.rundir import CLAIM, CLAIM_ENV, claim, discard_unused, hand_over, leave, release, write_hydra_files

CONF = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture(autouse=True)
def no_inherited_claim(monkeypatch):
    monkeypatch.delenv(CLAIM_ENV, raising=False)


@pytest.mark.parametrize("debug", [None, "smoke"])
def test_run_directories_of_runs_started_in_the_same_second_differ(debug):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"debug={debug}"] if debug else [], return_hydra_config=True)
    hc = cfg.hydra
    for pattern in (OmegaConf.to_container(hc.run)["dir"], OmegaConf.to_container(hc.sweep)["dir"]):
        fmt = pattern.split("${now:")[1].split("}")[0]
        a, b = datetime(2026, 5, 1, 12, 0, 0, 1), datetime(2026, 5, 1, 12, 0, 0, 2)  # one microsecond apart
        assert a.strftime(fmt) != b.strftime(fmt), pattern
    # Hydra writes nothing into the directory before train.py's claim
    assert hc.output_subdir is None and hc.job_logging.handlers.file.delay is True


def test_a_directory_with_another_runs_outputs_is_refused_and_left_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = Path("outputs") / "demo" / "run"
    (d / "checkpoints").mkdir(parents=True)
    (d / "results.json").write_text("{}")
    (d / "final_model.int8_zlib.ptz").write_bytes(b"artifact")
    (d / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    with pytest.raises(ConfigError) as e:
        claim(d, None, ["seed=2"])
    msg = str(e.value)
    assert "already holds another run's outputs (checkpoints, final_model.int8_zlib.ptz, results.json)" in msg
    assert msg.startswith("run directory outputs/demo/run already holds") and str(tmp_path) not in msg
    assert msg.endswith("or continue that run with resume=outputs/demo/run/checkpoints/last.ckpt")
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before and (d / "results.json").read_text() == "{}"


def test_only_hydras_own_files_may_be_there_before_the_claim(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("")  # Hydra's log handler without `delay`
    assert claim(tmp_path, None, []) == "new"
    assert (tmp_path / CLAIM).is_file()
    with pytest.raises(ConfigError, match=r"\(train.log, \.pgolf-run\.json\)|\(\.pgolf-run\.json\)"):
        claim(tmp_path, None, [])  # a second run: the first one's claim is there


def test_runs_racing_for_one_directory_cannot_both_get_it(tmp_path):
    d, n = tmp_path / "run", 8
    start = threading.Barrier(n)
    won, refused = [], []

    def one():
        start.wait()
        try:
            won.append(claim(d, None, []))
        except ConfigError:
            refused.append(1)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert won == ["new"] and len(refused) == n - 1


def test_resume_from_a_checkpoint_inside_continues_in_that_directory(tmp_path):
    d = tmp_path / "run"
    claim(d, None, [])
    (d / "checkpoints").mkdir()
    ck = d / "checkpoints" / "last.ckpt"
    ck.write_bytes(b"ckpt")
    with pytest.raises(ConfigError):
        claim(d, str(tmp_path / "elsewhere" / "last.ckpt"), [])  # resuming another run's checkpoint: refused
    assert claim(d, str(ck), ["resume=..."]) == "resumed"
    assert rundir.read_claim(d)["resumed_from"] == "checkpoints/last.ckpt"


def test_a_relaunched_job_takes_over_its_parents_claim(tmp_path, monkeypatch):
    claim(tmp_path, None, [])
    hand_over(tmp_path)  # the parent, before starting torchrun
    assert claim(tmp_path, None, []) == "inherited"  # its rank 0
    monkeypatch.setenv(CLAIM_ENV, "another token")
    with pytest.raises(ConfigError):
        claim(tmp_path, None, [])


def test_a_run_refused_after_its_claim_leaves_nothing(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["seed=3"])
        hydra_cfg = OmegaConf.create({"hydra": compose("train", ["seed=3"], return_hydra_config=True).hydra})
    d = tmp_path / "run"
    how = claim(d, None, ["seed=3"])
    write_hydra_files(d, cfg, hydra_cfg, None)  # as Hydra writes them (read by pgolf/tools/runs.py, identity.py)
    assert OmegaConf.load(d / ".hydra" / "overrides.yaml") == ["seed=3"]
    assert OmegaConf.load(d / ".hydra" / "config.yaml") == cfg
    assert "hydra" in OmegaConf.load(d / ".hydra" / "hydra.yaml")
    release(d, how)
    assert not d.exists()
    claim(d, None, [])
    (d / "results.json").write_text("{}")
    release(d, "new")
    assert (d / "results.json").is_file()  # never removes what it did not write
    assert not discard_unused(d) and d.is_dir()


def test_the_jobs_other_processes_leave_their_own_directory(tmp_path):
    d = tmp_path / "rank1"
    d.mkdir()
    handler = logging.FileHandler(d / "train.log", delay=True)  # Hydra's, in the directory Hydra made for it
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        leave(d)
        assert handler not in root.handlers and not d.exists()
    finally:
        root.removeHandler(handler)
    shared = tmp_path / "rank0"
    claim(shared, None, [])
    leave(shared)  # rank 0's (Lightning's DDP processes are told it): kept
    assert (shared / CLAIM).is_file()
