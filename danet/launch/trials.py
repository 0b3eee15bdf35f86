"""The life of an Optuna trial that runs one cell: shared by the in-process Optuna driver and the W&B-YAML executor.

Exactly-once comes from the records, not from Optuna: GridSampler may hand one cell to two workers
and counts failed cells as visited (its own docstring; optuna issues #2039, #5139). So a trial
learns its cell's record folder from the run contract, takes a complete record as its result,
waits while another process trains the cell (its run lock is held), and otherwise runs it. How a
run ends decides the trial:

- complete: the trial completes with the run's value;
- pruned: the trial is pruned, with the reason;
- preempted (SIGTERM, SIGUSR1, a dying worker): the cell is proposed again and resumes from its checkpoint;
- anything else (a crash, SIGKILL, no record at all): the trial fails with the reason and the cell is
  proposed again, up to MAX_ATTEMPTS runs; then its record is marked failed ("given up"), as the
  Slurm path does.

Workers hold a lock file while they live (`WorkerLock`); a running trial whose worker's lock is free
belongs to a dead worker: it is failed and proposed again (`reap_dead_workers`), on every storage.
A driver finishes a grid only when every cell has a complete or given-up record (`grid_standing`).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from danet.grids import Grid
from danet.launch.contract import RunTarget
from danet.launch.ledger import PlanState, advance, standing_lines
from danet.tracking import (
    STATUS_FAILED,
    STATUS_PREEMPTED,
    STATUS_PRUNED,
    RunLock,
    RunStore,
    complete_runs,
    find_complete,
    read_summary,
    run_lock,
)

BUSY_POLL_SECONDS = 2.0
MAX_ATTEMPTS = 5  # runs of one cell that end without a complete record (killed, crashed) before it is given up
FAILURES_TO_STOP = 3  # cells given up in a row stop a worker (a broken command would fail forever)
GIVEN_UP = "given up"  # how a given-up record's reason starts


class RunFailed(Exception):
    """A trial's run ended without a result: the trial fails, the study goes on."""


@dataclass
class RunEnd:
    """How one run of a trial's cell ended: a record status, "busy" (another process holds the run),
    or "missing" (the run left no record), with the reason."""

    status: str
    reason: str = ""


BUSY, MISSING, REUSED = "busy", "missing", "reused"  # REUSED: a complete record appeared before the run began


def point_key(params: dict[str, Any]) -> str:
    """A grid point (a trial's parameters, or a sweep's values) as one comparable string."""
    return json.dumps(params, sort_keys=True, default=str)


def frozen(study: optuna.Study, number: int) -> FrozenTrial:
    return next(trial for trial in study.get_trials(deepcopy=False) if trial.number == number)


def requeue(study: optuna.Study, trial: FrozenTrial, **user_attrs: Any) -> None:
    """Propose a trial's parameters again (a waiting trial), so that the next worker takes that cell
    first and resumes it. As Optuna's retry callback does, the copied system attributes keep
    GridSampler's grid point (enqueue_trial would not)."""
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions, system_attrs=dict(trial.system_attrs),
                                        user_attrs={"attempt": trial.user_attrs.get("attempt", 1)} | user_attrs))


def plain_study(study_name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """The study for tell() and add_trial() outside a trial: with GridSampler as its sampler, they would
    run its after_trial, which stops the study."""
    return optuna.load_study(study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler())


class WorkerLock:
    """A worker's lock file under RUNS_DIR/.locks: held while the worker lives, free the moment it dies."""

    def __init__(self, runs_dir: Path) -> None:
        self.path = runs_dir / ".locks" / f"worker-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
        self.lock = RunLock.acquire(self.path)
        if self.lock is None:
            raise RuntimeError(f"cannot lock {self.path}")

    def release(self) -> None:
        self.lock.__exit__(None, None, None)


def held(lock: RunLock | None) -> bool:
    """Whether a process (this one included) held the lock that acquiring returned `lock` for."""
    if lock is None:
        return True
    with lock:
        return False


def worker_alive(trial: FrozenTrial) -> bool:
    """Whether a running trial's worker lives (a trial a moment old has no worker yet: alive)."""
    path = trial.user_attrs.get("worker")
    return path is None or held(RunLock.acquire(Path(path)))


def propose_again(study: optuna.Study, trial: FrozenTrial, console: Console | None = None) -> None:
    """A trial whose worker died: propose its cell again, to resume from its checkpoint. A run killed with
    its worker counts as one more attempt (a cell that kills its worker every time must not loop forever);
    a run that outlived it long enough to stop at a checkpoint (preempted: the executor's runs get SIGTERM
    when it dies) does not."""
    attempt = trial.user_attrs.get("attempt", 1)
    run_dir = trial.user_attrs.get("run_dir")
    preempted = run_dir is not None and (read_summary(Path(run_dir)) or {}).get("status") == STATUS_PREEMPTED
    if not preempted:
        attempt += 1
    if attempt <= MAX_ATTEMPTS:
        requeue(study, trial, attempt=attempt, resumes_trial=trial.number)
    if console is not None:
        what = "proposed again (its run resumes)" if attempt <= MAX_ATTEMPTS else \
            f"not proposed again ({MAX_ATTEMPTS} attempts)"
        console.print(f"trial {trial.number}: its worker died; {what}", markup=False, soft_wrap=True)


def reap_dead_workers(plain: optuna.Study, console: Console) -> None:
    """Fail the running trials of workers that died (their lock is free) and propose them again."""
    for trial in plain.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        path = trial.user_attrs.get("worker")
        lock = RunLock.acquire(Path(path)) if path else None
        if lock is None:  # its worker lives (or the trial is a moment old and has no worker yet)
            continue
        with lock:  # one worker reaps a dead one at a time
            if frozen(plain, trial.number).state != TrialState.RUNNING:
                continue
            try:
                plain.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # a heartbeat callback failed it a moment ago and proposes it again
                continue
            propose_again(plain, trial, console)


def retry_dead_worker_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A database storage's failed_trial_callback (a trial whose worker's heartbeat went stale): as
    `reap_dead_workers` does (Optuna's own RetryFailedTrialCallback is deprecated in Optuna 5, and its
    successor is experimental)."""
    propose_again(study, trial)


def wait_while_busy(run_dir: Path) -> None:
    """Wait until no other process holds the run."""
    while (lock := run_lock(run_dir)) is None:
        time.sleep(BUSY_POLL_SECONDS)
    with lock:
        pass


class CellTrial:
    """One trial, one cell, exactly once (module doc). A driver says how to find the trial's cell
    (`target`), how to run it once (`run`) and what the trial's value is (`value`)."""

    def __init__(self, plain: optuna.Study, worker: WorkerLock, console: Console) -> None:
        self.plain, self.worker, self.console = plain, worker, console
        self.stop_requested = False  # this worker was asked to stop (a preempted run): the driver ends

    def target(self, trial: optuna.Trial) -> RunTarget:
        raise NotImplementedError

    def run(self, trial: optuna.Trial, target: RunTarget) -> RunEnd:
        raise NotImplementedError

    def value(self, trial: optuna.Trial, target: RunTarget, run_dir: Path) -> float:
        raise NotImplementedError

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", str(self.worker.path))  # how a dead worker's trials are found
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        try:
            target = self.target(trial)
        except Exception as error:
            trial.set_user_attr("reason", f"{error.__class__.__name__}: {error}")
            raise
        trial.set_user_attr("run_dir", str(target.run_dir))
        trial.set_user_attr("cell_hash", target.cell_hash)
        trained = False  # whether a run of this trial wrote the record (else another process did)
        done = find_complete(target.runs_dir, target.cell_hash)
        while done is None:
            end = self.run(trial, target)
            trained = trained or end.status not in (BUSY, REUSED)
            if end.status == BUSY:
                wait_while_busy(target.run_dir)  # another process trains this cell: its record decides
            elif end.status == STATUS_PRUNED:
                trial.set_user_attr("reason", end.reason)
                raise optuna.TrialPruned(end.reason)
            elif (done := find_complete(target.runs_dir, target.cell_hash)) is None:
                self._ended_without_record(trial, target, end)
        if not trained:
            trial.set_user_attr("reused_record", str(done))
        return self.value(trial, target, done)

    def _ended_without_record(self, trial: optuna.Trial, target: RunTarget, end: RunEnd) -> None:
        """Propose the cell again (a preempted run resumes; a failed one is retried a bounded number of
        times, then given up); the trial fails with the reason."""
        reason = end.reason or f"the run ended {end.status} without a complete record"
        trial.set_user_attr("reason", reason)
        past = frozen(self.plain, trial.number)
        attempt = past.user_attrs.get("attempt", 1)
        if end.status == STATUS_PREEMPTED:
            requeue(self.plain, past, resumes_trial=trial.number)
            raise RunFailed(f"preempted, proposed again: {reason}")
        if attempt < MAX_ATTEMPTS:
            requeue(self.plain, past, attempt=attempt + 1, retry_of=trial.number)
            raise RunFailed(f"{reason} (attempt {attempt} of {MAX_ATTEMPTS}; proposed again)")
        given_up = f"{GIVEN_UP} after {attempt} attempts: {reason}"
        trial.set_user_attr("reason", given_up)
        if not RunStore(target.runs_dir, target.cfg).give_up(given_up):
            self.console.print(f"{target.run_dir}: not marked failed (complete, or held by another process)",
                               markup=False, soft_wrap=True)
        raise RunFailed(given_up)


@dataclass
class GridStanding:
    """Where a grid's cells stand, from their records and the study's running trials."""

    complete: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # not run: the grid's plan stopped their cell
    given_up: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)  # held by a live run or worker
    missing: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return not (self.in_progress or self.missing)


def grid_standing(targets: dict[str, RunTarget], plain: optuna.Study,
                  key_of: Callable[[FrozenTrial], str], stopped: set[str] = frozenset()) -> GridStanding:
    """Each cell of a grid (`targets`, by the key `key_of` gives a trial): complete, stopped by the plan (the
    keys in `stopped`), given up, in progress (a waiting trial, a running trial of a live worker, a held run
    lock) or missing."""
    running = {key_of(trial) for trial in plain.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
               if trial.state == TrialState.WAITING or worker_alive(trial)}
    complete = {runs_dir: complete_runs(runs_dir) for runs_dir in {target.runs_dir for target in targets.values()}}
    standing = GridStanding()
    for cell, target in targets.items():
        summary = read_summary(target.run_dir) or {}
        if target.cell_hash in complete[target.runs_dir]:
            standing.complete.append(cell)
        elif cell in stopped:
            standing.stopped.append(cell)
        elif summary.get("status") == STATUS_FAILED and str(summary.get("reason", "")).startswith(GIVEN_UP):
            standing.given_up.append(cell)
        elif cell in running or run_lock_held(target.run_dir):
            standing.in_progress.append(cell)
        else:
            standing.missing.append(cell)
    return standing


def run_lock_held(run_dir: Path) -> bool:
    """Whether a process trains the run in run_dir (holds its lock)."""
    return held(run_lock(run_dir))


class ProgressLine:
    """After each trial: one line on how it ended and where the study stands (all workers); reaps the
    trials of dead workers; stops this worker after FAILURES_TO_STOP cells given up in a row (`failed`
    counts the cells this worker gave up)."""

    def __init__(self, metric: str, plain: optuna.Study, console: Console, cells: int | None = None) -> None:
        self.metric, self.plain, self.console, self.cells = metric, plain, console, cells
        self.failed, self.in_a_row, self.stopped = 0, 0, False

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state.name.lower() for t in trials)
        complete = trial.state == TrialState.COMPLETE  # a pruned trial's value is its last report: show why instead
        ended = f"{self.metric} {trial.value:.4f}" if complete else trial.user_attrs.get("reason", "")
        if self.cells is not None:  # a cell is a grid point: its parameters (the Optuna driver's: cell)
            done = {point_key(t.params) for t in trials if t.state == TrialState.COMPLETE}
            standing = f"{len(done)}/{self.cells} cells complete"
        else:
            standing = f"{states['complete']} complete, {states['pruned']} pruned"
        params = " ".join(f"{name}={value}" for name, value in trial.params.items())
        self.console.print(f"trial {trial.number} {params} {trial.state.name.lower()}: {ended} | study "
                           f"{study.study_name}: {standing}, {states['running']} running, {states['fail']} failed",
                           markup=False, soft_wrap=True)  # one greppable line; reasons may hold [brackets]
        given_up = trial.state == TrialState.FAIL and str(trial.user_attrs.get("reason", "")).startswith(GIVEN_UP)
        self.failed += given_up
        if given_up or trial.state != TrialState.FAIL:  # a failed run proposed again is not yet a failure
            self.in_a_row = self.in_a_row + 1 if given_up else 0
        if self.in_a_row >= FAILURES_TO_STOP:
            self.console.print(f"{FAILURES_TO_STOP} cells in a row given up: this worker stops", markup=False)
            self.stopped = True
            study.stop()
        reap_dead_workers(self.plain, self.console)


@dataclass
class PlanRounds:
    """A planned grid's seeds in rounds (danet.launch.ledger): before each round the looks that are ready are
    decided, and the study's GridSampler is narrowed to the round's cells."""

    grid: Grid
    runs_dir: Path
    cell_of: dict[str, str]  # the driver's key of each grid point -> its cell id
    space: dict[str, list]  # the driver's GridSampler space; its "cell" values are narrowed to each round
    state: PlanState | None = None  # where the plan stood at the last round

    def next_round(self, targets: dict[str, RunTarget]) -> tuple[dict[str, RunTarget], set[str]]:
        """The round's points (none: the plan is done) and the points the plan stopped."""
        self.state = state = advance(self.grid, self.runs_dir,
                                     {self.cell_of[key]: t.cell_hash for key, t in targets.items()})
        now, stopped = set(state.round_cells()), state.stopped_cell_ids()
        return ({key: target for key, target in targets.items() if self.cell_of[key] in now},
                {key for key in targets if self.cell_of[key] in stopped})

    def sampler(self, points: dict[str, RunTarget]) -> optuna.samplers.GridSampler:
        cells = {self.cell_of[key] for key in points}
        return optuna.samplers.GridSampler({**self.space, "cell": [c for c in self.space["cell"] if c in cells]})


def drive(study: optuna.Study, plain: optuna.Study, objective: CellTrial, progress: ProgressLine, console: Console, *,
          callbacks: Sequence[Callable] = (), n_trials: int | None = None, catch: tuple[type[Exception], ...] = (),
          grid: dict[str, RunTarget] | None = None, key_of: Callable[[FrozenTrial], str] | None = None,
          rounds: PlanRounds | None = None, max_trials: int | None = None) -> GridStanding | None:
    """Run trials until the study is done. For a grid, done means every cell has a complete or given-up record:
    GridSampler stops when it has proposed every cell, while cells may still wait to be retried or be trained
    by other workers, so this worker takes the waiting ones and waits for the rest. With a plan (`rounds`), a
    round is done the same way before its look is taken and the next round's cells are proposed; cells the
    plan stopped count as finished; a round that ends without its look (a cell given up) ends the drive.
    `max_trials`: a planned grid's trials across workers (MaxTrialsCallback in `callbacks` stops at it), after
    which no later round starts. Returns the grid's standing."""
    stopped: set[str] = set()
    finished_round = None  # the last round this worker saw finished, and the looks taken then
    while True:
        reap_dead_workers(plain, console)
        points = grid
        if rounds is not None:
            points, stopped = rounds.next_round(grid)
            this_round = (rounds.state.looks_taken, sorted(points))
            if not points or this_round == finished_round:  # done, or its look cannot be taken (a cell given up)
                return grid_standing(grid, plain, key_of, stopped)
            study.sampler = rounds.sampler(points)
        waiting = plain.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        exhausted = isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)
        if waiting or not exhausted:  # an exhausted GridSampler would propose a visited cell once more
            study.optimize(objective, n_trials=n_trials, callbacks=[progress, *callbacks], catch=catch,
                           gc_after_trial=True)
        if grid is None:
            return None
        standing = grid_standing(points, plain, key_of)
        interrupted = n_trials is not None or objective.stop_requested or progress.stopped
        if rounds is not None and (interrupted or not (standing.finished or standing.in_progress) or
                                   (max_trials is not None and len(plain.get_trials(deepcopy=False)) >= max_trials)):
            return grid_standing(grid, plain, key_of, stopped)
        if rounds is not None and standing.finished:
            finished_round = this_round
            continue  # the round is done: its look next
        if standing.finished or not standing.in_progress or interrupted:
            return standing
        time.sleep(BUSY_POLL_SECONDS)


def report_grid(standing: GridStanding, name: str, console: Console, rounds: PlanRounds | None = None) -> int:
    """The grid's last lines (with a plan, where it stands), and the driver's exit status: 0 when every cell is
    complete or stopped by the plan."""
    if rounds is not None and rounds.state is not None:
        for line in standing_lines(rounds.state, rounds.runs_dir):
            console.print(line, markup=False, soft_wrap=True)
    cells = len(standing.complete) + len(standing.stopped) + len(standing.given_up) + len(standing.in_progress) + \
        len(standing.missing)
    stopped = f", {len(standing.stopped)} stopped by its plan" if standing.stopped else ""
    console.print(f"grid {name}: {len(standing.complete)}/{cells} cells complete{stopped}", markup=False,
                  soft_wrap=True)
    for label, listed in (("given up (record failed; ablations/run.py --resume continues it)", standing.given_up),
                          ("still running in another worker", standing.in_progress),
                          ("without a complete record", standing.missing)):
        if listed:
            console.print(f"  {label}: {', '.join(listed)}", markup=False, soft_wrap=True)
    return 0 if len(standing.complete) + len(standing.stopped) == cells else 1
