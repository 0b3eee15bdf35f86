"""Turn logged runs into the paper's ablation tables, with the statistics the paper lacks.

    python reports/make_tables.py                                  # runs/ -> reports/out/
    python reports/make_tables.py --runs-dir results/camvid_cpu/runs --out results/camvid_cpu
    python reports/make_tables.py --wandb ENTITY/PROJECT [--sweep ID]
    python reports/make_tables.py --optuna-storage optuna/NAME.journal --study NAME
    python reports/make_tables.py --rows backbone,pam --cols cam   # any fields against any others
    python reports/make_tables.py --runs-dir R --out O --split test --protocol ms0.75-1-1.25-flip

Writes table1 / table2 (where the runs vary those fields), or, for the records of a grid that
declares comparisons (ablations/grids/<grid>.yaml), cells (one row per grid cell) and comparisons
(the grid's paired comparisons); the generic table; each as .md, .tex and .csv, plus runs.csv (one
row per run) and not_complete.csv (running, failed, unreadable runs and complete runs without a
usable number, each with its reason: listed, never averaged in). With --split / --protocol the
numbers come from the runs' evaluation records and every file name gets that suffix.

Each call first removes the files an earlier call with the same suffix wrote, so the folder always
describes the last call. Exit status 2 (and no tables) when no runs are found, a cell would pool
different settings, or two complete records share a cell and seed (see --duplicates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from danet.config import UsageError
from danet.console import stderr_console
from reports.sources import (
    UNREADABLE,
    NoRunsFound,
    multi_scale_rows,
    read_evaluations,
    read_optuna,
    read_run_store,
    read_wandb,
    with_evaluation_numbers,
)
from reports.stats import POWER
from reports.tables import (
    ALPHA,
    CELL_NOTE,
    EFFECT,
    TABLE1,
    TABLE2,
    DuplicateRunsError,
    Layout,
    MixedCellError,
    ablation_table,
    add_derived_columns,
    generic_table,
    grid_tables,
    load_grid_spec,
    paper_reference,
    presentable,
    presentable_cells,
    presentable_comparisons,
    provenance_lines,
    resolve_duplicates,
    table_note,
    to_markdown,
    usable_runs,
    write_table,
)

GRIDS_DIR = Path(__file__).resolve().parent.parent / "ablations" / "grids"
BASELINES = {"table1": ("no attention", "the DANet head with PAM and CAM off, same backbone"),
             "table2": ("base", "the row with no DA, multi-grid or multi-scale test")}
TABLE_NAMES = ("table1", "table2", "cells", "comparisons", "generic")
# figure names; "bars" is the bar chart earlier versions drew, removed with the other stale files
FIGURE_KINDS = ("intervals", "class_iou", "val_miou", "gamma", "bars")


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


def our_outputs(out: Path, suffix: str) -> list[Path]:
    """Every file this command may write into `out` for this suffix."""
    names = [f"runs{suffix}.csv", f"not_complete{suffix}.csv"]
    names += [f"{table}{suffix}.{ext}" for table in TABLE_NAMES for ext in ("md", "tex", "csv")]
    names += [f"{table}{suffix}_{kind}.{ext}" for table in TABLE_NAMES for kind in FIGURE_KINDS for ext in ("png", "pdf")]
    return [out / name for name in names]


def palette_for(cells: list[str]) -> dict[str, tuple]:
    """One colour per cell across every figure of a report."""
    import seaborn as sns

    return dict(zip(cells, sns.color_palette("tab10", max(len(cells), 1))))


def make_figures(runs: pd.DataFrame, table: pd.DataFrame, name: str, out: Path, where: str, metric: str,
                 baseline: str | None, comparisons: pd.DataFrame | None = None) -> list[Path]:
    """The figures of one table; runs carry a "cell" column naming their table row."""
    from reports import figures  # matplotlib is slow to import: only when figures are asked for

    runs = runs.assign(score=runs[metric] * 100)
    palette = palette_for(table["cell"].tolist())
    written = figures.point_intervals(table, runs, palette, out, f"{name}_intervals",
                                      f"{name}: val mIoU per cell ({where})")
    if comparisons is not None:
        compared = name.replace("cells", "comparisons", 1)
        written += figures.comparison_intervals(comparisons, runs, palette, out, f"{compared}_intervals",
                                                f"{compared}: paired differences by seed ({where})")
    written += figures.class_heatmap(runs, table["cell"].tolist(), baseline, out, f"{name}_class_iou",
                                     f"{name}: per-class IoU")
    if "run_dir" in runs:  # curves need the metrics.jsonl of local records
        written += figures.miou_curves(runs, palette, out, f"{name}_val_miou", f"{name}: validation mIoU during training")
        written += figures.gamma_curves(runs, palette, out, f"{name}_gamma", f"{name}: attention gammas during training")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/make_tables.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs-dir", type=Path, default=Path("runs"), help="a RunStore folder (default: runs)")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead")
    source.add_argument("--optuna-storage", metavar="STORAGE",
                        help="read the records of an Optuna study (with --study): its journal file PATH.journal or "
                             "database URL, the string sweeps/optuna_study.py --storage takes")
    parser.add_argument("--sweep", help="with --wandb: only this sweep's runs")
    parser.add_argument("--study", help="with --optuna-storage: the study name")
    parser.add_argument("--out", type=Path, default=Path("reports/out"), help="output folder (default: reports/out)")
    parser.add_argument("--metric", choices=["final_miou", "best_miou"], default="final_miou",
                        help="final_miou: the configured test protocol at the end (default); best_miou: best seen")
    parser.add_argument("--split", help="numbers from the runs' evaluation records of this split "
                                        "(default: each run's own final numbers)")
    parser.add_argument("--protocol", metavar="NAME", help="numbers from the runs' evaluation records with this "
                                                           "protocol, e.g. whole, slide, ms0.75-1-1.25-flip")
    parser.add_argument("--duplicates", choices=["refuse", "newest"], default="refuse",
                        help="two complete records of one cell and seed: refuse with exit 2 (default) or keep the "
                             "newest and list the others in not_complete.csv")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="family-wise level of the tests (default 0.05)")
    parser.add_argument("--power", type=float, default=POWER, help="power of the MDE and seeds columns (default 0.8)")
    parser.add_argument("--effect", type=float, default=EFFECT,
                        help="target effect in mIoU points of the seeds column (default 1.0)")
    parser.add_argument("--grids-dir", type=Path, default=GRIDS_DIR, help="where grid YAMLs live (default: "
                                                                          "ablations/grids)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--rows", help="generic table: comma-separated fields for rows")
    parser.add_argument("--cols", default="", help="generic table: comma-separated fields for columns")
    args = parser.parse_args(argv)
    if args.optuna_storage and not args.study:
        parser.error("--optuna-storage needs --study")
    evaluated = bool(args.split or args.protocol)
    if evaluated and args.metric != "final_miou":
        parser.error("--split / --protocol take the evaluation's mIoU: --metric best_miou does not apply")
    console = stderr_console()
    suffix = "".join(f"-{part}" for part in (args.split, args.protocol) if part)
    stale = [path for path in our_outputs(args.out, suffix) if path.exists()]
    for path in stale:  # written by an earlier call: never left beside this call's output, nor alone
        path.unlink()
    try:
        runs, where = load_runs(args)
    except (NoRunsFound, UsageError) as error:  # UsageError: a storage string Optuna's tools would not take
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2

    left_out = [runs.loc[runs["status"] != "complete", ["run_id", "status", "reason"]]]
    numbers = f"each run's {args.metric} from its summary.json"
    table_runs = runs
    evaluations, unreadable = read_evaluations(runs)  # for --split / --protocol, and Table 2's MS row
    for line in unreadable:
        print(f"{parser.prog}: warning: {line}", file=sys.stderr)
    if evaluated:
        table_runs, missing, numbers = with_evaluation_numbers(runs, evaluations, args.split, args.protocol)
        left_out.append(missing)
    usable, unusable = usable_runs(table_runs, args.metric)
    left_out.append(unusable)
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / f"runs{suffix}.csv", args.out / f"not_complete{suffix}.csv"]
    (table_runs if evaluated else runs).to_csv(written[0], index=False)

    def write_not_complete(extra: list[pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat([frame for frame in left_out + extra if not frame.empty] or [left_out[0]], ignore_index=True)
        frame.to_csv(written[1], index=False)
        return frame

    try:
        usable, duplicates = resolve_duplicates(usable, keep_newest=args.duplicates == "newest")
    except DuplicateRunsError as error:
        write_not_complete([])
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2
    not_complete = write_not_complete([duplicates])
    for _, row in not_complete.iterrows():  # failed and running runs are expected; these are not
        if row["status"] in ("complete", UNREADABLE):
            print(f"{parser.prog}: warning: {row['run_id']} ({row['status']}): {row['reason']}", file=sys.stderr)

    statistics = {"alpha": args.alpha, "power": args.power, "effect": args.effect}
    pending: list[tuple] = []  # (table, text, name, note, runs with their cell, baseline cell, comparisons)
    try:
        grids = sorted(set(usable.get("grid", pd.Series(dtype=str)).fillna("").astype(str)) - {""})
        specs = {grid: load_grid_spec(args.grids_dir, grid) for grid in grids}
        for grid, spec in specs.items():
            if spec is None:
                print(f"{parser.prog}: warning: grid {grid}: no {args.grids_dir / (grid + '.yaml')}; its records are "
                      "tabulated by the table1/table2 layouts, without comparisons", file=sys.stderr)
        compared = [spec for spec in specs.values() if spec is not None and spec.comparisons]
        if len(compared) > 1:
            raise MixedCellError(f"records of several grids with comparisons ({[spec.name for spec in compared]}): "
                                 "report each from its own --runs-dir")
        layout_runs = usable
        if compared:
            spec = compared[0]
            grid_runs = usable[usable["grid"] == spec.name]
            layout_runs = usable[usable["grid"] != spec.name]
            cells, comparisons = grid_tables(grid_runs, spec, args.metric, **statistics)
            lines = provenance_lines(grid_runs, numbers)
            note_cells = f"{CELL_NOTE} Cells of grid {spec.name}, matched by their records' grid_cell. " + " ".join(lines)
            baseline = comparisons["baseline"].mode().iloc[0] if not comparisons.empty else None
            with_cell = grid_runs.assign(cell=grid_runs["grid_cell"])
            pending.append((cells, presentable_cells(cells), "cells", note_cells, with_cell, baseline, comparisons))
            note = table_note(comparisons, "the comparison's baseline cell", **statistics) + " " + " ".join(lines)
            pending.append((comparisons, presentable_comparisons(comparisons, **statistics), "comparisons", note,
                            None, None, None))
        for layout in (TABLE1, TABLE2):
            of_layout = layout_runs
            if layout is TABLE2 and not evaluated and not layout_runs.empty:  # its MS row: evaluations of checkpoints
                of_layout = pd.concat([layout_runs, multi_scale_rows(layout_runs, evaluations)],
                                      ignore_index=True)
            if not of_layout.empty and layout_applies(of_layout, layout):
                table = ablation_table(of_layout, layout, args.metric, **statistics)
                dataset, _, _ = paper_reference(layout)
                name, meaning = BASELINES[layout.name]
                used = of_layout[of_layout["run_id"].isin(table["run_ids"].explode())]
                note = CELL_NOTE + " " + table_note(table, f"{meaning} ('{name}')", **statistics) + " " + " ".join(
                    provenance_lines(used, numbers))
                evaluated_rows = sorted({run_id.split("@", 1)[1] for run_id in used["run_id"] if "@" in run_id})
                if evaluated_rows:
                    note += (f" The multi-scale rows are evaluation records ({', '.join(evaluated_rows)}) of the "
                             "trained cells' last checkpoints, not cells of their own; their cost columns are empty.")
                cell_of = table[["cell", "run_ids"]].explode("run_ids").set_index("run_ids")["cell"]
                pending.append((table, presentable(table, layout, name, dataset, **statistics), layout.name,
                                note, used.assign(cell=used["run_id"].map(cell_of)), table["cell"].iloc[0], None))
        generic = None
        if args.rows:
            rows, cols = args.rows.split(","), [column for column in args.cols.split(",") if column]
            generic = generic_table(usable, rows, cols, args.metric)
            generic.columns = [f"{'/'.join(cols)}={value}" for value in generic.columns] if cols else ["mIoU (%)"]
    except (MixedCellError, DuplicateRunsError, KeyError, UsageError) as error:  # UsageError: a broken grid file
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 2

    for table, text, name, note, table_runs_with_cell, baseline, comparisons in pending:
        name += suffix
        written += write_table(table, text, args.out, name, note)
        markdown = to_markdown(text)
        if not console.is_terminal or max(map(len, markdown.splitlines())) <= console.width:
            console.print(markdown, markup=False, highlight=False)
        else:  # a 17-column table folded into a narrow terminal is unreadable: say where it is instead
            console.print(f"{name}: {len(text)} rows x {len(text.columns)} columns, too wide for this "
                          f"{console.width}-column terminal: see {args.out / name}.md", markup=False, highlight=False)
        if not args.no_figures and table_runs_with_cell is not None:
            written += make_figures(table_runs_with_cell, table, name, args.out, where, args.metric, baseline,
                                    comparisons)
    if generic is not None:
        (args.out / f"generic{suffix}.md").write_text(to_markdown(generic.reset_index()))
        generic.to_csv(args.out / f"generic{suffix}.csv")
        written += [args.out / f"generic{suffix}.md", args.out / f"generic{suffix}.csv"]
    removed = len([path for path in stale if not path.exists()])
    console.print(f"{len(runs)} runs from {where} ({len(not_complete)} not used, listed in {written[1].name}); "
                  f"wrote {len(written)} files to {args.out}" + (f", removed {removed} stale ones" if removed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
