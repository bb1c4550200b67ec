"""The statistics of a report, in one place: Student-t quantiles, t-intervals, paired and Welch differences.

Every interval is two-sided at 95%. The t quantile is exact for any real degrees of freedom (Welch's
are fractional): the t distribution's tail is a regularized incomplete beta function, inverted by bisection.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from functools import lru_cache

LEVEL = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _beta_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_two_sided_tail(t: float, df: float) -> float:
    """P(|T| > t) for Student's T with `df` degrees of freedom."""
    return _beta_regularized(df / 2.0, 0.5, df / (df + t * t))


@lru_cache(maxsize=None)
def t_quantile(df: float, level: float = LEVEL) -> float:
    """The half-width multiplier q with P(|T| <= q) = level (12.706 for df=1, 1.960 as df grows)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    lo, hi = 0.0, 1.0
    while t_two_sided_tail(hi, df) > 1.0 - level:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_tail(mid, df) > 1.0 - level else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2.0


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, 95% t-interval half-width); the half-width is nan below two values."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def welch_interval(base: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """mean(other) - mean(base), its 95% Welch half-width and Welch-Satterthwaite degrees of freedom."""
    if not base or not other:
        return math.nan, math.nan, math.nan
    diff = statistics.fmean(other) - statistics.fmean(base)
    if len(base) < 2 or len(other) < 2:
        return diff, math.nan, math.nan
    va, vb = statistics.variance(base) / len(base), statistics.variance(other) / len(other)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return diff, 0.0, math.inf
    df = (va + vb) ** 2 / (va**2 / (len(base) - 1) + vb**2 / (len(other) - 1))
    return diff, t_quantile(df) * se, df
