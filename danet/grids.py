"""Ablation grids as data: one YAML per grid, read by run.py, the W&B sweep files and Optuna.

A grid names a preset and a list of blocks. Each block is the product of its `axes` (field ->
values) with its named `cells` (settings that the paper ties together, such as one loss at lr
0.01 for the FCN cell and three losses at lr 0.003 for PAM+CAM). Every expanded cell has an id,
e.g. `pam-cam_backbone=resnet50_seed=2`, and is a flat {field: value} dict.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from danet.config import UsageError, load_yaml, sectioned


@dataclass(frozen=True)
class Grid:
    name: str
    preset: str
    cells: dict[str, dict[str, Any]]  # cell id -> {field: value}


def grid_path(name_or_path: str, grid_dir: Path) -> Path:
    path = Path(name_or_path) if Path(name_or_path).suffix in (".yaml", ".yml") else grid_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in grid_dir.glob("*.yaml")))
        raise UsageError(f"--grid {name_or_path}: no such grid or file (grids: {names})")
    return path


def _format(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_grid(name_or_path: str, grid_dir: Path) -> Grid:
    path = grid_path(name_or_path, grid_dir)
    data = load_yaml(path)
    unknown = sorted(set(data) - {"preset", "blocks", "description"})
    if unknown or "preset" not in data or not data.get("blocks"):
        raise UsageError(f"grid {path} needs 'preset' and 'blocks' (and may have 'description'); found {sorted(data)}")
    cells: dict[str, dict[str, Any]] = {}
    for block in data["blocks"]:
        axes = block.get("axes") or {}
        named = block.get("cells") or {"all": {}}
        for cell_name, tied in named.items():
            for values in itertools.product(*axes.values()):
                varied = dict(zip(axes, values))
                settings = {**tied, **varied}
                sectioned(settings)  # unknown fields are errors here, not when a worker meets them
                cell_id = "_".join([cell_name] + [f"{key}={_format(value)}" for key, value in varied.items()])
                if cell_id in cells:
                    raise UsageError(f"grid {path}: cell {cell_id} appears twice")
                cells[cell_id] = settings
    return Grid(path.stem, data["preset"], cells)


def grid_cell(grid: Grid, cell_id: str) -> dict[str, Any]:
    if cell_id not in grid.cells:
        sample = ", ".join(list(grid.cells)[:4])
        raise UsageError(f"--cell {cell_id}: not a cell of grid {grid.name} ({len(grid.cells)} cells, e.g. {sample})")
    return grid.cells[cell_id]
