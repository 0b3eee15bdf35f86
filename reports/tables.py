"""Ablation tables: per cell mean, sd, n and 95% t-interval over seeds, the paired delta against
the baseline cell with its test and power, the paper's number beside it, and costs. For a grid's
comparisons also each one's verdict under the grid's seed plan (reports/sequential.py), each cell's
gain over the last quarter of training, and the plan's runs and hours. Written as Markdown, LaTeX
(pdflatex-safe) and CSV."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from danet.config import NOT_IN_CELL, fields_by_cell_rule
from danet.grids import Grid, load_grid
from danet.plans import CONTINUE, EQUIVALENT, Plan
from reports.sequential import (
    SOURCE_FIXED,
    SOURCE_LEDGER,
    Verdict,
    fixed_verdicts,
    plan_state,
    planned_verdicts,
    runs_and_hours,
    seed_records,
    with_cell_ids,
)
from reports.sources import IOU_PREFIX, MACHINE_NOT_RECORDED
from reports.stats import (
    POWER,
    holm,
    minimum_detectable_effect,
    paired_delta,
    probability_of_improvement,
    seeds_needed,
    sign_flip_p_value,
    smallest_p_value,
    t_interval,
)

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
# Settings that do not change a result (danet.config.NOT_IN_CELL plus tracking): never "mixed".
NOT_SETTINGS = fields_by_cell_rule(NOT_IN_CELL)  # paths, devices, logging, tracking: never "mixed"
RESULT_FIELDS = {"run_id", "run_dir", "status", "reason", "final_miou", "best_miou", "final_pixel_accuracy",
                 "wall_time_s", "images_per_second", "peak_memory_mb", "iterations", "device", "cell_hash",
                 "finished_at", "machine", "machine_kind", "score_source"}
ALPHA = 0.05
EFFECT = 1.0  # mIoU points: the target effect of seeds_needed
DESIGN_NOT_FROM_GRID = ""
DESIGN_NOT_RECORDED = "not recorded"


class MixedCellError(ValueError):
    """A table cell would pool runs whose settings differ."""


class DuplicateRunsError(ValueError):
    """Two complete records of the same cell and seed."""


@dataclass(frozen=True)
class Layout:
    name: str
    rows: list[str]  # the config fields (or derived columns) that make a row
    baseline: dict[str, Any]  # values that turn a row into its baseline row
    labels: dict[str, str]  # column headers
    # fields that may split a row into variant rows, with their standard values (a row whose variant
    # fields all have these values is the standard one; others are listed in a Variant column)
    variants: dict[str, Any] = dataclasses.field(default_factory=dict)


TABLE1 = Layout("table1", ["backbone", "pam", "cam"], {"pam": False, "cam": False},
                {"backbone": "BaseNet", "pam": "PAM", "cam": "CAM"},
                variants={"head": "danet", "cam_energy": "code", "pam_reduction": 8})
TABLE2 = Layout("table2", ["backbone", "random_scale", "multi_grid", "multi_scale_test"],
                {"random_scale": False, "multi_grid": False, "multi_scale_test": False},
                {"backbone": "BaseNet", "random_scale": "DA", "multi_grid": "Multi-Grid", "multi_scale_test": "MS"})
FCN_HEAD_LABEL = "Dilated FCN (FCN head)"
NO_ATTENTION_LABEL = "DANet head, no attention"


def add_derived_columns(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    if "eval_scales" in runs and "eval_flip" in runs:
        runs["multi_scale_test"] = [isinstance(scales, tuple) and len(scales) > 1 or flip is True
                                    for scales, flip in zip(runs["eval_scales"], runs["eval_flip"])]
    return runs


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def usable_runs(runs: pd.DataFrame, metric: str = "final_miou") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The complete runs whose metric is a number, and the complete runs left out (run_id, status,
    reason): a complete record with a missing, null or NaN metric must not count as a result."""
    complete = runs[runs["status"] == "complete"]
    values = complete[metric] if metric in complete else pd.Series(None, index=complete.index, dtype=object)
    finite = values.map(_finite).astype(bool)
    left_out = complete.loc[~finite, ["run_id", "status"]].assign(
        reason=f"complete, but {metric} is missing, null or NaN: left out of every statistic")
    usable = complete[finite].copy()
    usable["seed"] = usable["seed"].astype(int)
    return usable, left_out


def resolve_duplicates(runs: pd.DataFrame, keep_newest: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Refuse (DuplicateRunsError naming the folders) or, with keep_newest, keep the newest of
    several records of one cell (cell_hash) and seed; the others are returned with the reason."""
    if "cell_hash" not in runs:
        return runs, pd.DataFrame(columns=["run_id", "status", "reason"])
    keyed = runs[runs["cell_hash"].notna()]
    groups = [group for _, group in keyed.groupby(["cell_hash", "seed"]) if len(group) > 1]
    if groups and not keep_newest:
        group = groups[0]
        folders = " and ".join(str(row.get("run_dir") or row["run_id"]) for _, row in group.iterrows())
        more = f" ({len(groups) - 1} more cells and seeds have several records)" if len(groups) > 1 else ""
        raise DuplicateRunsError(f"{folders} are complete records of the same cell (cell_hash "
                                 f"{group['cell_hash'].iloc[0]}, seed {group['seed'].iloc[0]}){more}: remove one, or "
                                 "pass --duplicates newest to keep the newest")
    dropped = []
    for group in groups:
        order = group.sort_values("finished_at", na_position="first")
        newest = order["run_id"].iloc[-1]
        dropped += [{"run_id": run_id, "status": "complete",
                     "reason": f"duplicate of {newest} (same cell_hash and seed): --duplicates newest kept that one"}
                    for run_id in order["run_id"].iloc[:-1]]
    dropped_frame = pd.DataFrame(dropped, columns=["run_id", "status", "reason"])
    return runs[~runs["run_id"].isin(dropped_frame["run_id"])], dropped_frame


def setting_columns(runs: pd.DataFrame) -> list[str]:
    return [column for column in runs.columns if column not in RESULT_FIELDS | NOT_SETTINGS
            and not column.startswith(IOU_PREFIX)]


def design_of(runs: pd.DataFrame) -> str:
    """The design the records declare; refuses records of two different declared designs."""
    designs = set(runs.get("design", pd.Series([DESIGN_NOT_RECORDED])).fillna(DESIGN_NOT_RECORDED).astype(str))
    declared = designs - {DESIGN_NOT_RECORDED, DESIGN_NOT_FROM_GRID}
    if len(declared) > 1:
        raise MixedCellError(f"the table would pool records of the designs {sorted(declared)}: report each grid "
                             "from its own --runs-dir")
    return declared.pop() if declared else sorted(designs)[0]


def _varies(values: pd.Series) -> bool:
    """Whether a setting takes more than one value; a missing value (NaN) counts as one of them."""
    return values.astype(str).nunique(dropna=False) > 1


def check_not_mixed(runs: pd.DataFrame, rows: list[str], design: str = DESIGN_NOT_RECORDED,
                    cell_names: dict[tuple, str] | None = None) -> None:
    """Refuse a cell whose runs differ in anything but the seed, naming the differing fields."""
    others = [column for column in setting_columns(runs) if column not in rows and column != "seed"]
    for key, group in runs.groupby(rows, dropna=False):
        differing = [column for column in others if _varies(group[column])]
        if differing:
            key = key if isinstance(key, tuple) else (key,)
            name = (cell_names or {}).get(key) or str(dict(zip(rows, key)))
            raise MixedCellError(f"cell {name} (design: {design or 'runs not from a grid'}) mixes runs that differ "
                                 f"in {differing}: select runs (--runs-dir) or add these fields to the rows")


def paper_reference(layout: Layout) -> tuple[str | None, list[str], dict[tuple, float]]:
    """The paper's dataset, the fields its numbers are keyed by, and the numbers."""
    section = yaml.safe_load(PAPER_NUMBERS.read_text()).get(layout.name)
    if not section:
        return None, [], {}
    columns = [column for column in section["rows"][0] if column != "miou"]
    return section["dataset"], columns, {tuple(row[c] for c in columns): row["miou"] for row in section["rows"]}


def _paired_statistics(by_seed: dict[int, float], baseline_by_seed: dict[int, float], prefix: str = "") -> dict:
    """Paired delta by seed with its t-interval, sign-flip p, smallest reachable p and P(A > B)."""
    delta = paired_delta(by_seed, baseline_by_seed)
    differences = [by_seed[s] - baseline_by_seed[s] for s in delta.seeds]
    statistics = {"delta": delta.interval.mean, "delta_sd": delta.interval.sd, "delta_low": delta.interval.low,
                  "delta_high": delta.interval.high, "delta_n": delta.interval.n,
                  "delta_includes_zero": delta.interval.includes_zero, "unpaired_seeds": delta.unpaired,
                  "p_value": sign_flip_p_value(differences) if differences else math.nan,
                  "p_min": smallest_p_value(len(differences)) if differences else math.nan,
                  "p_improvement": probability_of_improvement(list(by_seed.values()), list(baseline_by_seed.values()))}
    return {prefix + name: value for name, value in statistics.items()}


def add_tests(table: pd.DataFrame, alpha: float = ALPHA, power: float = POWER, effect: float = EFFECT) -> pd.DataFrame:
    """Holm across the tested rows (those whose n pairs let the exact test reach alpha: 2^-n <= alpha)
    and, for every row with a paired delta, the power columns at one-sided alpha/k, k the number of
    tested rows (all delta rows when none is tested: the family a larger run would test):
    mde (80%-power effect of the paired t-test at the row's n and sd), seeds_needed for `effect`,
    and whether the exact test can reach alpha/k at the row's n at all."""
    table = table.copy()
    for column in ("p_holm", "holm_k", "alpha_per_row", "mde", "seeds_needed", "significance_possible"):
        table[column] = math.nan if column != "significance_possible" else None
    if "p_min" not in table:
        return table
    has_delta = table["p_min"].notna()
    tested = table.index[has_delta & (table["p_min"] <= alpha)]
    if len(tested):
        table.loc[tested, "p_holm"] = holm(table.loc[tested, "p_value"].tolist())
    k = len(tested) or int(has_delta.sum())
    for index in table.index[has_delta]:
        n, sd = int(table.at[index, "delta_n"]), float(table.at[index, "delta_sd"])
        table.at[index, "holm_k"] = k
        table.at[index, "alpha_per_row"] = alpha / k
        table.at[index, "mde"] = minimum_detectable_effect(sd, n, alpha / k, power)
        table.at[index, "seeds_needed"] = seeds_needed(effect, sd, alpha / k, power) or math.nan
        table.at[index, "significance_possible"] = smallest_p_value(n) <= alpha / k
    table["seeds_needed"] = table["seeds_needed"].astype("Int64")
    return table


def cell_label(row: pd.Series | dict, layout: Layout) -> str:
    """A cell's name in tables and figures: 'DANet head, no attention', 'Dilated FCN (FCN head)',
    'PAM', 'CAM', 'PAM+CAM' (+ the other row fields that are on, + variant fields that differ from
    their standard value)."""
    parts = [name.upper() for name in ("pam", "cam") if row.get(name)]
    if parts:
        label = "+".join(parts)
    elif "pam" in row:
        label = FCN_HEAD_LABEL if row.get("head") == "fcn" else NO_ATTENTION_LABEL
    else:
        label = "base"
    extras = [f"{name}={row[name]}" for name in layout.rows if name not in ("pam", "cam", "backbone")
              and row.get(name)]
    extras += [f"{name}={row[name]}" for name, standard in layout.variants.items()
               if name in row and row[name] != standard and not (name == "head" and "pam" in row)]
    return " ".join([label, *extras])


def _cell_record(values: dict[str, Any], group: pd.DataFrame, by_seed: dict[int, float]) -> dict[str, Any]:
    cell = t_interval(list(by_seed.values()))
    return {**values, "n": cell.n, "mean": cell.mean, "sd": cell.sd, "ci_low": cell.low, "ci_high": cell.high,
            "seeds": sorted(by_seed), "run_ids": sorted(group["run_id"]), "minutes": group["wall_time_s"].mean() / 60,
            "images_per_s": group["images_per_second"].mean(), "peak_memory_mb": group["peak_memory_mb"].mean()}


def _by_seed(group: pd.DataFrame, metric: str, cell: str) -> dict[int, float]:
    repeated = group.loc[group["seed"].duplicated(keep=False), "run_id"].tolist()
    if repeated:
        raise DuplicateRunsError(f"cell {cell} has several complete records of one seed: {repeated}; remove one, "
                                 "or pass --duplicates newest to keep the newest")
    return dict(zip(group["seed"].astype(int), group[metric] * 100))


def ablation_table(runs: pd.DataFrame, layout: Layout, metric: str = "final_miou", alpha: float = ALPHA,
                   power: float = POWER, effect: float = EFFECT) -> pd.DataFrame:
    """One row per cell of the layout over the usable complete runs (others are not averaged in).

    Variant fields of the layout that take several values become part of the row key: such a row is
    compared with the baseline (delta, p_value, ...) and with its standard row (standard_delta, ...)."""
    complete, _ = usable_runs(add_derived_columns(runs), metric)
    if complete.empty:
        raise MixedCellError("no complete runs to tabulate")
    design = design_of(complete)
    varying = [field for field in layout.variants if field in complete and _varies(complete[field])]
    rows = [column for column in layout.rows if column in complete.columns] + varying
    check_not_mixed(complete, rows, design)
    paper_dataset, paper_columns, paper = paper_reference(layout)
    paper_backbones = sorted({key[paper_columns.index("backbone")] for key in paper}, key=lambda name: (len(name), name)) \
        if "backbone" in paper_columns else []  # resnet50 before resnet101
    groups = {key if isinstance(key, tuple) else (key,): group for key, group in complete.groupby(rows)}
    several_backbones = "backbone" in rows and complete["backbone"].nunique() > 1
    label_of = {key: cell_label(dict(zip(rows, key)), layout) + (f" ({dict(zip(rows, key))['backbone']})"
                                                                 if several_backbones else "") for key in groups}
    by_seed_of = {key: _by_seed(group, metric, label_of[key]) for key, group in groups.items()}

    def standard(values: dict[str, Any], **fixed: Any) -> tuple:
        return tuple(fixed.get(column, layout.variants.get(column, value)) for column, value in values.items())

    records = []
    for key, group in groups.items():
        values = dict(zip(rows, key))
        by_seed = by_seed_of[key]
        variant = ", ".join(f"{field}={values[field]}" for field in varying if values[field] != layout.variants[field])
        record = {**_cell_record(values, group, by_seed), "variant": variant, "cell": label_of[key]}
        baseline_key = standard(values, **layout.baseline)
        if baseline_key in groups and baseline_key != key:
            record |= {"baseline": label_of[baseline_key], **_paired_statistics(by_seed, by_seed_of[baseline_key])}
        if variant and standard(values) in groups and standard(values) != baseline_key:
            record |= _paired_statistics(by_seed, by_seed_of[standard(values)], prefix="standard_")
        # the paper's numbers, only where the paper has the row's configuration (its head included)
        off_paper = any(values[field] != layout.variants[field] for field in varying if field not in paper_columns)
        lookup = {column: values[column] if column in values else group.iloc[0].get(column) for column in paper_columns}
        for backbone in paper_backbones:
            paper_key = tuple(backbone if c == "backbone" else lookup[c] for c in paper_columns)
            record[f"paper_{backbone}"] = None if off_paper else paper.get(paper_key)
        reference = None if off_paper else paper.get(tuple(lookup.values()))
        record["paper"] = reference
        same_data = paper_dataset is not None and set(group["dataset"]) == {paper_dataset}
        record["ours_minus_paper"] = record["mean"] - reference if reference is not None and same_data else None
        records.append(record)
    # the paper's order: baseline first, then by how many parts are switched on (PAM before CAM), variants last
    records.sort(key=lambda r: (sum(r[c] != v for c, v in layout.baseline.items() if c in r), bool(r["variant"]),
                                tuple(r[c] == v for c, v in layout.baseline.items() if c in r),
                                tuple(str(r[c]) for c in rows)))
    return add_tests(pd.DataFrame(records), alpha, power, effect)


def find_grid(grids_dir: Path, name: str) -> Grid | None:
    """<grids_dir>/<name>.yaml, read by the same loader as the launchers; None when the file is missing."""
    path = Path(grids_dir) / f"{name}.yaml"
    return load_grid(str(path), Path(grids_dir)) if path.is_file() else None


@dataclass(frozen=True)
class GridReport:
    """The tables of a grid that declares comparisons: its cells, its comparisons (with their verdicts),
    the runs and hours of its plan (None for a grid with neither a plan nor a ledger) and the plan the
    verdicts come from with its source (sequential.SOURCE_*)."""

    cells: pd.DataFrame
    comparisons: pd.DataFrame
    hours: pd.DataFrame | None
    plan: Plan | None
    source: str


def grid_tables(runs: pd.DataFrame, grid: Grid, metric: str = "final_miou", alpha: float = ALPHA,
                power: float = POWER, effect: float = EFFECT) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-cell table and the comparisons table of a grid that declares comparisons (grid_report)."""
    report = grid_report(runs, grid, metric, alpha, power, effect)
    return report.cells, report.comparisons


def _grid_records(runs: pd.DataFrame, grid: Grid, metric: str) -> pd.DataFrame:
    """The usable records of the grid's cells; a controlled grid's cells may differ only in the switches
    the grid studies (and the seed)."""
    complete, _ = usable_runs(runs[runs["grid_cell"].astype(str) != ""], metric)
    if complete.empty:
        raise MixedCellError(f"no complete runs of grid {grid.name} to tabulate")
    grid_switches = grid.switches()
    design = design_of(complete)
    check_not_mixed(complete, ["grid_cell"], design, {(name,): name for name in complete["grid_cell"]})
    if design == "controlled":
        firsts = complete.groupby("grid_cell").first()
        differing = [column for column in setting_columns(complete) if column not in grid_switches | {"seed"}
                     and column in firsts and _varies(firsts[column])]
        if differing:
            raise MixedCellError(f"grid {grid.name} (design: controlled) has cells that differ in {differing}, "
                                 f"which are not switches it studies ({sorted(grid_switches)})")
    return complete


def grid_report(runs: pd.DataFrame, grid: Grid, metric: str = "final_miou", alpha: float = ALPHA,
                power: float = POWER, effect: float = EFFECT, runs_dir: Path | None = None) -> GridReport:
    """The cells and comparisons of a grid that declares comparisons, records matched to cells by
    tracking.grid_cell, each comparison with its verdict: the ledger's in runs_dir, else the grid's plan
    replayed over the records, else the fixed design (reports/sequential.py); and the plan's runs and hours."""
    complete = _grid_records(runs, grid, metric)
    order = [name for name in grid.named_cells() if name in set(complete["grid_cell"])]
    order += sorted(set(complete["grid_cell"]) - set(order))
    groups = {name: complete[complete["grid_cell"] == name] for name in order}
    by_seed_of = {name: _by_seed(group, metric, name) for name, group in groups.items()}
    grid_switches = grid.switches()
    switches = [field for field in SWITCH_LABELS if field in grid_switches and field in complete]
    switches += sorted(grid_switches & set(complete.columns) - set(switches))
    cells = pd.DataFrame([{"cell": name, **group.iloc[0][switches].to_dict(),
                           **_cell_record({}, group, by_seed_of[name]), **cell_convergence(group)}
                          for name, group in groups.items()])
    records = []
    for comparison in grid.comparisons:
        treatment, baseline = comparison["treatment"], comparison["baseline"]
        record = {"comparison": comparison["name"], "treatment": treatment, "baseline": baseline}
        if treatment in by_seed_of and baseline in by_seed_of:
            record |= _paired_statistics(by_seed_of[treatment], by_seed_of[baseline])
        records.append(record)
    comparisons = add_tests(pd.DataFrame(records), alpha, power, effect)
    return grid_verdicts(grid, complete, cells, comparisons, by_seed_of, metric, alpha, runs_dir)


def grid_verdicts(grid: Grid, complete: pd.DataFrame, cells: pd.DataFrame, comparisons: pd.DataFrame,
                  by_seed_of: dict[str, dict[int, float]], metric: str, alpha: float, runs_dir: Path | None) -> GridReport:
    """The comparisons with their verdicts (the ledger's, the grid's plan replayed, or the fixed design's)
    and the plan's runs and hours."""
    seeded = with_cell_ids(grid, complete)
    planned = plan_state(grid, seed_records(seeded, metric), runs_dir)
    if planned is None:
        verdicts = fixed_verdicts(_tested_differences(comparisons, by_seed_of), alpha)
        plan, hours, source = None, None, SOURCE_FIXED
    else:
        state, source = planned
        verdicts, plan, hours = planned_verdicts(state, source), state.grid.plan, runs_and_hours(state, seeded)
    return GridReport(cells, with_verdicts(comparisons, verdicts, not_converged(cells)), hours, plan, source)


def _tested_differences(comparisons: pd.DataFrame, by_seed_of: dict[str, dict[int, float]]
                        ) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
    """The rows with a test (in the Holm family): their paired seeds and differences treatment - baseline."""
    tested = {}
    for _, row in comparisons[comparisons["p_holm"].notna()].iterrows():
        treatment, baseline = by_seed_of[row["treatment"]], by_seed_of[row["baseline"]]
        seeds = tuple(sorted(set(treatment) & set(baseline)))
        tested[row["comparison"]] = seeds, np.array([treatment[seed] - baseline[seed] for seed in seeds])
    return tested


def with_verdicts(comparisons: pd.DataFrame, verdicts: dict[str, Verdict], improving: set[str]) -> pd.DataFrame:
    """The verdict columns: decision, n, seeds, stopped early, source, and the compared cells still improving."""
    comparisons = comparisons.copy()
    found = [verdicts.get(name) for name in comparisons["comparison"]]
    decided = [verdict.decision if verdict else None for verdict in found]
    comparisons["verdict"] = [decision.decision if decision else "" for decision in decided]
    comparisons["verdict_n"] = pd.array([decision.n if decision else None for decision in decided], dtype="Int64")
    comparisons["verdict_seeds"] = [seed_range(verdict.seeds) if verdict else "" for verdict in found]
    comparisons["verdict_stopped_early"] = [bool(verdict and verdict.early) for verdict in found]
    comparisons["verdict_source"] = [verdict.source if verdict else "" for verdict in found]
    comparisons["verdict_margin"] = [verdict.margin if verdict else math.nan for verdict in found]
    comparisons["not_converged"] = ["; ".join(cell for cell in (row["treatment"], row["baseline"]) if cell in improving)
                                    for _, row in comparisons.iterrows()]
    return comparisons


# The convergence column: how much each cell still gained over the last quarter of training.

CONVERGENCE_FROM = 0.75  # the gain runs from the last evaluation at or before this fraction of the iterations


def val_curve(run_dir: Any) -> dict[int, float]:
    """A run's val mIoU (points) by step from its metrics.jsonl; {} where there is none."""
    path = Path(run_dir, "metrics.jsonl") if isinstance(run_dir, str) else None
    if path is None or not path.is_file():
        return {}
    curve = {}
    for line in path.read_text().splitlines():
        event = json.loads(line) if "val/mIoU" in line else {}
        if _finite(event.get("val/mIoU")):
            curve[int(event["step"])] = 100.0 * event["val/mIoU"]
    return curve


def last_quarter_gain(run_dir: Any, iterations: Any) -> tuple[float, int, int]:
    """val mIoU at the last evaluation minus at the last evaluation at or before 75% of the iterations (so the
    span covers at least the last quarter), in points, with the two steps; NaN without such an evaluation."""
    curve = val_curve(run_dir) if pd.notna(iterations) else {}
    early = [step for step in curve if step <= CONVERGENCE_FROM * float(iterations)]
    if not early or max(early) == max(curve):  # no evaluation before the last quarter, or none in it
        return math.nan, -1, -1
    start, last = max(early), max(curve)
    return curve[last] - curve[start], start, last


def cell_convergence(group: pd.DataFrame) -> dict[str, Any]:
    """A cell's gain over the last quarter of training: mean and 95% t-interval over its seeds' runs, and the
    span (the steps most of its runs measure it between)."""
    run_dirs = group["run_dir"] if "run_dir" in group else pd.Series(None, index=group.index)
    iterations = group["iterations"] if "iterations" in group else pd.Series(None, index=group.index)
    measured = [last_quarter_gain(run_dir, total) for run_dir, total in zip(run_dirs, iterations)]
    measured = [entry for entry in measured if math.isfinite(entry[0])]
    interval = t_interval([gain for gain, _, _ in measured])
    span = Counter((start, last) for _, start, last in measured).most_common(1)
    return {"gain": interval.mean, "gain_low": interval.low, "gain_high": interval.high, "gain_n": interval.n,
            "gain_span": f"{span[0][0][0]}→{span[0][0][1]}" if span else ""}


def not_converged(cells: pd.DataFrame) -> set[str]:
    """The cells still improving at the end of training: their gain's interval lies above 0."""
    return set(cells.loc[cells["gain_low"] > 0, "cell"])


def generic_table(runs: pd.DataFrame, rows: list[str], cols: list[str], metric: str = "final_miou") -> pd.DataFrame:
    """mean +- sd (n) of any config fields against any others."""
    complete, _ = usable_runs(add_derived_columns(runs), metric)
    check_not_mixed(complete, rows + cols, design_of(complete))

    def summarise(values: pd.Series) -> str:
        cell = t_interval(values * 100)
        return f"{cell.mean:.2f} ± {cell.sd:.2f} (n={cell.n})" if cell.n > 1 else f"{cell.mean:.2f} (n=1)"

    return complete.pivot_table(index=rows, columns=cols, values=metric, aggfunc=summarise)


def _number(value: Any, digits: int = 2) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def _flag(value: Any) -> str:
    return "yes" if value is True else "" if value is False else str(value)


def _p_text(row: pd.Series, alpha: float, column: str = "p_holm") -> str:
    if pd.isna(row.get("p_min")):
        return ""
    if row["p_min"] > alpha:
        return f"too few seeds (n={int(row['delta_n'])})"
    return _number(row[column], 3)


def _delta_text(row: pd.Series, prefix: str = "") -> str:
    delta = row.get(prefix + "delta")
    if delta is None or pd.isna(delta):
        return ""
    low, high = row[prefix + "delta_low"], row[prefix + "delta_high"]
    if pd.isna(low):
        return f"{delta:+.2f} (one pair: no interval)"
    return f"{delta:+.2f} [{_number(low)}, {_number(high)}]" + (" (CI includes 0)" if row[prefix + "delta_includes_zero"]
                                                                else "")


def _rows(count: int) -> str:
    return f"{count} row" if count == 1 else f"{count} rows"


def _mde_text(row: pd.Series, alpha: float) -> str:
    if pd.isna(row.get("p_min")):
        return ""
    if row["delta_n"] < 2:
        return "sd unknown (n<2)"
    if row["significance_possible"]:
        return _number(row["mde"])
    k, n = int(row["holm_k"]), int(row["delta_n"])
    why = (f"cannot reach p < {alpha:g} after Holm with {_rows(k)} and {n} seeds (2^-{n} = {2.0 ** -n:.3g} > "
           f"{alpha:g}/{k})" if k > 1 else f"cannot reach p < {alpha:g} with {n} seeds (2^-{n} = {2.0 ** -n:.3g})")
    return "; ".join(part for part in (_number(row["mde"]), why) if part)


def _seeds_text(row: pd.Series) -> str:
    if pd.isna(row.get("p_min")):
        return ""
    if row["delta_n"] < 2:
        return "sd unknown (n<2)"
    return "more than 1000" if pd.isna(row["seeds_needed"]) else str(int(row["seeds_needed"]))


def _test_columns(table: pd.DataFrame, out: pd.DataFrame, baseline_name: str, alpha: float, power: float,
                  effect: float) -> None:
    rows = list(table.iterrows())
    out[f"MDE ({power:.0%} power)"] = [_mde_text(row, alpha) for _, row in rows]
    out[f"seeds for Δ = {effect:+g} ({power:.0%} power)"] = [_seeds_text(row) for _, row in rows]
    out[f"P(> {baseline_name})"] = [_number(value) for value in table["p_improvement"]]


def _cost_columns(table: pd.DataFrame, out: pd.DataFrame) -> None:
    out["min / run"] = [_number(value, 1) for value in table["minutes"]]
    out["images / s"] = [_number(value, 1) for value in table["images_per_s"]]
    out["peak MiB"] = [_number(value, 0) for value in table["peak_memory_mb"]]


def _cell_columns(table: pd.DataFrame, out: pd.DataFrame) -> None:
    out["mIoU (mean ± sd)"] = [f"{_number(m)} ± {_number(s)}" if not math.isnan(s) else _number(m)
                               for m, s in zip(table["mean"], table["sd"])]
    out["n"] = table["n"].astype(int)
    out["95% CI"] = [f"[{_number(lo)}, {_number(hi)}]" if not math.isnan(lo) else "" for lo, hi in
                     zip(table["ci_low"], table["ci_high"])]


def presentable(table: pd.DataFrame, layout: Layout, baseline_name: str, paper_dataset: str | None,
                alpha: float = ALPHA, power: float = POWER, effect: float = EFFECT) -> pd.DataFrame:
    """The table as text cells (mIoU in %), as the paper would print it plus our statistics."""
    out = pd.DataFrame()
    if layout is TABLE1:
        out["Method"] = [FCN_HEAD_LABEL if row.get("head") == "fcn" else NO_ATTENTION_LABEL
                         if not (row["pam"] or row["cam"]) else "DANet" for _, row in table.iterrows()]
    for column in layout.rows:
        if column in table:
            out[layout.labels.get(column, column)] = [_flag(value) for value in table[column]]
    if table["variant"].astype(bool).any():
        out["Variant"] = table["variant"].tolist()
    _cell_columns(table, out)
    if "delta" in table:
        out[f"Δ vs {baseline_name} [95% CI]"] = [_delta_text(row) for _, row in table.iterrows()]
        out["p (one-sided, Holm)"] = [_p_text(row, alpha) for _, row in table.iterrows()]
        _test_columns(table, out, baseline_name, alpha, power, effect)
    if "standard_delta" in table:
        out["Δ vs standard [95% CI]"] = [_delta_text(row, "standard_") for _, row in table.iterrows()]
    for column in (c for c in table if c.startswith("paper_")):
        name = column.removeprefix("paper_").replace("resnet", "R")
        out[f"paper {name} ({paper_dataset})" if paper_dataset else f"paper {name}"] = \
            [_number(value) for value in table[column]]
    if table["ours_minus_paper"].notna().any():
        out["ours − paper"] = [_number(value) for value in table["ours_minus_paper"]]
    _cost_columns(table, out)
    return out


SWITCH_LABELS = {"head": "Head", "pam": "PAM", "cam": "CAM", "aux": "Aux", "aux_branches": "Aux branches"}


def presentable_cells(cells: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"Cell": cells["cell"]})
    for column in cells.columns[1:cells.columns.get_loc("n")]:
        values = cells[column]
        if column == "aux_branches" and "aux" in cells:  # as config.check_combinations: it needs aux and the DANet head
            applies = cells["aux"].astype(bool)
            if "head" in cells:  # a grid whose cells never set the head keeps the preset's DANet head
                applies &= cells["head"].eq("danet")
            values = values.where(applies, False)
        out[SWITCH_LABELS.get(column, column)] = [_flag(value) for value in values]
    _cell_columns(cells, out)
    if "gain" in cells:
        out["gain, last quarter [95% CI]"] = [_gain_text(row) for _, row in cells.iterrows()]
    _cost_columns(cells, out)
    return out


def _gain_text(row: pd.Series) -> str:
    if pd.isna(row["gain"]):
        return ""
    if pd.isna(row["gain_low"]):
        return f"{row['gain']:+.2f} (one seed: no interval; iterations {row['gain_span']})"
    return f"{row['gain']:+.2f} [{_number(row['gain_low'])}, {_number(row['gain_high'])}] (iterations {row['gain_span']})"


def presentable_comparisons(comparisons: pd.DataFrame, alpha: float = ALPHA, power: float = POWER,
                            effect: float = EFFECT) -> pd.DataFrame:
    out = pd.DataFrame({"Comparison": comparisons["comparison"],
                        "treatment − baseline": comparisons["treatment"] + " − " + comparisons["baseline"]})
    if "delta" not in comparisons:
        out["Δ [95% CI]"] = "no complete runs of both cells"
        return out
    rows = list(comparisons.iterrows())
    out["Δ [95% CI]"] = [_delta_text(row) or "no complete runs of both cells" for _, row in rows]
    out["n pairs"] = [_number(value, 0) for value in comparisons["delta_n"]]
    out["p (exact, one-sided)"] = [_p_text(row, alpha, "p_value") for _, row in rows]
    out["p (Holm)"] = [_p_text(row, alpha) for _, row in rows]
    if "verdict" in comparisons:
        out["Verdict"] = [verdict_text(row, alpha) for _, row in rows]
    _test_columns(comparisons, out, "baseline", alpha, power, effect)
    return out


def seed_range(seeds: Any) -> str:
    """0-4, or 0, 2, 5 where they are not consecutive."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def verdict_text(row: pd.Series, alpha: float = ALPHA) -> str:
    """'better at n = 8 (seeds 0-7)', 'equivalent (±1) at n = 8 (...)', 'futile, stopped at n = 4 (...)',
    ', not converged' where a compared cell still improves; 'continue: n = 6 so far' mid-plan."""
    if not row["verdict"]:  # a plan before its first look; a fixed-design row without a test or a Δ
        return "no look yet" if row["verdict_source"] else "" if pd.isna(row.get("p_min")) else \
            f"no test: {_p_text(row, alpha)}"
    if row["verdict"] == CONTINUE:
        return f"continue: n = {row['verdict_n']} so far (seeds {row['verdict_seeds']})"
    text = row["verdict"] + (f" (±{row['verdict_margin']:g})" if row["verdict"] == EQUIVALENT else "")
    text += ", not converged" if row["not_converged"] else ""
    text += f", stopped at n = {row['verdict_n']}" if row["verdict_stopped_early"] else f" at n = {row['verdict_n']}"
    return f"{text} (seeds {row['verdict_seeds']})"


def verdict_note(report: GridReport) -> str:
    """Where the Verdict column comes from and how to read it."""
    plan = report.plan
    if report.source == SOURCE_FIXED:
        text = ("Verdict: the fixed design, one look at each row's n pairs (reports/sequential.py): Holm's step-down "
                "over the rows with a test, so 'better' is p (Holm) at or below alpha; a row not better is 'worse' "
                "or 'equivalent' (within ±1 point, two one-sided tests) at the level where the step-down stopped, "
                "else 'inconclusive'.")
    else:
        where = ("the decisions the launchers took and recorded in the grid's ledger in the runs folder (each "
                 "comparison's latest look; decided on each run's final_miou)" if report.source == SOURCE_LEDGER else
                 "the grid's plan replayed over these records in seed order (a ledger, where the runs folder has "
                 "one, holds the decisions on the runs' own final numbers)")
        text = (f"Verdict: {where}; plan: looks {list(plan.looks)}, futility {'on' if plan.futility else 'off'}, "
                f"efficacy {plan.efficacy}, alpha {plan.alpha:g} family-wise (Holm at the last look), equivalence "
                f"margin ±{plan.margin:g} point (reports/sequential.py). n = k: the first k seeds of both cells; a "
                "row may show more pairs than its verdict used (records beyond a stop), the verdict is still the plan's.")
    text += (" 'not converged': the treatment or baseline cell still gained over the last quarter of training (the "
             "cells table's gain interval lies above 0).")
    if report.comparisons["verdict_stopped_early"].any():
        text += (" A row stopped early ('stopped at n = k', before the plan's last look) has an estimate conditional "
                 "on having stopped there: an efficacy stop overstates |Δ|, a futility stop was selected for Δ <= 0.")
    return text


def presentable_hours(hours: pd.DataFrame) -> pd.DataFrame:
    """The runs and hours table as text cells."""
    return pd.DataFrame({"Cell": hours["cell"], "runs (plan)": hours["runs"].astype(int),
                         "runs (fixed design)": hours["runs_fixed"].astype(int), "records": hours["records"].astype(int),
                         "hours (plan)": [_number(value) for value in hours["hours"]],
                         "hours saved": [_number(value) for value in hours["hours_saved"]]})


def hours_note(report: GridReport) -> str:
    source = "the ledger's decisions" if report.source == SOURCE_LEDGER else "the grid's plan replayed over the records"
    return (f"Runs and training hours under the grid's plan ({source}): per named cell, the runs the plan made (its "
            "seeds up to the look that stopped every comparison of the cell, else up to the last look taken), the "
            "runs of the fixed design (every seed of every cell), the records in the runs folder, the training hours "
            "of the plan's runs (each record's wall_time_s) and the hours saved (the cell's mean run time times the "
            "runs saved).")


CELL_NOTE = "mIoU in % over seeds (mean ± sample sd, n, 95% t-interval)."
GAIN_NOTE = ("Gain, last quarter: each run's val mIoU (points) at its last evaluation minus at its last evaluation at "
             "or before 75% of its iterations (so at least the last quarter; the iterations it spans in brackets; "
             "metrics.jsonl), mean and 95% t-interval over seeds; an interval above 0: the cell was still improving. "
             "Empty where the records have no evaluation before the last.")


def table_note(table: pd.DataFrame, baseline: str, alpha: float, power: float, effect: float) -> str:
    """What the statistics are, in the words a reader needs: the Holm family, the pairing, power."""
    tested = int(table["p_holm"].notna().sum())
    k = int(table["holm_k"].max()) if table["holm_k"].notna().any() else 0
    return (f"Δ: against {baseline}, paired by seed: the "
            f"mean and 95% t-interval of the differences over the seeds both cells have (n pairs, which may be fewer "
            f"than either cell's n). p: exact one-sided sign-flip test of those differences; Holm's correction runs "
            f"over the family of the {_rows(tested)} with a test (rows whose n pairs let the exact test reach "
            f"p <= {alpha:g}, 2^-n <= {alpha:g}; rows marked 'too few seeds' are not in it). P(>): probability of "
            f"improvement, Mann-Whitney U / (n_A n_B), over all seeds of both cells, paired or not. MDE: the "
            f"smallest true Δ that the paired t-test at one-sided {alpha:g}/k, k = {k} (Holm's strictest step over the rows "
            f"with a test, or over every Δ row when none has enough seeds for one), detects with "
            f"{power:.0%} power at the row's n pairs and sd of differences (noncentral t; the exact test the table uses "
            f"has less power at small n). Seeds for Δ = {effect:+g}: the smallest n at which that t-test has {power:.0%} "
            f"power for Δ = {effect:+g} point and 2^-n <= {alpha:g}/k.")


def model_description(row: pd.Series | dict) -> str:
    """What a record's model is, in words that never confuse the two baselines: 'Dilated FCN (FCN
    head)' (head fcn), 'DANet head, no attention' (the DANet head with PAM and CAM off, whatever its
    run folder or grid cell is called: a cell named fcn is this one), 'DANet head with PAM+CAM', ...,
    and ', deep supervision of both branches' where aux_branches is all."""
    if row.get("head", "danet") == "fcn":
        return FCN_HEAD_LABEL
    modules = "+".join(name.upper() for name in ("pam", "cam") if _on(row.get(name)))
    text = f"DANet head with {modules}" if modules else NO_ATTENTION_LABEL
    if _on(row.get("aux")) and row.get("aux_branches") == "all":
        text += ", deep supervision of both branches"
    return text


def loss_names(row: pd.Series | dict) -> list[str]:
    """The loss terms a record's model trained with (danet.config.ModelConfig.loss_weights, from
    the flat record): the main output, a branch classifier per DANet-head branch with aux on (those
    whose module is on, or both with aux_branches all), and the FCN auxiliary head."""
    branches = row.get("head", "danet") == "danet" and _on(row.get("aux"))
    every = row.get("aux_branches") == "all"
    names = ["main"] + [f"{name.upper()} branch" for name in ("pam", "cam") if branches and (_on(row.get(name)) or every)]
    return names + (["FCN auxiliary"] if _on(row.get("fcn_aux")) else [])


def _on(value: Any) -> bool:
    """A switch that is on (a bool from a record, numpy's or Python's; a missing one is off)."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def plain_setting(value: Any) -> str:
    """A setting as a reader types it: 0.02, 300, (1.0,) -> 1.0, 0.75 1.0 1.25."""
    if isinstance(value, (tuple, list)):
        return " ".join(plain_setting(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def recorded_values(values: pd.Series) -> list[str]:
    return sorted({str(value) for value in values if value is not None and not pd.isna(value) and str(value)})


def _number_first(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


BRANCH_LOSS = "branch-loss"  # one recipe for every cell, the loss terms following the modules (aux on, as released)


def without_design(runs: pd.DataFrame) -> str:
    """What records that declare no design hold, from their configs: whether lr and iterations are
    one recipe for every run, the loss terms of each model (one recipe and loss terms that differ
    between models: the branch-loss design, where a delta is a module and its branch losses), and
    where the records came from (the Optuna study they name, or runs launched one at a time)."""
    recipe = {name: runs[name].dropna().map(plain_setting) for name in ("lr", "iterations") if name in runs}
    recipe = {name: values for name, values in recipe.items() if not values.empty}
    one_recipe = all(values.nunique() == 1 for values in recipe.values())
    settings = ", ".join(f"{name} {' or '.join(sorted(values.unique(), key=_number_first))}"
                         for name, values in recipe.items())
    losses: dict[str, int] = {}
    for _, row in runs.iterrows():
        losses.setdefault(model_description(row), len(loss_names(row)))
    ordered = sorted(losses.items(), key=lambda item: (item[1], item[0]))
    text = (f"a {BRANCH_LOSS} design: " if one_recipe and len(set(losses.values())) > 1 else "") + \
        (f"one recipe in every run ({settings})" if one_recipe else f"recipes that differ between runs ({settings})")
    text += "; loss terms per run: " + ", ".join(f"{count} ({model})" for model, count in ordered)
    studies = recorded_values(runs["study"]) if "study" in runs else []
    return text + (f"; from Optuna study {', '.join(studies)}" if studies else
                   "; launched one run at a time, outside an Optuna study")


def provenance_lines(runs: pd.DataFrame, numbers: str) -> list[str]:
    """Where the numbers come from, the design the records declare (and, for records that declare
    none, what they hold), and (when more than one) the kinds of machine the runs came from."""
    lines = [f"Numbers: {numbers}."]
    designs = runs.get("design", pd.Series(DESIGN_NOT_RECORDED, index=runs.index)).fillna(DESIGN_NOT_RECORDED)
    grids = sorted(set(runs.get("grid", pd.Series("", index=runs.index)).fillna("").astype(str)) - {""})
    names = {DESIGN_NOT_RECORDED: "not recorded (records made before a record named its grid and design)",
             DESIGN_NOT_FROM_GRID: "none declared (runs not from a grid)"}
    lines.append("Design: " + "; ".join(f"{names.get(design, design)} ({count} runs)"
                                        for design, count in designs.value_counts().sort_index().items())
                 + (f"; grid {', '.join(grids)}" if grids else "") + ".")
    undeclared = runs[designs.isin([DESIGN_NOT_RECORDED, DESIGN_NOT_FROM_GRID])]
    if not undeclared.empty:
        lines.append(f"What the records without a design hold: {without_design(undeclared)}.")
    machines = runs.get("machine", pd.Series(MACHINE_NOT_RECORDED, index=runs.index)).fillna(MACHINE_NOT_RECORDED)
    if machines.nunique() > 1:
        lines.append("Runs from more than one kind of machine: " + "; ".join(
            f"{machine} ({count} runs)" for machine, count in machines.value_counts().sort_index().items())
            + ". A run repeats bit for bit only on the same hardware and software; elsewhere it is another draw "
              "from the seed distribution.")
    return lines


def to_markdown(text_table: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(column) for column in text_table.columns) + " |"
    rule = "|" + "|".join("---" for _ in text_table.columns) + "|"
    lines = ["| " + " | ".join(str(value) for value in row) + " |" for row in text_table.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


LATEX_SPECIALS = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "|": r"\textbar{}",
    # pdflatex has no glyphs for these in its default fonts: write them as math
    "±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "≤": r"$\leq$", "≥": r"$\geq$", "α": r"$\alpha$",
    "×": r"$\times$"})


def latex_escape(text: Any) -> str:
    """Text for pdflatex: LaTeX specials escaped, the few non-ASCII signs we print as math."""
    return str(text).translate(LATEX_SPECIALS)


def to_latex(text_table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (\\usepackage{booktabs}) whose every cell, header and caption is escaped."""
    escaped = text_table.map(latex_escape)
    escaped.columns = [latex_escape(column) for column in text_table.columns]
    return escaped.to_latex(index=False, escape=False, caption=latex_escape(caption), label=label)


def write_table(table: pd.DataFrame, text_table: pd.DataFrame, out_dir: Path, name: str, note: str) -> list[Path]:
    """name.md (with a note under it), name.tex (booktabs, the note as caption), name.csv (unrounded)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.tex", out_dir / f"{name}.csv"]
    paths[0].write_text(to_markdown(text_table) + "\n" + note + "\n")
    paths[1].write_text(to_latex(text_table, note, f"tab:{name}"))
    table.to_csv(paths[2], index=False, float_format="%.6g")
    return paths
