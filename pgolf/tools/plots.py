"""PNG plots for `pgolf.tools.compare` (matplotlib, headless Agg backend chosen when a plot is drawn).

`curves.png`: train loss and val_bpb against step and against training time (the challenge clock), one
line per run, one colour per group (seeds share their group's colour; the legend names groups), the final
round-trip val_bpb of the artifact as a marker at the run's last step. `final_bpb.png`: every run's final
val_bpb per eval mode, one column of points per group with its mean ± std.
"""

from __future__ import annotations

import math
from pathlib import Path

from pgolf.io import atomic_path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def _plt():
    # matplotlib is a heavy optional dependency (the `analysis` extra): imported when a plot is drawn, so that
    # `compare --no-plots` and importing this module work without it.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colours(groups: list[str]) -> dict[str, str]:
    return {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(groups)}


def _robust_ylim(ax, values: list[float], pad: float = 0.05, top: float = 0.9) -> None:
    """Fit the y-axis to the values up to the `top` quantile: the train loss starts near ln V, far above the
    part worth reading; the final val_bpb markers (top=1) must all stay visible."""
    vals = sorted(v for v in values if math.isfinite(v))
    if len(vals) < 2:
        return
    lo, hi = vals[0], vals[int(top * (len(vals) - 1))]
    if hi <= lo:
        hi = vals[-1]
    span = (hi - lo) or abs(hi) * 0.01 or 1.0
    ax.set_ylim(lo - pad * span, hi + pad * span)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def final_mode(rep) -> str | None:
    """The eval mode shown as markers: standard when present, else the first non-diagnostic one."""
    modes = [m for m in rep.modes if m != "pre_quant"]
    return "standard" if "standard" in modes else (modes[0] if modes else None)


def plot_curves(rep, path: str | Path) -> Path:
    plt = _plt()
    colours = _colours(rep.groups)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    fmode = final_mode(rep)
    train_vals, val_vals, final_vals = [], [], []
    for run in rep.runs:
        c = colours[run.identity.group]
        if run.train_curve:
            step, loss, ms = zip(*run.train_curve)
            axes[0, 0].plot(step, loss, color=c, alpha=0.8, lw=1.2)
            axes[0, 1].plot([t / 1000 for t in ms], loss, color=c, alpha=0.8, lw=1.2)
            train_vals += list(loss)
        val = [(s, b, t) for s, _, b, t in run.val_curve]
        final = run.modes.get(fmode) if fmode else None
        if val:
            step, bpb, ms = zip(*val)
            axes[1, 0].plot(step, bpb, color=c, alpha=0.8, lw=1.2, marker=".", ms=4)
            axes[1, 1].plot([t / 1000 for t in ms], bpb, color=c, alpha=0.8, lw=1.2, marker=".", ms=4)
            val_vals += list(bpb)
        if final is not None and run.steps is not None:
            axes[1, 0].plot([run.steps], [final["val_bpb"]], color=c, marker="x", ms=8, mew=2, ls="none")
            if run.train_time_ms is not None:
                axes[1, 1].plot([run.train_time_ms / 1000], [final["val_bpb"]], color=c, marker="x", ms=8, mew=2)
            final_vals.append(final["val_bpb"])
    for ax in axes[0]:
        ax.set_ylabel("train loss (nats/token)")
        _robust_ylim(ax, train_vals)
    for ax in axes[1]:
        ax.set_ylabel("val_bpb")
        # every final marker, and the validation curve without its first (highest) points
        _robust_ylim(ax, final_vals + sorted(val_vals)[: max(1, int(0.75 * len(val_vals)))], pad=0.1, top=1.0)
    from matplotlib.ticker import MaxNLocator  # deferred with matplotlib itself (see _plt)

    for ax in axes[:, 0]:
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 1]:
        ax.set_xlabel("training time (s, challenge clock)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_title("train loss vs step")
    axes[0, 1].set_title("train loss vs training time")
    axes[1, 0].set_title(f"val_bpb vs step (x: final {fmode} round trip)" if fmode else "val_bpb vs step")
    axes[1, 1].set_title("val_bpb vs training time")
    counts = {g: sum(r.identity.group == g for r in rep.runs) for g in rep.groups}
    handles = [plt.Line2D([], [], color=colours[g], lw=2, label=f"{g} ({counts[g]} runs)") for g in rep.groups]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 3), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_finals(rep, path: str | Path) -> Path:
    plt = _plt()
    colours = _colours(rep.groups)
    modes = rep.modes
    fig, axes = plt.subplots(1, len(modes), figsize=(max(4.0, 3.2 * len(modes)) + 1, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for i, g in enumerate(rep.groups):
            s = rep.stats.get((g, mode))
            if s is None:
                continue
            xs = [i + 0.08 * (j - (s.n - 1) / 2) for j in range(s.n)]
            ax.plot(xs, s.bpb, "o", color=colours[g], alpha=0.7, ms=6)
            err = s.bpb_std if math.isfinite(s.bpb_std) else 0.0
            ax.errorbar([i + 0.3], [s.bpb_mean], yerr=[err], color=colours[g], marker="_", ms=14, capsize=4, lw=1.5)
        ax.set_xticks(range(len(rep.groups)))
        ax.set_xticklabels(rep.groups, rotation=20, ha="right", fontsize=8)
        ax.set_title(mode + (" (float, diagnostic)" if mode == "pre_quant" else ""))
        ax.set_ylabel("val_bpb")
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_xlim(-0.5, len(rep.groups) - 0.3)
    fig.suptitle("final val_bpb per run (points) and group mean ± std")
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
