"""Optuna studies over the ablation grids (GridSampler) and hyper-parameter searches (TPE + pruner),
each trial a run in this worker's process (or, with several GPUs a trial, under torchrun).

A trial is a `danet.launch.trials.CellTrial`: its cell's argv comes from the run contract, its record
decides whether anything is trained, and a preempted, crashed or killed run is proposed again.
Storages: `danet.launch.storages`. Importing this module loads no torch: a trial imports the runner.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import optuna
from optuna.trial import TrialState
from rich.console import Console

from danet.config import field_section
from danet.grids import Grid
from danet.launch.contract import RunTarget, cell_argv, launcher_overrides, search_argv, target_of, trial_flags
from danet.launch.sweep_files import Search, suggest_params, sweep_pruner
from danet.launch.trials import (
    BUSY,
    MISSING,
    REUSED,
    CellTrial,
    PlanRounds,
    ProgressLine,
    RunEnd,
    WorkerLock,
    drive,
    plain_study,
    point_key,
    report_grid,
)
from danet.paths import RUN_SCRIPT
from danet.tracking import STATUS_PREEMPTED, read_summary

METRIC_NAME = "val mIoU"  # the objective's name in Optuna's tools


class StudyTrial(CellTrial):
    """A trial of a grid (its cell) or a search (a point of its space), run in this process or under torchrun."""

    def __init__(self, grid: Grid | None, search: Search | None, run_flags: Sequence[str], plain: optuna.Study,
                 worker: WorkerLock, console: Console, processes_per_trial: int = 1) -> None:
        super().__init__(plain, worker, console)
        self.grid, self.search, self.run_flags = grid, search, list(run_flags)
        self.processes_per_trial = processes_per_trial
        self.argv: list[str] = []

    def _argv(self, trial: optuna.Trial) -> list[str]:
        if self.grid is not None:
            cell = trial.suggest_categorical("cell", list(self.grid.cells))
            argv = cell_argv(str(self.grid.path), cell, self.run_flags)
        else:
            argv = search_argv(self.search.preset, self.search.fixed() | suggest_params(trial, self.search.space),
                               self.run_flags)
        return [*argv, *trial_flags(trial.study.study_name, trial.number)]

    def target(self, trial: optuna.Trial) -> RunTarget:
        self.argv = self._argv(trial)
        target = target_of(self.argv, self.processes_per_trial)
        for name in self.grid.varying() if self.grid else ():  # so that trials can be sliced in Optuna's tools
            trial.set_user_attr(name, getattr(getattr(target.cfg, field_section(name)), name))
        return target

    def run(self, trial: optuna.Trial, target: RunTarget) -> RunEnd:
        if self.processes_per_trial > 1:
            return self._torchrun(target)
        from danet.engine import StopRun  # torch: only in a process that trains
        from danet.runner import BUSY as RUNNER_BUSY
        from danet.runner import SKIPPED, prepare, run_cell

        validations = 0

        def report(iteration: int, miou: float) -> None:
            nonlocal validations
            # W&B's hyperband bands count logged values; Optuna's own pruners see iterations
            trial.report(miou, validations if self.search and self.search.early_terminate else iteration)
            validations += 1
            if self.search is not None and trial.should_prune():
                raise StopRun(f"pruned by Optuna at iteration {iteration} (val mIoU {miou:.4f})")

        outcome = run_cell(prepare(target.cfg), resume=True, on_eval=report, console=self.console)
        if outcome.status in (RUNNER_BUSY, SKIPPED):
            return RunEnd(BUSY if outcome.status == RUNNER_BUSY else REUSED)
        if outcome.status == STATUS_PREEMPTED:  # this worker was asked to stop: its cell is offered again
            self.stop_requested = True
            trial.study.stop()
        return RunEnd(outcome.status, outcome.summary.get("reason") or outcome.message)

    def _torchrun(self, target: RunTarget) -> RunEnd:
        """The trial as `torchrun --nproc_per_node=N ablations/run.py ...` (no pruning: the run is another
        process); its record says how it ended."""
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.processes_per_trial}", str(RUN_SCRIPT), *self.argv]
        return_code = subprocess.run(command, check=False).returncode
        summary = read_summary(target.run_dir)
        if summary is None:
            return RunEnd(MISSING, f"torchrun exited with {return_code} and left no record")
        return RunEnd(summary.get("status", MISSING), summary.get("reason", f"torchrun exited with {return_code}"))

    def value(self, trial: optuna.Trial, target: RunTarget, run_dir: Path) -> float:
        if self.grid is not None:
            self._evaluate(trial, target, run_dir)
        return float(read_summary(run_dir)["final_miou"])

    def _evaluate(self, trial: optuna.Trial, target: RunTarget, run_dir: Path) -> None:
        """The grid's evaluations of this cell, on the checkpoint it wrote (each protocol once)."""
        from danet.evaluation import run_grid_evaluations  # torch

        records, skipped = run_grid_evaluations(
            run_dir, target.cfg.tracking.grid_cell, self.grid.evaluations,
            lambda line: self.console.print(line, markup=False, soft_wrap=True))
        for record in records:
            trial.set_user_attr(f"eval/{record['split']}/{record['protocol']}", record["miou"])
        if skipped:
            trial.set_user_attr("evaluation_skipped", "; ".join(skipped))


def make_pruner(search: Search | None, pruner: str | None) -> optuna.pruners.BasePruner:
    """No pruning for grids; for a search, --pruner, else the file's own hyperband as W&B runs it, else median."""
    if search is None:
        return optuna.pruners.NopPruner()
    if pruner is None and search.early_terminate:
        return sweep_pruner(search.early_terminate, search.source)
    return optuna.pruners.HyperbandPruner() if pruner == "hyperband" else optuna.pruners.MedianPruner(n_startup_trials=3)


def run_worker(grid: Grid | None, search: Search | None, storage: optuna.storages.BaseStorage, study_name: str,
               n_trials: int | None, run_flags: Sequence[str], pruner: str | None, console: Console,
               processes_per_trial: int = 1) -> int:
    """One worker of the study, until the grid is done (or n_trials trials across all workers). Returns the exit
    status: 0 done; 1 a cell without a complete record, or a search point that failed."""
    launcher_overrides(run_flags)  # the flags a launcher sets itself are refused before any trial
    sampler = optuna.samplers.GridSampler({"cell": list(grid.cells)}) if grid else optuna.samplers.TPESampler()
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                pruner=make_pruner(search, pruner), direction="maximize", load_if_exists=True)
    with warnings.catch_warnings():  # experimental in Optuna 5; used deliberately, so that tools show the name
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([METRIC_NAME])
    plain = plain_study(study_name, storage)
    targets = {cell: target_of(cell_argv(str(grid.path), cell, run_flags)) for cell in grid.cells} if grid else None
    runs_dir = next(iter(targets.values())).runs_dir if targets else target_of(search_argv(search.preset, {},
                                                                                             run_flags)).runs_dir
    callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=None)] if n_trials is not None else []
    console.print(f"worker {platform.node()}:{os.getpid()} joins study {study_name} "
                  f"({'grid ' + grid.name if grid else 'search ' + search.name})")
    worker = WorkerLock(runs_dir)
    try:
        objective = StudyTrial(grid, search, run_flags, plain, worker, console, processes_per_trial)
        progress = ProgressLine(METRIC_NAME, plain, console, len(grid.cells) if grid else None)
        rounds = PlanRounds(grid, runs_dir, {cell: cell for cell in grid.cells}, {"cell": list(grid.cells)}) \
            if grid is not None and grid.plan is not None else None
        standing = drive(study, plain, objective, progress, console, callbacks=callbacks, catch=(Exception,),
                         grid=targets, key_of=lambda trial: trial.params.get("cell"), rounds=rounds,
                         max_trials=n_trials)
    finally:
        worker.release()
    line, failed = study_summary(study)
    console.print(line, markup=False, soft_wrap=True)
    if standing is not None and n_trials is None and not objective.stop_requested:
        return report_grid(standing, grid.name, console, rounds)
    return 1 if failed else 0


def study_summary(study: optuna.Study) -> tuple[str, int]:
    """One line on how the study stands, and how many parameter sets failed without a complete
    trial (a retried trial that completed does not count)."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(trial.state for trial in trials)
    done = {point_key(trial.params) for trial in trials if trial.state == TrialState.COMPLETE}
    failed = {point_key(trial.params) for trial in trials if trial.state == TrialState.FAIL} - done
    line = (f"study {study.study_name}: {states[TrialState.COMPLETE]} complete, {len(failed)} failed, "
            f"{states[TrialState.PRUNED]} pruned, {states[TrialState.RUNNING]} running")
    if states[TrialState.COMPLETE]:
        best = study.best_trial
        cell = best.params.get("cell") or " ".join(f"{name}={value}" for name, value in best.params.items())
        line += f"; best: {cell} ({METRIC_NAME} {best.value:.4f}, {best.user_attrs.get('run_dir', '')})"
    return line, len(failed)

