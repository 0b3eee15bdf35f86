"""The command line of one run (`ablations/run.py` is a thin wrapper around `main`): the argparse
binding of the config fields, and what is printed. The run itself is `danet.runner.run_cell`.

Exit status: 0 done, 2 usage / config / data error, 1 failure during the run (recorded as failed).
This module imports torch only once a run is asked for, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

from danet.config import (
    EXIT_OK,
    EXIT_USAGE,
    SECTIONS,
    RunConfig,
    UsageError,
    dump_yaml,
    find_yaml,
    load_yaml,
    resolve_run_config,
)
from danet.console import stderr_console
from danet.grids import Evaluation, grid_cell, load_grid

DEFAULT_PRESET = "demo"
# the reports tool of a source checkout (it reads records; the library does not need it)
REPORTS_SCRIPT = Path(__file__).resolve().parents[1] / "reports" / "make_tables.py"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {TRUE_WORDS + FALSE_WORDS}, got {text!r}")


def parse_float_list(text: str) -> list[float]:
    """'0.5,0.75', '0.5 0.75' or '[0.5, 0.75]' (the form W&B agents send)."""
    items = text.strip().strip("[]()").replace(",", " ").split()
    if not items:
        raise ValueError("expected a list of numbers")
    return [float(item) for item in items]


class BoolFlag(argparse.Action):
    """--pam, --no-pam, --pam=true|false|1|0 (W&B agents send --pam=True / --pam=False)."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            flag = True if value is None else parse_bool(value)
        except ValueError as error:
            raise argparse.ArgumentError(self, str(error)) from None
        setattr(namespace, self.dest, flag if not option_string.startswith("--no-") else not flag)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _field_flags(name: str) -> list[str]:
    flags = [f"--{name.replace('_', '-')}"]
    return flags + [f"--{name}"] if "_" in name else flags  # W&B sends the YAML key as it is


def _shown(value: Any) -> str:
    """A default as a person would type it: lists comma-separated, an empty string as 'none'."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value == "" else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, preset: dict[str, dict[str, Any]] | None = None,
                         preset_name: str = "") -> None:
    """One flag per config field, dest 'section.field', absent from the namespace unless given.
    The help shows the value the run will get without the flag: the preset's, else the default."""
    preset = preset or {}
    for section_name, section in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} settings")
        hints = typing.get_type_hints(section)
        for field in dataclasses.fields(section):
            if not field.metadata["flag"]:
                continue
            flags, kind = _field_flags(field.name), hints[field.name]
            values = preset.get(section_name) or {}
            shown = f"{_shown(values[field.name])}, from preset {preset_name}" if field.name in values else \
                _shown(field.default)
            options = {"dest": f"{section_name}.{field.name}", "default": argparse.SUPPRESS,
                       "help": f"{field.metadata['help']} (default: {shown})"}
            if kind is bool:
                flags.append(f"--no-{field.name.replace('_', '-')}")
                group.add_argument(*flags, action=BoolFlag, nargs="?", metavar="BOOL", **options)
            elif typing.get_origin(kind) is tuple:
                group.add_argument(*flags, type=parse_float_list, metavar="LIST", **options)
            else:
                group.add_argument(*flags, type=kind, metavar=kind.__name__.upper(), **options)


def explicit_settings(namespace: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, as {section: {field: value}}."""
    settings: dict[str, dict[str, Any]] = {}
    for key, value in vars(namespace).items():
        if "." in key:
            section, name = key.split(".", 1)
            settings.setdefault(section, {})[name] = value
    return settings


def preset_for_help(argv: list[str], preset_dir: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """The preset a command line will run (its --config, its --grid's preset, or the default) and
    its settings, for --help; ({}, name) when it cannot be read (the real parse reports that)."""
    scout = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    scout.add_argument("--config")
    scout.add_argument("--grid")
    known, _ = scout.parse_known_args(argv)
    try:
        name = load_grid(known.grid, preset_dir.parent / "grids").preset if known.grid else \
            known.config or DEFAULT_PRESET
        return name, load_yaml(find_yaml(name, preset_dir, "--config"))
    except UsageError:
        return known.config or DEFAULT_PRESET, {}


def build_parser(preset_name: str = DEFAULT_PRESET,
                 preset: dict[str, dict[str, Any]] | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ablations/run.py", allow_abbrev=False,
        description="Train and evaluate one DANet ablation cell. Settings come from the defaults, then the "
                    "preset (--config), then these flags. Boolean switches take --pam, --no-pam or --pam=true|false.",
        epilog="Records go to RUNS_DIR/<run-id>/: config.yaml, metrics.jsonl (curves), summary.json (status and "
               "final numbers), checkpoints/. Exit status: 0 done, 2 usage/config/data error, 1 failed run.")
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help="preset name from ablations/configs/ or a YAML file (default: demo, CPU + synthetic data)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit, without reading the data or the weights "
                             "(num_classes 0 and --epochs are resolved when the run starts)")
    parser.add_argument("--dry-run", action="store_true", help="build data and model, print what would run, exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue this run (same config) from its last checkpoint; a complete run is left as is")
    parser.add_argument("--overwrite", action="store_true", help="delete this run's earlier record and start over")
    parser.add_argument("--grid", metavar="GRID",
                        help="an ablation grid from ablations/grids/ (or a YAML file); needs --cell")
    parser.add_argument("--cell", metavar="ID", help="the grid cell to run, e.g. pam-cam_seed=0 (its preset and settings)")
    add_config_arguments(parser, preset, preset_name)
    return parser


def config_from_args(args: argparse.Namespace, preset_dir: Path, environment: dict[str, str]) -> RunConfig:
    """The run config a command line asks for: preset (or grid cell), then flags."""
    preset, cell = args.config or DEFAULT_PRESET, None
    if args.grid or args.cell:
        if not (args.grid and args.cell):
            raise UsageError("--grid and --cell go together")
        if args.config:
            raise UsageError("--config with --grid: the grid names its preset")
        grid = load_grid(args.grid, preset_dir.parent / "grids")
        preset, cell = grid.preset, grid_cell(grid, args.cell)
    return resolve_run_config(preset, explicit_settings(args), preset_dir, environment, cell)


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
    preset_dir = preset_dir or Path("ablations/configs")
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
        return _run_and_report(args, prepared, context, prog, usage_error, evaluations)
    finally:
        distributed.stop()


def _run_and_report(args: argparse.Namespace, prepared, context, prog: str, usage_error,
                    evaluations: list[Evaluation]) -> int:
    from danet import runner
    from danet.evaluation import run_grid_evaluations
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
    return EXIT_OK
