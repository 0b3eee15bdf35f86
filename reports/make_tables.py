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
numbers come from the runs' evaluation records and every file name gets that suffix. Last, the
folder's results page, OUT/README.md (reports/pages.py): the records' grid, design, recipe,
machines and cells, the hand-written OUT/about.md, every table and figure the folder holds (every
suffix), and the hand-written OUT/reading.md.

Each call first removes the files an earlier call with the same suffix wrote, so the folder always
describes the last call. Exit status 2 (and no tables) when no runs are found, a cell would pool
different settings, or two complete records share a cell and seed (see --duplicates). The work is
reports/report.py's (make_report); this script only reads the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.report import PROG, ReportRequest, make_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # the defaults: ReportRequest's
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--runs-dir", type=Path, help="a RunStore folder (default: runs)")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead")
    source.add_argument("--optuna-storage", metavar="STORAGE",
                        help="read the records of an Optuna study (with --study): its journal file PATH.journal or "
                             "database URL, the string sweeps/optuna_study.py --storage takes")
    parser.add_argument("--sweep", help="with --wandb: only this sweep's runs")
    parser.add_argument("--study", help="with --optuna-storage: the study name")
    parser.add_argument("--out", type=Path, help="output folder (default: reports/out)")
    parser.add_argument("--metric", choices=["final_miou", "best_miou"],
                        help="final_miou: the configured test protocol at the end (default); best_miou: best seen")
    parser.add_argument("--split", help="numbers from the runs' evaluation records of this split "
                                        "(default: each run's own final numbers)")
    parser.add_argument("--protocol", metavar="NAME", help="numbers from the runs' evaluation records with this "
                                                           "protocol, e.g. whole, slide, ms0.75-1-1.25-flip")
    parser.add_argument("--duplicates", choices=["refuse", "newest"],
                        help="two complete records of one cell and seed: refuse with exit 2 (default) or keep the "
                             "newest and list the others in not_complete.csv")
    parser.add_argument("--alpha", type=float, help="family-wise level of the tests (default 0.05)")
    parser.add_argument("--power", type=float, help="power of the MDE and seeds columns (default 0.8)")
    parser.add_argument("--effect", type=float, help="target effect in mIoU points of the seeds column (default 1.0)")
    parser.add_argument("--grids-dir", type=Path, help="where grid YAMLs live (default: ablations/grids)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--rows", help="generic table: comma-separated fields for rows")
    parser.add_argument("--cols", help="generic table: comma-separated fields for columns")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    request = ReportRequest(**vars(parser.parse_args(argv)))
    if request.optuna_storage and not request.study:
        parser.error("--optuna-storage needs --study")
    if request.evaluated and request.metric != "final_miou":
        parser.error("--split / --protocol take the evaluation's mIoU: --metric best_miou does not apply")
    return make_report(request, parser.prog)


if __name__ == "__main__":
    sys.exit(main())
