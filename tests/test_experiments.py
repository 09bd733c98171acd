"""Experiments as users run them: sweeps (joblib, DDP jobs, the SLURM launcher config), W&B offline runs,
compare and the submission folder on real tiny runs."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pgolf.tools import compare, submission
from pgolf.tools.pack import unpack
from pgolf.tools.sweep import relaunch_command
from pgolf.train.identity import identity, identity_of_dir, variant_items

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.iterations=3",
    "train.max_wallclock_seconds=0",
    "train.warmdown_iters=2",
    "train.log_every=1",
    "final_eval.batch_windows=8",
    "final_eval.modes=[standard]",
    "callbacks.progress=none",
]


def offline_env(tmp_path: Path) -> dict:
    """No W&B credentials: logger=wandb must go offline by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true")
    return env


def train(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


# ---- the W&B offline run file (LevelDB log format of protobuf records, as `wandb sync` reads it) -------------
def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def wandb_run(run_dir: Path) -> dict:
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*"))  # exactly one run per job
    (f,) = offline.glob("run-*.wandb")
    info: dict = {"history": [], "summary": {}, "exit": None, "runs": 0}
    for rec in wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            info["runs"] += 1
            r = rec.run
            info.update(project=r.project, group=r.run_group, name=r.display_name, tags=list(r.tags))
            info["config"] = {i.key: json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            info["history"].append(row)
        elif kind == "summary":
            for i in rec.summary.update:
                info["summary"]["/".join(i.nested_key) or i.key] = json.loads(i.value_json)
        elif kind == "exit":
            info["exit"] = rec.exit.exit_code
    return info


# ---- a 2-variant x 2-seed ablation through the joblib launcher, logged to W&B offline ---------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, synth_dir):
    pytest.importorskip("wandb")
    d = tmp_path_factory.mktemp("sweep")
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, f"data.root={synth_dir.parent}"]
    args += ["train.val_every=2", "logger=wandb", "seed=0,1", "model.mlp_act=relu2,leaky_relu2", f"hydra.sweep.dir={d}"]
    train(args, offline_env(d))
    return d


def test_sweep_jobs_hold_config_logs_metrics_artifact_results(sweep):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_seed0", "1_seed0", "2_seed1", "3_seed1"]
    for j in jobs:
        for f in (".hydra/config.yaml", ".hydra/resolved.yaml", "train.log", "csv/metrics.csv", "results.json"):
            assert (j / f).is_file(), (j.name, f)
        assert (j / "final_model.int8_zlib.ptz").is_file()
        resolved = OmegaConf.load(j / ".hydra" / "resolved.yaml")
        assert resolved.model.vocab_size == 256  # interpolations resolved
        assert "train_loss" in (j / "csv" / "metrics.csv").read_text().splitlines()[0]
        # the periodic validation's line (the clock pauses for it and prints it inside fit)
        assert "step:2/3 val_loss:" in (j / "train.log").read_text()
    assert [identity_of_dir(j).group for j in jobs] == [
        "demo[model.mlp_act=relu2]",
        "demo[model.mlp_act=leaky_relu2]",
        "demo[model.mlp_act=relu2]",
        "demo[model.mlp_act=leaky_relu2]",
    ]


def test_wandb_offline_run_per_job_with_identity_curves_and_results(sweep):
    for j in sorted(p for p in sweep.iterdir() if p.is_dir()):
        res = json.loads((j / "results.json").read_text())
        ident = identity_of_dir(j)
        w = wandb_run(j)
        assert w["runs"] == 1 and w["exit"] == 0
        assert w["project"] == "pgolf" and w["group"] == ident.group and w["name"] == f"{ident.group}-seed{ident.seed}"
        assert {f"seed:{ident.seed}", "exp:demo", *(f"{k}={v}" for k, v in ident.variant_items)} <= set(w["tags"])
        assert w["config"]["seed"] == ident.seed and w["config"]["model"]["vocab_size"] == 256  # resolved config
        steps = [h["trainer/global_step"] for h in w["history"] if "train_loss" in h]
        assert steps == [1, 2, 3]
        assert any("val_bpb" in h for h in w["history"])  # the validation curve
        s = w["summary"]
        assert s["roundtrip/standard/val_bpb"] == pytest.approx(res["roundtrip"]["standard"]["val_bpb"])
        assert s["roundtrip/standard/compliant"] is True
        assert s["export/model_bytes"] == res["export"]["model_bytes"] and s["export/total_bytes"] > 0
        assert s["export/path"] == "final_model.int8_zlib.ptz"  # no machine path in the summary
        assert s["training/steps"] == 3 == res["training"]["steps"] and s["training/train_time_ms"] > 0


def test_compare_on_the_sweep(sweep, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([str(sweep), "--baseline", "demo[model.mlp_act=relu2]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "demo[model.mlp_act=leaky_relu2]  standard" in printed and "compare: 4 runs, 2 groups" in printed
    data = json.loads((out / "compare.json").read_text())
    (c,) = [c for c in data["comparisons"] if c["mode"] == "standard"]
    assert c["baseline"] == "demo[model.mlp_act=relu2]" and c["rule_met"] is False  # 3 steps prove nothing
    for png in ("curves.png", "final_bpb.png"):
        assert (out / png).stat().st_size > 10_000
    runs, _ = compare.load_runs([sweep])
    assert all([v[0] for v in r.val_curve] == [0, 2, 3] and len(r.train_curve) == 3 for r in runs)


def test_submission_folder_from_one_group(sweep, tmp_path):
    jobs = [sweep / "0_seed0", sweep / "2_seed1"]
    out = tmp_path / "records" / "2026-05-01_Tiny"
    rc = submission.main(
        [*map(str, jobs), "--out", str(out), "--name", "Tiny leaky", "--github-id", "someone"]
        + ["--baseline", str(sweep / "1_seed0"), str(sweep / "3_seed1")]
    )
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "requirements.txt",
        "submission.json",
        "train_gpt.py",
        "train_seed0.log",
        "train_seed1.log",
    ]
    sub = json.loads((out / "submission.json").read_text())
    script = (out / "train_gpt.py").read_bytes()
    assert script == (jobs[0] / "train_gpt.py").read_bytes() == (jobs[1] / "train_gpt.py").read_bytes()
    assert sub["bytes_code"] == len(script) == res_code_bytes(jobs[0]) and len(sub["code_sha256"]) == 64
    for key in ("author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_bpb_std"):
        assert sub[key] is not None, key
    assert sub["seeds"] == [0, 1] and set(sub["seed_results"]) == {"0", "1"}
    res0 = json.loads((jobs[0] / "results.json").read_text())
    assert sub["seed_results"]["0"]["val_bpb"] == pytest.approx(res0["roundtrip"]["standard"]["val_bpb"], abs=1e-8)
    assert sub["seed_results"]["0"]["artifact_bytes"] == res0["export"]["total_bytes"]
    assert sub["bytes_total"] == max(v["artifact_bytes"] for v in sub["seed_results"].values())
    assert sub["eval_mode"] == "standard" and sub["eval_modes"]["standard"]["compliant"] is True
    assert sub["eval_modes"]["pre_quant"]["diagnostic"] is True
    assert sub["comparison"]["baseline_group"] == "demo[model.mlp_act=leaky_relu2]"
    assert "torch==" in (out / "requirements.txt").read_text()
    readme = (out / "README.md").read_text()
    assert "python train.py -m" in readme and "seed=0,1" in readme and "| 1 |" in readme
    assert "SEED=1 RUN_ID=seed1 DATA_PATH=./data/datasets/shards" in readme
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    for f in out.iterdir():
        text = f.read_text()
        if f.name == "train_gpt.py":  # what the file holds, not the digits of its compressed payload
            payload, sources = unpack(f.read_bytes())
            text = json.dumps(payload) + "\n".join(sources.values())
        assert submission.find_machine_paths(text) == [], (f.name, submission.find_machine_paths(text))
        assert str(sweep) not in text and str(ROOT) not in text
    assert "step:3/3 train_loss:" in (out / "train_seed0.log").read_text()
    # never overwritten; several groups are refused
    assert submission.main([str(jobs[0]), "--out", str(out), "--name", "x", "--github-id", "y"]) == 2
    assert submission.main([str(sweep), "--out", str(tmp_path / "o2"), "--name", "x", "--github-id", "y"]) == 2


def res_code_bytes(job: Path) -> int:
    return json.loads((job / "results.json").read_text())["export"]["code_bytes"]


# ---- a multirun job with two processes: one torchrun, one process group, one W&B run ------------------------
@pytest.mark.slow
def test_ddp_job_of_a_multirun_runs_as_one_torchrun(tmp_path, synth_dir):
    pytest.importorskip("wandb")
    d = tmp_path / "ddp"
    args = ["-m", *TINY, f"data.root={synth_dir.parent}", "trainer=ddp_cpu", "logger=wandb", "seed=0"]
    r = train([*args, f"hydra.sweep.dir={d}"], offline_env(tmp_path))
    assert sorted(p.name for p in d.iterdir()) == ["0_seed0", "multirun.yaml"]
    job = d / "0_seed0"
    log = (job / "train.log").read_text()
    assert log.count("world_size:2 ") == 1 and log.count("final_int8_zlib_roundtrip_exact") == 1
    assert not list(job.glob("train_ddp_process_*.log"))  # Lightning did not re-run the sweep in children
    w = wandb_run(job)  # one offline run although two processes ran the job
    assert w["runs"] == 1 and w["exit"] == 0 and w["group"] == "demo" and w["name"] == "demo-seed0"
    assert "Launching 1 jobs locally" in r.stdout + r.stderr


# ---- configs and launchers without running anything -----------------------------------------------------------
def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("exp", ["demo", "baseline"])
def test_sweep_and_ablation_overrides_compose(exp):
    cfg = compose_train([f"experiment={exp}", "seed=42", "model.mlp_act=leaky_relu2", "variant=leaky"])
    assert cfg.name == exp and cfg.seed == 42 and cfg.model.mlp_act == "leaky_relu2"
    assert identity(cfg.name, cfg.seed, cfg.variant, [], []).group == f"{exp}[leaky]"


@pytest.mark.parametrize(("trainer", "gpus", "nodes"), [("ddp", 8, 1), ("gpu", 1, 1)])
def test_slurm_launcher_takes_gpus_and_tasks_from_the_trainer(trainer, gpus, nodes):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train(["hydra/launcher=slurm", f"trainer={trainer}", "hydra.launcher.partition=gpu"])
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("SlurmLauncher")
    assert (lc.gpus_per_node, lc.tasks_per_node, lc.nodes) == (gpus, gpus, nodes)
    assert lc.timeout_min >= 20 and lc.partition == "gpu"


def test_slurm_launcher_writes_an_sbatch_script_with_one_task_per_gpu(monkeypatch, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists
    seen = {}

    def capture(executor, fn, *iterables):  # instead of sbatch: keep the script it would submit
        seen["script"] = executor._executor._make_submission_file_text("CMD", "uid")
        seen["jobs"] = len(iterables[0])
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    cfg = compose_train(
        ["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.partition=h100", f"hydra.sweep.dir={tmp_path}"]
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    assert launcher.launch([["seed=1337"], ["seed=42"], ["seed=2025"]], initial_job_idx=0) == []
    script = seen["script"]
    for flag in ("--gpus-per-node=8", "--ntasks-per-node=8", "--nodes=1", "--time=40", "--partition=h100"):
        assert f"#SBATCH {flag}" in script, flag
    assert seen["jobs"] == 3 and "srun" in script


def test_joblib_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cfg = compose_train(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def test_variant_is_the_swept_keys_other_than_seed():
    sweep = ["model=tiny", "seed=1,2,3", "model.ema=true,false", "+x=range(0,2)", "experiment=demo,baseline"]
    job = ["model=tiny", "seed=2", "model.ema=false", "+x=1", "experiment=baseline"]
    assert variant_items(job, sweep) == (("model.ema", "false"), ("x", "1"))
    ident = identity("baseline", 2, None, job, sweep)
    assert ident.group == "baseline[model.ema=false,x=1]" and ident.job_name == "baseline[model.ema=false,x=1]-seed2"
    assert identity("demo", 1, None, ["seed=1"], ["seed=1,2"]).group == "demo"
    assert identity("demo", 1, "mine", job, sweep).group == "demo[mine]"  # an explicit variant wins


def test_relaunch_only_for_local_multi_process_multirun_jobs(tmp_path):
    from hydra.types import RunMode

    cfg = compose_train(["trainer=ddp_cpu", "seed=3", "train.iterations=5"])
    hc = cfg.hydra
    OmegaConf.set_readonly(hc, False)
    hc.runtime.output_dir = str(tmp_path / "0_seed3")
    hc.runtime.cwd = str(ROOT)
    hc.job.config_name = "train"
    hc.overrides.task = ["trainer=ddp_cpu", "seed=3", "train.iterations=5"]
    hc.mode = RunMode.MULTIRUN
    cmd = relaunch_command(cfg, hc, ROOT / "train.py", env={})
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py")]
    assert cmd[6:9] == ["trainer=ddp_cpu", "seed=3", "train.iterations=5"]
    assert f'hydra.run.dir="{tmp_path / "0_seed3"}"' in cmd and "hydra.output_subdir=null" in cmd
    assert relaunch_command(cfg, hc, "train.py", env={"LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None  # a child
    assert relaunch_command(cfg, hc, "train.py", env={"SLURM_NTASKS": "2"}) is None  # srun started the tasks
    hc.mode = RunMode.RUN
    assert relaunch_command(cfg, hc, "train.py", env={}) is None  # a single run: Lightning starts the ranks
    cpu = compose_train(["trainer=cpu"])
    OmegaConf.set_readonly(cpu.hydra, False)
    cpu.hydra.mode = RunMode.MULTIRUN
    assert relaunch_command(cpu, cpu.hydra, "train.py", env={}) is None  # one process: nothing to do


def test_wandb_mode_follows_credentials(monkeypatch, tmp_path):
    from pgolf.train.wandb_logger import resolve_mode

    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="logger.mode"):
        resolve_mode("sometimes")
