"""Statistics for ablation tables with a handful of seeds per cell (SWEEPS.md, "Statistics")."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

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


EXACT_MAX_PAIRS = 16  # 2^16 sign patterns; beyond, a seeded Monte Carlo sample of them
MONTE_CARLO_PATTERNS = 100_000


def sign_flip_p_value(differences: list[float] | np.ndarray) -> float:
    """One-sided permutation p-value of mean(differences) > 0 over sign flips: exact over all 2^n
    patterns up to 16 pairs (every ablation table), a Monte Carlo estimate beyond."""
    differences = np.asarray(differences, dtype=float)
    observed = differences.mean()
    if len(differences) <= EXACT_MAX_PAIRS:
        patterns = np.array(list(itertools.product((1.0, -1.0), repeat=len(differences))))
    else:
        rng = np.random.default_rng(0)
        patterns = rng.choice((1.0, -1.0), size=(MONTE_CARLO_PATTERNS, len(differences)))
        patterns[0] = 1.0  # the observed pattern counts, so p is never 0
    means = (patterns * differences).mean(axis=1)
    return float(np.mean(means >= observed - 1e-12))


def smallest_p_value(n: int) -> float:
    """The smallest one-sided p an exact sign-flip test can give with n pairs: 2^-n."""
    return 2.0 ** -n


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error across the rows of one table)."""
    order = np.argsort(p_values)
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(p_values) - rank) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted.tolist()


def probability_of_improvement(treatment: list[float], baseline: list[float]) -> float:
    """P(A > B) = Mann-Whitney U / (n_A n_B), ties counting one half."""
    a, b = np.asarray(treatment, dtype=float)[:, None], np.asarray(baseline, dtype=float)[None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())
