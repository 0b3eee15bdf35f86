"""Ablation tables: per cell mean, sd, n and 95% t-interval over seeds, the paired delta against
the baseline cell, the paper's number beside it, and costs. Written as Markdown, LaTeX, CSV."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from reports.stats import holm, paired_delta, probability_of_improvement, sign_flip_p_value, smallest_p_value, t_interval

PAPER_NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
# Settings that do not change a result (danet.config.NOT_IN_CELL plus tracking): never "mixed".
NOT_SETTINGS = {"data_root", "workers", "device", "log_every", "checkpoint_every", "eval_batch_size", "runs_dir",
                "run_name", "wandb", "wandb_project", "wandb_entity", "quiet", "study", "trial"}
RESULT_FIELDS = {"run_id", "run_dir", "status", "reason", "final_miou", "best_miou", "final_pixel_accuracy",
                 "wall_time_s", "images_per_second", "peak_memory_mb", "iterations", "device", "cell_hash"}
ALPHA = 0.05


class MixedCellError(ValueError):
    """A table cell would pool runs whose settings differ."""


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
                variants={"cam_energy": "code", "pam_reduction": 8})
TABLE2 = Layout("table2", ["backbone", "random_scale", "multi_grid", "multi_scale_test"],
                {"random_scale": False, "multi_grid": False, "multi_scale_test": False},
                {"backbone": "BaseNet", "random_scale": "DA", "multi_grid": "Multi-Grid", "multi_scale_test": "MS"})


def add_derived_columns(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    if "eval_scales" in runs and "eval_flip" in runs:
        runs["multi_scale_test"] = [len(scales) > 1 or bool(flip) for scales, flip in
                                    zip(runs["eval_scales"], runs["eval_flip"])]
    return runs


def setting_columns(runs: pd.DataFrame) -> list[str]:
    return [column for column in runs.columns if column not in RESULT_FIELDS | NOT_SETTINGS
            and not column.startswith("IoU/")]


def check_not_mixed(runs: pd.DataFrame, rows: list[str]) -> None:
    """Refuse a cell whose runs differ in anything but the seed, naming the differing fields."""
    others = [column for column in setting_columns(runs) if column not in rows and column != "seed"]
    for key, group in runs.groupby(rows, dropna=False):
        differing = [column for column in others if group[column].astype(str).nunique() > 1]
        if differing:
            raise MixedCellError(f"cell {dict(zip(rows, np.atleast_1d(key)))} mixes runs that differ in "
                                 f"{differing}: select runs (--runs-dir) or add these fields to the rows")


def paper_reference(layout: Layout) -> tuple[str | None, list[str], dict[tuple, float]]:
    """The paper's dataset, the row fields its numbers are keyed by, and the numbers."""
    section = yaml.safe_load(PAPER_NUMBERS.read_text()).get(layout.name)
    if not section:
        return None, [], {}
    columns = [column for column in layout.rows if column in section["rows"][0]]
    return section["dataset"], columns, {tuple(row[c] for c in columns): row["miou"] for row in section["rows"]}


def _paired_statistics(by_seed: dict[int, float], baseline_by_seed: dict[int, float], prefix: str = "") -> dict:
    """Paired delta by seed with its t-interval, sign-flip p, smallest reachable p and P(A > B)."""
    delta = paired_delta(by_seed, baseline_by_seed)
    differences = [by_seed[s] - baseline_by_seed[s] for s in delta.seeds]
    statistics = {"delta": delta.interval.mean, "delta_low": delta.interval.low, "delta_high": delta.interval.high,
                  "delta_n": delta.interval.n, "delta_includes_zero": delta.interval.includes_zero,
                  "unpaired_seeds": delta.unpaired,
                  "p_value": sign_flip_p_value(differences) if differences else math.nan,
                  "p_min": smallest_p_value(len(differences)) if differences else math.nan,
                  "p_improvement": probability_of_improvement(list(by_seed.values()), list(baseline_by_seed.values()))}
    return {prefix + name: value for name, value in statistics.items()}


def ablation_table(runs: pd.DataFrame, layout: Layout, metric: str = "final_miou") -> pd.DataFrame:
    """One row per cell of the layout over the complete runs (others are not averaged in).

    Variant fields of the layout that take several values become part of the row key: such a row is
    compared with the baseline (delta, p_value, ...) and with its standard row (standard_delta, ...)."""
    complete = add_derived_columns(runs[runs["status"] == "complete"])
    if complete.empty:
        raise MixedCellError("no complete runs to tabulate")
    varying = [field for field in layout.variants if field in complete and complete[field].astype(str).nunique() > 1]
    rows = [column for column in layout.rows if column in complete.columns] + varying
    check_not_mixed(complete, rows)
    paper_dataset, paper_columns, paper = paper_reference(layout)
    paper_backbones = sorted({key[paper_columns.index("backbone")] for key in paper}, key=lambda name: (len(name), name)) \
        if "backbone" in paper_columns else []  # resnet50 before resnet101
    groups = {key if isinstance(key, tuple) else (key,): group for key, group in complete.groupby(rows)}
    by_seed_of = {key: dict(zip(group["seed"], group[metric] * 100)) for key, group in groups.items()}

    def standard(values: dict[str, Any], **fixed: Any) -> tuple:
        return tuple(fixed.get(column, layout.variants.get(column, value)) for column, value in values.items())

    records = []
    for key, group in groups.items():
        values = dict(zip(rows, key))
        by_seed = by_seed_of[key]
        variant = ", ".join(f"{field}={values[field]}" for field in varying if values[field] != layout.variants[field])
        cell = t_interval(list(by_seed.values()))
        record = {**values, "variant": variant, "n": cell.n, "mean": cell.mean, "sd": cell.sd, "ci_low": cell.low,
                  "ci_high": cell.high, "seeds": sorted(by_seed), "minutes": group["wall_time_s"].mean() / 60,
                  "images_per_s": group["images_per_second"].mean(), "peak_memory_mb": group["peak_memory_mb"].mean()}
        baseline_key = standard(values, **layout.baseline)
        if baseline_key in groups and baseline_key != key:
            record |= _paired_statistics(by_seed, by_seed_of[baseline_key])
        if variant and standard(values) in groups:
            record |= _paired_statistics(by_seed, by_seed_of[standard(values)], prefix="standard_")
        # the paper's numbers, per backbone it reports, for the standard rows only
        for backbone in paper_backbones:
            paper_key = tuple(backbone if c == "backbone" else values.get(c) for c in paper_columns)
            record[f"paper_{backbone}"] = None if variant else paper.get(paper_key)
        reference = None if variant else paper.get(tuple(values.get(c) for c in paper_columns))
        record["paper"] = reference
        same_data = paper_dataset is not None and set(group["dataset"]) == {paper_dataset}
        record["ours_minus_paper"] = cell.mean - reference if reference is not None and same_data else None
        records.append(record)
    # the paper's order: baseline first, then by how many parts are switched on (PAM before CAM), variants last
    records.sort(key=lambda r: (sum(r[c] != v for c, v in layout.baseline.items() if c in r), bool(r["variant"]),
                                tuple(r[c] == v for c, v in layout.baseline.items() if c in r),
                                tuple(str(r[c]) for c in rows)))
    table = pd.DataFrame(records)
    testable = table.index[table.get("p_min", pd.Series(dtype=float)).fillna(1.0) <= ALPHA] \
        if "p_min" in table else []
    table["p_holm"] = math.nan
    if len(testable):
        table.loc[testable, "p_holm"] = holm(table.loc[testable, "p_value"].tolist())
    return table


def generic_table(runs: pd.DataFrame, rows: list[str], cols: list[str], metric: str = "final_miou") -> pd.DataFrame:
    """mean +- sd (n) of any config fields against any others."""
    complete = add_derived_columns(runs[runs["status"] == "complete"])
    check_not_mixed(complete, rows + cols)

    def summarise(values: pd.Series) -> str:
        cell = t_interval(values * 100)
        return f"{cell.mean:.2f} ± {cell.sd:.2f} (n={cell.n})" if cell.n > 1 else f"{cell.mean:.2f} (n=1)"

    return complete.pivot_table(index=rows, columns=cols, values=metric, aggfunc=summarise)


def _number(value: Any, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _flag(value: Any) -> str:
    return "yes" if value is True else "" if value is False else str(value)


def _p_text(row: pd.Series) -> str:
    if "p_min" not in row or pd.isna(row.get("p_min")):
        return ""
    if row["p_min"] > ALPHA:
        return f"too few seeds (n={int(row['delta_n'])})"
    return _number(row["p_holm"], 3)


def _delta_text(row: pd.Series, prefix: str = "") -> str:
    delta = row.get(prefix + "delta")
    if delta is None or pd.isna(delta):
        return ""
    low, high = row[prefix + "delta_low"], row[prefix + "delta_high"]
    if pd.isna(low):
        return f"{delta:+.2f} (one pair: no interval)"
    return f"{delta:+.2f} [{_number(low)}, {_number(high)}]" + (" (CI includes 0)" if row[prefix + "delta_includes_zero"]
                                                                else "")


def presentable(table: pd.DataFrame, layout: Layout, baseline_name: str, paper_dataset: str | None) -> pd.DataFrame:
    """The table as text cells (mIoU in %), as the paper would print it plus our statistics."""
    out = pd.DataFrame()
    if layout is TABLE1:
        out["Method"] = ["Dilated FCN" if not (row.pam or row.cam) else "DANet" for row in table.itertuples()]
    for column in layout.rows:
        if column in table:
            out[layout.labels.get(column, column)] = [_flag(value) for value in table[column]]
    if table["variant"].astype(bool).any():
        out["Variant"] = table["variant"].tolist()
    out["mIoU (mean ± sd)"] = [f"{_number(m)} ± {_number(s)}" if not math.isnan(s) else _number(m)
                               for m, s in zip(table["mean"], table["sd"])]
    out["n"] = table["n"].astype(int)
    out["95% CI"] = [f"[{_number(lo)}, {_number(hi)}]" if not math.isnan(lo) else "" for lo, hi in
                     zip(table["ci_low"], table["ci_high"])]
    if "delta" in table:
        out[f"Δ vs {baseline_name} [95% CI]"] = [_delta_text(row) for _, row in table.iterrows()]
        out["p (one-sided, Holm)"] = [_p_text(row) if not pd.isna(row["delta"]) else "" for _, row in table.iterrows()]
        out[f"P(> {baseline_name})"] = [_number(value) for value in table["p_improvement"]]
    if "standard_delta" in table:
        out["Δ vs standard [95% CI]"] = [_delta_text(row, "standard_") for _, row in table.iterrows()]
    for column in (c for c in table if c.startswith("paper_")):
        name = column.removeprefix("paper_").replace("resnet", "R")
        out[f"paper {name} ({paper_dataset})" if paper_dataset else f"paper {name}"] = \
            [_number(value) for value in table[column]]
    if table["ours_minus_paper"].notna().any():
        out["ours − paper"] = [_number(value) for value in table["ours_minus_paper"]]
    out["min / run"] = [_number(value, 1) for value in table["minutes"]]
    out["images / s"] = [_number(value, 1) for value in table["images_per_s"]]
    out["peak MiB"] = [_number(value, 0) for value in table["peak_memory_mb"]]
    return out


def to_markdown(text_table: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(column) for column in text_table.columns) + " |"
    rule = "|" + "|".join("---" for _ in text_table.columns) + "|"
    lines = ["| " + " | ".join(str(value) for value in row) + " |" for row in text_table.itertuples(index=False)]
    return "\n".join([header, rule, *lines]) + "\n"


def write_table(table: pd.DataFrame, text_table: pd.DataFrame, out_dir: Path, name: str, note: str) -> list[Path]:
    """name.md (with a note under it), name.tex (booktabs), name.csv (the unrounded numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.md", out_dir / f"{name}.tex", out_dir / f"{name}.csv"]
    paths[0].write_text(to_markdown(text_table) + "\n" + note + "\n")
    paths[1].write_text(text_table.to_latex(index=False, escape=True, caption=note, label=f"tab:{name}"))
    table.to_csv(paths[2], index=False, float_format="%.6g")
    return paths
