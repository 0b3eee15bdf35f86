"""The command line of one run (`ablations/run.py` is a thin wrapper around `main`): what it runs and
what it prints. Its flags, and how they become a config, are the run contract (`danet.launch.contract`);
the run itself is `danet.runner.run_cell`.

Exit status: 0 done (or not needed: the grid's sequential plan stopped the cell), 2 usage / config / data
error, 1 failure during the run (recorded as failed) or a grid ledger that disagrees with its records, 3
stopped on request (SIGTERM, SIGUSR1) at a checkpoint. This module imports torch only once a run is asked for, so
`--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from danet.config import EXIT_FAILED, EXIT_OK, EXIT_USAGE, RunConfig, UsageError, dump_yaml
from danet.console import stderr_console
from danet.grids import Evaluation, load_grid
from danet.launch.contract import build_parser, config_from_args, plan_state, preset_for_help
from danet.paths import PRESET_DIR, REPORTS_SCRIPT


def print_summary(console, cfg: RunConfig, summary: dict[str, Any], class_names: tuple[str, ...],
                  run_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{cfg.cell_name()}  ({summary['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in (("final val mIoU", "final_miou", "{:.4f}"), ("best val mIoU", "best_miou", "{:.4f}"),
                            ("pixel accuracy", "final_pixel_accuracy", "{:.4f}"),
                            ("iterations", "iterations", "{}"), ("images / s (training)", "images_per_second", "{:.1f}"),
                            ("peak memory (MiB)", "peak_memory_mb", "{:.0f}"), ("wall time (s)", "wall_time_s", "{:.0f}")):
        if summary.get(key) is not None:
            table.add_row(label, fmt.format(summary[key]))
    for name in class_names:
        value = summary.get("per_class_iou", {}).get(name)
        table.add_row(f"  IoU {name}", "absent" if value is None else f"{value:.4f}")
    console.print(table)
    console.print(f"record: {run_dir} (summary.json: the numbers above; metrics.jsonl: the curves)")
    if REPORTS_SCRIPT.exists():
        console.print(f"tables: python reports/make_tables.py --runs-dir {run_dir.parent}")


def main(argv: list[str] | None = None, preset_dir: Path | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    preset_dir = preset_dir or PRESET_DIR
    parser = build_parser(*preset_for_help(argv, preset_dir))
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.print_config:  # resolved without the data or the weights: a sweep can be checked on a laptop
        try:
            print(dump_yaml(config_from_args(args, preset_dir, dict(os.environ))), end="")
        except UsageError as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK

    from danet.launch.ledger import LedgerError

    # the grid's plan: a cell it stopped is not trained. Only a lone process takes looks: the ranks of a torchrun
    # read the ledger, and a dry run writes nothing
    alone = int(os.environ.get("WORLD_SIZE", 1)) == 1
    try:
        state = None if vars(args).get("tracking.ignore_plan") else \
            plan_state(args, preset_dir, dict(os.environ), decide=alone and not args.dry_run)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_FAILED
    if state is not None and args.cell in (stopped := state.stopped_cell_ids()):
        print(f"{args.cell}: not trained: {stopped[args.cell]}; --ignore-plan trains it anyway", file=sys.stderr)
        return EXIT_OK

    from danet import data as datasets  # torch and the models: only once a run is asked for
    from danet import distributed, runner
    from danet.engine import pick_device
    from danet.models.backbone import BackboneWeightsError

    context = distributed.from_environment()

    def usage_error(message: str) -> int:
        if context.is_main:
            print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        cfg = config_from_args(args, preset_dir, dict(os.environ))
        distributed.start(context, distributed.device_for(context, pick_device(cfg.train.device)))
        prepared = runner.prepare(cfg, context)
    except (UsageError, ValueError, datasets.DataError, BackboneWeightsError) as error:
        return usage_error(runner.one_line(error))
    evaluations = load_grid(args.grid, preset_dir.parent / "grids").evaluations if args.grid else []
    try:
        return _run_and_report(args, prepared, context, prog, usage_error, evaluations, preset_dir)
    finally:
        distributed.stop()


def _run_and_report(args: argparse.Namespace, prepared, context, prog: str, usage_error,
                    evaluations: list[Evaluation], preset_dir: Path) -> int:
    from danet import runner
    from danet.evaluation import run_grid_evaluations
    from danet.launch.ledger import LedgerError
    from danet.tracking import STATUS_COMPLETE, RunStore

    console = stderr_console()
    cfg = prepared.cfg
    if args.dry_run:
        parameters = sum(p.numel() for p in prepared.model.parameters())
        console.print(f"{cfg.cell_name()}: {parameters / 1e6:.2f} M parameters, {len(prepared.data.train)} train / "
                      f"{len(prepared.data.val)} val images, {cfg.train.iterations} iterations on {prepared.device}; "
                      f"record: {RunStore(cfg.tracking.runs_dir, cfg).dir}")
        return EXIT_OK

    outcome = runner.run_cell(prepared, resume=args.resume, overwrite=args.overwrite, console=console, context=context)
    if not context.is_main:
        return outcome.exit_code
    if outcome.status in (runner.EXISTS, runner.BUSY):
        return usage_error(outcome.message)
    if outcome.status not in (runner.SKIPPED, STATUS_COMPLETE):
        print(f"{prog}: {outcome.message}", file=sys.stderr)
        return outcome.exit_code
    if outcome.status == runner.SKIPPED:
        console.print(outcome.message)
    else:
        if not cfg.tracking.quiet:
            print_summary(console, cfg, outcome.summary, prepared.data.class_names, outcome.run_dir)
        print(f"final val mIoU {outcome.summary['final_miou']:.4f}  record: {outcome.run_dir}")
    # the grid's test protocols for this cell, as the Optuna driver runs them (a skipped one is said, not fatal)
    run_grid_evaluations(outcome.run_dir, cfg.tracking.grid_cell, evaluations,
                         lambda line: console.print(line, markup=False, soft_wrap=True))
    if outcome.status == STATUS_COMPLETE and args.grid:  # the look this record may complete (runs one by one)
        try:
            plan_state(args, preset_dir, dict(os.environ))
        except LedgerError as error:
            print(f"{prog}: {error}", file=sys.stderr)
            return EXIT_FAILED
    return EXIT_OK
