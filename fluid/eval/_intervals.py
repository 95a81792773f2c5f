"""The mean of repeated measurements (a sweep's seeds) and its Student-t interval.

(ShapesEval's interval of a proportion, `wilson_interval`, lives with the judge.) SciPy is
not a dependency of fluid: the t quantile is computed here from the closed form of the t
distribution's CDF for an integer number of degrees of freedom, which is all a count of
seeds needs.
"""

import math

import numpy as np
from numpy.typing import ArrayLike


def _t_central_probability(theta: float, df: int) -> float:
    """`P(|T| <= sqrt(df) * tan(theta))` for Student's t with `df` degrees of freedom
    (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    if df == 1:
        return 2 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(1, (df - 3) // 2 + 1):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + sin * total)


def _t_critical(confidence: float, df: int) -> float:
    """The `t` with `P(|T| <= t) = confidence`: `t_{(1 + confidence) / 2, df}`."""
    # The central probability rises with theta = atan(t / sqrt(df)) over [0, pi / 2):
    # bisection to the last bit.
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _t_central_probability(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean of independent measurements and its Student-t confidence interval,
    `mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)` with `s` the sample standard
    deviation: what `scipy.stats.t.interval(confidence, n - 1, mean, s / sqrt(n))` gives.

    **Arguments:**

    - `values`: the `n` measurements (one per seed, say), 1-D and finite.
    - `confidence`: the interval's coverage, in (0, 1).

    **Returns:**

    `(mean, low, high)`. One measurement has no interval: `low` and `high` are NaN then
    (its spread is unknown, and no width would be honest).
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"mean_interval takes a non-empty 1-D list, got shape {values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"mean_interval takes finite values, got {values.tolist()}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    mean = float(values.mean())
    n = len(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = _t_critical(confidence, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half
