"""Compare finished runs: `python -m pgolf.tools.compare RUN_OR_SWEEP_DIR... [--baseline GROUP] [--out DIR]`.

Reads run directories (no W&B needed): `.hydra/` (config, overrides; the sweep's `multirun.yaml`),
`results.json` (export sizes, the round-trip eval modes, the float model's `pre_quant` diagnostic),
every `eval_result.json` in the run directory or up to two levels below it (`python eval.py ...
out_dir=RUN/eval`; a symlink there to an eval output directory works too), and `train.log` (curves).
Runs are grouped by experiment and variant (`pgolf.train.identity.RunIdentity`, or `--by KEY...`); eval modes are
handled by name, whatever they are.

Printed and written (`compare.md`, `compare.json`, plots `curves.png` and `final_bpb.png` from
`pgolf.tools.plots`; an --out that holds any of them is refused before any run is read, unless --force):
* per run: seed, steps, training time, artifact bytes, code bytes (its packed train_gpt.py), val_bpb of every mode;
* per group and mode: n, mean ± sample std (ddof 1) of val_bpb and of val_loss;
* against the baseline group, per mode: Δbpb and Δnats of the means (negative = better), and two one-sided
  Welch t-tests on the per-seed val_loss (nats per token): p(gain > 0) and p(gain > margin), where
  gain = mean_baseline − mean_group. The challenge's rule (its README: beat the SOTA by ≥ 0.005 nats at
  p < 0.01) is met when p(gain > 0.005) < 0.01, both groups have ≥ 2 runs, every run of both groups is
  compliant in that mode, and all of them were scored on the same tokens and bytes.

A note names every group whose runs differ in more than their seed: in their configs (`pgolf.tools.runs`) or
in their code, the sha256 of the packed train_gpt.py that made each run (`code_sha256`): such runs are not
replicates, and `pgolf.tools.submission` refuses them.

Nats are val_loss, the mean NLL per scored token; on one validation set val_loss = val_bpb · ln 2 ·
bytes/tokens, so Δnats = Δbpb · ln 2 · bytes/tokens (the factor is printed) and both tests give the same p.
Run directories are read by `pgolf.tools.runs`, the statistics are in `pgolf.tools.stats`, the plots in
`pgolf.tools.plots`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from pgolf.io import atomic_write_bytes, sha256_file
from pgolf.tools.plots import plot_curves, plot_finals
from pgolf.tools.runs import CompareError, Run, load_runs
from pgolf.tools.stats import MissingScipyError, Welch, mean_std, welch_greater

MARGIN_NATS = 0.005  # the challenge README's record margin
ALPHA = 0.01
DIAGNOSTIC_MODES = ("pre_quant",)  # the float model before quantization: informative, never a score
MODE_ORDER = ("pre_quant", "standard", "sliding")
SCRIPT = "train_gpt.py"


# ---- groups and the comparison ---------------------------------------------------------------------------
@dataclass
class ModeStats:
    group: str
    mode: str
    n: int
    seeds: list[int]
    bpb: list[float]
    loss: list[float]
    bpb_mean: float
    bpb_std: float
    loss_mean: float
    loss_std: float
    compliant: bool
    reasons: list[str]
    tokens: list[int]
    bytes: list[float]

    @property
    def nats_per_bpb(self) -> float:
        """ln 2 · bytes/tokens: val_loss = val_bpb · this (one validation set)."""
        return math.log(2) * self.bytes[0] / self.tokens[0] if self.tokens and self.tokens[0] else float("nan")


@dataclass
class Comparison:
    group: str
    baseline: str
    mode: str
    delta_bpb: float
    delta_nats: float
    gain: Welch  # H1: baseline − group > 0 (nats)
    rule: Welch  # H1: baseline − group > margin (nats)
    rule_met: bool
    why: str


def group_order(runs: list[Run], baseline: str | None) -> list[str]:
    groups = list(dict.fromkeys(r.identity.group for r in runs))
    return ([baseline] if baseline in groups else []) + [g for g in groups if g != baseline]


def mode_order(runs: list[Run]) -> list[str]:
    seen = list(dict.fromkeys(m for r in runs for m in r.modes))
    return [m for m in MODE_ORDER if m in seen] + [m for m in seen if m not in MODE_ORDER]


def mode_stats(runs: list[Run], group: str, mode: str) -> ModeStats | None:
    rs = sorted((r for r in runs if r.identity.group == group and mode in r.modes), key=lambda r: r.seed)
    if not rs:
        return None
    res = [r.modes[mode] for r in rs]
    bpb, loss = [float(x["val_bpb"]) for x in res], [float(x["val_loss"]) for x in res]
    bm, bs = mean_std(bpb)
    lm, ls = mean_std(loss)
    return ModeStats(
        group,
        mode,
        len(rs),
        [r.seed for r in rs],
        bpb,
        loss,
        bm,
        bs,
        lm,
        ls,
        all(bool(x.get("compliant", False)) for x in res),
        sorted({str(x.get("reason", "")) for x in res if not x.get("compliant", False)}),
        [int(x.get("tokens", 0)) for x in res],
        [float(x.get("bytes", 0.0)) for x in res],
    )


def compare_to(base: ModeStats, other: ModeStats, margin: float = MARGIN_NATS, alpha: float = ALPHA) -> Comparison:
    gain = welch_greater(base.loss, other.loss, 0.0)
    rule = welch_greater(base.loss, other.loss, margin)
    why = ""
    if base.mode in DIAGNOSTIC_MODES:
        why = "diagnostic mode (float model, not the artifact)"
    elif not (base.compliant and other.compliant):
        why = "not compliant"
    elif len(set(base.tokens + other.tokens)) > 1 or len(set(base.bytes + other.bytes)) > 1:
        why = "scored on different tokens/bytes"
    elif base.n < 2 or other.n < 2:
        why = "needs >= 2 runs per group"
    elif not rule.p < alpha:
        why = f"p(gain > {margin}) = {rule.p:.3g} >= {alpha}"
    return Comparison(
        other.group,
        base.group,
        base.mode,
        other.bpb_mean - base.bpb_mean,
        other.loss_mean - base.loss_mean,
        gain,
        rule,
        not why,
        why or "met",
    )


@dataclass
class Report:
    runs: list[Run]
    groups: list[str]
    modes: list[str]
    stats: dict[tuple[str, str], ModeStats]
    comparisons: list[Comparison]
    baseline: str | None
    margin: float
    alpha: float
    notes: list[str]


def build_report(
    runs: list[Run], baseline: str | None = None, margin: float = MARGIN_NATS, alpha: float = ALPHA, notes=None
) -> Report:
    if not runs:
        raise CompareError("no finished runs to compare")
    groups = group_order(runs, baseline)
    if baseline is not None and baseline not in groups:
        raise CompareError(f"--baseline {baseline!r} is not one of the groups: {', '.join(groups)}")
    modes = mode_order(runs)
    stats = {(g, m): s for g in groups for m in modes if (s := mode_stats(runs, g, m)) is not None}
    comps = []
    if baseline is not None:
        for g in groups[1:]:
            for m in modes:
                if (baseline, m) in stats and (g, m) in stats:
                    comps.append(compare_to(stats[(baseline, m)], stats[(g, m)], margin, alpha))
    return Report(runs, groups, modes, stats, comps, baseline, margin, alpha, [*(notes or []), *code_notes(runs)])


# ---- code ----------------------------------------------------------------------------------------------------
def code_sha256(run: Run) -> str | None:
    """The sha256 of the packed train_gpt.py that made `run`: the last `code_sha256:` line of its log (what
    it ran, pgolf/train/build.py `log_header`; read with the log, `Run.logged_code`), else the hash of the
    train_gpt.py beside it (a train.py run keeps its own; a packed run's folder holds the script), else None
    (a run made before the packer)."""
    if run.logged_code is not None:
        return run.logged_code
    script = run.path / SCRIPT
    return sha256_file(script) if script.is_file() else None


def code_notes(runs: list[Run]) -> list[str]:
    """A note for every group whose runs were made by different code (`code_sha256`; runs of unknown code
    aside): they differ in more than their seed, whatever their configs say, and a submission refuses them
    (`pgolf.tools.submission`)."""
    notes = []
    for g in dict.fromkeys(r.identity.group for r in runs):
        by_sha: dict[str, list[str]] = {}
        for r in runs:
            if r.identity.group == g and (sha := code_sha256(r)) is not None:
                by_sha.setdefault(sha, []).append(r.label)
        if len(by_sha) > 1:
            shown = "; ".join(f"{sha[:12]}: {_some(labels)}" for sha, labels in by_sha.items())
            notes.append(
                f"group {g} mixes runs of different code ({SCRIPT} sha256 {shown}): not replicates of one "
                f"{SCRIPT} (a submission refuses them; compare runs of one code, or name the variants with variant=...)"
            )
    return notes


def _some(labels: list[str], k: int = 3) -> str:
    return ", ".join(labels[:k]) + (f" and {len(labels) - k} more" if len(labels) > k else "")


# ---- tables ------------------------------------------------------------------------------------------------
def _f(x: float | None, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def run_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    head = ["group", "seed", "steps", "train s", "artifact bytes", "code bytes", *(f"{m} bpb" for m in rep.modes)]
    head.append("run")
    rows = []
    for g in rep.groups:
        for r in sorted((r for r in rep.runs if r.identity.group == g), key=lambda r: r.seed):
            t = r.train_time_ms
            rows.append(
                [
                    g,
                    str(r.seed),
                    str(r.steps if r.steps is not None else "–"),
                    _f(t / 1000 if t is not None else None, 1),
                    f"{r.artifact_bytes:,}" if r.artifact_bytes is not None else "–",
                    f"{r.code_bytes:,}" if r.code_bytes is not None else "–",
                    *(_f(r.modes[m]["val_bpb"], 6) if m in r.modes else "–" for m in rep.modes),
                    r.label,
                ]
            )
    return head, rows


def summary_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    head = ["group", "mode", "n", "val_bpb mean ± std", "val_loss mean ± std", "compliant"]
    rows = []
    for g in rep.groups:
        for m in rep.modes:
            s = rep.stats.get((g, m))
            if s is None:
                continue
            comp = "yes" if s.compliant else "NO"
            if m in DIAGNOSTIC_MODES:
                comp += " (diagnostic)"
            rows.append(
                [
                    g,
                    m,
                    str(s.n),
                    f"{_f(s.bpb_mean, 6)} ± {_f(s.bpb_std, 6)}",
                    f"{_f(s.loss_mean, 6)} ± {_f(s.loss_std, 6)}",
                    comp,
                ]
            )
    return head, rows


def comparison_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    m = rep.margin
    head = ["group", "mode", "Δ bpb", "Δ nats", "t", "df", "p(gain>0)", f"p(gain>{m})", "rule"]
    rows = []
    for c in rep.comparisons:
        rows.append(
            [
                c.group,
                c.mode,
                f"{c.delta_bpb:+.6f}",
                f"{c.delta_nats:+.6f}",
                _f(c.rule.t, 2),
                _f(c.rule.df, 2),
                _p(c.gain.p),
                _p(c.rule.p),
                "MET" if c.rule_met else f"not met: {c.why}",
            ]
        )
    return head, rows


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def method_lines(rep: Report) -> list[str]:
    lines = [
        "Δ = mean(group) − mean(baseline) (negative = better). Nats are val_loss (mean NLL per scored token); "
        "on one validation set val_loss = val_bpb · ln 2 · bytes/tokens.",
        f"p(gain>x): one-sided Welch t-test on the per-seed val_loss, H1: mean(baseline) − mean(group) > x nats "
        f"(t and df shown for x = {rep.margin}). Rule (challenge README): p(gain>{rep.margin}) < {rep.alpha}, "
        "≥ 2 runs per group, all runs compliant in the mode and scored on the same tokens and bytes.",
    ]
    factors = {round(s.nats_per_bpb, 9) for s in rep.stats.values() if s.tokens and len(set(s.tokens)) == 1}
    if len(factors) == 1:
        lines.append(f"nats per bpb on this validation set: ln 2 · bytes/tokens = {factors.pop():.6f}.")
    return lines


def render_text(rep: Report) -> str:
    parts = ["Runs", text_table(*run_rows(rep)), "", "Groups", text_table(*summary_rows(rep))]
    if rep.comparisons:
        parts += ["", f"Against the baseline {rep.baseline}", text_table(*comparison_rows(rep))]
    parts += ["", *method_lines(rep), *(f"note: {n}" for n in rep.notes)]
    return "\n".join(parts)


def render_markdown(rep: Report, plots: list[str] = ()) -> str:
    parts = ["# Run comparison", "", "## Runs", "", md_table(*run_rows(rep)), "", "## Groups", ""]
    parts += [md_table(*summary_rows(rep)), ""]
    if rep.comparisons:
        parts += [f"## Against the baseline `{rep.baseline}`", "", md_table(*comparison_rows(rep)), ""]
    parts += [*(f"{x}  " for x in method_lines(rep)), ""]
    if rep.notes:
        parts += ["Notes:", "", *(f"- {n}" for n in rep.notes), ""]
    for p in plots:
        parts += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(parts)


def report_json(rep: Report) -> dict:
    return {
        "baseline": rep.baseline,
        "margin_nats": rep.margin,
        "alpha": rep.alpha,
        "runs": [
            {
                "group": r.identity.group,
                "experiment": r.identity.experiment,
                "variant": r.identity.variant,
                "seed": r.seed,
                "run": r.label,
                "steps": r.steps,
                "train_time_ms": r.train_time_ms,
                "artifact_bytes": r.artifact_bytes,
                "code_bytes": r.code_bytes,
                "code_sha256": code_sha256(r),
                "modes": {m: {k: v for k, v in x.items() if k != "settings"} for m, x in r.modes.items()},
            }
            for r in rep.runs
        ],
        "groups": [asdict(s) for s in rep.stats.values()],
        "comparisons": [asdict(c) for c in rep.comparisons],
        "notes": rep.notes,
    }


# ---- command -----------------------------------------------------------------------------------------------
def output_files(out: Path, plots: bool = True) -> list[Path]:
    """Every file `write_outputs` writes into `out`: compare.md, compare.json and, with `plots`, the PNGs."""
    return [out / "compare.md", out / "compare.json", *((out / "curves.png", out / "final_bpb.png") if plots else ())]


def check_outputs(out: Path, plots: bool = True, force: bool = False) -> None:
    """Refuse (CompareError) an `out` that is not a directory, or one that holds any file `write_outputs`
    would write (`output_files`) unless `force`: a user's file is never replaced unasked."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is not a directory; choose another --out")
    there = [p.name for p in output_files(out) if p.exists()]  # PNGs too: they would sit beside a new comparison
    if there and not force:
        raise CompareError(f"{out} already holds {', '.join(there)}; choose another --out, or pass --force to replace")


def write_outputs(rep: Report, out: Path, plots: bool = True, force: bool = False) -> list[Path]:
    """Write compare.json, compare.md and (with `plots`) the PNGs into `out`, each atomically; refused
    first by `check_outputs`. Without `plots`, the PNGs of the comparison replaced (`force`) are removed: they
    are not this one's. Returns the files written."""
    check_outputs(out, plots, force)
    targets = [out / "compare.md", out / "compare.json"]
    written = []
    pngs: list[Path] = []
    if plots:
        pngs = [plot_curves(rep, out / "curves.png"), plot_finals(rep, out / "final_bpb.png")]
        written += pngs
    else:
        for p in output_files(out)[2:]:
            p.unlink(missing_ok=True)
    atomic_write_bytes(targets[1], (json.dumps(report_json(rep), indent=2) + "\n").encode())
    atomic_write_bytes(targets[0], render_markdown(rep, [p.name for p in pngs]).encode())
    return [*written, *targets]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgolf.tools.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories, or sweep/output directories to search for runs")
    ap.add_argument("--baseline", help="the group to compare against (e.g. record_1263 or 'demo[model.x=y]')")
    ap.add_argument("--by", nargs="+", metavar="KEY", help="group by the experiment and these config keys instead")
    ap.add_argument("--out", help="output directory (default outputs/compare/<time>)")
    ap.add_argument("--margin", type=float, default=MARGIN_NATS, help="required gain in nats (default 0.005)")
    ap.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default 0.01)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--force", action="store_true", help="replace an earlier comparison in --out")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out) if args.out else Path("outputs") / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    try:
        check_outputs(out, plots=not args.no_plots, force=args.force)  # before any run is read
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs, notes = load_runs(args.runs, args.by)
        notes += [str(w.message) for w in caught]
        rep = build_report(runs, args.baseline, args.margin, args.alpha, notes)
        files = write_outputs(rep, out, plots=not args.no_plots, force=args.force)
    except (CompareError, MissingScipyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_text(rep))
    print(f"wrote {', '.join(str(f) for f in files)}")
    print(f"compare: {len(rep.runs)} runs, {len(rep.groups)} groups in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
