"""A sequential seed plan: the `plan:` of a grid file, next to its `comparisons`.

    plan: {looks: [6, 9, 12], futility: true, efficacy: none, margin: 1.0, alpha: 0.05}

`looks` are seeds complete per cell at each look (seed ids in order; the last look is the most seeds a
cell gets); `futility` stops a comparison whose mean paired difference is at or below 0 at an interim
look; `efficacy` is `none` (test at the last look only) or `spending` (alpha split over the looks by the
seeds each adds, Lan and DeMets 1983); `margin` is the equivalence margin in mIoU points; `alpha` is
family-wise over the grid's comparisons (Holm). The exact sign-flip test cannot go below 2^-n with n
seeds, so a plan with a look meant for efficacy below that is refused when the grid is read, with one
line. How a plan decides and what it guarantees: reports/sequential.py (and `reports/plan.py --audit`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

TOLERANCE = 1e-12  # as the exact test: a p equal to the boundary rejects

EFFICACY_RULES = ("none", "spending")
PLAN_KEYS = ("looks", "futility", "efficacy", "margin", "alpha")


class PlanError(ValueError):
    """A plan that cannot work as written (one line)."""


@dataclass(frozen=True)
class Plan:
    looks: tuple[int, ...]
    futility: bool = True
    efficacy: str = "none"
    alpha: float = 0.05  # the level of one comparison's test; in a grid's plan, family-wise (see for_rows)
    margin: float = 1.0  # equivalence margin, mIoU points

    def __post_init__(self) -> None:
        looks = self.looks
        if not looks or any(n < 1 for n in looks) or list(looks) != sorted(set(looks)):
            raise PlanError(f"looks {list(looks)}: seed counts, increasing, at least 1")
        if self.efficacy not in EFFICACY_RULES:
            raise PlanError(f"efficacy {self.efficacy!r}: one of {', '.join(EFFICACY_RULES)}")
        if not 0 < self.alpha < 1:
            raise PlanError(f"alpha {self.alpha}: between 0 and 1")
        for n, level in zip(looks, self.levels()):
            if level and level < 2.0 ** -n:  # the exact test's smallest p (exact_tests.smallest_p_value)
                smallest = next(m for m in range(1, 64) if 2.0 ** -m <= level)
                raise PlanError(f"look at {n} seeds: its efficacy level {level:.4g} is below 2^-{n} = "
                                f"{2.0 ** -n:.4g}, "
                                f"the smallest p the exact test reaches with {n} seeds; a look meant for efficacy at "
                                f"this level needs at least {smallest} seeds")

    def levels(self) -> tuple[float, ...]:
        """The efficacy level of each look (0: no efficacy test there)."""
        if self.efficacy == "none":
            return (0.0,) * (len(self.looks) - 1) + (self.alpha,)
        total, previous = self.looks[-1], 0
        spent = []
        for n in self.looks:
            spent.append(self.alpha * (n - previous) / total)
            previous = n
        return tuple(spent)

    def for_rows(self, rows: int) -> Plan:
        """The plan of one of `rows` comparisons: its test at Holm's strictest step, alpha / rows."""
        return dataclasses.replace(self, alpha=self.alpha / max(1, rows))


def plan_from_grid(entry: Any, comparisons: int, where: str) -> Plan:
    """A grid file's `plan`, checked for `comparisons` comparisons (Holm over them); PlanError names what
    is wrong."""
    if not isinstance(entry, dict) or set(entry) - set(PLAN_KEYS) or "looks" not in entry:
        raise PlanError(f"{where}: plan needs looks and may have {', '.join(PLAN_KEYS)}; got {entry!r}")
    if not comparisons:
        raise PlanError(f"{where}: a plan decides comparisons: the grid declares none")
    looks = entry["looks"]
    if not isinstance(looks, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in looks):
        raise PlanError(f"{where}: plan looks must be a list of seed counts, got {looks!r}")
    alpha = float(entry.get("alpha", 0.05))
    try:
        # checked at one row's level (Holm's strictest step): its efficacy looks must be able to fire
        row = Plan(tuple(looks), bool(entry.get("futility", True)), str(entry.get("efficacy", "none")),
                   alpha / comparisons, float(entry.get("margin", 1.0)))
    except PlanError as error:
        raise PlanError(f"{where}: plan: {error} (alpha {alpha} over {comparisons} comparisons)") from None
    return dataclasses.replace(row, alpha=alpha)


# What a look decides for one comparison. CONTINUE: more seeds; the others stop it.
CONTINUE, FUTILE, BETTER, WORSE, EQUIVALENT, INCONCLUSIVE = (
    "continue", "futile", "better", "worse", "equivalent", "inconclusive")


@dataclass(frozen=True)
class LookDecision:
    """One comparison at one look: its decision, the paired differences' mean, the exact one-sided
    p-values and the boundary (level) the tests used (0: no test at this look, futility only)."""

    decision: str
    n: int
    delta: float
    p_better: float  # H0: Δ <= 0
    p_worse: float  # H0: Δ >= 0
    p_equivalent: float  # two one-sided tests, H0: |Δ| >= margin (the larger of their p-values)
    level: float


def row_p_values(differences: np.ndarray, margin: float) -> tuple[float, float, float]:
    """(better, worse, equivalent) one-sided exact sign-flip p-values of one comparison's differences.
    Equivalence is two one-sided tests (Schuirmann 1987): the differences shifted by +margin tested
    for mean > 0 and by -margin for mean < 0; the larger p."""
    import numpy as np  # only once a look is decided: reading a grid (run.py --help) loads no numpy

    from danet.exact_tests import sign_flip_p_values

    d = np.asarray(differences, dtype=float)
    p_better, p_worse, p_above, p_below = sign_flip_p_values(np.stack([d, -d, d + margin, margin - d]))
    return float(p_better), float(p_worse), float(max(p_above, p_below))


def decide_look(plan: Plan, index: int, differences: dict[str, np.ndarray], rows: int) -> dict[str, LookDecision]:
    """Look `index` of a grid's plan (family-wise `alpha` over `rows` comparisons) for the comparisons
    still running (`differences`: each one's paired differences over the look's seeds, in seed order).

    An interim look tests each row at its efficacy level split over the rows (Bonferroni, alpha_j / rows):
    better, else worse, else equivalent; else with futility a mean at or below 0 stops it as futile.
    The last look is Holm's step-down over all `rows` at the last level, the rows stopped earlier
    counting as not rejected (they sort last); the rows it does not find better are tested for worse
    and equivalence at the level where the step-down stopped, else they are inconclusive. The plan
    spends alpha_1 + ... + alpha_K = alpha over the looks, so by the union bound it keeps its level."""
    n, level = plan.looks[index], plan.levels()[index]
    last = index == len(plan.looks) - 1
    tested = {name: (d[:n], *row_p_values(d[:n], plan.margin)) for name, d in differences.items()}
    decisions: dict[str, LookDecision] = {}
    if not last:
        row_level = level / rows
        for name, (d, p_better, p_worse, p_equivalent) in tested.items():
            decision = CONTINUE
            if row_level and p_better <= row_level + TOLERANCE:
                decision = BETTER
            elif row_level and p_worse <= row_level + TOLERANCE:
                decision = WORSE
            elif row_level and p_equivalent <= row_level + TOLERANCE:
                decision = EQUIVALENT
            elif plan.futility and d.mean() <= 0:
                decision = FUTILE
            decisions[name] = LookDecision(decision, len(d), float(d.mean()), p_better, p_worse, p_equivalent,
                                           row_level)
        return decisions
    order = sorted(tested, key=lambda name: tested[name][1])
    rejected = 0
    for name in order:  # Holm's step-down: the i-th smallest p against level / (rows - i)
        if tested[name][1] > level / (rows - rejected) + TOLERANCE:
            break
        rejected += 1
    for rank, name in enumerate(order):
        d, p_better, p_worse, p_equivalent = tested[name]
        row_level = level / (rows - min(rank, rejected))
        decision = BETTER if rank < rejected else WORSE if p_worse <= row_level + TOLERANCE else \
            EQUIVALENT if p_equivalent <= row_level + TOLERANCE else INCONCLUSIVE
        decisions[name] = LookDecision(decision, len(d), float(d.mean()), p_better, p_worse, p_equivalent, row_level)
    return decisions
