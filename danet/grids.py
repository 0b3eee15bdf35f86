"""Ablation grids as data: one YAML per grid, read by run.py, the W&B sweep files and Optuna.

A grid names a preset, its design and a list of blocks. Each block is the product of its `axes`
(field -> values) with its named `cells` (settings that go together, such as one loss at lr 0.01
for the FCN cell and three losses at lr 0.003 for PAM+CAM). Every expanded cell has an id, e.g.
`pam-cam_backbone=resnet50_seed=2`, and is a flat {field: value} dict that includes the tracking
fields `grid`, `grid_cell` (the named cell) and `design`.

design: `as-released` (each cell with the authors' own recipe) or `controlled` (every cell the same
recipe; only model switches and the seed differ, and `aux` is off unless a cell turns it on). A
controlled grid whose question is a recipe field (say, training length) names it in `studies`.
`comparisons` name the paired questions a grid answers (treatment and baseline named cells);
`evaluations` are test protocols run on a cell's checkpoint after it trains (ablations/evaluate.py);
`plan` is the sequential seed plan of the comparisons (danet.plans).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from danet.config import (
    DESIGNS,
    EvalConfig,
    UsageError,
    field_section,
    find_yaml,
    load_yaml,
    section_from_dict,
    sectioned,
)
from danet.plans import Plan, PlanError, plan_from_grid

GRID_KEYS = {"preset", "design", "blocks", "description", "comparisons", "evaluations", "studies", "plan"}
EVALUATION_KEYS = {"of", "split", "checkpoint"}  # besides the EvalConfig protocol fields


@dataclass(frozen=True)
class Evaluation:
    """A test protocol run on the checkpoints of some named cells once they have trained."""

    protocol: dict[str, Any]  # EvalConfig fields that differ from the run's own
    of: tuple[str, ...] = ()  # named cells; empty: every cell
    split: str = ""  # "": the run's own validation split
    checkpoint: str = "last"

    def applies_to(self, named_cell: str) -> bool:
        return not self.of or named_cell in self.of


@dataclass(frozen=True)
class Grid:
    name: str
    preset: str
    design: str
    cells: dict[str, dict[str, Any]]  # cell id -> {field: value}
    comparisons: list[dict[str, str]] = field(default_factory=list)  # {name, treatment, baseline}
    evaluations: list[Evaluation] = field(default_factory=list)
    path: Path | None = None  # the YAML file it was read from
    plan: Plan | None = None  # the sequential seed plan of its comparisons (danet.plans)

    def varying(self) -> tuple[str, ...]:
        """The settings whose values differ between the grid's cells (sorted names)."""
        cells = self.cells.values()
        names = {name for settings in cells for name in settings}
        return tuple(sorted(name for name in names if len({repr(settings.get(name)) for settings in cells}) > 1))

    def named_cells(self) -> dict[str, dict[str, Any]]:
        """Each named cell's switches (in the grid's order): its settings besides the seed and the
        tracking fields, over all of its expanded cells."""
        named: dict[str, dict[str, Any]] = {}
        for settings in self.cells.values():
            switches = {name: value for name, value in settings.items()
                        if name != "seed" and field_section(name) != "tracking"}
            named.setdefault(settings["grid_cell"], {}).update(switches)
        return named

    def seeds_in_order(self) -> dict[str, list[tuple[int, str]]]:
        """Each named cell's (seed, cell id), seeds in increasing order: the order a plan counts them in."""
        order: dict[str, list[tuple[int, str]]] = {}
        for cell_id, settings in self.cells.items():
            order.setdefault(settings["grid_cell"], []).append((int(settings.get("seed", 0)), cell_id))
        return {name: sorted(cells) for name, cells in order.items()}

    def switches(self) -> set[str]:
        """The fields the grid's named cells set: the switches under study (the seed is an axis)."""
        return {name for settings in self.named_cells().values() for name in settings}


def _format(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _check_controlled(path: Path, cells: dict[str, dict[str, Any]], studied: set[str]) -> None:
    """A controlled grid's cells share one recipe: only model switches, the recipe fields the grid
    studies and the seed may differ."""
    def recipe(settings: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in settings.items()
                if name not in studied | {"seed"} and field_section(name) not in ("model", "tracking")}

    (first_id, first), *others = cells.items()
    for cell_id, settings in others:
        if recipe(settings) != recipe(first):
            raise UsageError(f"grid {path} is controlled, but cells {first_id} and {cell_id} differ in their recipe "
                             f"({recipe(first)} vs {recipe(settings)}): only model switches, the seed and the "
                             f"fields the grid names in 'studies' ({sorted(studied)}) may differ")


def _evaluations(path: Path, entries: list[dict[str, Any]], named: set[str]) -> list[Evaluation]:
    evaluations = []
    for entry in entries:
        protocol = {key: value for key, value in entry.items() if key not in EVALUATION_KEYS}
        try:
            section_from_dict(EvalConfig, protocol)
        except ValueError as error:
            raise UsageError(f"grid {path}: evaluation {entry}: {error}") from None
        of = tuple(entry.get("of") or ())
        unknown = sorted(set(of) - named)
        if unknown:
            raise UsageError(f"grid {path}: evaluation of unknown cells {unknown} (cells: {sorted(named)})")
        evaluations.append(Evaluation(protocol, of, entry.get("split", ""), entry.get("checkpoint", "last")))
    return evaluations


def load_grid(name_or_path: str, grid_dir: Path) -> Grid:
    path = find_yaml(name_or_path, grid_dir, "--grid")
    data = load_yaml(path)
    unknown = sorted(set(data) - GRID_KEYS)
    if unknown or "preset" not in data or not data.get("blocks"):
        raise UsageError(f"grid {path} needs 'preset', 'design' and 'blocks' (and may have {sorted(GRID_KEYS)}); "
                         f"found {sorted(data)}")
    design = data.get("design")
    if design not in DESIGNS:
        raise UsageError(f"grid {path}: design must be one of {list(DESIGNS)} (the authors' recipes per cell, or "
                         f"one recipe for every cell), got {design!r}")
    cells: dict[str, dict[str, Any]] = {}
    for block in data["blocks"]:
        axes = block.get("axes") or {}
        named = block.get("cells") or {"all": {}}
        for cell_name, tied in named.items():
            for values in itertools.product(*axes.values()):
                varied = dict(zip(axes, values))
                settings = {**({"aux": False} if design == "controlled" else {}), **tied, **varied,
                            "grid": path.stem, "grid_cell": cell_name, "design": design}
                sectioned(settings)  # unknown fields are errors here, not when a worker meets them
                cell_id = "_".join([cell_name] + [f"{key}={_format(value)}" for key, value in varied.items()])
                if cell_id in cells:
                    raise UsageError(f"grid {path}: cell {cell_id} appears twice")
                cells[cell_id] = settings
    studied = set(data.get("studies") or [])
    sectioned({name: None for name in studied})  # unknown fields are errors
    if design == "controlled":
        _check_controlled(path, cells, studied)
    named_cells = {settings["grid_cell"] for settings in cells.values()}
    comparisons = data.get("comparisons") or []
    for comparison in comparisons:
        if set(comparison) != {"name", "treatment", "baseline"} or \
                not {comparison["treatment"], comparison["baseline"]} <= named_cells:
            raise UsageError(f"grid {path}: a comparison needs name, treatment and baseline, the latter two named "
                             f"cells of the grid ({sorted(named_cells)}); got {comparison}")
    try:
        plan = plan_from_grid(data["plan"], len(comparisons), f"grid {path}") if "plan" in data else None
    except PlanError as error:
        raise UsageError(str(error)) from None
    grid = Grid(path.stem, data["preset"], design, cells, comparisons,
                _evaluations(path, data.get("evaluations") or [], named_cells), path, plan)
    if plan is not None:
        _check_plan_seeds(grid)
    return grid


def _check_plan_seeds(grid: Grid) -> None:
    """A planned grid gives every compared cell the same seeds, as many as the plan's last look."""
    order = grid.seeds_in_order()
    compared = [name for name in order if any(name in (c["treatment"], c["baseline"]) for c in grid.comparisons)]
    seeds = {name: [seed for seed, _ in order[name]] for name in compared}
    for name in compared:
        if len(seeds[name]) != grid.plan.looks[-1] or seeds[name] != seeds[compared[0]]:
            raise UsageError(f"grid {grid.path}: plan: cell {name} has seeds {seeds[name]}; a planned grid gives each "
                             f"compared cell the same {grid.plan.looks[-1]} seeds (its last look)")


def grid_cell(grid: Grid, cell_id: str) -> dict[str, Any]:
    if cell_id not in grid.cells:
        sample = ", ".join(list(grid.cells)[:4])
        raise UsageError(f"--cell {cell_id}: not a cell of grid {grid.name} ({len(grid.cells)} cells, e.g. {sample})")
    return grid.cells[cell_id]
