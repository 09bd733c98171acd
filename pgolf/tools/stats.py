"""Statistics for comparing groups of seed runs: mean and sample std, Welch's one-sided t-test.

The Student-t tail comes from the regularized incomplete beta function (continued fraction, modified
Lentz), so pgolf needs no scipy at run time; the tests check t, df and p against `scipy.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean_std(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = math.fsum(xs) / n
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, s


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (real) degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass
class Welch:
    t: float
    df: float
    p: float  # one-sided: H1 mean(a) - mean(b) > margin


def welch_greater(a: list[float], b: list[float], margin: float = 0.0) -> Welch:
    """Welch's unequal-variance t-test, one-sided: H1 is mean(a) − mean(b) > margin."""
    if len(a) < 2 or len(b) < 2:
        return Welch(float("nan"), float("nan"), float("nan"))
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se2 = va + vb
    diff = ma - mb - margin
    if se2 == 0.0:  # no spread at all (identical reruns): the sign alone decides
        return Welch(math.copysign(math.inf, diff) if diff else 0.0, float("nan"), 0.0 if diff > 0 else 1.0)
    t = diff / math.sqrt(se2)
    df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    return Welch(t, df, t_sf(t, df))
