"""Sequential seed plans: looks at fixed seed counts, a non-binding futility stop, optional efficacy stops,
and an exact audit of the plan's false-positive rate.

One comparison's paired differences d_1, d_2, ... (treatment minus baseline, by seed, seeds in a fixed
order) are looked at after `looks` = (n_1, ..., n_K) seeds. At each look the one-sided exact sign-flip
test of mean(d) > 0 (`reports.stats.sign_flip_p_values`) is compared with that look's efficacy level;
p at or below it stops the comparison as "better". Otherwise, with `futility`, a mean difference at or
below 0 at an interim look stops it as "futile". At the last look a comparison that is not better is
not rejected. This is the "better" side of what a grid's look decides (danet.plans.decide_look, which
also stops for "worse" and "equivalent" at the same levels): those stops never reject "better", so the
audit's false-positive rate holds for the enforced plan too; with efficacy `spending` they can end a
comparison early, so the enforced plan's power and expected seeds can differ from the audit's.

Efficacy levels: `none` tests only at the last look, at `alpha` (with futility this is the fixed design
plus stops that can only lower the false-positive rate: a futility stop never rejects, so it is
non-binding). `spending` splits `alpha` over the looks in proportion to the seeds each adds (a linear
alpha-spending function of the information fraction, Lan and DeMets 1983); the levels sum to `alpha`,
so by the union bound the plan keeps its level whatever the looks. The exact test cannot go below
2^-n with n seeds (Good, "Permutation Tests", 2000), so a look whose level is below that can never
stop: such a plan is refused rather than run.

`audit` computes the plan's false-positive rate exactly: under no effect, with the magnitudes |d_i|
fixed, the 2^N sign patterns are equally likely, so the rate is the share of patterns the plan rejects;
it is taken as the worst case over the magnitude sets tried (distinct, tied, geometric and random ones),
not a bound over all of them.
Power and expected seeds come from normal draws.

A grid's verdicts (the comparisons table's Verdict column) and the runs and hours its plan took come
from `plan_state`: the decisions its launchers recorded in the ledger (danet.launch.ledger), else
its plan replayed over the records (`replay_plan`, which writes nothing); a grid without a plan gets
`fixed_verdicts`, the fixed design's one look (decide_look's last look: Holm over the rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from danet.grids import Grid
from danet.launch.ledger import PlanState, SeedRecord, ledger_path, read_ledger, replay, replay_plan, verify
from danet.plans import CONTINUE, TOLERANCE, LookDecision, Plan, decide_look
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


# A grid's plan over its records: each comparison's verdict, and the runs and hours the plan took.

SOURCE_LEDGER, SOURCE_REPLAY, SOURCE_FIXED = "ledger", "replay", "fixed design"
FIXED_MARGIN = 1.0  # mIoU points: the equivalence margin of the fixed design's verdicts


@dataclass(frozen=True)
class Verdict:
    """One comparison's verdict: the decision (None: no look taken yet), the seeds it used, where it
    came from (SOURCE_*), whether it stopped before the plan's last look, and the equivalence margin."""

    decision: LookDecision | None
    seeds: tuple[int, ...]
    source: str
    early: bool = False
    margin: float = FIXED_MARGIN


def with_cell_ids(grid: Grid, runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are seeds of the grid's named cells (by grid_cell and seed), with their cell id."""
    ids = {(name, seed): cell_id for name, order in grid.seeds_in_order().items() for seed, cell_id in order}
    cell_ids = [ids.get((str(cell), int(seed))) for cell, seed in zip(runs["grid_cell"], runs["seed"])]
    return runs.assign(cell_id=cell_ids).loc[[cell_id is not None for cell_id in cell_ids]]


def seed_records(runs: pd.DataFrame, metric: str = "final_miou") -> dict[str, SeedRecord]:
    """Cell id -> the record a plan decides on (the metric in points), of runs with cell ids."""
    return {row["cell_id"]: SeedRecord(100.0 * float(row[metric]), str(row["run_id"])) for _, row in runs.iterrows()}


def ledger_plan(entries: list[dict]) -> Plan:
    """The plan a ledger was written under (for a grid file that no longer names one)."""
    written = entries[0]["plan"]
    return Plan(tuple(written["looks"]), written["futility"], written["efficacy"], written["alpha"], written["margin"])


def plan_state(grid: Grid, records: dict[str, SeedRecord], runs_dir: Path | None) -> tuple[PlanState, str] | None:
    """Where the grid's plan stands and the source: the ledger in runs_dir (its records checked, LedgerError
    otherwise) when it has entries, else the grid's plan replayed over `records`; None with neither."""
    entries = read_ledger(ledger_path(runs_dir, grid.name)) if runs_dir is not None else []
    if entries:
        verify(entries, Path(runs_dir))
        planned = grid if grid.plan is not None else dataclasses.replace(grid, plan=ledger_plan(entries))
        return replay(planned, entries), SOURCE_LEDGER
    return (replay_plan(grid, records), SOURCE_REPLAY) if grid.plan is not None else None


def planned_verdicts(state: PlanState, source: str) -> dict[str, Verdict]:
    """Each comparison's latest decision, the first n seeds (in order) it used, and whether it stopped early."""
    order, plan = state.grid.seeds_in_order(), state.grid.plan
    verdicts = {}
    for comparison in state.grid.comparisons:
        decision = state.decisions.get(comparison["name"])
        n = decision.n if decision else 0
        early = decision is not None and decision.decision != CONTINUE and n < plan.looks[-1]
        seeds = tuple(seed for seed, _ in order[comparison["treatment"]][:n])
        verdicts[comparison["name"]] = Verdict(decision, seeds, source, early, plan.margin)
    return verdicts


def fixed_verdicts(differences: dict[str, tuple[tuple[int, ...], np.ndarray]], alpha: float) -> dict[str, Verdict]:
    """The fixed design: one look at each row's n pairs (`differences`: the rows with a test, each with its
    paired seeds and differences), decide_look's last look at `alpha` over them (Holm, then worse and
    equivalence within FIXED_MARGIN), so that 'better' is p (Holm) <= alpha."""
    if not differences:
        return {}
    plan = Plan((max(len(d) for _, d in differences.values()),), futility=False, efficacy="none", alpha=alpha,
                margin=FIXED_MARGIN)
    decided = decide_look(plan, 0, {name: d for name, (_, d) in differences.items()}, len(differences))
    return {name: Verdict(decided[name], seeds, SOURCE_FIXED) for name, (seeds, _) in differences.items()}


HOURS_COLUMNS = ["runs", "runs_fixed", "records", "hours", "hours_saved"]


def runs_and_hours(state: PlanState, runs: pd.DataFrame) -> pd.DataFrame:
    """Per named cell (`runs`: with cell ids and wall_time_s): the runs the plan made (PlanState.cell_seeds),
    the runs of the fixed design (every seed), the records there are, the training hours of the plan's runs
    and the hours saved (the cell's mean run time times the runs saved: the seeds of a stopped cell beyond
    its stop; a cell still running saves none yet); then a total row."""
    made, stopped = state.cell_seeds(), state.stopped_cells()
    rows = []
    for name, order in state.grid.seeds_in_order().items():
        cell = runs[runs["grid_cell"].astype(str) == name]
        seconds = cell.set_index("cell_id")["wall_time_s"].astype(float)
        plan_runs = seconds.reindex([cell_id for _, cell_id in order[:made[name]]]).dropna()
        saved = len(order) - made[name] if name in stopped else 0
        rows.append({"cell": name, "runs": made[name], "runs_fixed": len(order), "records": len(cell),
                     "hours": plan_runs.sum() / 3600, "hours_saved": seconds.mean() * saved / 3600 if saved else 0.0})
    table = pd.DataFrame(rows, columns=["cell", *HOURS_COLUMNS])
    total = pd.DataFrame([{"cell": "total", **{column: table[column].sum() for column in HOURS_COLUMNS}}])
    return pd.concat([table, total], ignore_index=True)
