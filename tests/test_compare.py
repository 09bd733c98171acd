"""pgolf.tools.compare on hand-made run directories: statistics against scipy, grouping, eval results, outputs."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from pgolf.tools import compare
from pgolf.tools.compare import build_report
from pgolf.tools.runs import CompareError, load_runs
from pgolf.tools.stats import MissingScipyError, t_sf, welch_greater

scipy_stats = pytest.importorskip("scipy.stats")

TOKENS, BYTES = 1000, 4200.0
NATS_PER_BPB = math.log(2) * BYTES / TOKENS


def eval_result(bpb: float, mode: str, compliant: bool = True, tokens: int = TOKENS, nbytes: float = BYTES) -> dict:
    loss = bpb * math.log(2) * nbytes / tokens
    return {
        "mode": mode,
        "val_loss": loss,
        "val_bpb": bpb,
        "tokens": tokens,
        "bytes": nbytes,
        "seconds": 0.1,
        "compliant": compliant,
        "reason": "ok" if compliant else "adapts to unscored tokens",
        "settings": {},
    }


def make_run(
    sweep: Path,
    job: str,
    seed: int,
    modes: dict[str, float],
    name: str = "demo",
    overrides: list[str] | None = None,
    config: dict | None = None,
    compliant: bool = True,
    tokens: int = TOKENS,
    steps: int = 10,
) -> Path:
    d = sweep / job
    (d / ".hydra").mkdir(parents=True)
    cfg = {"name": name, "seed": seed, "variant": None, "train": {"iterations": steps}, **(config or {})}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*(overrides or []), f"seed={seed}"]))
    rt = {m: eval_result(b, m, compliant or m == "standard", tokens) for m, b in modes.items()}
    res = {
        "export": {"path": f"{d}/final_model.int8_zlib.ptz", "model_bytes": 1000 + seed, "code_bytes": 500},
        "roundtrip": rt,
        "size_ok": True,
        "total_bytes": 1500 + seed,
    }
    res["export"]["total_bytes"] = res["total_bytes"]
    (d / "results.json").write_text(json.dumps(res))
    lines = [
        f"step:{s}/{steps} train_loss:{5 - 0.1 * s + 0.01 * seed:.4f} train_time:{100 * s}ms step_avg:100.00ms"
        for s in range(1, steps + 1)
    ]
    val = f"step:5/{steps} val_loss:4.5000 val_bpb:{1.5 + 0.01 * seed:.4f} train_time:500ms step_avg:100.00ms"
    lines.insert(5, val)
    (d / "train.log").write_text("\n".join(lines) + "\n")
    return d


def write_sweep_file(sweep: Path, task: list[str]) -> None:
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))


# ---- statistics ----------------------------------------------------------------------------------------------
def test_t_survival_function_against_closed_forms_and_tables():
    for t in (-30.0, -3.2, -1.0, -0.1, 0.0, 0.4, 1.0, 2.5, 7.0, 40.0):
        assert t_sf(t, 1.0) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)  # Cauchy
        assert t_sf(t, 2.0) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-12, abs=1e-15)
    # the critical values of a t table: t_{0.025,10} = 2.228139, t_{0.05,10} = 1.812461, t_{0.005,30} = 2.749996
    assert t_sf(2.228139, 10.0) == pytest.approx(0.025, rel=1e-6)
    assert t_sf(1.812461, 10.0) == pytest.approx(0.05, rel=1e-6)
    assert t_sf(2.749996, 30.0) == pytest.approx(0.005, rel=1e-5)
    assert t_sf(0.0, 3.31) == 0.5 and t_sf(math.inf, 4.0) == 0.0


def test_welch_textbook_example():
    # R's Welch test (its t.test default) on these samples prints t = -1.8325, df = 17.9, p-value = 0.08356
    # (two-sided); the one-sided p of the opposite order is half of it.
    ts1 = [11, 9, 10, 11, 10, 12, 9, 11, 12, 9]
    ts2 = [11, 13, 10, 13, 12, 9, 11, 12, 12, 11]
    w = welch_greater(ts2, ts1)
    assert (round(w.t, 4), round(w.df, 1), round(2 * w.p, 5)) == (1.8325, 17.9, 0.08356)
    less = welch_greater(ts1, ts2)
    assert less.t == -w.t and less.p == pytest.approx(1 - w.p, rel=1e-12)
    # a margin shifts the difference: H1 mean(ts2) - mean(ts1) > 1 holds as much as 0 > 0 does
    assert welch_greater(ts2, ts1, 1.0).p == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("margin", [0.0, 0.005])
def test_welch_one_sided_matches_scipy(margin):
    rng = random.Random(7)
    for _ in range(40):
        na, nb = rng.randint(2, 6), rng.randint(2, 6)
        a = [1.9 + rng.gauss(0, rng.choice([0.0005, 0.002, 0.01])) for _ in range(na)]
        b = [1.9 - rng.uniform(-0.01, 0.02) + rng.gauss(0, rng.choice([0.0005, 0.002])) for _ in range(nb)]
        w = welch_greater(a, b, margin)
        ref = scipy_stats.ttest_ind([x - margin for x in a], b, equal_var=False, alternative="greater")
        assert w.t == pytest.approx(ref.statistic, rel=1e-9)
        assert w.df == pytest.approx(ref.df, rel=1e-9)
        assert w.p == pytest.approx(ref.pvalue, rel=1e-7, abs=1e-15)


def test_welch_edge_cases():
    one = welch_greater([1.0], [0.9, 0.8])  # one run: no variance, no test
    assert math.isnan(one.t) and math.isnan(one.df) and math.isnan(one.p)
    assert math.isnan(welch_greater([1.0, 1.1], [0.9]).p)
    same = welch_greater([2.0, 2.0], [1.0, 1.0], 0.005)  # identical reruns: the sign decides
    assert (same.t, same.p) == (math.inf, 0.0) and math.isnan(same.df)
    worse = welch_greater([1.0, 1.0], [1.0, 1.0], 0.005)
    assert (worse.t, worse.p) == (-math.inf, 1.0)
    tie = welch_greater([1.0, 1.0], [1.0, 1.0])
    assert (tie.t, tie.p) == (0.0, 1.0)
    # one group without spread, the other with: an ordinary test, df = n - 1 of the varying group
    b = [1.0, 1.2, 0.9]
    w = welch_greater([2.0, 2.0, 2.0], b)
    t = (2.0 - statistics.mean(b)) / (statistics.stdev(b) / math.sqrt(3))
    assert w.t == pytest.approx(t, rel=1e-12) and w.df == pytest.approx(2.0, rel=1e-12)
    assert w.p == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-9)  # the t tail at df 2, closed form


def test_without_scipy_a_p_value_fails_with_one_line_naming_the_extra(two_groups, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    with pytest.raises(MissingScipyError, match=r"pip install pgolf\[analysis\]"):
        welch_greater([1.0, 1.1], [0.9, 0.8])
    assert math.isnan(welch_greater([1.0], [0.9, 0.8]).p) and welch_greater([2.0, 2.0], [1.0, 1.0]).p == 0.0
    # no baseline, no p-value: the comparison runs; with one, the command stops with one line
    assert compare.main([str(two_groups), "--no-plots", "--out", str(two_groups / "cmp")]) == 0
    capsys.readouterr()
    base = ["--baseline", "demo[model.mlp_act=relu2]", "--no-plots", "--out", str(two_groups / "cmp2")]
    assert compare.main([str(two_groups), *base]) == 2
    err = capsys.readouterr().err
    assert err == "error: the Welch t-test needs scipy: pip install pgolf[analysis]\n"
    assert not (two_groups / "cmp2").exists()


# ---- a comparison of two groups -----------------------------------------------------------------------------
BASE = {0: 1.2000, 1: 1.2010, 2: 1.1995}
GOOD = {0: 1.1940, 1: 1.1945, 2: 1.1938}  # ~0.006 bpb = ~0.019 nats better, tight


@pytest.fixture
def two_groups(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    write_sweep_file(sweep, ["model=tiny", "seed=0,1,2", "model.mlp_act=relu2,leaky_relu2"])
    job = 0
    for seed in BASE:
        for act, table in (("relu2", BASE), ("leaky_relu2", GOOD)):
            make_run(
                sweep,
                f"{job}_seed{seed}",
                seed,
                {"standard": table[seed] + 0.002, "sliding": table[seed]},
                overrides=["model=tiny", f"model.mlp_act={act}"],
                config={"model": {"mlp_act": act}},
            )
            job += 1
    return sweep


def test_groups_come_from_the_swept_keys_and_numbers_match_scipy(two_groups):
    runs, notes = load_runs([two_groups])
    assert not notes
    groups = sorted({r.identity.group for r in runs})
    assert groups == ["demo[model.mlp_act=leaky_relu2]", "demo[model.mlp_act=relu2]"]
    rep = build_report(runs, baseline="demo[model.mlp_act=relu2]")
    s = rep.stats[("demo[model.mlp_act=leaky_relu2]", "sliding")]
    assert s.n == 3 and s.seeds == [0, 1, 2]
    assert s.bpb_mean == pytest.approx(statistics.mean(GOOD.values()), abs=1e-12)
    assert s.bpb_std == pytest.approx(statistics.stdev(GOOD.values()), abs=1e-12)
    assert s.nats_per_bpb == pytest.approx(NATS_PER_BPB)
    (c,) = [c for c in rep.comparisons if c.mode == "sliding"]
    base_loss = [b * NATS_PER_BPB for b in BASE.values()]
    good_loss = [b * NATS_PER_BPB for b in GOOD.values()]
    assert c.delta_bpb == pytest.approx(statistics.mean(GOOD.values()) - statistics.mean(BASE.values()), abs=1e-12)
    assert c.delta_nats == pytest.approx(c.delta_bpb * NATS_PER_BPB, abs=1e-12)
    ref = scipy_stats.ttest_ind([x - 0.005 for x in base_loss], good_loss, equal_var=False, alternative="greater")
    assert c.rule.p == pytest.approx(ref.pvalue, rel=1e-7)
    assert c.gain.p == pytest.approx(
        scipy_stats.ttest_ind(base_loss, good_loss, equal_var=False, alternative="greater").pvalue, rel=1e-7
    )
    assert c.rule.p < 0.01 and c.rule_met and c.why == "met"


def test_rule_not_met_when_small_noncompliant_or_on_other_tokens(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    for seed in range(3):
        make_run(sweep, f"a{seed}", seed, {"standard": BASE[seed]}, name="base")
        # a gain of 0.0005 bpb = 0.0016 nats, below the 0.005-nat margin
        make_run(sweep, f"b{seed}", seed, {"standard": BASE[seed] - 0.0005}, name="small")
        slot = {"standard": GOOD[seed], "slot": GOOD[seed] - 0.1}
        make_run(sweep, f"c{seed}", seed, slot, name="slot", compliant=False)
        make_run(sweep, f"d{seed}", seed, {"standard": GOOD[seed]}, name="other_tokens", tokens=TOKENS + 64)
    rep = build_report(load_runs([sweep])[0], baseline="base")
    by = {(c.group, c.mode): c for c in rep.comparisons}
    small = by[("small", "standard")]
    assert small.gain.p < 0.5 < small.rule.p and not small.rule_met and small.why.startswith("p(gain > 0.005)")
    assert by[("slot", "standard")].rule_met  # its standard mode is compliant
    assert ("slot", "slot") not in by  # the baseline has no slot mode
    assert rep.stats[("slot", "slot")].compliant is False
    assert by[("other_tokens", "standard")].why == "scored on different tokens/bytes"


def test_eval_results_beside_the_run_add_modes_by_name(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    d = make_run(sweep, "0_seed0", 0, {"standard": 1.3})
    (d / "eval_ttt").mkdir()
    results = {"lora_ttt": eval_result(1.25, "lora_ttt"), "standard": eval_result(1.31, "standard")}
    ev = {"mode": "lora_ttt", "artifact": "final_model.int8_zlib.ptz", "results": results}
    (d / "eval_ttt" / "eval_result.json").write_text(json.dumps(ev))
    (d / "eval_float").mkdir()  # an evaluation of the float weights: not the run's artifact, left out
    floats = {"artifact": "final_model.float.ptz", "results": {"sliding": eval_result(1.0, "sliding")}}
    (d / "eval_float" / "eval_result.json").write_text(json.dumps(floats))
    (d / "eval_quick").mkdir()  # eval.py max_tokens=500: a prefix never replaces the full-set score
    quick = {
        "artifact": "final_model.int8_zlib.ptz",
        "max_tokens": 500,
        "results": {"sliding": eval_result(1.0, "sliding")},
    }
    (d / "eval_quick" / "eval_result.json").write_text(json.dumps(quick))
    with pytest.warns(UserWarning) as caught:
        (run,) = load_runs([sweep])[0]
    said = [str(w.message) for w in caught]
    assert any("replaces" in m for m in said)
    left_out = "eval_float/eval_result.json scores final_model.float.ptz, not final_model.int8_zlib.ptz: left out"
    assert any(left_out in m for m in said)
    assert any(
        "eval_quick/eval_result.json scores the first 500 validation targets (max_tokens): left out" in m for m in said
    )
    assert run.modes["lora_ttt"]["val_bpb"] == 1.25 and run.sources["lora_ttt"] == "eval_ttt/eval_result.json"
    assert run.modes["standard"]["val_bpb"] == 1.31  # the later evaluation of the artifact wins, with a warning
    assert "sliding" not in run.modes


def test_unfinished_duplicate_and_mixed_runs_are_reported(tmp_path):
    sweep = tmp_path / "s"
    sweep.mkdir()
    make_run(sweep, "0_seed0", 0, {"standard": 1.3})
    make_run(sweep, "1_seed1", 1, {"standard": 1.3}, config={"train": {"iterations": 99}})
    make_run(sweep, "2_seed1", 1, {"standard": 1.29}, config={"train": {"iterations": 99}})
    bad = make_run(sweep, "3_seed2", 2, {"standard": 1.3})
    (bad / "results.json").unlink()
    ev = sweep / "eval_out"  # an eval.py output directory (Hydra's .hydra/ but no train.log): not a run
    (ev / ".hydra").mkdir(parents=True)
    (ev / ".hydra" / "config.yaml").write_text("name: eval\n")
    (ev / "eval_result.json").write_text(json.dumps({"results": {"standard": eval_result(1.2, "standard")}}))
    runs, notes = load_runs([sweep])
    assert [r.path.name for r in runs] == ["0_seed0", "2_seed1"]
    text = "\n".join(notes)
    assert "3_seed2: no results" in text and "seed 1 2 times" in text and "differ in train.iterations" in text


def test_steps_and_time_come_from_results_or_the_last_log_line(tmp_path):
    d = make_run(tmp_path / "s", "0_seed0", 0, {"standard": 1.3}, steps=10)
    (run,) = load_runs([tmp_path / "s"])[0]
    assert (run.steps, run.train_time_ms, len(run.train_curve), len(run.val_curve)) == (10, 1000.0, 10, 1)
    with open(d / "train.log", "a") as f:
        f.write("step:11/20 train_loss:4.0 train_time:1100ms step_avg:100.00ms\n")
        f.write("stopping_early: wallclock_cap train_time:1234ms step:12/20\n")
    (run,) = load_runs([tmp_path / "s"])[0]
    assert (run.steps, run.train_time_ms) == (12, 1234.0)
    res = json.loads((d / "results.json").read_text())
    (d / "results.json").write_text(json.dumps({**res, "training": {"steps": 13, "train_time_ms": 1300.5}}))
    (run,) = load_runs([tmp_path / "s"])[0]
    assert (run.steps, run.train_time_ms) == (13, 1300.5)


def test_group_by_config_keys(two_groups):
    runs, _ = load_runs([two_groups], by=["model.mlp_act"])
    assert {r.identity.group for r in runs} == {"demo[model.mlp_act=relu2]", "demo[model.mlp_act=leaky_relu2]"}
    with pytest.raises(CompareError, match="no such key"):
        load_runs([two_groups], by=["model.nope"])


def test_cli_writes_tables_json_and_plots_and_never_overwrites(two_groups, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([str(two_groups), "--baseline", "demo[model.mlp_act=relu2]", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "p(gain>0.005)" in printed and "MET" in printed and "compare: 6 runs, 2 groups" in printed
    md = (out / "compare.md").read_text()
    assert "| demo[model.mlp_act=leaky_relu2] | sliding | 3 | 1.194100 ± 0.000361 |" in md
    assert "![curves](curves.png)" in md and str(tmp_path) not in md
    data = json.loads((out / "compare.json").read_text())
    assert len(data["runs"]) == 6 and data["baseline"] == "demo[model.mlp_act=relu2]"
    for png in ("curves.png", "final_bpb.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare.main([str(two_groups), "--out", str(out)]) == 2  # an earlier comparison is kept
    assert "--force" in capsys.readouterr().err
    assert compare.main([str(two_groups), "--baseline", "nope", "--out", str(tmp_path / "x")]) == 2
    assert compare.main([str(tmp_path / "missing")]) == 2
