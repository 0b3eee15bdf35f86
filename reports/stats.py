"""Statistics for ablation tables with a handful of seeds per cell.

Per cell the Student t-interval of the mean over seeds; per comparison the differences paired by
seed, their exact one-sided sign-flip test and Holm's step-down adjustment over a table's rows
(danet.exact_tests, which the launchers share); the probability of improvement P(A > B), the Mann-Whitney U statistic over
n_A n_B (as in Agarwal et al., "Deep Reinforcement Learning at the Edge of the Statistical
Precipice", NeurIPS 2021); and the power of the one-sided paired t-test from the noncentral t
distribution (J. Cohen, "Statistical Power Analysis for the Behavioral Sciences", 2nd ed., 1988;
scipy.stats.nct), which gives the minimum detectable effect and the seeds needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats

from danet.exact_tests import holm, sign_flip_p_value, sign_flip_p_values, smallest_p_value  # noqa: F401 (re-exported)

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    sd: float  # sample standard deviation (ddof 1); NaN for one value
    n: int
    low: float  # 95% t-interval; NaN below two values
    high: float

    @property
    def includes_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)


def t_interval(values: list[float] | np.ndarray) -> Interval:
    """mean +- t(0.975, n-1) * sd / sqrt(n): honest at 3-10 seeds, unlike a percentile bootstrap."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(values.mean())
    if n == 1:
        return Interval(mean, math.nan, 1, math.nan, math.nan)
    sd = float(values.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)


@dataclass(frozen=True)
class PairedDelta:
    interval: Interval  # of the per-seed differences treatment - baseline
    seeds: list[int]  # the seeds present in both arms
    unpaired: list[int]  # seeds present in one arm only (left out)


def paired_delta(treatment: dict[int, float], baseline: dict[int, float]) -> PairedDelta:
    """Differences paired by seed; seeds missing in either arm are left out and listed."""
    seeds = sorted(set(treatment) & set(baseline))
    unpaired = sorted(set(treatment) ^ set(baseline))
    return PairedDelta(t_interval([treatment[s] - baseline[s] for s in seeds]), seeds, unpaired)


def probability_of_improvement(treatment: list[float], baseline: list[float]) -> float:
    """P(A > B) = Mann-Whitney U / (n_A n_B), ties counting one half."""
    a, b = np.asarray(treatment, dtype=float)[:, None], np.asarray(baseline, dtype=float)[None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


POWER = 0.8
MAX_SEEDS = 1000


def paired_t_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the one-sided paired t-test at level alpha with n pairs whose differences have
    standard deviation sd, against a true mean difference `effect`: the paired t statistic then
    follows the noncentral t distribution with n - 1 degrees of freedom and noncentrality
    effect * sqrt(n) / sd (Cohen 1988, ch. 2; scipy.stats.nct), so the power is
    1 - F_nct(t(1 - alpha, n - 1); n - 1, effect * sqrt(n) / sd)."""
    critical = scipy_stats.t.ppf(1 - alpha, n - 1)
    return float(scipy_stats.nct.sf(critical, n - 1, effect * math.sqrt(n) / sd))


def minimum_detectable_effect(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest true mean difference the one-sided paired t-test at level alpha detects with
    the given power at n pairs; NaN when it cannot be computed (n < 2 or sd unknown)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    # the power grows with effect / sd: solve once for sd = 1 and scale
    standardised = optimize.brentq(lambda effect: paired_t_power(effect, 1.0, n, alpha) - power, 1e-9, 1e3)
    return float(standardised * sd)


def seeds_needed(effect: float, sd: float, alpha: float, power: float = POWER) -> int | None:
    """The smallest number of paired seeds at which both hold: the exact sign-flip test can reach
    alpha at all (2^-n <= alpha) and the paired t-test at alpha has the power for `effect`.
    None when sd is unknown or more than MAX_SEEDS would be needed."""
    if not math.isfinite(sd) or effect <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if smallest_p_value(n) <= alpha and (sd == 0 or paired_t_power(effect, sd, n, alpha) >= power):
            return n
    return None
