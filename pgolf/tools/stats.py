"""Statistics for comparing groups of seed runs: mean and sample std, Welch's one-sided t-test.

The Student-t tail is `scipy.stats.t.sf` (the `analysis` extra: `pip install pgolf[analysis]`), imported when
a p-value is first needed, so that importing this module, and a comparison without a baseline, work without
scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCIPY_HINT = "the Welch t-test needs scipy: pip install pgolf[analysis]"


class MissingScipyError(ImportError):
    """scipy (the `analysis` extra) is not installed and a p-value was asked for."""


def mean_std(xs: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof 1) of `xs`; the std is NaN for a single value."""
    n = len(xs)
    m = math.fsum(xs) / n
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, s


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (real, > 0) degrees of freedom: `scipy.stats.t.sf`.
    Raises MissingScipyError (one line naming the extra) when scipy is not installed."""
    try:
        from scipy import stats
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "scipy":  # scipy is there but one of its own imports fails: show that
            raise
        raise MissingScipyError(SCIPY_HINT) from None
    return float(stats.t.sf(t, df))


@dataclass
class Welch:
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # one-sided: H1 mean(a) - mean(b) > margin


def welch_greater(a: list[float], b: list[float], margin: float = 0.0) -> Welch:
    """Welch's unequal-variance t-test, one-sided: H1 is mean(a) − mean(b) > margin (the units of a and b).

    Equals `scipy.stats.ttest_ind([x - margin for x in a], b, equal_var=False, alternative="greater")`, with
    two cases decided without a distribution: a group of fewer than 2 values has no variance and gives no
    test (t, df and p NaN); when neither group varies (identical reruns) the sign of the difference decides
    (t = ±inf or 0, df NaN, p = 0 when mean(a) − mean(b) > margin, else 1). Raises MissingScipyError only
    when a p-value has to be computed and scipy is absent."""
    if len(a) < 2 or len(b) < 2:
        return Welch(float("nan"), float("nan"), float("nan"))
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se2 = va + vb
    diff = ma - mb - margin
    if se2 == 0.0:  # no spread at all (identical reruns): the sign alone decides
        return Welch(math.copysign(math.inf, diff) if diff else 0.0, float("nan"), 0.0 if diff > 0 else 1.0)
    t = diff / math.sqrt(se2)
    df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))  # Welch-Satterthwaite
    return Welch(t, df, t_sf(t, df))
