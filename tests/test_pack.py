"""The packed train_gpt.py (pgolf/tools/pack.py): what it holds, that it runs with no pgolf importable and
gives the losses and val_bpb of `python train.py`, the size rule, and the submission folder built around it."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from callbacks.checkpoint import resume_command, resume_hint
from pgolf import optional
from pgolf.config.runtime import PART_RULES, check_parts, uses_doc_attention
from pgolf.config.typed import ConfigError
from pgolf.eval import registry
from pgolf.export.code import code_record, requirement_pins
from pgolf.io import sha256_file
from pgolf.quant.artifact import read_artifact, write_artifact
from pgolf.tools import packsource, submission
from pgolf.tools.pack import (
    ALPHABET,
    BOOTSTRAP,
    SCRIPT,
    bootstrap,
    check_no_machine_paths,
    compose_train,
    decode_payload,
    encode_payload,
    extra_refs,
    pack,
    pack_key,
    packed_config,
    packed_modules,
    part_modules,
    unpack,
)
from pgolf.tools.packsource import (
    Module,
    PackError,
    compact,
    drop_mode_registrations,
    drop_registrations,
    minify,
    runtime_modules,
    shake,
    shaken,
    strip,
    unparse,
)
from pgolf.train.run import kept_files
from pgolf.train.standalone import (
    check_config,
    check_run_id,
    config_path,
    main,
    parse_env,
    run_config,
    run_id_of,
    set_by,
    unread_note,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny",
    "data=synthetic",
    "train.seq_len=32",
    "train.batch_tokens=1024",
    "train.iterations=4",
    "train.max_wallclock_seconds=0",
    "train.warmdown_iters=2",
    "train.log_every=1",
    "final_eval.modes=[standard,sliding]",
    "final_eval.batch_windows=8",
    "final_eval.stride=16",
    "callbacks.progress=none",
]
# The records' model bytes: their largest artifact minus their script's code bytes (baseline: the
# openai/parameter-golf train_gpt.py log; PR #1263, PR #1298 and PR #1611: the records' logs and submission.json).
RECORD_MODEL_BYTES = {
    "baseline": 15_863_489 - 47_642,
    "record_1263": 15_890_549 - 73_198,
    "record_1298": 15_824_588 - 60_868,
    "record_1611": 15_907_550 - 31_999,
}
# The child's first lines: drop the editable install's finder (a .pth in the venv installs it) and prove that
# neither pgolf nor callbacks can be imported, then run train_gpt.py as `python train_gpt.py ARGS` would.
NO_PGOLF = """import importlib.util, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
assert importlib.util.find_spec("pgolf") is None and importlib.util.find_spec("callbacks") is None
sys.argv = ["train_gpt.py", *sys.argv[1:]]
runpy.run_path("train_gpt.py", run_name="__main__")
"""


# ---- what a pack holds -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packs():
    out = {exp: pack(compose_train([f"experiment={exp}"])) for exp in RECORD_MODEL_BYTES}
    for name, modes in {
        "standard": "[standard]",
        "sliding": "[standard,sliding]",
        "slot": "[standard,slot_1263]",
    }.items():
        out[name] = pack(compose_train(["experiment=record_1263", f"final_eval.modes={modes}"]))
    return out


def test_pack_holds_the_runtime_the_experiment_needs(packs):
    std = packs["standard"]
    payload, sources = unpack(std.script)
    assert set(sources) == set(std.modules) and payload["entry"] == "pgolf.train.standalone"
    assert not any(m.startswith("pgolf.tools") for m in std.modules)
    assert {"pgolf.eval.standard", "pgolf.train.run", "callbacks.__init__", "pgolf.__init__"} <= set(std.modules)
    # only the eval modes of final_eval are packed; the packed registry imports no other mode module
    assert not {"pgolf.eval.sliding", "pgolf.eval.slot", "pgolf.eval.ttt", "pgolf.eval.lora_ttt"} & set(std.modules)
    assert "sliding" not in sources["pgolf.eval.modes"] and "standard" in sources["pgolf.eval.modes"]
    assert "pgolf.eval.sliding" in packs["sliding"].modules and "pgolf.eval.slot" not in packs["sliding"].modules
    assert "pgolf.eval.slot" in packs["slot"].modules and "pgolf.eval.ttt" not in packs["slot"].modules
    for key, src in sources.items():  # every module compiles
        compile(src, key, "exec")
    assert "One training run of a validated config" not in sources["pgolf.train.run"]  # its docstring is gone
    reqs = set(payload["requirements"])
    assert {"torch", "lightning", "hydra-core", "omegaconf", "sentencepiece", "numpy"} <= reqs and "wandb" not in reqs
    again = pack(compose_train(["experiment=record_1263", "final_eval.modes=[standard]"]))
    assert again.script == std.script  # deterministic


@pytest.mark.parametrize("exp", sorted(RECORD_MODEL_BYTES))
def test_packed_code_plus_the_records_model_fits(packs, exp):
    n = len(packs[exp].script)
    assert n == packs[exp].code["bytes"] and n + RECORD_MODEL_BYTES[exp] <= 16_000_000, (exp, n)


def test_the_pack_is_the_recipe_not_the_run():
    """Runs of one recipe (other seed, data folder, logger, progress bar, one GPU or DDP) share one file."""
    a = pack(compose_train(["experiment=record_1263"]))
    b = pack(
        compose_train(
            ["experiment=record_1263", "seed=42", "data.root=/elsewhere", "logger=wandb", "trainer=ddp"]
            + ["callbacks.progress=line", "callbacks.checkpoint.every_steps=100"]
        )
    )
    c = pack(compose_train(["experiment=record_1263", "train.warmdown_iters=3000"]))
    assert a.script == b.script and a.script != c.script
    payload, _ = unpack(a.script)
    cfg = payload["config"]
    assert cfg["data"]["dir"] == "${data.root}/datasets/fineweb10B_sp1024" and cfg["data"]["root"] == "./data"
    assert cfg["logger"]["kind"] == "none" and cfg["trainer"]["strategy"] == "auto" and "seed" in cfg
    assert payload["distributed_strategy"]["_target_"].endswith("DDPStrategy")


def test_a_number_written_as_an_integer_or_a_float_is_one_recipe():
    """`model.mlp_mult=2` and `=2.0`, a wall clock of `400` and `400.0` (fields declared float): the same
    recipe, so one file and one code hash (a sweep's `mlp_mult=2` group had its own hash, which the
    submission refused to combine with plain runs). Integer fields stay integers."""
    base = pack(compose_train([]))
    for over in (["model.mlp_mult=2", "train.max_wallclock_seconds=400.0"], ["model.mlp_mult=2.0"]):
        assert pack(compose_train(over)).script == base.script, over
    cfg = unpack(base.script)[0]["config"]
    assert cfg["model"]["mlp_mult"] == 2.0 and cfg["train"]["max_wallclock_seconds"] == 400.0
    assert type(cfg["train"]["max_wallclock_seconds"]) is float and type(cfg["train"]["iterations"]) is int
    assert pack(compose_train(["model.mlp_mult=3"])).script != base.script


def test_a_byte_sidecar_pattern_follows_the_data_folder():
    """A CaseOps run's byte sidecar pattern is reset like the shard patterns (`DATA_PATH` moves all three);
    before, an absolute one stopped train.py with the packer's absolute-path error."""
    over = ["experiment=record_1611", "data.dir=/d/sp", "data.val_bytes_pattern=/d/sp/fineweb_val_bytes_*.bin"]
    cfg, _ = packed_config(compose_train(over))
    assert cfg["data"]["val_bytes_pattern"] == "${data.dir}/fineweb_val_bytes_*.bin"
    assert packed_config(compose_train(["experiment=baseline"]))[0]["data"]["val_bytes_pattern"] is None


def test_a_config_with_an_absolute_path_is_not_packed():
    """The data folders are reset to ./data; any other absolute path would leave the machine in the file."""
    with pytest.raises(PackError, match=r"export.float_filename = '/home/me/w.ptz' is an absolute path"):
        pack(compose_train(["experiment=baseline", "export.float_filename=/home/me/w.ptz"]))
    with pytest.raises(PackError, match=r"callbacks.averaging.kind = '~/x'"):
        check_no_machine_paths({"callbacks": {"averaging": {"kind": "~/x"}}})
    check_no_machine_paths({"a": ["./x", "${data.root}/y", "x/y", "1e-3"]})


def test_environment_and_overrides_map_onto_the_config():
    payload, _ = unpack(pack(compose_train(["experiment=baseline"])).script)
    env = {"SEED": "42", "DATA_PATH": "/d/sp", "TOKENIZER_PATH": "/t/x.model", "ITERATIONS": "50"}
    env |= {"MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "10", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}
    cfg = run_config(payload, ["train.log_every=5", "+final_eval.modes=[standard]"], env)
    assert (cfg.seed, cfg.train.iterations, cfg.train.max_wallclock_seconds, cfg.train.val_every) == (42, 50, 0, 10)
    assert cfg.data.train_pattern == "/d/sp/fineweb_train_*.bin" and cfg.data.tokenizer_path == "/t/x.model"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.train.log_every) == (8, 1, 5)
    assert cfg.trainer.strategy["_target_"].endswith("DDPStrategy")
    check_config(cfg)
    ref = {"TRAIN_BATCH_TOKENS": "2048", "TRAIN_SEQ_LEN": "64", "WARMUP_STEPS": "0", "WARMDOWN_ITERS": "3"}
    ref |= {"TRAIN_LOG_EVERY": "7", "VAL_BATCH_SIZE": "4096", "NUM_LAYERS": "3", "MATRIX_LR": "0.1"}
    cfg = run_config(payload, [], ref)
    t = cfg.train
    assert (t.batch_tokens, t.seq_len, t.warmup_steps, t.warmdown_iters, t.log_every) == (2048, 64, 0, 3, 7)
    assert cfg.data.val_batch_tokens == 4096 and cfg.model.num_layers == payload["config"]["model"]["num_layers"]
    assert cfg.final_eval.seq_len == 64  # the reference's eval window is its TRAIN_SEQ_LEN
    p1611, _ = unpack(pack(compose_train(["experiment=record_1611"])).script)  # evaluates at 2048, trains 98,304
    assert run_config(p1611, [], {"TRAIN_SEQ_LEN": "49152"}).final_eval.seq_len == 2048
    assert unread_note(ref) == (
        "note: NUM_LAYERS, MATRIX_LR: not read by this script; set the config's keys as key=value arguments"
    )
    assert unread_note(env) is None
    alone = run_config(payload, [], {})
    assert alone.seed == 1337 and alone.trainer.strategy == "auto" and alone.data.dir.startswith("./data/datasets/")
    with pytest.raises(ConfigError, match="no config groups"):
        run_config(payload, ["model=tiny"], {})
    with pytest.raises(ConfigError, match="iteration"):
        check_config(run_config(payload, ["train.iteration=5"], {}))
    # a key may index a list, as in train.py (docs/export.md: export.rules.3.bits=5)
    n = len(payload["config"]["export"]["rules"])
    cfg = run_config(payload, [f"export.rules.{n - 1}.bits=5", "data.dir=${data.root}/other"], {})
    assert cfg.export.rules[n - 1].bits == 5 and cfg.data.dir == "./data/other"
    assert cfg.export.rules[0] == payload["config"]["export"]["rules"][0]
    for bad, match in [(f"export.rules.{n}.bits=5", "list index out of range"), ("export.rules.x.bits=5", "'x'")]:
        with pytest.raises(ConfigError, match=match):
            run_config(payload, [bad], {})
    # Hydra's grammar, as train.py parses it: {k:v} without spaces; a sweep is refused
    cfg = run_config(payload, ["+final_eval.settings={sliding:{stride:32}}"], {})
    assert cfg.final_eval.settings == {"sliding": {"stride": 32}}
    with pytest.raises(ConfigError, match="a sweep"):
        run_config(payload, ["seed=1,2"], {})
    # a bad value from the environment is named by its variable, unless the command line set the key
    msg = "train.iterations must be an integer >= 1, got -3"
    assert set_by(msg, {"ITERATIONS": "-3"}, []) == " (set by ITERATIONS=-3)"
    assert set_by(msg, {"ITERATIONS": "-3"}, ["train.iterations=-3"]) == ""
    assert set_by("train.iterations_x must be", {"ITERATIONS": "5"}, []) == ""
    assert set_by(msg, {"ITERATIONS": "-3"}, ["++train.iterations=-5"]) == ""
    # TRAIN_SEQ_LEN sets the final eval's windows too, which are checked first
    fmsg = "final_eval.seq_len must be an integer in [1, 16384], got 0"
    assert set_by(fmsg, {"TRAIN_SEQ_LEN": "0"}, []) == " (set by TRAIN_SEQ_LEN=0)"
    assert set_by(fmsg, {"TRAIN_SEQ_LEN": "0"}, ["final_eval.seq_len=0"]) == ""


def test_environment_integers_are_read_as_the_reference_reads_them():
    env = {"SEED": "010", "ITERATIONS": " 20 ", "MAX_WALLCLOCK_SECONDS": "1e2", "DATA_PATH": "/d/0x10"}
    assert dict(parse_env(env)) == {"seed": 10, "train.iterations": 20, "train.max_wallclock_seconds": 100.0} | {
        "data.dir": "/d/0x10"
    }  # YAML 1.1 would read 010 as the octal 8


def test_the_resume_hint_names_the_script_that_ran(monkeypatch, tmp_path):
    (tmp_path / "repo").mkdir()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_gpt.py", "train.log_every=5"])
    assert resume_command() == "<same environment, RUN_ID included> python train_gpt.py <same overrides>"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resume_command().endswith("torchrun --standalone --nproc_per_node=8 train_gpt.py <same overrides>")
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.chdir(tmp_path / "repo")
    assert resume_hint(tmp_path / "repo" / "out" / "last.ckpt").endswith("resume=out/last.ckpt")
    elsewhere = tmp_path / "runs" / "last.ckpt"  # not ../runs/last.ckpt
    assert resume_hint(elsewhere) == f"resume with: python train.py <same overrides> resume={elsewhere}"
    monkeypatch.setattr(sys, "argv", ["/repo/train.py", "model=tiny"])
    assert resume_command() == "python train.py <same overrides>"
    # a packed run without RUN_ID gets a uuid, which the hint then names (the resumed run appends to its log)
    monkeypatch.setenv("RUN_ID", "")  # unset, and restored after the test (run_id_of sets it)
    monkeypatch.setattr(sys, "argv", ["train_gpt.py"])
    run_id = run_id_of(os.environ)
    assert len(run_id) == 36 and f"RUN_ID={run_id} " in resume_command() and run_id_of({"RUN_ID": "s1"}) == "s1"


def test_a_reused_run_id_keeps_the_earlier_runs_config(tmp_path):
    logs = tmp_path / "logs"
    assert config_path(logs, "seed0") == logs / "seed0.yaml"
    logs.mkdir()
    (logs / "seed0.yaml").write_text("seed: 0\n")
    assert config_path(logs, "seed0") == logs / "seed0.2.yaml"
    (logs / "seed0.2.yaml").write_text("seed: 1\n")
    assert config_path(logs, "seed0") == logs / "seed0.3.yaml"
    assert config_path(logs, "seed1") == logs / "seed1.yaml"


def test_help_prints_the_usage_and_writes_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / SCRIPT).write_bytes(b"# packed\n")
    monkeypatch.chdir(tmp_path)
    assert main({"config": {}}, tmp_path / SCRIPT, ["--help"], {}) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: [torchrun --standalone --nproc_per_node=N] {SCRIPT} [key=value ...]")
    assert "SEED" in out and "DATA_PATH" in out and "train.iterations=50" in out
    assert [p.name for p in tmp_path.iterdir()] == [SCRIPT]


@pytest.mark.parametrize("run_id", ["../outside", "/abs/x", "a/b", "..", ".hidden", "-x", "x" * 129, "a\nb", "é"])
def test_a_run_id_that_is_not_a_plain_file_name_is_refused_before_anything_is_written(
    run_id, tmp_path, monkeypatch, capsys
):
    """RUN_ID names logs/<RUN_ID>.txt: a path out of logs/ (written outside the folder before), a hidden or
    over-long name, a newline: one config error line, exit 2, nothing written."""
    (tmp_path / SCRIPT).write_bytes(b"# packed\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main({"config": {}}, tmp_path / SCRIPT, [], {"RUN_ID": run_id})
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"config error: RUN_ID={run_id!r} must be a plain file name")
    assert [p.name for p in tmp_path.iterdir()] == [SCRIPT]
    for ok in ("seed42", "2026-11-30_run.1", "a" * 128):
        check_run_id(ok)


def read_only(folder: Path, on: bool) -> bool:
    """Make `folder` read-only (`on`) or writable again: chmod, or for root (whom chmod does not stop) the
    immutable attribute; False where that is not possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555 if on else 0o755)
        return True
    return subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["train.py run", "logs is a file", "read-only"])
def test_a_folder_the_packed_run_must_not_or_cannot_write_in_is_refused_before_anything(
    kind, tmp_path, monkeypatch, capsys
):
    """Inside a train.py run directory the packed run replaced that run's results.json and artifact without a
    word; in a read-only folder it stopped with a PermissionError traceback. One config error line naming the
    folder, exit 2, nothing written."""
    (tmp_path / SCRIPT).write_bytes(b"# packed\n")
    if kind == "train.py run":
        (tmp_path / ".hydra").mkdir()
        (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
        (tmp_path / "train.log").write_text("step:1/4\n")
        (tmp_path / "results.json").write_text("{}")
        want = f"config error: {tmp_path} is a train.py run directory: this run would replace its results.json"
    elif kind == "logs is a file":
        (tmp_path / "logs").write_text("")
        want = f"config error: {tmp_path / 'logs'}: the run cannot write its files there (Not a directory)"
    elif not read_only(tmp_path, True):
        pytest.skip("no read-only folder here (root, without chattr)")
    else:
        want = f"config error: {tmp_path}: the run cannot write its files there ("  # (Permission denied) or chattr's
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as e:
            main({"config": {}}, tmp_path / SCRIPT, [], {"RUN_ID": "r1"})
    finally:
        read_only(tmp_path, False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(want) and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


GPTQ_PART = {"pgolf.quant.gptq", "pgolf.quant.calibrate", "pgolf.export.gptq_stage"}
OTHER_PARTS = {"pgolf.export.prune_stage", "pgolf.quant.prune", "pgolf.train.wandb_logger", "callbacks.averaging"}
OTHER_PARTS |= {"pgolf.quant.pergroup", "pgolf.quant.lqer"}


def test_only_the_optional_parts_the_config_uses_are_packed(packs):
    """Full GPTQ (+ calibration), pruning, W&B and weight averaging are packed only when the config uses them."""
    base, r1298, r1263 = (set(packs[e].modules) for e in ("baseline", "record_1298", "record_1263"))
    assert not (GPTQ_PART | OTHER_PARTS) & base  # int8 RTN, no EMA, no pruning; the packed logger is none
    assert "callbacks.averaging" in r1298 and not (GPTQ_PART | {"pgolf.export.prune_stage"}) & r1298  # EMA, GPTQ-lite
    assert GPTQ_PART | {"callbacks.averaging"} <= r1263 and "pgolf.train.wandb_logger" not in r1263  # full GPTQ
    _, sources = unpack(packs["baseline"].script)
    assert (
        "gptq_stage" not in sources["pgolf.export.stages"] and "import averaging" not in sources["callbacks.__init__"]
    )
    owners = part_modules()  # every rule names a registered part
    assert set(owners) == set(PART_RULES) and owners["prune"] == "pgolf.export.prune_stage"
    pruned = pack(compose_train(["experiment=baseline", "export.prune.enabled=true"]))
    assert {"pgolf.export.prune_stage", "pgolf.quant.prune"} <= set(pruned.modules)
    grouped = pack(compose_train(["experiment=baseline", "export.codec=pergroup_brotli", "export.level=11"]))
    assert "pgolf.quant.pergroup" in grouped.modules and "pgolf.quant.brotli_io" in set(packs["baseline"].modules)


def test_a_packed_config_refuses_an_override_that_needs_a_part_it_lacks(packs, monkeypatch):
    """In the packed baseline (no averaging module), `callbacks.averaging.kind=ema` fails before training."""
    payload, _ = unpack(packs["baseline"].script)
    check_parts(run_config(payload, [], {}))
    monkeypatch.delitem(optional.PARTS, "averaging")  # as in the packed file, whose averaging module is left out
    check_parts(run_config(payload, [], {}))  # not needed: fine
    with pytest.raises(ConfigError, match=r"optional parts \['averaging'\]"):
        check_parts(run_config(payload, ["callbacks.averaging.kind=ema"], {}))
    with pytest.raises(LookupError, match="'averaging' is not in this program"):
        optional.get("averaging")


def test_a_pack_is_cached_by_its_inputs_and_a_bad_entry_is_made_again(tmp_path, monkeypatch):
    """The cached file is the file made afresh; another config or a changed runtime file is another entry; an
    entry failing its checksum is made again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = compose_train(["experiment=baseline"])
    fresh = pack(cfg, use_cache=False)
    assert not (tmp_path / "cache" / "pgolf" / "pack").exists()  # nothing written without the cache
    first, again = pack(cfg), pack(cfg)
    assert first.script == again.script == fresh.script and again.modules == fresh.modules
    assert again.payload == fresh.payload
    (entry,) = (tmp_path / "cache" / "pgolf" / "pack").iterdir()
    entry.write_bytes(entry.read_bytes().replace(b"torch", b"torcH", 1))
    assert pack(cfg).script == fresh.script and entry.read_bytes().startswith(fresh.script)
    other = pack(compose_train(["experiment=baseline", "train.iterations=7"]))
    assert other.script != fresh.script and len(list(entry.parent.iterdir())) == 2
    keys = runtime_modules(ROOT)
    changed = tmp_path / "io.py"
    changed.write_text(keys["pgolf.io"].read_text() + "\n# another line\n")
    config, strategy = packed_config(cfg)
    assert pack_key(config, strategy, keys) != pack_key(config, strategy, {**keys, "pgolf.io": changed})


def test_compact_is_cached_and_a_bad_cache_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    src = "def f(alpha, beta):\n    total = alpha + beta\n    return total * total\n"
    out = compact(src, {"f"})
    assert "total" not in out and "alpha" in out and "def f(" in out  # locals renamed, arguments (keywords) kept
    ns = {}
    exec(out, ns)
    assert ns["f"](beta=2, alpha=1) == 9
    (entry,) = packsource.cache_dir().glob("*.py")
    assert entry.read_text().startswith(out + "# sha256:") and compact(src, {"f"}) == out
    stored = entry.read_text()
    for damaged in ("def broken(:\n", stored.replace("alpha", "alphx", 1), stored[:-5]):  # not used, rewritten
        entry.write_text(damaged)
        assert compact(src, {"f"}) == out and entry.read_text() == stored
    assert "def f(" not in compact(src)  # a module-level name nothing keeps is renamed (another cache entry)


def test_minify_renames_the_module_level_names_nothing_else_can_name():
    a = (
        "import math\nLIMIT = 3\ndef _helper(v):\n    return math.sqrt(v) + len([v])\n"
        "def public(v):\n    return _helper(v) * LIMIT\nclass Shape:\n    pass\n"
        "def by_name():\n    return Shape\nNAMES = ['by_name']\n"
    )
    b = "from pkg.a import public\ndef main():\n    return public(4.0)\n"
    mods = {k: Module(k, ast.parse(src)) for k, src in (("pkg.a", a), ("pkg.b", b))}
    out = minify(mods, {"main"})
    for kept in ("def public(", "class Shape", "def by_name(", "len(", "def main("):  # another module, a class,
        assert kept in out["pkg.a"] + out["pkg.b"], kept  # a word of a string, a builtin, the entry
    assert "_helper" not in out["pkg.a"] and "LIMIT" not in out["pkg.a"]
    ns = {}
    exec(out["pkg.a"], ns)
    assert ns["public"](4.0) == 9.0 and ns["by_name"]() is ns["Shape"]


def test_minify_drops_what_nothing_uses(tmp_path):
    src = '''"""doc"""
from __future__ import annotations
from dataclasses import dataclass
from pkg import used_mode, unused_mode  # registers
x = helper_a(1)
y = Cfg()


@dataclass
class Cfg:
    """doc"""
    n: int = 1  # a field: its annotation stays


def helper_a(v: int) -> int:
    return helper_b(v)


def helper_b(v):
    return v


def dead(v: Cfg):
    return v


@register
def kept_by_its_decorator():
    pass


used_mode.go()
'''
    tree = strip(ast.parse(src))
    keys = {"pkg.__init__": 0, "pkg.used_mode": 0, "pkg.unused_mode": 0}
    drop_registrations(tree, keys, {"pkg.used_mode", "pkg.unused_mode"})
    assert shake({"m": tree}) == 1  # `dead`
    out = unparse(tree)
    assert "dead" not in out and "helper_b" in out and "kept_by_its_decorator" in out and "doc" not in out
    assert "n: int = 1" in out and "v: int" not in out and "-> int" not in out
    assert "from pkg import used_mode\n" in out  # the unused registration import is gone, the used one stays
    assert "\ndef helper_a(v):\n return helper_b(v)\n" in out  # one space per level, no blank lines


# ---- Check: the packed script alone, against train.py ---------------------------------------------------------
def train_py(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def run_packed(folder: Path, synth: Path, seed: int, args: list[str] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "WORLD_SIZE", "RANK", "LOCAL_"))}
    env |= {"SEED": str(seed), "RUN_ID": f"seed{seed}", "DATA_PATH": str(synth)}
    env["TOKENIZER_PATH"] = str(synth / "synth_256_bpe_selftrained.model")
    cmd = [sys.executable, "-I", "-c", NO_PGOLF, *args]
    r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def losses(text: str) -> list[str]:
    return re.findall(r"^step:(\d+/\d+) train_loss:(\S+)", text, re.M)


def exact(text: str) -> list[str]:
    return re.findall(r"^final_\w+_exact val_loss:\S+ val_bpb:\S+$", text, re.M)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_dir):
    """Two short train.py runs (seeds 0 and 1) of the tiny experiment, each with its packed train_gpt.py."""
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for seed in (0, 1):
        r = train_py([*TINY, f"data.root={synth_dir.parent}", f"hydra.run.dir={d / f'seed{seed}'}", f"seed={seed}"])
        out[seed] = (d / f"seed{seed}", r.stdout)
    return out


@pytest.mark.slow
def test_packed_script_runs_without_pgolf_like_train_py(runs, synth_dir, tmp_path):
    run_dir, stdout = runs[0]
    script = (run_dir / SCRIPT).read_bytes()
    assert script == pack(compose_train(TINY)).script  # the CLI's pack and train.py's in-memory pack agree
    probe = [sys.executable, "-I", "-c", "import importlib.util as u; print(u.find_spec('pgolf') is not None)"]
    assert subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "True"  # installed
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy(run_dir / SCRIPT, folder / SCRIPT)
    r = run_packed(folder, synth_dir, seed=0)
    assert losses(r.stdout) == losses(stdout) and len(losses(stdout)) == 4  # bit-identical printed losses
    assert exact(r.stdout) == exact(stdout) and len(exact(stdout)) == 2  # standard and sliding round trips
    res, ref = (json.loads((p / "results.json").read_text())["roundtrip"] for p in (folder, run_dir))
    assert all(res[m]["val_bpb"] == ref[m]["val_bpb"] and res[m]["val_loss"] == ref[m]["val_loss"] for m in ref)
    assert r.stdout.rstrip().splitlines()[-2] == f"Code size: {len(script)} bytes"  # ends with the size lines
    assert r.stdout.rstrip().splitlines()[-1].startswith("Total submission size int8+zlib:")
    log = (folder / "logs" / "seed0.txt").read_text()
    assert f"code_sha256:{code_record(script)['sha256']}" in log and "step:4/4 train_loss:" in log
    # the artifact of the packed run is read by eval.py and inspect (no pgolf needed to make it)
    artifact = folder / "final_model.int8_zlib.ptz"
    ev = subprocess.run(
        [sys.executable, "eval.py", f"artifact={artifact}", "data=synthetic", f"data.root={synth_dir.parent}"]
        + ["eval=standard", "batch_windows=8", f"out_dir={tmp_path / 'ev'}", f"hydra.run.dir={tmp_path / 'h'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = json.loads((tmp_path / "ev" / "eval_result.json").read_text())["results"]["standard"]["val_bpb"]
    assert got == res["standard"]["val_bpb"]
    ins = subprocess.run(
        [sys.executable, "-m", "pgolf.tools.inspect", str(artifact)], cwd=ROOT, capture_output=True, text=True
    )
    assert ins.returncode == 0 and f"code: train_gpt.py {len(script)} bytes sha256:" in ins.stdout
    # the run's record, and a submission made from the folder it ran in
    record = json.loads((folder / "logs" / "seed0.json").read_text())
    assert record["artifact"]["sha256"] == sha256_file(artifact) and record["results"]["roundtrip"] == res
    out = tmp_path / "records" / "alone"
    assert submission.main([str(folder), "--out", str(out), "--name", "Alone", "--github-id", "someone"]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["seeds"] == [0] and sub["seed_results"]["0"]["model_bytes"] == artifact.stat().st_size
    assert (out / "train_seed0.log").read_text() == log and (out / SCRIPT).read_bytes() == script


# ---- the records folder ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_submission_folder_holds_the_verified_script_and_runs_from_inside(runs, synth_dir, tmp_path):
    out = tmp_path / "records" / "tiny"
    dirs = [str(runs[s][0]) for s in (0, 1)]
    assert submission.main([*dirs, "--out", str(out), "--name", "Tiny", "--github-id", "someone"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "requirements.txt", "submission.json", SCRIPT, "train_seed0.log", "train_seed1.log"]
    script = (out / SCRIPT).read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == len(script) and sub["code_sha256"] == code_record(script)["sha256"]
    reqs = (out / "requirements.txt").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", reqs, re.M) and "lightning==" in reqs and "sentencepiece==" in reqs
    readme = (out / "README.md").read_text()
    assert "SEED=0 RUN_ID=seed0 DATA_PATH=./data/datasets/shards" in readme
    assert "torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    r = run_packed(out, synth_dir, 1, ["train.iterations=2"])  # from inside the folder, with an override
    assert "step:2/2 train_loss:" in r.stdout and (out / "logs" / "seed1.txt").is_file()
    # runs of different code refuse to form one submission
    other = tmp_path / "other"
    shutil.copytree(runs[1][0], other)
    (other / SCRIPT).write_bytes(script + b"\n")
    with pytest.raises(submission.SubmissionError, match="different code"):
        submission.assemble([runs[0][0], other], tmp_path / "o2", name="x", github_id="y")
    shutil.copy(runs[1][0] / SCRIPT, other / SCRIPT)  # the same file, but a log that recorded other code
    log = (other / "train.log").read_text()
    (other / "train.log").write_text(re.sub(r"code_sha256:\w+", "code_sha256:" + "0" * 64, log))
    with pytest.raises(submission.SubmissionError, match="train.log records code"):
        submission.assemble([runs[0][0], other], tmp_path / "o3", name="x", github_id="y")
    (other / "train.log").write_text(log)  # and an artifact that recorded other code
    artifact = other / "final_model.int8_zlib.ptz"
    entries, meta = read_artifact(artifact)
    write_artifact(artifact, entries, {**meta, "code": {"bytes": 1, "sha256": "0" * 64}}, "zlib")
    with pytest.raises(submission.SubmissionError, match="artifact records code"):
        submission.assemble([runs[0][0], other], tmp_path / "o4", name="x", github_id="y")


def decoder_lines(blob: bytes) -> str:
    """The bootstrap's decoding lines (alphabet, payload, CRC-checked decode) for `blob`, as `pack` fills them."""
    lines = bootstrap(blob).splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("B="))
    last = next(i for i, x in enumerate(lines) if i > first and x.startswith("except"))
    return "\n".join(lines[first : last + 1])


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 32, 1000])
def test_payload_encoding_round_trips_and_is_one_byte_per_character(n):
    """Every length (whole and partial chunks), every byte value: the bootstrap's own decoding lines (run as
    the packed file runs them) and `decode_payload` give the bytes back; the text is ASCII inside a "..."
    literal and 19 characters per 16 bytes."""
    blob = bytes(range(256)) * (n // 256) + os.urandom(n % 256)
    text = encode_payload(blob)
    assert len(text) == 19 * -(-n // 16) and text.isascii() and not set(text) - set(ALPHABET)
    assert decode_payload(text, n) == blob
    src = decoder_lines(blob)
    assert len(src.encode()) == len(src)  # one UTF-8 byte per character
    env = {"__file__": "train_gpt.py", "sys": sys, "zlib": zlib}
    exec(compile(src, "train_gpt.py", "exec"), env)
    assert bytes(env["D"]) == blob and env["P"] == text and env["B"] == ALPHABET


def test_payload_alphabet_is_safe_for_literals_terminals_and_line_splitters():
    """No character a "..." literal cannot hold, none a terminal acts on (ESC, BEL, SO, ...) or answers (ENQ),
    none str.splitlines breaks a line at: a packed file has as many lines for every reader."""
    assert len(ALPHABET) == len(set(ALPHABET)) == 109 and 109**19 >= 256**16 and ALPHABET.isascii()
    assert not {
        "\0",
        "\n",
        "\r",
        '"',
        "\\",
        "\x05",
        "\x07",
        "\x08",
        "\x0e",
        "\x0f",
        "\x18",
        "\x1a",
        "\x1b",
        "\x7f",
    } & set(ALPHABET)
    assert len(("x" + ALPHABET + "x").splitlines()) == 1
    with pytest.raises(ValueError, match="outside the alphabet"):
        decode_payload('"' * 19, 1)
    with pytest.raises(ValueError, match="whole chunks"):
        decode_payload("a" * 18, 1)


def test_a_damaged_payload_stops_the_file_with_one_line(tmp_path, packs):
    """A changed payload character is caught by the CRC-32 before any embedded code runs: one line naming the
    file, exit 1, no traceback; the packed file splits into the same lines for every reader."""
    text = packs["baseline"].script.decode()
    assert len(text.splitlines()) == text.count("\n") == len(BOOTSTRAP.splitlines())
    at = text.index('P="') + 200
    bad = text[:at] + ALPHABET[(ALPHABET.index(text[at]) + 1) % len(ALPHABET)] + text[at + 1 :]
    (tmp_path / SCRIPT).write_text(bad, encoding="utf-8")
    r = subprocess.run([sys.executable, "-I", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "the embedded code is damaged (payload checksum)" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_missing_package_stops_the_file_with_one_line(tmp_path, packs):
    """A package of requirements.txt that is not installed (hydra here, blocked in sys.modules) stops the file
    with one line naming it and requirements.txt, exit 1, no traceback."""
    (tmp_path / SCRIPT).write_bytes(packs["baseline"].script)
    for package in ("hydra", "brotli"):  # one the runtime imports, the one the bootstrap itself imports
        code = f"import runpy,sys;sys.modules['{package}']=None;runpy.run_path(sys.argv[1],run_name='__main__')"
        r = subprocess.run([sys.executable, "-I", "-c", code, SCRIPT], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 1 and package in r.stderr and "pip install -r requirements.txt" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---- optional parts of the model and the quantization rules ------------------------------------------------
NEW_PARTS = {"pgolf.quant.sdclip", "pgolf.model.doc_attention", "pgolf.model.decode", "pgolf.model.record_1611"}


def test_sdclip_doc_attention_decode_and_the_1611_model_are_packed_only_when_used(packs):
    """SDClip rules, document-bounded attention, the KV-cache decoding of AR calibration and the PR #1611 model
    features (gated SmearGate, two lanes) are optional parts: left out of the record-stack packs, in PR
    #1611's; the imports that only register them or only annotate with them go with them."""
    for exp in ("baseline", "record_1298", "record_1263"):
        assert not NEW_PARTS & set(packs[exp].modules), exp
    _, sources = unpack(packs["record_1263"].script)
    gpt, layers, rules = (sources[f"pgolf.{m}"] for m in ("model.gpt", "model.layers", "quant.rules"))
    assert not re.search(r"model\.decode|model import.*(decode|doc_attention|record_1611)", gpt)
    assert "doc_attention" not in layers and not re.search(r"import.*sdclip", rules)
    r1611 = set(packs["record_1611"].modules)
    assert NEW_PARTS - {"pgolf.model.decode"} <= r1611 and "pgolf.model.decode" not in r1611
    ar = pack(compose_train(["experiment=record_1263", "export.calibration.source=ar"]))
    assert "pgolf.model.decode" in ar.modules


def test_an_unused_mode_is_not_registered_and_its_run_function_is_not_packed():
    src = (
        "from pkg.registry import Mode, register\ndef run_a(): return 1\ndef rule(): return 2\n"
        "def helper(): return 3\ndef run_b(): return helper()\n"
        'register(Mode("a", dict, run_a, rule))\nregister(\n    Mode("b", dict, run_b, rule))\nprint("a")\n'
    )
    tree = ast.parse(src)
    drop_mode_registrations(tree, {"a", "c"})
    shake({"m": tree})
    out = ast.unparse(tree)
    assert "run_a" not in out and "Mode('a'" not in out and "print('a')" in out  # only the registration goes
    assert "def rule" in out and "def helper" in out and "Mode('b', dict, run_b, rule)" in out
    drop_mode_registrations(tree, {"b"})
    shake({"m": tree})
    assert "def " not in ast.unparse(tree)


def test_record_1611_packs_the_modes_phased_ttt_needs_but_registers_only_its_own(packs):
    """PR #1611's phased TTT imports helpers of pgolf/eval/ttt.py and lora_ttt.py: those modules are packed,
    their modes (ttt, lora_ttt, lora_ttt_1090) and the other phased form are not registered, and their run
    functions are not packed."""
    _, sources = unpack(packs["record_1611"].script)
    assert {"pgolf.eval.ttt", "pgolf.eval.lora_ttt", "pgolf.eval.phased_ttt"} <= set(sources)
    assert registered_modes(packs["record_1611"].script) == {"phased_ttt_1611", "standard"}
    config = packs["record_1611"].payload["config"]
    trees = shaken(packed_modules(config, runtime_modules(ROOT)), extra_refs(config))
    defs = {k: {n.name for n in t.body if isinstance(n, ast.FunctionDef)} for k, t in trees.items()}
    assert not {"run_ttt", "ttt_rule"} & defs["pgolf.eval.ttt"] and "all_reduce_grads" in defs["pgolf.eval.ttt"]
    assert "run_lora_ttt" not in defs["pgolf.eval.lora_ttt"] and "run_phased_ttt" in defs["pgolf.eval.phased_ttt"]


def registered_modes(script: bytes) -> set[str]:
    """The eval modes a packed file registers (its `register(Mode("<name>", ...))` statements)."""
    return set(re.findall(r"Mode\(['\"](\w+)['\"]", "".join(unpack(script)[1].values())))


def test_a_mode_named_by_another_modes_settings_is_packed(monkeypatch):
    """`final_eval.settings.sliding.mode=ttt` runs the ttt mode under the name sliding: its module is packed
    and registered, and the packed config passes the packed file's own check with only the file's modes
    registered (it refused it before: unknown mode 'ttt'). Such a mode counts for document attention too."""
    packed = pack(compose_train(["final_eval.modes=[standard,sliding]", "+final_eval.settings={sliding:{mode:ttt}}"]))
    assert "pgolf.eval.ttt" in packed.modules and registered_modes(packed.script) == {"standard", "sliding", "ttt"}
    modes = {k: v for k, v in registry._MODES.items() if k in registered_modes(packed.script)}
    monkeypatch.setattr(registry, "_MODES", modes)  # as in the packed file
    check_config(run_config(packed.payload, [], {}))
    del modes["ttt"]
    with pytest.raises(ConfigError, match="unknown mode 'ttt'"):
        check_config(run_config(packed.payload, [], {}))
    assert uses_doc_attention(
        {"train": {"doc_attention": False}, "final_eval": {"modes": ["a"], "settings": {"a": {"mode": "phased_ttt"}}}}
    )


def test_an_import_only_annotations_use_goes_with_its_dropped_module():
    src = (
        "from pkg.a import Used, OnlyAnnotated\nfrom pkg.b import Other\n"
        "def f(x: OnlyAnnotated, y: Other) -> Used:\n    return Used(x)\n"
    )
    tree = ast.parse(src)
    keys = {"pkg.__init__": 0, "pkg.a": 0, "pkg.b": 0}
    drop_registrations(tree, keys, {"pkg.a"})  # pkg.b is kept: its name stays although only an annotation uses it
    assert [[a.name for a in s.names] for s in tree.body[:2]] == [["Used"], ["Other"]]


def test_a_program_without_a_part_refuses_what_needs_it(monkeypatch):
    """Without its module (a packed file whose config did not use it), an SDClip rule is a ValueError naming
    the part (a ConfigError when the export config is checked), a gated SmearGate or two-lane model and a
    forward with `cu_seqlens` a LookupError; everything else still builds and runs."""
    import torch

    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT
    from pgolf.quant.rules import QuantRule

    for name in ("sdclip", "model_1611", "doc_attention", "decode"):
        monkeypatch.delitem(optional.PARTS, name)
    with pytest.raises(ValueError, match="clip sdclip: optional part 'sdclip' is not in this program"):
        QuantRule(store="int", clip="sdclip", sigmas=12.85, scale_floor=False, name="m")
    with pytest.raises(ValueError, match="sigmas applies only to store: int with clip: sdclip"):
        QuantRule(store="int", sigmas=12.85)
    QuantRule(store="int", clip="search")
    small = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(LookupError, match="'model_1611' is not in this program"):
        GPT(GPTConfig(**small, smear_gate="gated"))
    m = GPT(GPTConfig(**small))
    x = torch.randint(0, 64, (1, 8))
    assert m(x).shape == (1, 8, 64)
    with pytest.raises(LookupError, match="'doc_attention' is not in this program"):
        m(x, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(LookupError, match="'decode' is not in this program"):
        m.new_cache(1, 8)


def test_the_pack_command_writes_the_script_and_its_requirements(tmp_path, capsys, packs):
    from pgolf.tools.pack import main

    assert main(["experiment=baseline", "--out", str(tmp_path / "out")]) == 0
    script = (tmp_path / "out" / SCRIPT).read_bytes()
    reqs = (tmp_path / "out" / "requirements.txt").read_text().splitlines()
    assert script == packs["baseline"].script
    names = [r.split("==")[0] for r in reqs]
    assert {"brotli", "torch", "lightning", "omegaconf"} <= set(names) and all("==" in r for r in reqs)
    out = capsys.readouterr().out
    assert f"{len(script)} bytes sha256:" in out and "requirements.txt: brotli==" in out


@pytest.mark.parametrize(
    "override, words",
    [
        ("experiment=nosuch", "experiment=nosuch: no such option of experiment (one of ablation/no_clip | "),
        ("train.iteration=5", "train.iteration is not a key of group train (did you mean iterations?)"),
        ("seed=1,2", "seed=1,2 is a sweep; a pack is of one config"),
        ("seed=range(1,3)", "seed=range(1,3) is a sweep; a pack is of one config"),
        ("seed=[", "seed=[: no viable alternative"),
        ("train.iterations=abc", "train.iterations must be an integer >= 1, got 'abc'"),
    ],
)
def test_the_pack_command_gives_a_config_problem_as_one_line_and_writes_nothing(tmp_path, capsys, override, words):
    from pgolf.tools.pack import main

    with pytest.raises(SystemExit) as e:
        main([override, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("config error: ") and words in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_pack_command_refuses_an_out_that_is_a_file(tmp_path, capsys):
    from pgolf.tools.pack import main

    (tmp_path / "afile").write_text("x")
    for out in ("afile", "afile/sub"):
        assert main(["experiment=baseline", "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --out {tmp_path / out}: {tmp_path / 'afile'} is a file, not a folder\n"
    assert (tmp_path / "afile").read_text() == "x"


def test_the_pack_command_replaces_a_different_file_only_with_force(tmp_path, capsys, monkeypatch):
    """A user's own train_gpt.py (or another config's) is kept unless --force; packing the same config again is
    fine; requirements.txt pins public releases (no local `+cpu` label). The pack is faked: only main() runs."""
    from pgolf.tools import pack as tool

    fake = tool.Packed(b"packed\n", ("m",), {"requirements": ["brotli", "torch"]}, 0.0)
    monkeypatch.setattr(tool, "pack", lambda cfg: fake)
    monkeypatch.setattr(tool, "package_versions", lambda d: {"brotli": "1.2.1", "torch": "2.13.0+cpu"})
    out = tmp_path / "out"
    out.mkdir()
    (out / SCRIPT).write_text("print('mine')\n")
    assert tool.main(["experiment=baseline", "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {out / SCRIPT} exists and differs from this pack; give --force to replace it\n"
    )
    assert (out / SCRIPT).read_text() == "print('mine')\n" and not (out / "requirements.txt").exists()
    assert tool.main(["experiment=baseline", "--out", str(out), "--force"]) == 0
    assert (out / SCRIPT).read_bytes() == fake.script
    assert (out / "requirements.txt").read_text() == "brotli==1.2.1\ntorch==2.13.0\n"
    assert tool.main(["experiment=baseline", "--out", str(out)]) == 0  # the same pack again: idempotent
    (out / "requirements.txt").write_text("torch==2.12.0\n")
    assert tool.main(["experiment=baseline", "--out", str(out)]) == 2
    assert "requirements.txt exists and differs" in capsys.readouterr().err


def test_requirement_pins_drop_the_local_version_label():
    versions = {"brotli": "1.2.1", "torch": "2.13.0+cpu", "x": "missing"}
    assert requirement_pins(versions) == ["brotli==1.2.1", "torch==2.13.0", "x"]


def test_a_terminated_run_says_whose_results_json_it_leaves(tmp_path):
    assert kept_files(tmp_path) == "No artifact was written. No results.json."
    (tmp_path / "results.json").write_text("{}")
    os.utime(tmp_path / "results.json", (1_000, 1_000))
    (tmp_path / "final_model.int8_zlib.ptz").write_bytes(b"x")  # a later run's artifact, then SIGTERM
    assert kept_files(tmp_path).endswith("final_model.int8_zlib.ptz. The results.json is an earlier run's.")
    (tmp_path / "results.json").write_text("{}")
    assert kept_files(tmp_path).endswith("results.json was written.")
