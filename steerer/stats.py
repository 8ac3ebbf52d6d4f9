"""The project's one statistics module: intervals and tests shared by the A/B report, the probes' training
reports and the benchmarks, so a formula (and its edge cases) is written once.

Pure functions of counts and samples; no I/O, no model. Heavy libraries (statsmodels, scipy) are imported
inside the functions that need them, so `wilson` and the bootstraps cost nothing to import (the serve
plugin and the runtime import this module's neighbours).

- `wilson`: Wilson score interval of a proportion (closed form; equal to statsmodels' "wilson").
- `two_proportions`: difference of two proportions with Newcombe's hybrid-score interval and a score test.
- `needed_per_arm`: fixed-horizon sample size per arm for a difference of proportions (planning only).
- `welch`: difference of two means by Welch's t-test.
- `chi_square`: goodness of fit of counts against expected counts.
- `paired_gain_ci`, `ratio_of_means_ci`: percentile bootstraps over paired units.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

POWER = 0.8


def z_value(alpha: float) -> float:
    """Two-sided standard-normal critical value (1.959964 for alpha = 0.05)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return NormalDist().inv_cdf(1 - alpha / 2)


def wilson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float] | None:
    """Wilson score interval of successes / n at level 1 - alpha; None for n = 0 (no data is no interval).

    Why Wilson: unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage at rates
    near 0 or 1 and at small n, which is where probe and compliance rates live."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    z = z_value(alpha)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds where rounding leaves 1e-17
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def two_proportions(s1: int, n1: int, s0: int, n0: int, alpha: float = 0.05) -> tuple[float, float, float, float]:
    """(rate1 - rate0, Newcombe low, high, two-sided score-test p). Newcombe's interval combines the two
    Wilson intervals, so it inherits their behaviour near 0 and 1; needs n1, n0 > 0."""
    from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

    if n1 <= 0 or n0 <= 0:
        raise ValueError(f"both samples need responses, got n1={n1}, n0={n0}")
    with np.errstate(divide="ignore", invalid="ignore"):  # statsmodels also computes ratios, undefined at 0
        low, high = confint_proportions_2indep(s1, n1, s0, n0, method="newcomb", compare="diff", alpha=alpha)
        test = test_proportions_2indep(s1, n1, s0, n0, method="score", compare="diff")
    p = float(test.pvalue)
    return s1 / n1 - s0 / n0, float(low), float(high), p if math.isfinite(p) else 1.0


def needed_per_arm(p1: float, p0: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Responses per arm (equal split) a fixed-horizon test needs to detect p1 vs p0 with `power` (Cohen's h);
    None if p1 == p0. A planning figure, not a stopping rule."""
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    h = proportion_effectsize(p1, p0)
    if not math.isfinite(h) or abs(h) < 1e-9:
        return None
    n = NormalIndPower().solve_power(effect_size=abs(h), alpha=alpha, power=power, ratio=1.0)
    return int(math.ceil(float(np.asarray(n).item())))


def welch(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> tuple[float | None, ...]:
    """(mean a, mean b, difference, low, high, p) by Welch's t-test; None where there are too few values."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    mean_a = float(a.mean()) if len(a) else None
    mean_b = float(b.mean()) if len(b) else None
    if len(a) < 2 or len(b) < 2:
        diff = None if mean_a is None or mean_b is None else mean_a - mean_b
        return mean_a, mean_b, diff, None, None, None
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no spread: the test is undefined; the difference is exact
        d = mean_a - mean_b
        return mean_a, mean_b, d, d, d, 1.0 if mean_a == mean_b else 0.0
    with warnings.catch_warnings():  # scipy warns on nearly constant samples; the interval is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=False)
        ci = test.confidence_interval(1 - alpha)
    return mean_a, mean_b, mean_a - mean_b, float(ci.low), float(ci.high), float(test.pvalue)


def chi_square(observed: Sequence[float], expected: Sequence[float]) -> tuple[float, float]:
    """(chi-square statistic, p) of observed counts against expected counts (same total)."""
    from scipy import stats

    chi2, p = stats.chisquare(list(observed), list(expected))
    return float(chi2), float(p)


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_gain_ci(treated: Sequence[float], base: Sequence[float], resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(treated) - mean(base), units resampled in pairs; None if empty."""
    t, b = np.asarray(treated, float), np.asarray(base, float)
    if len(t) != len(b):
        raise ValueError(f"paired samples differ in length: {len(t)} vs {len(b)}")
    if len(t) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    return _percentile(t[idx].mean(1) - b[idx].mean(1), level)


def ratio_of_means_ci(log_deltas: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95,
                      ) -> tuple[float, float] | None:
    """Percentile bootstrap interval of exp(mean of per-unit log differences), e.g. a perplexity ratio from
    per-prompt NLL differences; None if empty."""
    d = np.asarray(log_deltas, float)
    if len(d) == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    return _percentile(np.exp(d[idx].mean(1)), level)
