"""The report of reports/make_tables.py as a library: logged runs in, tables, notes and figures out.

make_report(ReportRequest(...)) does what the script does, in this order: remove the files an
earlier report with the same suffix wrote (remove_stale_outputs), load the runs (load_runs), keep
those with a usable number (select_runs), refuse or resolve two records of one cell and seed
(resolve_duplicates), build the tables (grid_report_tables for the records of a grid that declares
comparisons, layout_report_table for table1 / table2, generic_report for --rows / --cols) and write
each with its note and figures (write_report_table), and last the folder's results page
(OUT/README.md, reports/pages.py: the records' header, about.md, every table and figure the folder
holds, reading.md). It returns the script's exit status: 2, with one line on stderr, when no runs
are found, a cell would pool different settings, two complete records share a cell and seed, or
the runs folder's ledger disagrees with the grid or the records (a failed call leaves no page either).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console

from danet.config import UsageError
from danet.console import stderr_console
from danet.grids import Grid
from danet.launch.ledger import LedgerError
from danet.paths import GRID_DIR
from reports import pages
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
    GAIN_NOTE,
    TABLE1,
    TABLE2,
    DuplicateRunsError,
    Layout,
    MixedCellError,
    ablation_table,
    add_derived_columns,
    find_grid,
    generic_table,
    grid_report,
    hours_note,
    paper_reference,
    presentable,
    presentable_cells,
    presentable_comparisons,
    presentable_hours,
    provenance_lines,
    resolve_duplicates,
    table_note,
    to_markdown,
    usable_runs,
    verdict_note,
    write_table,
)

PROG = "reports/make_tables.py"  # the name in front of its messages
BASELINES = {"table1": ("no attention", "the DANet head with PAM and CAM off, same backbone"),
             "table2": ("base", "the row with no DA, multi-grid or multi-scale test")}
TABLE_NAMES = ("table1", "table2", "cells", "comparisons", "plan", "generic")
# figure names; "bars" is the bar chart earlier versions drew, removed with the other stale files
FIGURE_KINDS = ("intervals", "class_iou", "val_miou", "gamma", "bars")


@dataclass(frozen=True)
class ReportRequest:
    """What to tabulate, from where, into which folder: the options of reports/make_tables.py, with
    its defaults. One source of runs: runs_dir, wandb (with sweep) or optuna_storage (with study)."""

    runs_dir: Path = Path("runs")
    wandb: str | None = None  # ENTITY/PROJECT
    sweep: str | None = None
    optuna_storage: str | None = None
    study: str | None = None
    out: Path = Path("reports/out")
    metric: str = "final_miou"  # or best_miou
    split: str | None = None  # numbers from the runs' evaluation records of this split ...
    protocol: str | None = None  # ... and / or of this test protocol
    duplicates: str = "refuse"  # or newest
    alpha: float = ALPHA
    power: float = POWER
    effect: float = EFFECT
    grids_dir: Path = GRID_DIR
    no_figures: bool = False
    rows: str | None = None  # generic table: comma-separated fields for rows ...
    cols: str = ""  # ... and for columns

    @property
    def evaluated(self) -> bool:
        """Numbers from evaluation records rather than the runs' own final numbers."""
        return bool(self.split or self.protocol)

    @property
    def suffix(self) -> str:
        """What every file name gets: -SPLIT-PROTOCOL, the parts asked for."""
        return "".join(f"-{part}" for part in (self.split, self.protocol) if part)

    @property
    def statistics(self) -> dict[str, float]:
        return {"alpha": self.alpha, "power": self.power, "effect": self.effect}


@dataclass(frozen=True)
class ReportTable:
    """One table of the report, with what its note and figures need."""

    name: str  # file name before the suffix: table1, table2, cells, comparisons
    numbers: pd.DataFrame  # one row per cell or comparison, every statistic (the .csv)
    text: pd.DataFrame  # the presentable columns (the .md and .tex)
    note: str  # written under the table
    runs: pd.DataFrame | None = None  # the tabulated runs, a "cell" column naming their row; None: no figures
    baseline: str | None = None  # the cell the class-IoU heat map compares against
    comparisons: pd.DataFrame | None = None  # a grid's comparisons, drawn beside its cells


@dataclass
class RunSelection:
    """The loaded runs with the numbers the tables use, and which of them a table may average."""

    table_runs: pd.DataFrame  # the runs with the numbers the tables use (runs.csv)
    usable: pd.DataFrame  # complete, with a number
    numbers: str  # where the numbers come from, in words
    evaluations: pd.DataFrame  # the runs' evaluation records
    left_out: list[pd.DataFrame] = field(default_factory=list)  # run_id, status, reason of the others


def our_outputs(out: Path, suffix: str) -> list[Path]:
    """Every file a report may write into `out` for this suffix."""
    names = [f"runs{suffix}.csv", f"not_complete{suffix}.csv"]
    names += [f"{table}{suffix}.{ext}" for table in TABLE_NAMES for ext in ("md", "tex", "csv")]
    names += [f"{table}{suffix}_{kind}.{ext}" for table in TABLE_NAMES for kind in FIGURE_KINDS for ext in ("png", "pdf")]
    return [out / name for name in names]


def remove_stale_outputs(out: Path, suffix: str) -> list[Path]:
    """Remove what an earlier report with this suffix wrote (never left beside this report's output,
    nor alone), and the folder's generated page (rewritten after a call that succeeds); the paths
    removed."""
    stale = [path for path in our_outputs(out, suffix) if path.exists()]
    for path in stale:
        path.unlink()
    if pages.remove_page(out):
        stale.append(out / pages.PAGE)
    return stale


def write_page(out: Path, runs: pd.DataFrame, evaluations: pd.DataFrame, where: str, grids_dir: Path,
               prog: str = PROG) -> list[Path]:
    """The folder's results page (reports/pages.py), after its tables and figures; warns instead
    when a hand-written README.md is in the way."""
    header = pages.records_header(runs, evaluations, where, grids_dir)
    page = pages.write_page(out, header, prog, pages.default_title(runs))
    if page is None:
        print(f"{prog}: warning: {out / pages.PAGE} is not a page this script wrote: left as it is", file=sys.stderr)
        return []
    return [page]


def records_folder(request: ReportRequest, where: str) -> str:
    """The records' folder as a page names it: its own name for a local run store (no absolute
    path), the source in words otherwise."""
    return f"{request.runs_dir.name}/" if not (request.wandb or request.optuna_storage) else where


def load_runs(request: ReportRequest) -> tuple[pd.DataFrame, str]:
    """The runs of the request's source, and where they came from in words."""
    if request.wandb:
        return read_wandb(request.wandb, request.sweep), f"W&B {request.wandb}"
    if request.optuna_storage:
        return read_optuna(request.optuna_storage, request.study), f"Optuna study {request.study}"
    return read_run_store(request.runs_dir), str(request.runs_dir)


def select_runs(runs: pd.DataFrame, request: ReportRequest, prog: str = PROG) -> RunSelection:
    """Each run's number (its own, or its evaluation's with --split / --protocol) and whether a
    table may use it; warns on stderr about evaluation records it cannot read."""
    left_out = [runs.loc[runs["status"] != "complete", ["run_id", "status", "reason"]]]
    numbers = f"each run's {request.metric} from its summary.json"
    table_runs = runs
    evaluations, unreadable = read_evaluations(runs)  # for --split / --protocol, and Table 2's MS row
    for line in unreadable:
        print(f"{prog}: warning: {line}", file=sys.stderr)
    if request.evaluated:
        table_runs, missing, numbers = with_evaluation_numbers(runs, evaluations, request.split, request.protocol)
        left_out.append(missing)
    usable, unusable = usable_runs(table_runs, request.metric)
    left_out.append(unusable)
    return RunSelection(table_runs, usable, numbers, evaluations, left_out)


def write_not_complete(left_out: list[pd.DataFrame], path: Path) -> pd.DataFrame:
    """The runs no table uses, each with its reason, as one csv (its header even when empty)."""
    frame = pd.concat([frame for frame in left_out if not frame.empty] or [left_out[0]], ignore_index=True)
    frame.to_csv(path, index=False)
    return frame


def warn_unexpected(not_complete: pd.DataFrame, prog: str = PROG) -> None:
    """Failed and running runs are expected; complete runs left out and unreadable ones are not."""
    for _, row in not_complete.iterrows():
        if row["status"] in ("complete", UNREADABLE):
            print(f"{prog}: warning: {row['run_id']} ({row['status']}): {row['reason']}", file=sys.stderr)


def layout_applies(runs: pd.DataFrame, layout: Layout) -> bool:
    """A layout is worth writing when its varying fields take more than one value in the runs."""
    runs = add_derived_columns(runs)
    varying = [column for column in layout.baseline if column in runs]
    return bool(varying) and any(runs[column].nunique() > 1 for column in varying)


def grid_with_comparisons(usable: pd.DataFrame, grids_dir: Path, prog: str = PROG) -> Grid | None:
    """The grid of the records that declares comparisons, if one does; warns about grids whose file
    is missing. Records of several such grids are refused (MixedCellError)."""
    names = sorted(set(usable.get("grid", pd.Series(dtype=str)).fillna("").astype(str)) - {""})
    grids = {name: find_grid(grids_dir, name) for name in names}
    for name, grid in grids.items():
        if grid is None:
            print(f"{prog}: warning: grid {name}: no {grids_dir / (name + '.yaml')}; its records are "
                  "tabulated by the table1/table2 layouts, without comparisons", file=sys.stderr)
    compared = [grid for grid in grids.values() if grid is not None and grid.comparisons]
    if len(compared) > 1:
        raise MixedCellError(f"records of several grids with comparisons ({[grid.name for grid in compared]}): "
                             "report each from its own --runs-dir")
    return compared[0] if compared else None


def grid_report_tables(grid_runs: pd.DataFrame, grid: Grid, request: ReportRequest, numbers: str) -> list[ReportTable]:
    """The cells and comparisons tables of a grid that declares comparisons, and the runs and hours of its
    plan where it has one (or its runs folder a ledger)."""
    statistics = request.statistics
    # the ledger's decisions were taken on the runs' own final numbers: evaluation numbers get the plan replayed
    local = None if request.wandb or request.optuna_storage or request.evaluated else request.runs_dir
    report = grid_report(grid_runs, grid, request.metric, **statistics, runs_dir=local)
    cells, comparisons = report.cells, report.comparisons
    lines = provenance_lines(grid_runs, numbers)
    note_cells = f"{CELL_NOTE} {GAIN_NOTE} Cells of grid {grid.name}, matched by their records' grid_cell. " + \
        " ".join(lines)
    baseline = comparisons["baseline"].mode().iloc[0] if not comparisons.empty else None
    note = " ".join([table_note(comparisons, "the comparison's baseline cell", **statistics), verdict_note(report),
                     *lines])
    tables = [ReportTable("cells", cells, presentable_cells(cells), note_cells,
                          grid_runs.assign(cell=grid_runs["grid_cell"]), baseline, comparisons),
              ReportTable("comparisons", comparisons, presentable_comparisons(comparisons, **statistics), note)]
    if report.hours is not None:
        tables.append(ReportTable("plan", report.hours, presentable_hours(report.hours),
                                  " ".join([hours_note(report), *lines])))
    return tables


def layout_report_table(layout_runs: pd.DataFrame, layout: Layout, request: ReportRequest, numbers: str,
                        evaluations: pd.DataFrame) -> ReportTable | None:
    """Table 1 or Table 2 of the paper from the runs, or None when the runs do not vary its switches."""
    of_layout = layout_runs
    if layout is TABLE2 and not request.evaluated and not layout_runs.empty:  # its MS row: evaluations of checkpoints
        of_layout = pd.concat([layout_runs, multi_scale_rows(layout_runs, evaluations)], ignore_index=True)
    if of_layout.empty or not layout_applies(of_layout, layout):
        return None
    statistics = request.statistics
    table = ablation_table(of_layout, layout, request.metric, **statistics)
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
    return ReportTable(layout.name, table, presentable(table, layout, name, dataset, **statistics), note,
                       used.assign(cell=used["run_id"].map(cell_of)), table["cell"].iloc[0])


def report_tables(usable: pd.DataFrame, selection: RunSelection, request: ReportRequest,
                  prog: str = PROG) -> list[ReportTable]:
    """The grid's cells and comparisons (for the records of a grid with comparisons), then table1
    and table2 of the other records where they vary those switches."""
    tables: list[ReportTable] = []
    layout_runs = usable
    grid = grid_with_comparisons(usable, request.grids_dir, prog)
    if grid is not None:
        layout_runs = usable[usable["grid"] != grid.name]
        tables += grid_report_tables(usable[usable["grid"] == grid.name], grid, request, selection.numbers)
    for layout in (TABLE1, TABLE2):
        table = layout_report_table(layout_runs, layout, request, selection.numbers, selection.evaluations)
        if table is not None:
            tables.append(table)
    return tables


def generic_report(usable: pd.DataFrame, request: ReportRequest) -> pd.DataFrame | None:
    """The --rows / --cols table, or None when not asked for."""
    if not request.rows:
        return None
    rows, cols = request.rows.split(","), [column for column in request.cols.split(",") if column]
    generic = generic_table(usable, rows, cols, request.metric)
    generic.columns = [f"{'/'.join(cols)}={value}" for value in generic.columns] if cols else ["mIoU (%)"]
    return generic


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


def print_table(console: Console, text: pd.DataFrame, name: str, out: Path) -> None:
    """The table on the console, or where it is when it is too wide for the terminal."""
    markdown = to_markdown(text)
    if not console.is_terminal or max(map(len, markdown.splitlines())) <= console.width:
        console.print(markdown, markup=False, highlight=False)
    else:  # a 17-column table folded into a narrow terminal is unreadable: say where it is instead
        console.print(f"{name}: {len(text)} rows x {len(text.columns)} columns, too wide for this "
                      f"{console.width}-column terminal: see {out / name}.md", markup=False, highlight=False)


def write_report_table(table: ReportTable, request: ReportRequest, where: str, console: Console) -> list[Path]:
    """One table's files (and figures, unless no_figures), printed on the console too."""
    name = table.name + request.suffix
    written = write_table(table.numbers, table.text, request.out, name, table.note)
    print_table(console, table.text, name, request.out)
    if not request.no_figures and table.runs is not None:
        written += make_figures(table.runs, table.numbers, name, request.out, where, request.metric, table.baseline,
                                table.comparisons)
    return written


def write_generic(generic: pd.DataFrame, out: Path, suffix: str) -> list[Path]:
    markdown, csv = out / f"generic{suffix}.md", out / f"generic{suffix}.csv"
    markdown.write_text(to_markdown(generic.reset_index()))
    generic.to_csv(csv)
    return [markdown, csv]


def _refuse(prog: str, error: Exception) -> int:
    """One line on stderr and exit status 2."""
    print(f"{prog}: {error}", file=sys.stderr)
    return 2


def make_report(request: ReportRequest, prog: str = PROG, console: Console | None = None) -> int:
    """Tables, notes and figures of the request's runs in request.out; the exit status (0, or 2
    with one line on stderr). Progress and the tables go to `console` (default: stderr)."""
    console = console or stderr_console()
    stale = remove_stale_outputs(request.out, request.suffix)
    try:
        runs, where = load_runs(request)
    except (NoRunsFound, UsageError) as error:  # UsageError: a storage string Optuna's tools would not take
        return _refuse(prog, error)
    selection = select_runs(runs, request, prog)
    request.out.mkdir(parents=True, exist_ok=True)
    written = [request.out / f"runs{request.suffix}.csv", request.out / f"not_complete{request.suffix}.csv"]
    selection.table_runs.to_csv(written[0], index=False)
    try:
        usable, duplicates = resolve_duplicates(selection.usable, keep_newest=request.duplicates == "newest")
    except DuplicateRunsError as error:
        write_not_complete(selection.left_out, written[1])
        return _refuse(prog, error)
    not_complete = write_not_complete(selection.left_out + [duplicates], written[1])
    warn_unexpected(not_complete, prog)
    try:
        tables = report_tables(usable, selection, request, prog)
        generic = generic_report(usable, request)
    except (MixedCellError, DuplicateRunsError, KeyError, UsageError, LedgerError) as error:
        # UsageError: a broken grid file; LedgerError: a ledger of another plan, or whose records are gone or changed
        return _refuse(prog, error)
    for table in tables:
        written += write_report_table(table, request, where, console)
    if generic is not None:
        written += write_generic(generic, request.out, request.suffix)
    written += write_page(request.out, runs, selection.evaluations, records_folder(request, where), request.grids_dir,
                          prog)
    removed = len([path for path in stale if not path.exists()])
    console.print(f"{len(runs)} runs from {where} ({len(not_complete)} not used, listed in {written[1].name}); "
                  f"wrote {len(written)} files to {request.out}" + (f", removed {removed} stale ones" if removed else ""))
    return 0

