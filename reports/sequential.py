"""Sequential seed plans: looks at fixed seed counts, a non-binding futility stop, optional efficacy stops,
and an exact audit of the plan's false-positive rate.

One comparison's paired differences d_1, d_2, ... (treatment minus baseline, by seed, seeds in a fixed
order) are looked at after `looks` = (n_1, ..., n_K) seeds. At each look the one-sided exact sign-flip
test of mean(d) > 0 (`reports.stats.sign_flip_p_values`) is compared with that look's efficacy level;
p at or below it stops the comparison as "better". Otherwise, with `futility`, a mean difference at or
below 0 at an interim look stops it as "futile". At the last look a comparison that is not better is
not rejected.

Efficacy levels: `none` tests only at the last look, at `alpha` (with futility this is the fixed design
plus stops that can only lower the false-positive rate: a futility stop never rejects, so it is
non-binding). `spending` splits `alpha` over the looks in proportion to the seeds each adds (a linear
alpha-spending function of the information fraction, Lan and DeMets 1983); the levels sum to `alpha`,
so by the union bound the plan keeps its level whatever the looks. The exact test cannot go below
2^-n with n seeds (Good, "Permutation Tests", 2000), so a look whose level is below that can never
stop: such a plan is refused rather than run.

`audit` computes the plan's false-positive rate exactly: under no effect, with the magnitudes |d_i|
fixed, the 2^N sign patterns are equally likely, so the rate is the share of patterns the plan rejects;
it is taken as the worst case over several magnitude sets (distinct, tied, geometric and random ones).
Power and expected seeds come from normal draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from danet.plans import TOLERANCE, Plan
from reports.stats import sign_flip_p_values

AUDIT_DRAWS = 20_000  # normal draws per setting: Monte Carlo standard error of a rate at most 0.5 / sqrt(20000) < 0.004
RANDOM_MAGNITUDE_SETS = 40


def decide(plan: Plan, differences: np.ndarray,
           p_values: Callable[[np.ndarray], np.ndarray] = sign_flip_p_values) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a (draws, N) array of differences (N = the last look): whether the plan rejects
    (better), and the number of seeds it used. `p_values` gives the exact sign-flip p of each row."""
    differences = np.atleast_2d(differences)
    draws = differences.shape[0]
    rejected = np.zeros(draws, dtype=bool)
    stopped = np.zeros(draws, dtype=bool)
    seeds = np.full(draws, plan.looks[-1])
    for index, (n, level) in enumerate(zip(plan.looks, plan.levels())):
        live = ~stopped
        if not live.any():
            break
        last = index == len(plan.looks) - 1
        better = np.zeros(draws, dtype=bool)
        if level:
            better[live] = p_values(differences[live, :n]) <= level + TOLERANCE
        futile = live & ~better & (differences[:, :n].mean(axis=1) <= 0) if plan.futility and not last else \
            np.zeros(draws, dtype=bool)
        ends = live & (better | futile | last)
        rejected |= better
        seeds[ends] = n
        stopped |= ends
    return rejected, seeds


def sign_patterns(n: int) -> np.ndarray:
    """All 2^n patterns of n signs, (2^n, n), in itertools.product((1, -1), repeat=n) order."""
    return 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n - 1, -1, -1)) & 1)


def shared_magnitude_p_values(differences: np.ndarray) -> np.ndarray:
    """sign_flip_p_values for rows that differ only in their signs: one sorted table of the 2^n flipped sums
    serves every row (what makes enumerating all patterns of up to about 20 seeds cheap)."""
    n = differences.shape[1]
    flipped = np.sort(sign_patterns(n) @ np.abs(differences[0]))
    sums = differences.sum(axis=1)
    return (len(flipped) - np.searchsorted(flipped, sums - n * TOLERANCE, side="left")) / len(flipped)


def exact_type1(plan: Plan, magnitudes: np.ndarray) -> float:
    """The plan's false-positive rate when |d_i| = magnitudes and every sign pattern is equally likely."""
    total = plan.looks[-1]
    signed = sign_patterns(total) * np.asarray(magnitudes, dtype=float)[:total]
    rejected, _ = decide(plan, signed, shared_magnitude_p_values)
    return float(rejected.mean())


def magnitude_sets(total: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Distinct, tied, geometric and random magnitudes: where the discrete test's size differs most."""
    sets = [np.arange(1, total + 1, dtype=float), np.ones(total), 2.0 ** np.arange(total),
            np.repeat(np.arange(1, total // 2 + 2, dtype=float), 2)[:total]]
    sets += [np.abs(rng.normal(size=total)) for _ in range(RANDOM_MAGNITUDE_SETS)]
    return sets


@dataclass(frozen=True)
class AuditRow:
    design: str
    type1: float  # exact, the worst case over the magnitude sets
    power: float  # at the effect, by simulation
    expected_seeds_null: float
    expected_seeds_effect: float


def audit(plan: Plan, effect: float, sd: float, draws: int = AUDIT_DRAWS, seed: int = 0) -> list[AuditRow]:
    """The fixed design (every seed, one test at the end at alpha) and the plan, side by side."""
    fixed = Plan((plan.looks[-1],), futility=False, efficacy="none", alpha=plan.alpha, margin=plan.margin)
    rng = np.random.default_rng(seed)
    sets = magnitude_sets(plan.looks[-1], rng)
    null = rng.normal(0.0, sd, size=(draws, plan.looks[-1]))
    shifted = rng.normal(effect, sd, size=(draws, plan.looks[-1]))
    rows = []
    for name, design in (("fixed", fixed), ("sequential", plan)):
        _, seeds_null = decide(design, null)
        rejected, seeds_effect = decide(design, shifted)
        rows.append(AuditRow(name, max(exact_type1(design, magnitudes) for magnitudes in sets), float(rejected.mean()),
                             float(seeds_null.mean()), float(seeds_effect.mean())))
    return rows
