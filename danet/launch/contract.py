"""The run contract: grid + cell + flags <-> the argv of `ablations/run.py` <-> (RunConfig, record folder, cell hash).

Every launcher goes through here: the run script parses its command line with `build_parser` and
`config_from_args`; the Optuna driver, the W&B-YAML executor, Slurm jobs and `make_sweeps.py` build
a cell's argv with `cell_argv` / `search_argv` and learn which record that argv will write with
`target_of`, without torch and without opening an image (the dataset's class count and training-set
size, which the cell hash holds, come from `danet.data.catalog`). Adding a flag to the contract is
one edit: a field in `danet.config`, which becomes a flag here.

W&B agents pass every parameter as `--key=value` (booleans `--pam=True`, lists `[0.5, 0.75]`, the YAML
key as it is, underscores included): the parser takes all of those forms.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from danet.config import SECTIONS, RunConfig, UsageError, find_yaml, load_yaml, resolve_for_dataset, resolve_run_config
from danet.data.catalog import CLASS_COUNTS, DataError, train_images
from danet.grids import grid_cell, load_grid
from danet.paths import GRID_DIR, PRESET_DIR, RUN_SCRIPT

if TYPE_CHECKING:
    from danet.launch.ledger import PlanState

DEFAULT_PRESET = "demo"
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
# The run flags a launcher sets itself: a user's copy would contradict the grid, or restart a run at every retry.
LAUNCHER_FLAGS = ("--config", "--grid", "--cell", "--overwrite")


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


def preset_for_help(argv: list[str], preset_dir: Path = PRESET_DIR) -> tuple[str, dict[str, dict[str, Any]]]:
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
    """The command line of `ablations/run.py`."""
    parser = OneLineErrorParser(
        prog="ablations/run.py", allow_abbrev=False,
        description="Train and evaluate one DANet ablation cell. Settings come from the defaults, then the "
                    "preset (--config), then these flags. Boolean switches take --pam, --no-pam or --pam=true|false.",
        epilog="Records go to RUNS_DIR/<run-id>/: config.yaml, metrics.jsonl (curves), summary.json (status and "
               "final numbers), checkpoints/. Exit status: 0 done (or a grid cell its sequential plan stopped: nothing "
               "trained), 2 usage/config/data error, 1 failed run, "
               "3 stopped on request (SIGTERM, SIGUSR1) at a checkpoint: --resume continues it.")
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


def config_from_args(args: argparse.Namespace, preset_dir: Path = PRESET_DIR,
                     environment: dict[str, str] | None = None) -> RunConfig:
    """The run config a command line asks for: preset (or grid cell), then flags. Not yet resolved
    for the dataset (see `resolve_without_data`)."""
    environment = dict(os.environ) if environment is None else environment
    preset, cell = args.config or DEFAULT_PRESET, None
    if args.grid or args.cell:
        if not (args.grid and args.cell):
            raise UsageError("--grid and --cell go together")
        if args.config:
            raise UsageError("--config with --grid: the grid names its preset")
        grid = load_grid(args.grid, preset_dir.parent / "grids")
        preset, cell = grid.preset, grid_cell(grid, args.cell)
    return resolve_run_config(preset, explicit_settings(args), preset_dir, environment, cell)


def plan_state(args: argparse.Namespace, preset_dir: Path = PRESET_DIR, environment: dict[str, str] | None = None,
               decide: bool = True) -> PlanState | None:
    """Where the sequential plan of this run's grid stands (None: no grid, or no plan), from its ledger in the
    run's records folder. With `decide`, the looks that are ready are taken first (danet.launch.ledger.advance),
    so that runs launched one by one (a `wandb agent`, an old Slurm array, a person) take looks too."""
    if not (args.grid and args.cell):
        return None
    grid = load_grid(args.grid, preset_dir.parent / "grids")
    if grid.plan is None:
        return None
    world_size = int((environment or {}).get("WORLD_SIZE", 1))
    hashes = {cell: resolve_without_data(config_from_args(argparse.Namespace(**{**vars(args), "cell": cell}),
                                                          preset_dir, environment), world_size).cell_hash()
              for cell in grid.cells}
    runs_dir = Path(config_from_args(args, preset_dir, environment).tracking.runs_dir)
    from danet.launch.ledger import advance  # numpy: only for a planned grid, so that --help answers at once

    return advance(grid, runs_dir, hashes, write=decide)


def parse_run_args(argv: Sequence[str]) -> argparse.Namespace:
    """run.py's parse of argv; a usage error (not an exit) when it does not parse."""
    try:
        return build_parser().parse_args(list(argv))
    except SystemExit:  # the parser has printed its one line
        raise UsageError(f"ablations/run.py does not take: {' '.join(argv)}") from None


def launcher_overrides(run_flags: Sequence[str]) -> argparse.Namespace:
    """The run flags a user gives a launcher (after its `--`), parsed; refuses the flags the launcher sets."""
    args = parse_run_args(run_flags)
    given = [flag for flag in LAUNCHER_FLAGS if getattr(args, flag[2:])]
    if given:
        raise UsageError(f"{', '.join(given)}: the launcher sets --config, --grid and --cell from the grid or search "
                         "file, and --overwrite would restart a run at every requeue or retry: leave them out of the "
                         "run flags")
    return args


def resolve_without_data(cfg: RunConfig, world_size: int = 1) -> RunConfig:
    """What `danet.runner.prepare` resolves from the built dataset (class count; iterations from --epochs),
    from the dataset's catalog instead: the same config, hence the same cell hash and record folder."""
    try:
        return resolve_for_dataset(cfg, CLASS_COUNTS[cfg.data.dataset], train_images(cfg.data), world_size)
    except DataError as error:
        raise UsageError(str(error)) from None


@dataclass(frozen=True)
class RunTarget:
    """What an argv of run.py will train: its resolved config, the record folder and the cell hash."""

    cfg: RunConfig

    @property
    def cell_hash(self) -> str:
        return self.cfg.cell_hash()

    @property
    def runs_dir(self) -> Path:
        return Path(self.cfg.tracking.runs_dir)

    @property
    def run_dir(self) -> Path:
        from danet.tracking import RunStore  # numpy: not for run.py --help, which parses with this module

        return RunStore(self.cfg.tracking.runs_dir, self.cfg).dir


def target_of(argv: Sequence[str], world_size: int = 1) -> RunTarget:
    """The record that run.py given argv (what follows the script) will write."""
    return RunTarget(resolve_without_data(config_from_args(parse_run_args(argv)), world_size))


def cell_argv(grid: str, cell: str, run_flags: Sequence[str] = ()) -> list[str]:
    """run.py's arguments for one grid cell, resumed (a complete record is skipped, a partial one continues)."""
    return ["--grid", grid, "--cell", cell, "--resume", *run_flags]


def search_argv(preset: str, values: dict[str, Any], run_flags: Sequence[str] = ()) -> list[str]:
    """run.py's arguments for one point of a search, as a W&B agent passes parameters (--key=value)."""
    return ["--config", preset, "--resume", *(f"--{name}={value}" for name, value in values.items()), *run_flags]


def trial_flags(study: str, trial: int) -> list[str]:
    """The flags that tie a run's record to its Optuna trial."""
    return ["--study", study, "--trial", str(trial)]


def run_command(argv: Sequence[str]) -> list[str]:
    """The process that runs run.py with argv, under this interpreter."""
    return [sys.executable, str(RUN_SCRIPT), *argv]


# The W&B sweep of a grid: one parameter, `cell`; run.py turns `--grid NAME --cell ID` into the cell's settings.
SWEEP_COMMAND = ["${env}", "${interpreter}", "${program}", "--resume", "--quiet", "${args}"]


def sweep_for_grid(name: str, grid_dir: Path = GRID_DIR) -> dict[str, Any]:
    """The W&B sweep file (`method: grid`) whose runs are the grid's cells."""
    grid = load_grid(name, grid_dir)
    return {
        "name": f"danet-{grid.name}",
        "description": f"Generated from ablations/grids/{grid.name}.yaml by sweeps/make_sweeps.py: do not edit.",
        "program": "ablations/run.py",
        "method": "grid",
        "metric": {"name": "val/mIoU", "goal": "maximize"},
        # online: a sweep run must report to the W&B server (run.py's own default is offline)
        "parameters": {"grid": {"value": grid.name}, "cell": {"values": list(grid.cells)}, "wandb": {"value": "online"}},
        "command": SWEEP_COMMAND,
    }
