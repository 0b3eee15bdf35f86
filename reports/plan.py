"""How many seeds each comparison needs, and what the grid would then cost, from pilot records.

    python reports/plan.py --runs-dir results/camvid_cpu/runs --effect 1.0
    python reports/plan.py --runs-dir DIR --cells PAM CAM PAM+CAM --budget-hours 10 --csv plan.csv
    python reports/plan.py --audit --looks 6,9,12 --futility --alpha 0.0167 --sd 1.0 --effect 1.0 [--csv FILE]
    python reports/plan.py --replay --runs-dir R --grid G --looks 4,6,8 --futility [--efficacy none|spending]
                           [--alpha 0.05] [--margin 1.0] [--csv FILE]

The comparisons are those of make_tables (reports/report.py): a grid's declared comparisons (records
of a grid with `comparisons`) or each table1/table2 row against its baseline. For each, the pilot's
paired differences give the sd; the seeds needed are the smallest n at which the one-sided paired
t-test at alpha/k (Holm's strictest step over the k comparisons planned) has the power for the
target effect and the exact sign-flip test can reach alpha/k at all (2^-n <= alpha/k). Every planned
cell gets the same seeds, so that the comparisons stay paired; the cost is the records' measured
minutes per run. With --budget-hours: the seeds per cell those hours of new runs buy, and the effect
they detect.

--audit checks a sequential seed plan instead (reports/sequential.py): its false-positive rate exactly,
by enumerating every sign pattern of the differences (the worst case over several magnitude sets),
and its power and expected seeds, with no effect and with --effect, from normal draws of sd --sd,
beside the fixed design that runs every seed and tests once.

--replay runs a plan given by the flags over a grid's finished records instead (the grid's own plan
replaced; danet.launch.ledger.replay_plan, seeds in order, the records' --metric; no ledger is
written): where each comparison would have stopped and with which decision, the runs the plan makes
against the fixed design's (every seed of every cell) and the training hours it saves (each cell's
mean wall_time_s times its runs saved). --csv writes the columns comparison,stopped_at,decision
(stopped_at: the seeds of the look that decided; empty while a comparison would continue), then
one row `total,<runs made>/<fixed-design runs>,<hours saved>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pandas as pd

from danet.config import UsageError
from danet.grids import Grid, load_grid
from danet.launch.ledger import PlanState, replay_plan
from danet.paths import GRID_DIR
from danet.plans import CONTINUE, EFFICACY_RULES, Plan, PlanError, plan_from_grid
from reports.report import layout_applies
from reports.sequential import (
    AUDIT_DRAWS,
    SOURCE_REPLAY,
    audit,
    planned_verdicts,
    runs_and_hours,
    seed_records,
    with_cell_ids,
)
from reports.sources import NoRunsFound, read_run_store
from reports.stats import MAX_SEEDS, POWER, minimum_detectable_effect, seeds_needed, smallest_p_value
from reports.tables import (
    ALPHA,
    EFFECT,
    TABLE1,
    TABLE2,
    DuplicateRunsError,
    MixedCellError,
    ablation_table,
    find_grid,
    grid_tables,
    resolve_duplicates,
    usable_runs,
    verdict_text,
    with_verdicts,
)


def pilot(runs: pd.DataFrame, metric: str = "final_miou", grids_dir: Path = GRID_DIR) -> tuple[pd.DataFrame,
                                                                                                 pd.DataFrame]:
    """The pilot's cells (cell, n, minutes, images_per_s) and comparisons (comparison, treatment,
    baseline, delta_n, delta_sd), as make_tables would tabulate them."""
    usable, _ = usable_runs(runs, metric)
    usable, _ = resolve_duplicates(usable, keep_newest=False)
    for grid in sorted(set(usable["grid"].fillna("").astype(str)) - {""}):
        found = find_grid(grids_dir, grid)
        if found is not None and found.comparisons:
            cells, comparisons = grid_tables(usable[usable["grid"] == grid], found, metric)
            return cells, comparisons
    layout = next((layout for layout in (TABLE1, TABLE2) if layout_applies(usable, layout)), None)
    if layout is None:
        raise MixedCellError("the records vary neither the table1 nor the table2 switches, and no grid of theirs "
                             "declares comparisons: nothing to plan")
    table = ablation_table(usable, layout, metric)
    compared = table[table["delta"].notna()] if "delta" in table else table.iloc[0:0]
    comparisons = pd.DataFrame({"comparison": compared["cell"] + " vs " + compared["baseline"],
                                "treatment": compared["cell"], "baseline": compared["baseline"],
                                "delta_n": compared["delta_n"], "delta_sd": compared["delta_sd"]})
    return table[["cell", "n", "minutes", "images_per_s"]], comparisons.reset_index(drop=True)


def seeds_affordable(cells: pd.DataFrame, hours: float) -> int:
    """The most seeds per cell whose runs still to make fit in `hours` (every cell gets them)."""
    n = int(cells["n"].max())
    while n < MAX_SEEDS and cost_to_make(cells, n + 1)[1] <= hours:
        n += 1
    return n


def cost_to_make(cells: pd.DataFrame, seeds: int) -> tuple[int, float]:
    """Runs and hours still to make so that every cell has `seeds` seeds."""
    missing = (seeds - cells["n"]).clip(lower=0)
    return int(missing.sum()), float((missing * cells["minutes"]).sum() / 60)


def plan(cells: pd.DataFrame, comparisons: pd.DataFrame, effect: float = EFFECT, alpha: float = ALPHA,
         power: float = POWER, budget_hours: float | None = None) -> pd.DataFrame:
    """One row per comparison: the seeds per cell it needs and what the planned cells cost at that
    number (all of them, and the runs still to make); with a budget, what it buys."""
    k = len(comparisons)
    planned = cells[cells["cell"].isin(set(comparisons["treatment"]) | set(comparisons["baseline"]))]
    budget_seeds = seeds_affordable(planned, budget_hours) if budget_hours is not None else None
    rows = []
    for _, comparison in comparisons.iterrows():
        n, sd = int(comparison["delta_n"]), float(comparison["delta_sd"])
        needed = seeds_needed(effect, sd, alpha / k, power) if n >= 2 else None
        row = {"comparison": comparison["comparison"], "treatment": comparison["treatment"],
               "baseline": comparison["baseline"], "pilot_pairs": n, "sd": sd if n >= 2 else math.nan, "k": k,
               "alpha_per_row": alpha / k, "effect": effect, "power": power, "seeds_needed": needed,
               "cells": len(planned)}
        if needed is not None:
            to_make, hours_to_make = cost_to_make(planned, needed)
            row |= {"runs_total": needed * len(planned), "hours_total": needed * planned["minutes"].sum() / 60,
                    "runs_to_make": to_make, "hours_to_make": hours_to_make}
        if budget_seeds is not None:
            row |= {"budget_hours": budget_hours, "budget_seeds": budget_seeds,
                    "budget_mde": minimum_detectable_effect(sd, budget_seeds, alpha / k, power) if n >= 2 else math.nan,
                    "budget_significance_possible": smallest_p_value(budget_seeds) <= alpha / k}
        rows.append(row)
    return pd.DataFrame(rows)


def describe(result: pd.DataFrame, cells: pd.DataFrame, machine: str) -> str:
    """The plan in sentences."""
    if result.empty:
        return "no comparisons to plan"
    first = result.iloc[0]
    k, effect, power = int(first["k"]), first["effect"], first["power"]
    planned = cells[cells["cell"].isin(set(result["treatment"]) | set(result["baseline"]))]
    lines = [f"Planned: {k} comparisons over {len(planned)} cells ({'; '.join(planned['cell'])}); Holm over k = {k}: "
             f"one-sided alpha/k = {first['alpha_per_row'] * k:g}/{k} = {first['alpha_per_row']:.4f} per comparison, "
             f"{power:.0%} power, effect {effect:+g} point (paired t-test, noncentral t; the exact sign-flip test "
             f"the tables use has somewhat less power at these n).",
             f"Cost per run from the records: {machine}; "
             + "; ".join(f"{row.cell} {row.minutes:.1f} min at {row.images_per_s:.1f} images/s"
                         for row in planned.itertuples()) + "."]
    for _, row in result.iterrows():
        if row["pilot_pairs"] < 2:
            lines.append(f"- {row['comparison']}: sd unknown (n<2 pilot pairs): run a second seed of both cells first.")
        elif pd.isna(row["seeds_needed"]):
            lines.append(f"- {row['comparison']}: more than {MAX_SEEDS} seeds (pilot sd {row['sd']:.2f} points).")
        else:
            lines.append(f"- to detect {effect:+g} point at {power:.0%} power: {row['comparison']} needs "
                         f"{int(row['seeds_needed'])} seeds per cell (pilot: {row['pilot_pairs']} pairs, sd of "
                         f"differences {row['sd']:.2f} points); the {len(planned)} cells at that many seeds are "
                         f"{int(row['runs_total'])} runs, about {row['hours_total']:.1f} hours on the machine that "
                         f"made these records; {int(row['runs_to_make'])} of them still to make "
                         f"(about {row['hours_to_make']:.1f} hours).")
    needed = result["seeds_needed"].dropna()
    if len(needed) == len(result):
        worst = result.loc[result["seeds_needed"].astype(float).idxmax()]
        lines.append(f"All {k} comparisons: {int(worst['seeds_needed'])} seeds per cell, {int(worst['runs_total'])} "
                     f"runs, about {worst['hours_total']:.1f} hours ({int(worst['runs_to_make'])} runs, "
                     f"{worst['hours_to_make']:.1f} hours still to make).")
    if "budget_seeds" in result:
        seeds = int(first["budget_seeds"])
        reach = "" if first["budget_significance_possible"] else \
            f" (but with {seeds} seeds the exact test cannot reach p < {first['alpha_per_row'] * k:g} after Holm)"
        lines.append(f"With {first['budget_hours']:g} more hours: {seeds} seeds per cell{reach}; the effect each "
                     "comparison then detects at " + f"{power:.0%} power: "
                     + "; ".join(f"{row.comparison} {row.budget_mde:.2f} points" if math.isfinite(row.budget_mde)
                                 else f"{row.comparison} sd unknown" for row in result.itertuples()) + ".")
    return "\n".join(lines)


def machine_of(runs: pd.DataFrame) -> str:
    complete = runs[runs["status"] == "complete"]
    recorded = complete["machine"][complete["machine"] != "machine not recorded"] if "machine" in complete else []
    labels = sorted(set(recorded) or set(complete.get("device", pd.Series(dtype=str)).dropna().astype(str)))
    return " / ".join(labels) or "machine not recorded"


def _seed_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seed counts such as 6,9,12") from None


def audit_plan(args: argparse.Namespace, prog: str) -> int:
    if not args.looks:
        print(f"{prog}: --audit needs --looks", file=sys.stderr)
        return 2
    try:
        plan_ = Plan(args.looks, args.futility, args.efficacy, args.alpha)
    except PlanError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    rows = pd.DataFrame([vars(row) for row in audit(plan_, args.effect, args.sd)])
    print(f"Plan: looks {list(plan_.looks)}, futility {'on' if plan_.futility else 'off'}, efficacy {plan_.efficacy} "
          f"(levels {', '.join(f'{level:.4g}' for level in plan_.levels())}), one-sided exact sign-flip test")
    print(f"type1: exact, all {2 ** plan_.looks[-1]:,} sign patterns, the worst of the magnitude sets tried; power and "
          f"expected seeds: {AUDIT_DRAWS:,} normal draws each (sd {args.sd}, effect {args.effect}; Monte Carlo "
          f"standard error at most {0.5 / math.sqrt(AUDIT_DRAWS):.4f})")
    print(rows.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        rows.to_csv(args.csv, index=False, float_format="%.6g")
        print(f"wrote {args.csv}")
    return 0


def replayed_plan(args: argparse.Namespace) -> Grid:
    """The grid with the plan of the flags in place of its own (PlanError: a plan that cannot work)."""
    grid = load_grid(str(args.grid), args.grids_dir)
    entry = {"looks": list(args.looks), "futility": args.futility, "efficacy": args.efficacy, "alpha": args.alpha,
             "margin": args.margin}
    planned = dataclasses.replace(grid, plan=plan_from_grid(entry, len(grid.comparisons), f"grid {grid.name}"))
    order = planned.seeds_in_order()
    short = [name for c in grid.comparisons for name in (c["treatment"], c["baseline"]) if len(order[name]) < args.looks[-1]]
    if short:
        raise PlanError(f"grid {grid.name}: plan: the last look needs {args.looks[-1]} seeds per cell; cell {short[0]} "
                        f"has {len(order[short[0]])}")
    return planned


def grid_records(runs_dir: Path, grid: Grid, metric: str) -> pd.DataFrame:
    """The usable records of the grid's cells in runs_dir, with their cell ids (NoRunsFound: none)."""
    usable, _ = usable_runs(read_run_store(runs_dir), metric)
    usable, _ = resolve_duplicates(usable, keep_newest=False)
    if "grid" in usable and "grid_cell" in usable:
        usable = with_cell_ids(grid, usable[usable["grid"].astype(str) == grid.name])
    if usable.empty or "cell_id" not in usable:
        raise NoRunsFound(f"no complete records of grid {grid.name} in {runs_dir}")
    return usable


def replay_rows(state: PlanState, hours: pd.DataFrame) -> pd.DataFrame:
    """comparison, stopped_at, decision per comparison, then total, <runs made>/<fixed runs>, <hours saved>."""
    rows = []
    for comparison in state.grid.comparisons:
        decision = state.decisions.get(comparison["name"])
        rows.append({"comparison": comparison["name"],
                     "stopped_at": decision.n if decision and decision.decision != CONTINUE else "",
                     "decision": decision.decision if decision else "no look"})
    total = hours.iloc[-1]
    rows.append({"comparison": "total", "stopped_at": f"{int(total['runs'])}/{int(total['runs_fixed'])}",
                 "decision": f"{total['hours_saved']:.2f}"})
    return pd.DataFrame(rows, columns=["comparison", "stopped_at", "decision"])


def describe_replay(state: PlanState, hours: pd.DataFrame, records: int, where: Path, metric: str) -> str:
    """The replay in sentences: the plan, each comparison's stop and decision, the runs and hours saved."""
    plan, grid = state.grid.plan, state.grid
    lines = [f"Replay of grid {grid.name} over its {records} records in {where} ({metric}; no ledger written): looks "
             f"{list(plan.looks)}, futility {'on' if plan.futility else 'off'}, efficacy {plan.efficacy}, alpha "
             f"{plan.alpha:g} family-wise over {len(grid.comparisons)} comparisons (Holm at the last look), margin "
             f"±{plan.margin:g} point."]
    compared = pd.DataFrame([{key: c[key] for key in ("treatment", "baseline")} | {"comparison": c["name"]}
                             for c in grid.comparisons])
    verdicts = planned_verdicts(state, SOURCE_REPLAY)
    for _, row in with_verdicts(compared, verdicts, set()).iterrows():
        decision = verdicts[row["comparison"]].decision
        delta = f"; Δ {decision.delta:+.2f} points over those seeds" if decision else ""
        lines.append(f"- {row['comparison']}: {verdict_text(row)}{delta}")
    total = hours.iloc[-1]
    lines.append(f"Runs: {int(total['runs'])} of the fixed design's {int(total['runs_fixed'])}; training hours: "
                 f"{total['hours']:.2f} for the plan's runs, {total['hours_saved']:.2f} saved (each cell's mean run "
                 "time times its runs saved).")
    return "\n".join(lines + ["", hours.to_string(index=False, float_format=lambda value: f"{value:.2f}")])


def replay_grid(args: argparse.Namespace, prog: str) -> int:
    if not (args.runs_dir and args.grid and args.looks):
        print(f"{prog}: --replay needs --runs-dir, --grid and --looks", file=sys.stderr)
        return 2
    try:
        grid = replayed_plan(args)
        runs = grid_records(args.runs_dir, grid, args.metric)
    except (PlanError, UsageError, NoRunsFound, DuplicateRunsError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    state = replay_plan(grid, seed_records(runs, args.metric))
    hours = runs_and_hours(state, runs)
    print(describe_replay(state, hours, len(runs), args.runs_dir, args.metric))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        replay_rows(state, hours).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/plan.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, help="pilot records (a RunStore folder); required without --audit")
    parser.add_argument("--effect", type=float, default=EFFECT, help="target effect in mIoU points (default 1.0)")
    parser.add_argument("--cells", nargs="+", metavar="CELL",
                        help="plan only the comparisons whose treatment is one of these cells (names as in the "
                             "tables, e.g. PAM PAM+CAM, or grid cell names; default: all)")
    parser.add_argument("--budget-hours", type=float, help="also: the effect that these hours of new runs can detect")
    parser.add_argument("--csv", type=Path, help="write the plan as csv too")
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="family-wise level (default 0.05); with --audit, the level of the one comparison's test "
                             "(e.g. 0.0167: Holm's first step over 3)")
    parser.add_argument("--power", type=float, default=POWER, help="target power (default 0.8)")
    parser.add_argument("--metric", choices=["final_miou", "best_miou"], default="final_miou")
    parser.add_argument("--grids-dir", type=Path, default=GRID_DIR, help="where grid YAMLs live")
    audit_flags = parser.add_argument_group("auditing a sequential plan")
    audit_flags.add_argument("--audit", action="store_true", help="audit the plan given by the flags below")
    audit_flags.add_argument("--looks", type=_seed_counts, help="seeds complete per cell at each look, e.g. 6,9,12")
    audit_flags.add_argument("--futility", action="store_true",
                             help="stop a comparison whose mean difference is <= 0 at an interim look")
    audit_flags.add_argument("--efficacy", choices=EFFICACY_RULES, default="none",
                             help="none: test at the last look only; spending: alpha split over the looks by the "
                                  "seeds each adds (default: none)")
    audit_flags.add_argument("--sd", type=float, default=1.0, help="sd of the paired differences (default 1.0)")
    replay_flags = parser.add_argument_group("replaying a plan over a grid's records (with --looks, --futility, "
                                             "--efficacy, --alpha, --runs-dir, --csv)")
    replay_flags.add_argument("--replay", action="store_true",
                              help="run the plan of the flags over the grid's finished records (writes no ledger)")
    replay_flags.add_argument("--grid", help="the grid (a name in --grids-dir, or a path)")
    replay_flags.add_argument("--margin", type=float, default=1.0, help="equivalence margin in mIoU points (default 1.0)")
    args = parser.parse_args(argv)
    if args.audit:
        return audit_plan(args, parser.prog)
    if args.replay:
        return replay_grid(args, parser.prog)
    if args.runs_dir is None:
        parser.error("--runs-dir is required (or --audit)")
    try:
        runs = read_run_store(args.runs_dir)
        cells, comparisons = pilot(runs, args.metric, args.grids_dir)
    except (NoRunsFound, MixedCellError, DuplicateRunsError, UsageError) as error:  # UsageError: a broken grid file
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    if args.cells:
        wanted = {name.lower() for name in args.cells}
        unknown = wanted - {name.lower() for name in comparisons["treatment"]}
        if unknown:
            print(f"{parser.prog}: no comparison has the treatment {sorted(unknown)}; cells compared: "
                  f"{comparisons['treatment'].tolist()}", file=sys.stderr)
            return 2
        comparisons = comparisons[comparisons["treatment"].str.lower().isin(wanted)].reset_index(drop=True)
    result = plan(cells, comparisons, args.effect, args.alpha, args.power, args.budget_hours)
    print(f"Pilot: {args.runs_dir} ({int((runs['status'] == 'complete').sum())} complete runs)")
    print(describe(result, cells, machine_of(runs)))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        result.to_csv(args.csv, index=False, float_format="%.6g")
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
