"""W&B sweep files, read once for every driver: the offline executor runs them as `wandb agent` would,
the Optuna driver takes a search file's parameters as its search space.

The forms are W&B's (the sweep configuration reference of the W&B documentation): `parameters` with
`value`, `values`, or `min`/`max` with a `distribution`; `method` grid, random or bayes; `early_terminate`
hyperband; `command` with the agent's macros, rendered by wandb's own functions.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from wandb.sdk.launch.sweeps.utils import DEFAULT_SWEEP_COMMAND, create_sweep_command, create_sweep_command_args

from danet.config import UsageError, find_yaml
from danet.paths import SWEEP_DIR


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep file's YAML, with its parameters; UsageError names what is wrong."""
    try:
        sweep = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise UsageError(f"{path}: a W&B sweep file needs program and parameters")
    return sweep


def sweep_parameters(parameters: dict[str, Any], where: str) -> dict[str, Any]:
    """A W&B sweep file's `parameters` as Optuna sees them: a fixed value, or a distribution.

    Without `distribution`, W&B infers one from min/max: int_uniform when both are integers, else uniform.
    """
    space: dict[str, Any] = {}
    for name, spec in parameters.items():
        distribution = spec.get("distribution")
        if distribution is None and "min" in spec and "max" in spec:
            integers = isinstance(spec["min"], int) and isinstance(spec["max"], int)
            distribution = "int_uniform" if integers else "uniform"
        if "value" in spec:
            space[name] = spec["value"]
        elif "values" in spec:
            space[name] = optuna.distributions.CategoricalDistribution(spec["values"])
        elif distribution in ("log_uniform_values", "uniform"):
            space[name] = optuna.distributions.FloatDistribution(
                spec["min"], spec["max"], log=distribution == "log_uniform_values")
        elif distribution == "int_uniform":
            space[name] = optuna.distributions.IntDistribution(spec["min"], spec["max"])
        else:
            raise UsageError(f"{where}: parameter {name} has a form this driver does not read: {spec} (it reads value, "
                             "values, and min/max with uniform, log_uniform_values or int_uniform)")
    return space


def grid_values(space: dict[str, Any], where: str) -> dict[str, list[Any]]:
    """The values a W&B grid enumerates, per varied parameter (fixed values are not parameters)."""
    grid = {}
    for name, value in space.items():
        if isinstance(value, optuna.distributions.CategoricalDistribution):
            grid[name] = list(value.choices)
        elif isinstance(value, optuna.distributions.IntDistribution):  # W&B's grid enumerates int_uniform
            grid[name] = list(range(value.low, value.high + 1))
        elif isinstance(value, optuna.distributions.FloatDistribution):
            raise UsageError(f"{where}: method grid needs values for parameter {name}, not a continuous range")
    return grid


def sweep_sampler(method: str, space: dict[str, Any], where: str) -> optuna.samplers.BaseSampler:
    """W&B's search methods in Optuna: grid over the same values, random, and bayes as a Gaussian process."""
    if method == "grid":
        return optuna.samplers.GridSampler(grid_values(space, where))
    if method == "random":
        return optuna.samplers.RandomSampler()
    if method == "bayes":
        return optuna.samplers.GPSampler(n_startup_trials=2)  # W&B's bayes fits its GP once two runs have results
    raise UsageError(f"{where}: method must be grid, random or bayes, not {method!r}")


def sweep_pruner(early_terminate: dict[str, Any] | None, where: str) -> optuna.pruners.BasePruner:
    """W&B's `early_terminate: {type: hyperband, ...}` in Optuna.

    W&B's "hyperband" is one bracket of asynchronous successive halving: at bands min_iter * eta^k (positions
    in a run's history of the metric), a run is stopped unless it is in the top 1/eta of the runs that reached
    the band. That is Optuna's SuccessiveHalvingPruner with min_early_stopping_rate 0 when trials report the
    values at steps 0, 1, 2, ... Optuna's HyperbandPruner is not: it spreads trials over several brackets, and
    with no max_resource it neither prunes nor records rung values until a trial completes, so the second run
    of a sweep could never be stopped.
    """
    if not early_terminate:
        return optuna.pruners.NopPruner()
    if early_terminate.get("type") != "hyperband":
        raise UsageError(f"{where}: early_terminate type must be hyperband, not {early_terminate.get('type')!r}")
    eta = int(early_terminate.get("eta", 3))  # W&B's default
    if "min_iter" in early_terminate:
        first_band = int(early_terminate["min_iter"])
    elif "max_iter" in early_terminate and "s" in early_terminate:
        # W&B's other form: s bands counted down from max_iter by factors of eta; the smallest is the first
        first_band = max(1, int(int(early_terminate["max_iter"]) / eta ** int(early_terminate["s"])))
    else:
        raise UsageError(f"{where}: early_terminate hyperband needs min_iter, or max_iter and s")
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_band, reduction_factor=eta,
                                                  min_early_stopping_rate=0)


def suggest_params(trial: optuna.Trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's values of the space's distributions (fixed values are not parameters)."""
    params = {}
    for name, value in space.items():
        if isinstance(value, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, value.choices)
        elif isinstance(value, optuna.distributions.FloatDistribution):
            params[name] = trial.suggest_float(name, value.low, value.high, log=value.log)
        elif isinstance(value, optuna.distributions.IntDistribution):
            params[name] = trial.suggest_int(name, value.low, value.high)
    return params


@dataclass(frozen=True)
class Sweep:
    """A W&B sweep file, as this executor reads it."""

    path: Path
    name: str
    method: str
    metric: str
    goal: str  # maximize or minimize
    program: str
    command: tuple[str, ...]
    parameters: dict[str, Any]  # fixed values and Optuna distributions, in the file's order
    early_terminate: dict[str, Any] | None

    def sampler(self) -> optuna.samplers.BaseSampler:
        return sweep_sampler(self.method, self.parameters, str(self.path))

    def pruner(self) -> optuna.pruners.BasePruner:
        return sweep_pruner(self.early_terminate, str(self.path))

    def grid_points(self) -> list[dict[str, Any]]:
        """Every point of a grid sweep: the fixed values with one combination of the varied ones."""
        grid = grid_values(self.parameters, str(self.path))
        return [self.values(dict(zip(grid, combination))) for combination in itertools.product(*grid.values())]

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every parameter's value for a proposal (its params, then the fixed values), in the file's order."""
        return {name: params.get(name, value) for name, value in self.parameters.items()}


def load_sweep(path: Path) -> Sweep:
    """Read and check a W&B sweep file (the one `wandb sweep` takes); UsageError names what is wrong."""
    sweep = read_sweep_file(path)
    if "program" not in sweep:
        raise UsageError(f"{path}: a W&B sweep file needs program and parameters")
    command = tuple(str(item) for item in sweep.get("command") or DEFAULT_SWEEP_COMMAND)
    if "${args_json_file}" in command:
        raise UsageError(f"{path}: ${{args_json_file}} is not supported here; use ${{args}} or ${{args_json}}")
    # without a metric, the one every run here logs; with one, W&B's default goal (minimize)
    metric = sweep.get("metric") or {"name": "val/mIoU", "goal": "maximize"}
    if "name" not in metric or metric.get("goal", "minimize") not in ("maximize", "minimize"):
        raise UsageError(f"{path}: metric needs a name and a goal of maximize or minimize")
    loaded = Sweep(path, str(sweep.get("name") or path.stem), str(sweep.get("method")), metric["name"],
                   metric.get("goal", "minimize"), str(sweep["program"]), command,
                   sweep_parameters(sweep["parameters"], str(path)), sweep.get("early_terminate"))
    loaded.sampler(), loaded.pruner()  # their usage errors now, not at the first trial
    return loaded


def render_command(sweep: Sweep, values: dict[str, Any]) -> list[str]:
    """The command `wandb agent` runs for these parameter values (wandb_agent.py, Agent._command_run),
    with the interpreter this process runs under instead of `python`."""
    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in values.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": [sys.executable], "program": [sweep.program]}
    rendered: list[str] = []
    for item in create_sweep_command(list(sweep.command)):  # ${envvar:NAME} first, as the agent does
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            rendered += macros.get(item[2:-1]) or []  # the agent renders an unknown macro as nothing
        else:
            rendered.append(item)
    return rendered



@dataclass(frozen=True)
class Search:
    """A search file as the Optuna driver reads it: its preset, and its parameters as a search space."""

    name: str
    source: str  # the file as given
    preset: str
    space: dict[str, Any]  # fixed values and Optuna distributions
    early_terminate: dict[str, Any] | None = None

    def fixed(self) -> dict[str, Any]:
        return {name: value for name, value in self.space.items()
                if not isinstance(value, optuna.distributions.BaseDistribution)}


def load_search(name_or_path: str, sweep_dir: Path = SWEEP_DIR) -> Search:
    """A search space from a W&B sweep file (the same file W&B agents use), by path or name in sweep_dir."""
    path = find_yaml(name_or_path, sweep_dir, "--search")
    sweep = read_sweep_file(path)
    if "blocks" in sweep or "grid" in sweep["parameters"]:
        grid = sweep["parameters"].get("grid", {}).get("value", path.stem)
        raise UsageError(f"--search {path} is a grid (its cells are runs, not a search space): run it with --grid {grid}")
    space = sweep_parameters(sweep["parameters"], str(path))
    preset = space.get("config", "demo")
    # the preset is the trial's base; W&B's sweep runs report online, Optuna's take --wandb from the run flags
    space = {name: value for name, value in space.items() if name not in ("config", "wandb")
             or isinstance(value, optuna.distributions.BaseDistribution)}
    return Search(path.stem, str(path), preset, space, sweep.get("early_terminate"))
