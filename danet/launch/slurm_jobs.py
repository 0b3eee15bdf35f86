"""Grids on a Slurm cluster: the batch script of a job array, and the supervisor inside each task.

Slurm is the engine: a job array holds the grid (one task per cell, or one Optuna worker per
task), `--signal=B:USR1@...` warns the task before its time limit, `scontrol requeue` brings it
back and SLURM_RESTART_COUNT counts how often that happened. The supervisor (`supervise`) is the
task's batch shell: it runs the cell's command, turns the warning into the run's stop signal, and
decides what Slurm should do next:

- the run finished, or its flags are wrong: nothing (a requeue would not change the outcome);
- the time limit is near: the run checkpoints and records itself preempted, the task is requeued
  and resumes the cell from that checkpoint (the command has --resume);
- a SIGTERM from Slurm (a person's scancel, a preempting partition, `scontrol requeue`): the run
  checkpoints and records preempted; Slurm alone decides whether the task comes back;
- the run failed or was killed (a crash, out of memory): the task is requeued;
- after `max_requeues` requeues of any cause the cell is given up and recorded as failed.

A grid with a sequential plan runs in rounds (sweeps/slurm.py): an array of a round's cells, then a
look job (`look_lines`: one CPU, never requeued) that decides the look and submits the next round.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from danet.config import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE
from danet.launch.contract import cell_argv, run_command, target_of
from danet.paths import SWEEP_DIR
from danet.tracking import RunStore

# A look job's time limit: it reads the records, decides a look and submits the next round.
LOOK_TIME = "00:10:00"
# The warning before the time limit: long enough for one training step, a checkpoint and the exit.
WARNING_SECONDS = 300
# How long the supervisor waits, after stopping an Optuna worker at the warning, for it to exit
# before it requeues the task anyway (Slurm's own SIGTERM then stops what is left).
STOP_GRACE_SECONDS = 120


@dataclass(frozen=True)
class Resources:
    """What each array task asks Slurm for; None or 0: the cluster's default (no request)."""

    partition: str | None = None
    account: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str | None = None


def _requests(resources: Resources) -> list[str]:
    options = ["--ntasks=1", f"--cpus-per-task={resources.cpus_per_task}"]
    for name, value in (("partition", resources.partition), ("account", resources.account),
                        ("gpus-per-task", resources.gpus_per_task or None), ("mem", resources.mem),
                        ("time", resources.time)):
        if value is not None:
            options.append(f"--{name}={value}")
    return options


def sbatch_lines(job_name: str, array: str, resources: Resources, workdir: Path, log_dir: Path) -> list[str]:
    """The #SBATCH header of the job array."""
    options = [f"--job-name={job_name}", f"--array={array}", *_requests(resources)]
    options += [f"--chdir={workdir}", f"--output={log_dir}/%x_%A_%a.out", "--open-mode=append", "--requeue",
                f"--signal=B:USR1@{WARNING_SECONDS}", "--export=ALL"]
    return [f"#SBATCH {option}" for option in options]


def look_lines(job_name: str, resources: Resources, workdir: Path, log_dir: Path) -> list[str]:
    """The #SBATCH header of a planned grid's look job: the tasks' partition and account, one CPU, no GPU,
    LOOK_TIME; never requeued (it submits the next round: twice would run the round twice)."""
    small = Resources(resources.partition, resources.account, time=LOOK_TIME)
    options = [f"--job-name={job_name}", *_requests(small), f"--chdir={workdir}", f"--output={log_dir}/%x_%j.out",
               "--open-mode=append", "--no-requeue", "--export=ALL"]
    return [f"#SBATCH {option}" for option in options]


def batch_script(header: list[str], comment: list[str], task_command: list[str], cells: list[str] | None,
                 threads: bool = True) -> str:
    """The whole batch script. With `cells`, task i runs cell i: the ids are written into the script,
    so that a grid file edited after submission cannot shift them. `threads`: OMP_NUM_THREADS is the
    task's CPUs (not in a look job, whose environment the next round's tasks get with --export=ALL)."""
    lines = ["#!/bin/bash", *header, *(f"# {line}" for line in comment)]
    if threads:
        lines += ["# torch would start a thread per core of the node, whose other cores belong to other tasks",
                  "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"]
    command = shlex.join(task_command)
    if cells is not None:
        lines.append("cells=(" + " ".join(shlex.quote(cell) for cell in cells) + ")")
        command = command.replace("--cell CELL", '--cell "${cells[$SLURM_ARRAY_TASK_ID]}"')
    lines.append(f"exec {command}")
    return "\n".join(lines) + "\n"


def cell_command(grid: str, cell: str, gpus_per_task: int, run_flags: list[str],
                 rendezvous: tuple[str, str] = ("", "")) -> list[str]:
    """One cell, resumed (the run contract's argv): ablations/run.py, or with several GPUs `srun torchrun`
    meeting at the `rendezvous` (endpoint, id) that `slurm_rendezvous` takes from the job's environment."""
    run = run_command(cell_argv(grid, cell, run_flags))
    if gpus_per_task <= 1:
        return run
    endpoint, rendezvous_id = rendezvous
    return ["srun", "--ntasks=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={gpus_per_task}", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={rendezvous_id}", *run[1:]]


def slurm_rendezvous(environ: dict[str, str]) -> tuple[str, str]:
    """torchrun's rendezvous for this task: the first host of its node list (`scontrol show
    hostnames` expands `node[01-04]`) at a port derived from the job id, so that the tasks of an
    array that share a node do not meet at the same port."""
    job = environ.get("SLURM_JOB_ID", "0")
    nodes = environ.get("SLURM_JOB_NODELIST", "")
    hostnames = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False)
    host = (hostnames.stdout.split() or ["localhost"])[0]
    return f"{host}:{29500 + int(job) % 10000}", job


def worker_command(grid: str, study: str, storage: str | None, gpus_per_task: int, run_flags: list[str]) -> list[str]:
    """One Optuna worker of the study (sweeps/optuna_study.py), on the task's GPUs."""
    command = [sys.executable, str(SWEEP_DIR / "optuna_study.py"), "--grid", grid, "--study", study]
    if storage:
        command += ["--storage", storage]
    if gpus_per_task > 1:
        command += ["--nproc-per-trial", str(gpus_per_task)]
    return [*command, "--", *run_flags]


def _ending(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def supervise(command: list[str], max_requeues: int, give_up: Callable[[str], None] | None,
              environ: dict[str, str] | None = None) -> int:
    """Run the task's command under Slurm and decide whether the task comes back (module doc).
    `give_up(reason)` records the cell as failed; the return value is the task's exit status."""
    environ = os.environ if environ is None else environ
    job = environ.get("SLURM_JOB_ID", "")
    # the name squeue shows: 1234_5 for task 5 of array 1234 (whose own job id is another number)
    name = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in environ else job
    restarts = int(environ.get("SLURM_RESTART_COUNT") or 0)

    def given_up(what: str) -> int:
        reason = f"given up after {restarts} requeue(s) of Slurm job {name} (--max-requeues {max_requeues}): {what}"
        print(reason, file=sys.stderr, flush=True)
        if give_up is not None:
            give_up(reason)
        return EXIT_FAILED

    if restarts > max_requeues:  # Slurm requeued it by itself (preemption, node failure) once too often
        return given_up("requeued by Slurm once more")
    print(f"slurm job {name}, restart {restarts}: {shlex.join(command)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command)
    warned_at: float | None = None

    def stop(signum: int, frame) -> None:
        nonlocal warned_at
        if signum == signal.SIGUSR1 and warned_at is None:
            warned_at = time.monotonic()
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)  # the one stop signal that srun and torchrun pass on

    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, stop)
    while (code := child.poll()) is None:
        if warned_at is not None and time.monotonic() - warned_at > STOP_GRACE_SECONDS:
            break  # an Optuna worker goes on to its next trial: requeue anyway
        time.sleep(0.2)
    if code in (EXIT_OK, EXIT_USAGE):
        return code
    if warned_at is None and code in (EXIT_PREEMPTED, -signal.SIGTERM):  # killed by it: before the run's handler
        return EXIT_PREEMPTED  # Slurm's own SIGTERM: scancel does not come back, a preemption or requeue does
    what = "stopped at the time limit" if warned_at is not None else f"the run {_ending(code)}"
    if restarts >= max_requeues:
        return given_up(f"last attempt {what}")
    print(f"{what}: requeueing Slurm job {name}", file=sys.stderr, flush=True)
    requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if requeued.returncode != 0:
        print(f"scontrol requeue {job} failed: {requeued.stderr.strip()}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_PREEMPTED


def record_given_up(grid: str, cell: str, run_flags: list[str], gpus_per_task: int, reason: str) -> None:
    """Mark the cell's record failed with the reason (the record folder, from the run contract)."""
    target = target_of(cell_argv(grid, cell, run_flags), max(1, gpus_per_task))
    if not RunStore(target.runs_dir, target.cfg).give_up(reason):
        print(f"{target.run_dir}: not marked failed (complete, or held by another process)", file=sys.stderr)
