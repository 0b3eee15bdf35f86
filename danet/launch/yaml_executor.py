"""W&B sweep files run without W&B's server: Optuna proposes each run, the sweep's command runs it.

`wandb sweep` and `wandb agent` need W&B's server for every proposal. Here the same YAML becomes an
Optuna study on our storage (`danet.launch.sweep_files`: grid -> GridSampler over the same values,
random -> RandomSampler, bayes -> GPSampler, `early_terminate: hyperband` -> successive halving on
W&B's bands), and each proposal runs as `wandb agent` runs it: the YAML's `command`, rendered by
wandb's own functions, as a subprocess. This process never imports torch.

A proposal is a `danet.launch.trials.CellTrial`: the records are the state, as for every launcher. A
proposal whose config has a complete record is not run again; one whose run another process holds
waits for that run; a run that ends without a complete record (preempted, crashed, killed) is
proposed again and continues from its checkpoint (`--resume` in the sweep's command), a bounded
number of times; the run of an executor that died is proposed again too.

Pruning: the executor follows the run's metrics.jsonl and reports the metric's values to the trial at
steps 0, 1, 2, ... (their positions in the run's history, as W&B counts logged values). When the pruner
says stop, the run gets SIGTERM (as `wandb agent` stops runs), checkpoints and records itself as
preempted; once it has ended, the executor turns that record into `pruned`, with the reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from rich.console import Console

from danet.config import EXIT_USAGE, UsageError
from danet.grids import load_grid
from danet.launch.contract import RunTarget, parse_run_args, target_of, trial_flags
from danet.launch.sweep_files import Sweep, grid_values, render_command, suggest_params
from danet.launch.trials import (
    BUSY,
    MISSING,
    CellTrial,
    PlanRounds,
    ProgressLine,
    RunEnd,
    WorkerLock,
    drive,
    frozen,
    plain_study,
    point_key,
    report_grid,
    requeue,
    run_lock_held,
)
from danet.paths import GRID_DIR
from danet.tracking import STATUS_PRUNED, mark_pruned, read_summary

POLL_SECONDS = 0.5
KILL_DELAY_SECONDS = 30.0  # as `wandb agent`: SIGTERM, then SIGKILL when the run is still there 30 s later
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def program_argv(sweep: Sweep, command: list[str]) -> list[str]:
    """What follows the sweep's program in a rendered command: run.py's own arguments."""
    if sweep.program not in command:
        raise UsageError(f"{sweep.path}: the command does not run the sweep's program {sweep.program}")
    return command[command.index(sweep.program) + 1:]


def metric_values(run_dir: Path, metric: str) -> list[float]:
    return [value for _, value in MetricHistory(run_dir / "metrics.jsonl", metric).new_values()]


class MetricHistory:
    """One metric's values in a metrics.jsonl that a run is appending to (W&B's history of that metric)."""

    def __init__(self, path: Path, metric: str) -> None:
        self.path, self.metric, self.offset, self.count = path, metric, 0, 0

    def new_values(self) -> list[tuple[int, float]]:
        """(position, value) of the values logged since the last call; a line still being written waits."""
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        chunk = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(chunk)
        found = []
        for line in chunk.splitlines():
            value = json.loads(line).get(self.metric)
            if value is not None:  # NaN is written as null: W&B drops it from the history too
                found.append((self.count, float(value)))
                self.count += 1
        return found


def _stop_with_executor(executor_pid: int) -> None:
    """In the run's process before exec (Linux): SIGTERM when the executor dies, even by SIGKILL, so the
    run checkpoints and says preempted, and the next executor resumes it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != executor_pid:  # it died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


def sweep_command(sweep: Sweep, values: dict[str, Any], study: str, trial: int, run_flags: list[str]) -> list[str]:
    """The agent's command for these values, then the study and trial, then the run flags (they win)."""
    return [*render_command(sweep, values), *trial_flags(study, trial), *run_flags]


def sweep_target(sweep: Sweep, values: dict[str, Any], run_flags: list[str]) -> RunTarget:
    """The record the command for these values writes (a trial's own flags do not change it)."""
    return target_of(program_argv(sweep, [*render_command(sweep, values), *run_flags]))


class SweepTrial(CellTrial):
    """One proposal: the agent's command for its values as a subprocess, its record, its metric for the
    sampler and pruner."""

    def __init__(self, sweep: Sweep, run_flags: list[str], plain: optuna.Study, worker: WorkerLock,
                 console: Console) -> None:
        super().__init__(plain, worker, console)
        self.sweep, self.run_flags = sweep, run_flags
        self.command: list[str] = []

    def target(self, trial: optuna.Trial) -> RunTarget:
        values = self.sweep.values(suggest_params(trial, self.sweep.parameters))
        self.command = sweep_command(self.sweep, values, trial.study.study_name, trial.number, self.run_flags)
        return target_of(program_argv(self.sweep, self.command))

    def run(self, trial: optuna.Trial, target: RunTarget) -> RunEnd:
        self.console.print(f"trial {trial.number}: {shlex.join(self.command)}", markup=False, soft_wrap=True)
        exit_code, stop_reason, started = self._run(trial, target.run_dir)
        if stop_reason and mark_pruned(target.run_dir, stop_reason):
            return RunEnd(STATUS_PRUNED, stop_reason)
        if not started and exit_code == EXIT_USAGE and run_lock_held(target.run_dir):
            return RunEnd(BUSY)  # another process holds this run: its record decides
        summary = read_summary(target.run_dir) if started else None
        ended = f"{self.sweep.program} exited with {exit_code}"
        if summary is None:
            return RunEnd(MISSING, ended)
        return RunEnd(summary.get("status", MISSING), summary.get("reason") or ended)

    def value(self, trial: optuna.Trial, target: RunTarget, run_dir: Path) -> float:
        values = metric_values(run_dir, self.sweep.metric)
        if not values:
            trial.set_user_attr("reason", f"the run logged no {self.sweep.metric}")
            raise RuntimeError(f"the run logged no {self.sweep.metric}")
        # the run's best value, which is what its W&B summary shows for val/mIoU (define_metric summary=max)
        return max(values) if self.sweep.goal == "maximize" else min(values)

    def _run(self, trial: optuna.Trial, run_dir: Path) -> tuple[int, str | None, bool]:
        """Run the command to its end, reporting the metric as it is logged and stopping the run when the
        pruner says so. Returns the exit status, why it was stopped, and whether it (re)started the record."""
        launched_at, executor_pid = time.time(), os.getpid()
        process = subprocess.Popen(self.command, start_new_session=True,  # Ctrl-C reaches the executor, which stops it
                                   preexec_fn=lambda: _stop_with_executor(executor_pid))
        history: MetricHistory | None = None
        stop_reason, terminated_at = None, None
        try:
            while True:
                exited = process.poll() is not None
                if history is None and (read_summary(run_dir) or {}).get("started_at", 0) >= launched_at:
                    history = MetricHistory(run_dir / "metrics.jsonl", self.sweep.metric)  # its record is (re)written
                for step, value in history.new_values() if history else []:
                    trial.report(value, step)
                    if stop_reason is None and trial.should_prune():
                        stop_reason = f"pruned by Hyperband at {self.sweep.metric} value {step + 1} ({value:.4f})"
                        process.terminate()
                        terminated_at = time.monotonic()
                if exited:
                    return process.returncode, stop_reason, history is not None
                if terminated_at is not None and time.monotonic() - terminated_at > KILL_DELAY_SECONDS:
                    process.kill()
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:  # the executor is asked to stop: so is the run, and it is proposed again
            process.terminate()
            process.wait()
            requeue(self.plain, frozen(self.plain, trial.number), resumes_trial=trial.number)
            raise


def plan_rounds(sweep: Sweep, points: dict[str, RunTarget], runs_dir: Path) -> PlanRounds | None:
    """The rounds of a grid sweep whose grid has a sequential plan (None: no plan). Its points must be the
    grid's cells, as sweeps/make_sweeps.py writes them: the `cell` parameter is the only one that varies."""
    example = next(iter(sweep.grid_points()))
    grid_name = parse_run_args(program_argv(sweep, render_command(sweep, example))).grid
    grid = load_grid(grid_name, GRID_DIR) if grid_name else None
    if grid is None or grid.plan is None:
        return None
    space = grid_values(sweep.parameters, str(sweep.path))
    if list(space) != ["cell"]:
        raise UsageError(f"{sweep.path}: grid {grid.name} has a sequential plan, which runs its cells in rounds: the "
                         f"sweep may vary only its cell parameter (it varies {sorted(space)})")
    cell_of = {point_key(values): values["cell"] for values in sweep.grid_points()}
    return PlanRounds(grid, runs_dir, {key: cell_of[key] for key in points}, space)


def run_executor(sweep: Sweep, storage: optuna.storages.BaseStorage, study_name: str, count: int | None,
                 run_flags: list[str], console: Console) -> int:
    """One executor of the sweep (what one `wandb agent` is): runs proposals until `count` runs (None: until
    every grid point has a complete or given-up record, or forever for random and bayes). Exit status 1 when
    a grid point has no complete record at the end, or (random, bayes) a run of this executor failed."""
    if not Path(sweep.program).is_file():
        raise UsageError(f"{sweep.path}: program {sweep.program} not found from {Path.cwd()} (W&B agents run it "
                         "relative to their working directory)")
    example = {name: value.choices[0] if isinstance(value, optuna.distributions.CategoricalDistribution)
               else getattr(value, "low", value) for name, value in sweep.parameters.items()}
    runs_dir = sweep_target(sweep, example, run_flags).runs_dir.resolve()  # usage errors before any trial
    grid = None
    if sweep.method == "grid":  # every point's record, to know when the grid is done
        grid = {point_key(values): sweep_target(sweep, values, run_flags) for values in sweep.grid_points()}
    sampler = sweep.sampler()
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=sweep.pruner(),
                                direction=sweep.goal, load_if_exists=True)
    plain = plain_study(study_name, storage)
    rounds = plan_rounds(sweep, grid, runs_dir) if grid else None
    worker = WorkerLock(runs_dir)
    try:
        console.print(f"executor {socket.gethostname()}:{os.getpid()} joins sweep {study_name} ({sweep.method}, "
                      f"{sweep.path}); records in {runs_dir}", markup=False, soft_wrap=True)
        trial_runner = SweepTrial(sweep, run_flags, plain, worker, console)
        progress = ProgressLine(sweep.metric, plain, console, len(grid) if grid else None)
        standing = drive(study, plain, trial_runner, progress, console, n_trials=count, catch=(Exception,),
                         grid=grid, key_of=lambda trial: point_key(sweep.values(trial.params)),
                         rounds=rounds)
    finally:
        worker.release()
    if standing is not None and count is None and not trial_runner.stop_requested:
        return report_grid(standing, study_name, console, rounds)
    return 1 if progress.failed else 0
