"""Turn logged runs into the paper's ablation tables, with the statistics the paper lacks.

    python reports/make_tables.py                                  # runs/ -> reports/out/
    python reports/make_tables.py --runs-dir results/camvid_cpu/runs --out results/camvid_cpu
    python reports/make_tables.py --wandb ENTITY/PROJECT [--sweep ID]
    python reports/make_tables.py --optuna-storage URL --study NAME
    python reports/make_tables.py --rows backbone,pam --cols cam   # any fields against any others

Writes table1 / table2 (where the runs vary those fields) and the generic table as .md, .tex and
.csv, plus runs.csv (one row per run) and not_complete.csv (running, failed, pruned runs, listed,
never averaged in). Exit status 2 when no runs are found or a cell would pool different settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console

from reports.sources import NoRunsFound, read_optuna, read_run_store, read_wandb
from reports.tables import (
    TABLE1,
    TABLE2,
    Layout,
    MixedCellError,
    ablation_table,
    add_derived_columns,
    generic_table,
    paper_reference,
    presentable,
    to_markdown,
    write_table,
)

NOTES = {
    "table1": "mIoU in % over seeds (mean ± sample sd, n, 95% t-interval). Δ: paired by seed against the Dilated "
              "FCN cell of the same backbone, with its 95% t-interval; p: exact one-sided sign-flip permutation test "
              "over seeds, Holm-corrected across rows; P(>): probability of improvement, Mann-Whitney U / (n_A n_B).",
    "table2": "mIoU in % over seeds (mean ± sample sd, n, 95% t-interval). Δ: paired by seed against the row with no "
              "DA, multi-grid or multi-scale test; p: exact one-sided sign-flip test, Holm-corrected.",
}


def load_runs(args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    if args.wandb:
        return read_wandb(args.wandb, args.sweep), f"W&B {args.wandb}"
    if args.optuna_storage:
        return read_optuna(args.optuna_storage, args.study), f"Optuna study {args.study}"
    return read_run_store(args.runs_dir), str(args.runs_dir)


def layout_applies(runs: pd.DataFrame, layout: Layout) -> bool:
    """A layout is worth writing when its varying fields take more than one value in the runs."""
    runs = add_derived_columns(runs)
    varying = [column for column in layout.baseline if column in runs]
    return bool(varying) and any(runs[column].nunique() > 1 for column in varying)


def make_figures(runs: pd.DataFrame, table: pd.DataFrame, layout: Layout, out: Path, where: str) -> list[Path]:
    from reports import figures  # matplotlib is slow to import: only when figures are asked for

    complete = runs[runs["status"] == "complete"]
    written = figures.ablation_bars(table, layout, out, f"{layout.name}: val mIoU per cell ({where})")
    written += figures.class_heatmap(complete, table, layout, out, f"{layout.name}: per-class IoU")
    if "run_dir" in complete:  # curves need the metrics.jsonl of local records
        written += figures.miou_curves(complete, layout, out, f"{layout.name}: validation mIoU during training")
        written += figures.gamma_curves(complete, layout, out, f"{layout.name}: attention gammas during training")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/make_tables.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs-dir", type=Path, default=Path("runs"), help="a RunStore folder (default: runs)")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead")
    source.add_argument("--optuna-storage", metavar="URL", help="read the records of an Optuna study (with --study)")
    parser.add_argument("--sweep", help="with --wandb: only this sweep's runs")
    parser.add_argument("--study", help="with --optuna-storage: the study name")
    parser.add_argument("--out", type=Path, default=Path("reports/out"), help="output folder (default: reports/out)")
    parser.add_argument("--metric", choices=["final_miou", "best_miou"], default="final_miou",
                        help="final_miou: the configured test protocol at the end (default); best_miou: best seen")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--rows", help="generic table: comma-separated fields for rows")
    parser.add_argument("--cols", default="", help="generic table: comma-separated fields for columns")
    args = parser.parse_args(argv)
    if args.optuna_storage and not args.study:
        parser.error("--optuna-storage needs --study")
    console = Console(stderr=True)
    try:
        runs, where = load_runs(args)
    except NoRunsFound as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out / "runs.csv", index=False)
    not_complete = runs[runs["status"] != "complete"]
    not_complete[["run_id", "status", "reason"]].to_csv(args.out / "not_complete.csv", index=False)
    written = [args.out / "runs.csv", args.out / "not_complete.csv"]
    try:
        for layout, baseline_name in ((TABLE1, "FCN"), (TABLE2, "base")):
            if layout_applies(runs, layout):
                table = ablation_table(runs, layout, args.metric)
                dataset, _, _ = paper_reference(layout)
                written += write_table(table, presentable(table, layout, baseline_name, dataset), args.out,
                                       layout.name, NOTES[layout.name])
                console.print(to_markdown(presentable(table, layout, baseline_name, dataset)))
                if not args.no_figures:
                    written += make_figures(runs, table, layout, args.out, where)
        if args.rows:
            rows, cols = args.rows.split(","), [column for column in args.cols.split(",") if column]
            pivot = generic_table(runs, rows, cols, args.metric)
            pivot.columns = [f"{'/'.join(cols)}={value}" for value in pivot.columns] if cols else ["mIoU (%)"]
            (args.out / "generic.md").write_text(to_markdown(pivot.reset_index()))
            pivot.to_csv(args.out / "generic.csv")
            written += [args.out / "generic.md", args.out / "generic.csv"]
    except (MixedCellError, KeyError) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    console.print(f"{len(runs)} runs from {where} ({len(not_complete)} not complete, listed in not_complete.csv); "
                  f"wrote {len(written)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
