"""W&B sweep files run without W&B's server: Optuna proposes each run, the sweep's command runs it.

`wandb sweep` and `wandb agent` need W&B's server for every proposal. Here the same YAML becomes an
Optuna study on our storage (danet.studies: grid -> GridSampler over the same values, random ->
RandomSampler, bayes -> GPSampler, `early_terminate: hyperband` -> successive halving on W&B's bands), and each proposal
runs as `wandb agent` runs it: the YAML's `command`, rendered by wandb's own functions, as a subprocess.

The records are the state, as for every launcher: a proposal whose config has a complete record is not
run again; one whose run another process holds (its run lock) waits for that run; the run of an executor
that died is proposed again and continues from its checkpoint (`--resume` in the sweep's command).

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
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from wandb.sdk.launch.sweeps.utils import DEFAULT_SWEEP_COMMAND, create_sweep_command, create_sweep_command_args

from danet import data as datasets
from danet.cli import build_parser, config_from_args
from danet.config import EXIT_USAGE, RunConfig, UsageError, resolve_for_dataset
from danet.runner import one_line
from danet.studies import requeue, suggest_params, sweep_parameters, sweep_pruner, sweep_sampler
from danet.tracking import STATUS_PREEMPTED, RunLock, RunStore, find_complete, mark_pruned, read_summary, run_lock

POLL_SECONDS = 0.5
BUSY_POLL_SECONDS = 2.0
KILL_DELAY_SECONDS = 30.0  # as `wandb agent`: SIGTERM, then SIGKILL when the run is still there 30 s later
FAILURES_TO_STOP = 3  # consecutive failed runs stop an executor (a broken command would fail forever)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def load_sweep(path: Path) -> Sweep:
    """Read and check a W&B sweep file (the one `wandb sweep` takes); UsageError names what is wrong."""
    try:
        sweep = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or "program" not in sweep:
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


def run_config(sweep: Sweep, command: list[str]) -> RunConfig:
    """The config the command's run will have, as its record will hold it (its cell hash finds the record):
    run.py's parser on what follows the program, then what the dataset decides."""
    if sweep.program not in command:
        raise UsageError(f"{sweep.path}: the command does not run the sweep's program {sweep.program}")
    argv = command[command.index(sweep.program) + 1:]
    preset_dir = Path(sweep.program).resolve().parent / "configs"  # where run.py finds its presets
    try:
        cfg = config_from_args(build_parser().parse_args(argv), preset_dir, dict(os.environ))
        data = datasets.build(cfg.data)
    except SystemExit:  # the parser has printed its one line
        raise UsageError(f"the program does not take this command: {shlex.join(command)}") from None
    except datasets.DataError as error:
        raise UsageError(one_line(error)) from None
    return resolve_for_dataset(cfg, data.num_classes, len(data.train))


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


def frozen(study: optuna.Study, number: int) -> FrozenTrial:
    return next(trial for trial in study.get_trials(deepcopy=False) if trial.number == number)


def reap_dead_executors(plain: optuna.Study, console: Console) -> None:
    """Fail the running trials of executors that died (their lock is free) and propose them again."""
    for trial in plain.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        path = trial.user_attrs.get("executor")
        lock = RunLock.acquire(Path(path)) if path else None
        if lock is None:  # its executor lives (or the trial is a moment old and has no executor yet)
            continue
        with lock:  # one executor reaps a dead one at a time
            if frozen(plain, trial.number).state == TrialState.RUNNING:
                plain.tell(trial.number, state=TrialState.FAIL)
                requeue(plain, trial, resumes_trial=trial.number)
                console.print(f"trial {trial.number}: its executor died; proposed again (its run resumes)",
                              markup=False, soft_wrap=True)


class RunFailed(Exception):
    """A run of the sweep ended without a result: its trial fails, the sweep goes on."""


def _stop_with_executor(executor_pid: int) -> None:
    """In the run's process before exec (Linux): SIGTERM when the executor dies, even by SIGKILL, so the
    run checkpoints and says preempted, and the next executor resumes it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != executor_pid:  # it died before prctl
            os.kill(os.getpid(), signal.SIGTERM)


class RunObjective:
    """One trial: the proposal's command as a subprocess, its record, its metric for the sampler and pruner."""

    def __init__(self, sweep: Sweep, plain: optuna.Study, run_flags: list[str], executor_lock: Path,
                 console: Console) -> None:
        self.sweep, self.plain, self.run_flags = sweep, plain, run_flags
        self.executor_lock, self.console = executor_lock, console

    def command(self, trial: optuna.Trial) -> list[str]:
        """The agent's command for this trial's values, then its study and trial, then the run flags (they win)."""
        params = suggest_params(trial, self.sweep.parameters)
        values = {name: params.get(name, value) for name, value in self.sweep.parameters.items()}
        return [*render_command(self.sweep, values), "--study", trial.study.study_name, "--trial", str(trial.number),
                *self.run_flags]

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("executor", str(self.executor_lock))  # how a dead executor's trials are found
        trial.set_user_attr("host", socket.gethostname())
        command = self.command(trial)
        cfg = run_config(self.sweep, command)
        runs_dir, cell_hash = cfg.tracking.runs_dir, cfg.cell_hash()
        run_dir = RunStore(runs_dir, cfg).dir
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("cell_hash", cell_hash)
        trained = False  # whether a run of this trial wrote the record (else another process did)
        while (done := find_complete(runs_dir, cell_hash)) is None:
            self.console.print(f"trial {trial.number}: {shlex.join(command)}", markup=False, soft_wrap=True)
            exit_code, stop_reason, started = self._run(trial, command, run_dir)
            trained = trained or started
            if stop_reason and mark_pruned(run_dir, stop_reason):
                trial.set_user_attr("reason", stop_reason)
                raise optuna.TrialPruned(stop_reason)
            if not started and exit_code == EXIT_USAGE and self._wait_while_busy(run_dir):
                continue  # another process held this run: its record decides
            if find_complete(runs_dir, cell_hash) is not None:
                continue
            summary = read_summary(run_dir) if started else None
            reason = (summary or {}).get("reason") or f"{self.sweep.program} exited with {exit_code}"
            if (summary or {}).get("status") == STATUS_PREEMPTED:  # stopped by someone else: its run resumes later
                requeue(self.plain, frozen(self.plain, trial.number), resumes_trial=trial.number)
            trial.set_user_attr("reason", reason)
            raise RunFailed(reason)
        if not trained:
            trial.set_user_attr("reused_record", str(done))
        values = metric_values(done, self.sweep.metric)
        if not values:
            trial.set_user_attr("reason", f"the run logged no {self.sweep.metric}")
            raise RunFailed(f"the run logged no {self.sweep.metric}")
        # the run's best value, which is what its W&B summary shows for val/mIoU (define_metric summary=max)
        return max(values) if self.sweep.goal == "maximize" else min(values)

    def _run(self, trial: optuna.Trial, command: list[str], run_dir: Path) -> tuple[int, str | None, bool]:
        """Run the command to its end, reporting the metric as it is logged and stopping the run when the
        pruner says so. Returns the exit status, why it was stopped, and whether it (re)started the record."""
        launched_at, executor_pid = time.time(), os.getpid()
        process = subprocess.Popen(command, start_new_session=True,  # Ctrl-C reaches the executor, which stops it
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

    @staticmethod
    def _wait_while_busy(run_dir: Path) -> bool:
        """Wait until no process holds the run; whether one did."""
        waited = False
        while (lock := run_lock(run_dir)) is None:
            waited = True
            time.sleep(BUSY_POLL_SECONDS)
        with lock:
            pass
        return waited


class Progress:
    """After each trial: one line on how it ended and where the sweep stands (all executors); reaps the
    trials of dead executors; stops this executor after FAILURES_TO_STOP failed runs in a row."""

    def __init__(self, sweep: Sweep, plain: optuna.Study, console: Console) -> None:
        self.sweep, self.plain, self.console = sweep, plain, console
        self.failed, self.in_a_row = 0, 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
        complete = trial.state == TrialState.COMPLETE  # a pruned trial's value is its last report: show why instead
        ended = f"{self.sweep.metric} {trial.value:.4f}" if complete else trial.user_attrs.get("reason", "")
        params = " ".join(f"{name}={value}" for name, value in trial.params.items())
        self.console.print(f"trial {trial.number} {params} {trial.state.name.lower()}: {ended} | sweep "
                           f"{study.study_name}: {states['complete']} complete, {states['pruned']} pruned, "
                           f"{states['fail']} failed, {states['running']} running", markup=False, soft_wrap=True)
        failed = trial.state == TrialState.FAIL
        self.failed += failed
        self.in_a_row = self.in_a_row + 1 if failed else 0
        if self.in_a_row >= FAILURES_TO_STOP:
            self.console.print(f"{FAILURES_TO_STOP} runs in a row failed: this executor stops", markup=False)
            study.stop()
        reap_dead_executors(self.plain, self.console)


def run_executor(sweep: Sweep, storage: optuna.storages.BaseStorage, study_name: str, count: int | None,
                 run_flags: list[str], console: Console) -> int:
    """One executor of the sweep (what one `wandb agent` is): runs proposals until `count` runs (None:
    until the grid is done, or forever for random and bayes). Exit status 1 when a run of its failed."""
    example = {name: value.choices[0] if isinstance(value, optuna.distributions.CategoricalDistribution)
               else getattr(value, "low", value) for name, value in sweep.parameters.items()}
    example_command = [*render_command(sweep, example), *run_flags]
    if not Path(sweep.program).is_file():
        raise UsageError(f"{sweep.path}: program {sweep.program} not found from {Path.cwd()} (W&B agents run it "
                         "relative to their working directory)")
    runs_dir = Path(run_config(sweep, example_command).tracking.runs_dir).resolve()  # usage errors before any trial
    sampler = sweep.sampler()
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=sweep.pruner(),
                                direction=sweep.goal, load_if_exists=True)
    # tell() and add_trial() outside a trial must not run GridSampler's after_trial (it stops the study)
    plain = optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    lock_path = runs_dir / ".locks" / f"executor-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
    executor_lock = RunLock.acquire(lock_path)
    if executor_lock is None:
        raise UsageError(f"cannot lock {lock_path}")
    with executor_lock:
        reap_dead_executors(plain, console)
        waiting = plain.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study) and not waiting:
            console.print(f"sweep {study_name}: every grid point has run (records in {runs_dir})", markup=False)
            return 0
        console.print(f"executor {socket.gethostname()}:{os.getpid()} joins sweep {study_name} ({sweep.method}, "
                      f"{sweep.path}); records in {runs_dir}", markup=False, soft_wrap=True)
        progress = Progress(sweep, plain, console)
        objective = RunObjective(sweep, plain, run_flags, lock_path, console)
        study.optimize(objective, n_trials=count, callbacks=[progress], catch=(RunFailed,))
    return 1 if progress.failed else 0
