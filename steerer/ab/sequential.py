"""An always-valid (anytime) confidence sequence for the difference between an arm and the control.

Why: a fixed-horizon 95% interval checked every hour of a running experiment excludes zero by chance far
more often than 5% of the time (each look is another chance). A confidence sequence holds at every sample
size at once, so an experiment can be watched continuously and stopped the first time it excludes zero.

What: the asymptotic confidence sequence of Waudby-Smith, Arnold, Wu, McAuliffe and Ramdas ("Time-uniform
central limit theory and asymptotic confidence sequences", Annals of Statistics 2024), which is Robbins'
two-sided normal-mixture boundary (Howard, Ramdas, McAuliffe, Sekhon, "Time-uniform, nonparametric,
nonasymptotic confidence sequences", Annals of Statistics 2021) applied to a running mean with a
running variance estimate:

    mean_t +- sigma_t * sqrt( 2 (t rho^2 + 1) / (t^2 rho^2) * log( sqrt(t rho^2 + 1) / alpha ) ),

rho chosen to make it tightest near `t_opt` observations. For an arm A against the control C with known
assignment probability pi = share_A / (share_A + share_C), each response of A or C with a checker verdict
y in {0, 1} contributes phi = y / pi (in A) or -y / (1 - pi) (in C), whose mean estimates p_A - p_C (the
inverse-probability-weighted difference the paper uses for randomized experiments).

Why no library: `confseq` (Howard's package, PyPI 0.0.11, 2023) ships only as a C++ source build needing
a compiler, CMake and Boost, and pins pytest and pandas as run-time requirements. The boundary is one line;
it is tested here against the values confseq's own unit tests take from the R reference implementation
(tests/test_ab_analysis.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def normal_mixture_rho(v_opt: float, alpha: float) -> float:
    """The mixture variance that makes the two-sided boundary tightest at intrinsic time `v_opt`
    (as confseq's `TwoSidedNormalMixture::best_rho`)."""
    if v_opt <= 0 or not 0 < alpha < 1:
        raise ValueError("v_opt must be > 0 and alpha in (0, 1)")
    log_inv = math.log(1 / alpha)
    return v_opt / (2 * log_inv + math.log(1 + 2 * log_inv))


def normal_mixture_bound(v: float | np.ndarray, alpha: float, v_opt: float) -> float | np.ndarray:
    """Two-sided normal-mixture uniform boundary on a sum with variance process v:
    P(exists t: |S_t| >= bound(V_t)) <= alpha for sub-Gaussian increments."""
    rho = normal_mixture_rho(v_opt, alpha)
    v = np.asarray(v, dtype=float)
    out = np.sqrt((v + rho) * (np.log1p(v / rho) + 2 * math.log(1 / alpha)))
    return float(out) if out.ndim == 0 else out


def asymptotic_radius(t: np.ndarray, sigma: np.ndarray, alpha: float, t_opt: float) -> np.ndarray:
    """Half-width of the asymptotic CS after t observations with standard deviation estimate sigma:
    sigma * bound(t; v_opt = t_opt) / t, the paper's closed form written through Howard's boundary."""
    t = np.asarray(t, dtype=float)
    return np.asarray(sigma, dtype=float) * normal_mixture_bound(t, alpha, t_opt) / t


@dataclass(frozen=True)
class SequenceResult:
    n: int  # observations (responses of the arm or the control with a verdict)
    estimate: float
    low: float
    high: float
    first_excluding_zero: int | None  # the first n (after burn-in) at which the sequence excluded zero
    burn_in: int = 2  # the earliest n a crossing counts at (see `difference_sequence`)

    @property
    def first_is_floor(self) -> bool:
        """True when `first_excluding_zero` equals the burn-in: the sequence already excluded zero when counting
        began, so the figure is the floor the analysis set, not an observed crossing."""
        return self.first_excluding_zero is not None and self.first_excluding_zero == self.burn_in


def ipw_terms(y: np.ndarray, in_arm: np.ndarray, pi: float) -> np.ndarray:
    """phi_i whose mean is p_arm - p_control under randomization with P(arm | arm or control) = pi."""
    if not 0 < pi < 1:
        raise ValueError("pi must be in (0, 1)")
    y = np.asarray(y, dtype=float)
    in_arm = np.asarray(in_arm, dtype=bool)
    return np.where(in_arm, y / pi, -y / (1 - pi))


def difference_sequence(
    y: np.ndarray, in_arm: np.ndarray, pi: float, alpha: float = 0.05, t_opt: float = 500, burn_in: int = 30
) -> SequenceResult | None:
    """The confidence sequence for p_arm - p_control over responses in arrival order, read at the last one.

    `burn_in`: the earliest n at which a crossing of zero counts (the asymptotic sequence needs its variance
    estimate to settle; before it a run of identical outcomes reads as zero variance)."""
    phi = ipw_terms(y, in_arm, pi)
    n = len(phi)
    if n < 2:
        return None
    t = np.arange(1, n + 1, dtype=float)
    mean = np.cumsum(phi) / t
    var = np.maximum(np.cumsum(phi**2) / t - mean**2, 0.0) * t / np.maximum(t - 1, 1)  # unbiased, running
    radius = asymptotic_radius(t, np.sqrt(var), alpha, t_opt)
    low, high = mean - radius, mean + radius
    excluded = (low > 0) | (high < 0)
    floor = max(burn_in, 2)
    excluded[: floor - 1] = False
    first = int(np.argmax(excluded)) + 1 if excluded.any() else None
    return SequenceResult(n, float(mean[-1]), float(low[-1]), float(high[-1]), first, floor)
