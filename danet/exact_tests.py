"""Exact tests of paired seed differences, shared by the launchers (a sequential plan's looks) and the
reports: the one-sided sign-flip (paired permutation) test, what scipy.stats.permutation_test with
permutation_type="samples" computes, and Holm's step-down adjustment (S. Holm, "A simple sequentially
rejective multiple test procedure", Scandinavian Journal of Statistics 6(2), 1979). numpy only: a
launcher that decides a look loads no scipy or torch.
"""

from __future__ import annotations

import itertools

import numpy as np

EXACT_MAX_PAIRS = 16  # 2^16 sign patterns; beyond, a seeded Monte Carlo sample of them
MONTE_CARLO_PATTERNS = 100_000


def sign_flip_p_values(differences: np.ndarray) -> np.ndarray:
    """One-sided permutation p-values of mean > 0 over sign flips, one per row of a (draws, n)
    array of paired differences: exact over all 2^n patterns up to 16 pairs (every ablation
    table), a seeded Monte Carlo sample of patterns beyond."""
    differences = np.atleast_2d(np.asarray(differences, dtype=float))
    n = differences.shape[1]
    if n <= EXACT_MAX_PAIRS:
        patterns = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        patterns = np.random.default_rng(0).choice((1.0, -1.0), size=(MONTE_CARLO_PATTERNS, n))
        patterns[0] = 1.0  # the observed pattern counts, so p is never 0
    rows = max(1, 2**22 // len(patterns))  # chunks of draws keep the (draws, patterns) means small
    p_values = []
    for chunk in np.split(differences, range(rows, len(differences), rows)):
        means = chunk @ patterns.T / n
        p_values.append(np.mean(means >= chunk.mean(axis=1, keepdims=True) - 1e-12, axis=1))
    return np.concatenate(p_values)


def sign_flip_p_value(differences: list[float] | np.ndarray) -> float:
    """The one-sided sign-flip p-value of one set of paired differences."""
    return float(sign_flip_p_values(np.asarray(differences, dtype=float)[None, :])[0])


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
