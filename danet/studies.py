"""Optuna studies over the ablation grids (GridSampler) and hyper-parameter searches (TPE + pruner).

Exactly-once comes from the records, not from Optuna (SWEEPS.md): a trial resolves its cell's
config and calls `run_cell(resume=True)`, which skips a config whose complete record exists,
continues a partial one, and holds a lock so that a cell GridSampler hands to two workers is
trained by one of them while the other waits for its result.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from rich.console import Console

from danet.config import RunConfig, UsageError, field_section, find_yaml, merge, resolve_run_config
from danet.engine import StopRun
from danet.evaluation import run_grid_evaluations
from danet.grids import Evaluation, load_grid
from danet.runner import BUSY, SKIPPED, Outcome, prepare, run_cell
from danet.storage import default_storage, open_storage, storage_kind
from danet.tracking import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_PREEMPTED,
    STATUS_PRUNED,
    RunStore,
    find_complete,
    read_summary,
)

BUSY_POLL_SECONDS = 2.0
MAX_RETRIES = 3
METRIC_NAME = "val mIoU"  # the objective's name in Optuna's tools


@dataclass(frozen=True)
class StudySpec:
    """What a worker needs to build a trial's config."""

    mode: str  # "grid" or "search"
    name: str  # grid or search name
    source: str  # the grid as given (name or path), for run.py --grid
    preset: str
    space: dict[str, Any]  # grid: {"cell": [ids]}; search: {param: optuna distribution or fixed value}
    cells: dict[str, dict[str, Any]]  # grid cells; empty for searches
    evaluations: tuple[Evaluation, ...] = ()  # the grid's protocols to run on each trained cell
    varying: tuple[str, ...] = ()  # the settings that differ between the grid's cells (trial user attributes)
    early_terminate: dict[str, Any] | None = None  # a search file's W&B early termination (hyperband)


def grid_spec(grid_name: str, grid_dir: Path) -> StudySpec:
    grid = load_grid(grid_name, grid_dir)
    cells = grid.cells.values()
    names = {name for settings in cells for name in settings}
    varying = tuple(sorted(name for name in names if len({repr(settings.get(name)) for settings in cells}) > 1))
    return StudySpec("grid", grid.name, grid_name, grid.preset, {"cell": list(grid.cells)}, grid.cells,
                     tuple(grid.evaluations), varying)


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


def search_spec(name_or_path: str, sweep_dir: Path) -> StudySpec:
    """A search space from a W&B sweep file (the same file W&B agents use), by path or name in sweep_dir."""
    search_path = find_yaml(name_or_path, sweep_dir, "--search")
    sweep = yaml.safe_load(search_path.read_text())
    if "blocks" in sweep or "grid" in (sweep.get("parameters") or {}):
        grid = (sweep.get("parameters") or {}).get("grid", {}).get("value", search_path.stem)
        raise UsageError(f"--search {search_path} is a grid (its cells are runs, not a search space): "
                         f"run it with --grid {grid}")
    space = sweep_parameters(sweep["parameters"], str(search_path))
    fixed = {name: value for name, value in space.items() if not isinstance(value, optuna.distributions.BaseDistribution)}
    preset = fixed.get("config", "demo")
    # the preset is the trial's base; W&B's sweep runs report online, Optuna's take --wandb from the run flags
    space = {name: value for name, value in space.items() if name not in fixed or name not in ("config", "wandb")}
    return StudySpec("search", search_path.stem, str(search_path), preset, space, {},
                     early_terminate=sweep.get("early_terminate"))


def sweep_sampler(method: str, space: dict[str, Any], where: str) -> optuna.samplers.BaseSampler:
    """W&B's search methods in Optuna: grid over the same values, random, and bayes as a Gaussian process."""
    if method == "grid":
        grid = {}
        for name, value in space.items():
            if isinstance(value, optuna.distributions.CategoricalDistribution):
                grid[name] = list(value.choices)
            elif isinstance(value, optuna.distributions.IntDistribution):  # W&B's grid enumerates int_uniform
                grid[name] = list(range(value.low, value.high + 1))
            elif isinstance(value, optuna.distributions.FloatDistribution):
                raise UsageError(f"{where}: method grid needs values for parameter {name}, not a continuous range")
        return optuna.samplers.GridSampler(grid)
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


def retry_dead_worker_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A database storage's failed_trial_callback: a trial whose worker died (its heartbeat went
    stale) is queued again with the same parameters, up to MAX_RETRIES times; the retry resumes
    the cell from its checkpoint. (Optuna's own RetryFailedTrialCallback is deprecated in Optuna 5,
    and its successor is experimental.)"""
    retries = trial.user_attrs.get("retries", 0)
    if retries < MAX_RETRIES:
        requeue(study, trial, retry_of=trial.number, retries=retries + 1)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, **user_attrs: Any) -> None:
    """Propose a trial's parameters again (a waiting trial), so that the next worker takes that cell
    first and resumes it. As Optuna's retry callback does, the copied system attributes keep
    GridSampler's grid point (enqueue_trial would not)."""
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, system_attrs=dict(trial.system_attrs),
                                        user_attrs=user_attrs))


def open_study_storage(text: str | None, study: str, workers: int, heartbeat: int) -> optuna.storages.BaseStorage:
    """The default journal file optuna/STUDY.journal (several workers on one host or NFS), a
    journal path, sqlite:/// for one process, postgresql:// across machines (with heartbeats, so
    that the trials of dead workers are retried)."""
    text = text or default_storage(study)
    if storage_kind(text) == "sqlite" and workers > 1:
        raise UsageError("SQLite is for one process: parallel workers hit 'database is locked'. Use the default "
                         "journal file (or --storage PATH.journal) on one host, or postgresql:// across hosts")
    return open_storage(text, heartbeat, retry_dead_worker_trial)


def trial_config(spec: StudySpec, params: dict[str, Any], overrides: dict[str, dict[str, Any]], preset_dir: Path,
                 study_name: str, trial_number: int) -> RunConfig:
    if spec.mode == "grid":
        cell = spec.cells[params["cell"]]
    else:
        cell = {name: value for name, value in spec.space.items()
                if not isinstance(value, optuna.distributions.BaseDistribution)} | params
    tracking = {"tracking": {"study": study_name, "trial": trial_number}}
    return resolve_run_config(spec.preset, merge(overrides, tracking), preset_dir, dict(os.environ), cell)


class Objective:
    """Runs one trial as an ordinary run with its own record."""

    def __init__(self, spec: StudySpec, overrides: dict[str, dict[str, Any]], preset_dir: Path, console: Console,
                 processes_per_trial: int = 1, run_flags: tuple[str, ...] = ()):
        self.spec, self.overrides, self.preset_dir, self.console = spec, overrides, preset_dir, console
        self.processes_per_trial, self.run_flags = processes_per_trial, run_flags

    def _torchrun(self, trial: optuna.Trial, params: dict[str, Any], cfg: RunConfig) -> Outcome:
        """The trial as `torchrun --nproc_per_node=N ablations/run.py ...` (no pruning: the run
        is another process); its record is read back afterwards."""
        if self.spec.mode == "grid":
            cell_flags = ["--grid", self.spec.source, "--cell", params["cell"]]
        else:
            fixed = {name: value for name, value in self.spec.space.items()
                     if not isinstance(value, optuna.distributions.BaseDistribution)}
            cell_flags = ["--config", self.spec.preset] + [f"--{name}={value}" for name, value in (fixed | params).items()]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.processes_per_trial}", str(self.preset_dir.parent / "run.py"), "--resume",
                   *cell_flags, *self.run_flags, "--study", trial.study.study_name, "--trial", str(trial.number)]
        return_code = subprocess.run(command, check=False).returncode
        run_dir = find_complete(cfg.tracking.runs_dir, cfg.cell_hash()) or RunStore(cfg.tracking.runs_dir, cfg).dir
        summary = read_summary(run_dir) or {"reason": f"torchrun exited with {return_code} and left no record"}
        return Outcome(summary.get("status", STATUS_FAILED), return_code, summary, run_dir, summary.get("reason", ""))

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.spec.mode == "grid":
            return {"cell": trial.suggest_categorical("cell", self.spec.space["cell"])}
        return suggest_params(trial, self.spec.space)

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = self._suggest(trial)
        try:
            cfg = trial_config(self.spec, params, self.overrides, self.preset_dir, trial.study.study_name,
                               trial.number)
            prepared = prepare(cfg)
        except Exception as error:
            trial.set_user_attr("reason", f"{error.__class__.__name__}: {error}")
            raise

        for name in self.spec.varying:  # so that trials can be sliced by setting in Optuna's tools
            trial.set_user_attr(name, getattr(getattr(prepared.cfg, field_section(name)), name))

        validations = 0

        def report(iteration: int, miou: float) -> None:
            nonlocal validations
            # W&B's hyperband bands count logged values; Optuna's own pruners see iterations
            trial.report(miou, validations if self.spec.early_terminate else iteration)
            validations += 1
            if self.spec.mode == "search" and trial.should_prune():
                raise StopRun(f"pruned by Optuna at iteration {iteration} (val mIoU {miou:.4f})")

        while True:
            if self.processes_per_trial > 1:
                outcome = self._torchrun(trial, params, prepared.cfg)
            else:
                outcome = run_cell(prepared, resume=True, on_eval=report, console=self.console)
            if outcome.status != BUSY:
                break
            time.sleep(BUSY_POLL_SECONDS)  # another worker trains this cell: wait for its record
        trial.set_user_attr("run_dir", str(outcome.run_dir))
        trial.set_user_attr("cell_hash", prepared.cfg.cell_hash())
        if outcome.status == STATUS_PREEMPTED:  # this worker was asked to stop: offer the cell again, then stop
            trial.set_user_attr("reason", outcome.summary.get("reason", STATUS_PREEMPTED))
            frozen = next(past for past in trial.study.get_trials(deepcopy=False) if past.number == trial.number)
            requeue(trial.study, frozen, retry_of=trial.number)
            trial.study.stop()
            raise RuntimeError(f"preempted, queued again: {outcome.summary.get('reason')}")
        if outcome.status == STATUS_PRUNED:
            trial.set_user_attr("reason", outcome.summary.get("reason", STATUS_PRUNED))
            raise optuna.TrialPruned(outcome.summary.get("reason"))
        if outcome.status not in (STATUS_COMPLETE, SKIPPED):
            reason = outcome.summary.get("reason") or outcome.message
            trial.set_user_attr("reason", reason)
            raise RuntimeError(reason)
        if outcome.status == SKIPPED:
            trial.set_user_attr("reused_record", True)
        self._evaluate(trial, prepared.cfg, outcome.run_dir)
        return float(outcome.summary["final_miou"])

    def _evaluate(self, trial: optuna.Trial, cfg: RunConfig, run_dir: Path) -> None:
        """The grid's evaluations of this cell, on the checkpoint it just wrote (each protocol once)."""
        records, skipped = run_grid_evaluations(
            run_dir, cfg.tracking.grid_cell, self.spec.evaluations,
            lambda line: self.console.print(line, markup=False, soft_wrap=True))
        for record in records:
            trial.set_user_attr(f"eval/{record['split']}/{record['protocol']}", record["miou"])
        if skipped:
            trial.set_user_attr("evaluation_skipped", "; ".join(skipped))


class ProgressLine:
    """After each trial, one line: how it ended and where the whole study stands (all workers)."""

    def __init__(self, spec: StudySpec, console: Console) -> None:
        self.spec, self.console = spec, console

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name.lower() for t in trials)
        ended = f"val mIoU {trial.value:.4f}" if trial.value is not None else trial.user_attrs.get("reason", "")
        if self.spec.mode == "grid":
            done = {t.params.get("cell") for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
            standing = f"{len(done)}/{len(self.spec.space['cell'])} cells complete"
        else:
            standing = f"{states['complete']} trials complete, {states['pruned']} pruned"
        params = " ".join(f"{name}={value}" for name, value in trial.params.items())
        self.console.print(f"trial {trial.number} {params} {trial.state.name.lower()}: {ended} | study "
                           f"{study.study_name}: {standing}, {states['running']} running, {states['fail']} failed",
                           markup=False, soft_wrap=True)  # one greppable line; reasons may hold [brackets]


def run_worker(spec: StudySpec, storage: optuna.storages.BaseStorage, study_name: str, n_trials: int | None,
               overrides: dict[str, dict[str, Any]], preset_dir: Path, pruner: str | None, console: Console,
               processes_per_trial: int = 1, run_flags: tuple[str, ...] = ()) -> optuna.Study:
    if spec.mode == "grid":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler(spec.space)
        pruner_object: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    else:
        sampler = optuna.samplers.TPESampler()
        if pruner is None and spec.early_terminate:  # the YAML's own hyperband, as W&B runs it
            pruner_object = sweep_pruner(spec.early_terminate, spec.source)
        else:
            pruner_object = (optuna.pruners.HyperbandPruner() if pruner == "hyperband"
                             else optuna.pruners.MedianPruner(n_startup_trials=3))
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner_object,
                                direction="maximize", load_if_exists=True)
    with warnings.catch_warnings():  # experimental in Optuna 5; used deliberately, so that tools show the name
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])
    callbacks = [ProgressLine(spec, console)]
    if n_trials is not None:  # a total across all workers, not per worker
        callbacks.append(optuna.study.MaxTrialsCallback(n_trials, states=None))
    console.print(f"worker {platform.node()}:{os.getpid()} joins study {study_name} ({spec.mode} {spec.name})")
    objective = Objective(spec, overrides, preset_dir, console, processes_per_trial, run_flags)
    study.optimize(objective, callbacks=callbacks, catch=(Exception,), gc_after_trial=True)
    return study


def study_summary(study: optuna.Study) -> tuple[str, int]:
    """One line on how the study stands, and how many parameter sets failed without a complete
    trial (a retried trial that completed does not count)."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state for trial in trials)
    done = {json.dumps(trial.params, sort_keys=True) for trial in trials if trial.state == TrialState.COMPLETE}
    failed = {json.dumps(trial.params, sort_keys=True) for trial in trials if trial.state == TrialState.FAIL} - done
    line = (f"study {study.study_name}: {states[TrialState.COMPLETE]} complete, {len(failed)} failed, "
            f"{states[TrialState.PRUNED]} pruned, {states[TrialState.RUNNING]} running")
    if states[TrialState.COMPLETE]:
        best = study.best_trial
        cell = best.params.get("cell") or " ".join(f"{name}={value}" for name, value in best.params.items())
        line += f"; best: {cell} ({METRIC_NAME} {best.value:.4f}, {best.user_attrs.get('run_dir', '')})"
    return line, len(failed)

