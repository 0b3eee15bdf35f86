"""Run an ablation grid on a Slurm cluster: one job array, requeued at time limits.

    python sweeps/slurm.py --grid table1 --partition gpu --gpus-per-task 1 --time 24:00:00 -- --data-root /data/cs
    python sweeps/slurm.py --grid table1 --study table1 --storage postgresql://... --array 8 -- --data-root ...
    python sweeps/slurm.py --grid demo --dry-run          # print the batch script, submit nothing

With --grid alone, task i of the array runs cell i (`ablations/run.py --grid G --cell ID --resume`);
with --study, each task is an Optuna worker of that study (sweeps/optuna_study.py). Either way a
complete record means a cell is done, whoever ran it. Before the time limit Slurm warns the task
(USR1); the run checkpoints, records itself preempted and the task is requeued, to resume the cell
from its checkpoint. A task requeued --max-requeues times is given up: its cell is recorded as failed.
A plain `scancel` stops the runs the same way (preempted, resumable) but does not requeue.
Logs: RUNS_DIR/slurm/ (RUNS_DIR: --runs-dir of the run flags, default runs). Flags after `--` go
to every run (for example --data-root, --runs-dir, --wandb offline).

A grid with a sequential plan (its `plan:`) runs in rounds: one array for the seeds up to the next look
of the cells still running (those without a complete record), then a look job (afterany the array)
that decides the look (danet.launch.ledger) and submits the next round the same way, until the plan is
done. A look job that finds cells of its round without a complete record names them and exits 1:
submit the grid again to run just those. With --study the Optuna workers run the rounds themselves.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from danet.config import EXIT_FAILED, EXIT_USAGE, UsageError
from danet.grids import Grid, load_grid
from danet.launch import slurm_jobs
from danet.launch.contract import cell_argv, launcher_overrides, target_of
from danet.launch.ledger import LedgerError, advance, ledger_path, standing_lines
from danet.paths import GRID_DIR
from danet.tracking import complete_runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweeps/slurm.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="an ablation grid from ablations/grids/ (or a YAML file)")
    parser.add_argument("--study", help="run the grid as this Optuna study: each array task is one worker")
    parser.add_argument("--storage", help="the study's storage (default: the journal file optuna/STUDY.journal, "
                                          "which needs a shared file system; postgresql://... across nodes)")
    parser.add_argument("--array", type=int, metavar="N",
                        help="with --study: N workers (default: one per cell); without: at most N cells at once "
                             "(default: all)")
    parser.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    parser.add_argument("--account", help="Slurm account to charge (default: yours)")
    parser.add_argument("--gpus-per-task", type=int, default=0, metavar="G",
                        help="GPUs per task (default: none); G > 1 runs a cell under srun torchrun")
    parser.add_argument("--cpus-per-task", type=int, default=1, metavar="C", help="CPUs per task (default: 1)")
    parser.add_argument("--mem", help="memory per node, e.g. 32G (default: no request)")
    parser.add_argument("--time", metavar="HH:MM:SS", help="time limit of each task (default: the partition's)")
    parser.add_argument("--max-requeues", type=int, default=3, metavar="K",
                        help="requeues of a task (time limits, preemptions, crashes) before its cell is recorded "
                             "as failed (default: 3)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    parser.add_argument("--task", action="store_true", help=argparse.SUPPRESS)  # inside the job: supervise one task
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # with --task: the cell of this task
    # a planned grid's look job: look K of its plan (K = the number of looks: the round after the last one)
    parser.add_argument("--look", type=int, metavar="K", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        if args.task:
            return task(args, run_flags)
        return submit(args, run_flags)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except LedgerError as error:
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return EXIT_FAILED


def submit(args: argparse.Namespace, run_flags: list[str]) -> int:
    """Submit the grid's job array (a planned grid: its current round and a look job); with --look, the look job."""
    if args.storage and not args.study:
        raise UsageError("--storage belongs to --study")
    if args.look is not None and args.study:
        raise UsageError("--look belongs to a planned grid's cells, not to --study")
    for name in ("array", "cpus_per_task", "max_requeues"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_requeues" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {0 if name == 'max_requeues' else 1}")
    grid = load_grid(args.grid, GRID_DIR)
    if grid.plan is not None and not args.study:
        return plan_step(args, run_flags, grid)
    if args.look is not None:
        raise UsageError(f"--look: grid {grid.name} has no plan")
    cells = list(grid.cells)
    script, array, log_dir = array_script(args, run_flags, grid, None if args.study else cells)
    if args.dry_run:
        print(script, end="")
        return 0
    job = sbatch(log_dir, f"danet-{grid.name}.sbatch", script)
    if job is None:
        return EXIT_FAILED
    print(f"submitted job array {job}: {array} ({'workers of study ' + args.study if args.study else 'cells'} of "
          f"grid {grid.name}); logs {log_dir}/danet-{grid.name}_{job}_*.out; watch: squeue -j {job}")
    return 0


def array_script(args: argparse.Namespace, run_flags: list[str], grid: Grid, cells: list[str] | None
                 ) -> tuple[str, str, Path]:
    """The batch script of a job array: task i runs cells[i], or (cells None, --study) is an Optuna worker.
    Returns the script, its --array range and the folder of the logs."""
    runs_dir = Path(vars(launcher_overrides(run_flags)).get("tracking.runs_dir", "runs"))
    task = [sys.executable, str(Path(__file__).resolve()), "--task", "--grid", args.grid,
            "--max-requeues", str(args.max_requeues)]
    if args.gpus_per_task:
        task += ["--gpus-per-task", str(args.gpus_per_task)]
    if cells is None:
        workers = args.array or len(grid.cells)
        array = f"0-{workers - 1}"
        task += ["--study", args.study] + (["--storage", args.storage] if args.storage else [])
        runs = slurm_jobs.worker_command(args.grid, args.study, args.storage, args.gpus_per_task, run_flags)
        comment = [f"{workers} Optuna workers of study {args.study} (grid {grid.name}, {len(grid.cells)} cells); "
                   "each runs:", "  " + " ".join(runs)]
    else:
        array = f"0-{len(cells) - 1}" + (f"%{args.array}" if args.array else "")
        task += ["--cell", "CELL"]
        runs = slurm_jobs.cell_command(args.grid, "CELL", args.gpus_per_task, run_flags,
                                       ("FIRST_NODE:PORT", "$SLURM_JOB_ID"))
        comment = [f"task i runs cell i of grid {grid.name} ({len(cells)} cells):", "  " + " ".join(runs)]
    comment += [f"USR1 {slurm_jobs.WARNING_SECONDS} s before the time limit: the run checkpoints (preempted) and the task "
                "is requeued to resume it;", f"a task requeued {args.max_requeues} times is given up (its cell: "
                "failed). scancel: the runs checkpoint, nothing is requeued."]
    header = slurm_jobs.sbatch_lines(f"danet-{grid.name}", array, _resources(args), Path.cwd(), _log_dir(runs_dir))
    return slurm_jobs.batch_script(header, comment, [*task, "--", *run_flags], cells), array, _log_dir(runs_dir)


def _resources(args: argparse.Namespace) -> slurm_jobs.Resources:
    return slurm_jobs.Resources(args.partition, args.account, args.gpus_per_task, args.cpus_per_task, args.mem,
                                args.time)


def _log_dir(runs_dir: Path) -> Path:
    return Path.cwd() / runs_dir / "slurm"


def launcher_flags(args: argparse.Namespace) -> list[str]:
    """The command line of this submission (grid, resources, requeues, --array), for the look job and for
    resuming: the next round asks Slurm for the same."""
    flags = ["--grid", args.grid]
    for name in ("partition", "account", "gpus_per_task", "cpus_per_task", "mem", "time", "array", "max_requeues"):
        value = getattr(args, name)
        if value is not None and not (name == "gpus_per_task" and not value):
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def sbatch(log_dir: Path, name: str, script: str, *options: str) -> str | None:
    """Write the script into the log folder and submit it; the job id, or None (said on stderr)."""
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found: run this on a Slurm login node (or pass --dry-run to see the script)")
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    script_path = log_dir / name
    script_path.write_text(script)
    submitted = subprocess.run(["sbatch", "--parsable", *options, str(script_path)], capture_output=True, text=True,
                               check=False)
    if submitted.returncode != 0:
        print(f"sbatch failed: {submitted.stderr.strip()} (script: {script_path})", file=sys.stderr)
        return None
    return submitted.stdout.strip().split(";")[0]


def plan_step(args: argparse.Namespace, run_flags: list[str], grid: Grid) -> int:
    """A planned grid, at its submission (args.look None) and in each look job (args.look: the look it waits
    for): take the looks that are ready, then submit the current round's cells that lack a complete record
    with its look job (submit_round), or say that the plan is done. A look job whose look could not be taken
    (cells of its round without a complete record: given up, failed, cancelled) names them and exits 1."""
    launcher_overrides(run_flags)  # the flags a launcher sets itself are refused first, in one line
    world_size = max(1, args.gpus_per_task)  # a cell's hash holds its world size, as its record does
    targets = {cell: target_of(cell_argv(args.grid, cell, run_flags), world_size) for cell in grid.cells}
    runs_dir = next(iter(targets.values())).runs_dir
    hashes = {cell: target.cell_hash for cell, target in targets.items()}
    for _ in range(2):  # a second time only for a record that completed between the look and the check
        state = advance(grid, runs_dir, hashes, write=not args.dry_run)
        complete = complete_runs(runs_dir)
        missing = [cell for cell in state.round_cells() if hashes[cell] not in complete]
        if missing or state.next_look() is None:
            break
    else:
        print(f"grid {grid.name}: every cell of the round before look {state.next_look() + 1} has a complete record, "
              f"yet the look cannot be taken (see {ledger_path(runs_dir, grid.name)})", file=sys.stderr)
        return EXIT_FAILED
    looks = len(grid.plan.looks)
    position = looks if state.next_look() is None else state.next_look()
    standing = standing_lines(state, runs_dir)
    if args.look is not None and position == args.look and missing:
        what = f"look {position + 1} of {looks}" if position < looks else f"the last round of grid {grid.name}"
        print("\n".join([f"{what}: not taken: {len(missing)} cell(s) of its round have no complete record "
                         f"(given up, failed or cancelled; their records and the array's logs say why): "
                         f"{', '.join(missing)}", *standing,
                         "resume (runs just those cells, then the look): python sweeps/slurm.py "
                         + shlex.join([*launcher_flags(args), "--", *run_flags])]), file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(standing), file=sys.stderr if args.dry_run else sys.stdout)
    if not missing:
        stopped = state.stopped_cell_ids()
        print(f"grid {grid.name}: its plan is done: {len(grid.cells) - len(stopped)} cells complete, {len(stopped)} "
              f"stopped by the plan; nothing to submit", file=sys.stderr if args.dry_run else sys.stdout)
        return 0
    return submit_round(args, run_flags, grid, missing, position)


def submit_round(args: argparse.Namespace, run_flags: list[str], grid: Grid, cells: list[str], position: int) -> int:
    """One round of a planned grid: a job array of its cells, and the job of look `position` (the number of
    looks: the round after the last one) afterany that array, which goes on with the next round."""
    script, array, log_dir = array_script(args, run_flags, grid, cells)
    looks = len(grid.plan.looks)
    what = f"look {position + 1} of {looks}" if position < looks else "the end of the plan"
    look_command = [sys.executable, str(Path(__file__).resolve()), "--look", str(position), *launcher_flags(args),
                    "--", *run_flags]
    comment = [f"after the round's array (afterany): {what} of grid {grid.name} (danet.launch.ledger), then the next "
               "round's array and look job, or exit 1 naming the round's cells without a complete record"]
    look_script = slurm_jobs.batch_script(slurm_jobs.look_lines(f"danet-{grid.name}-look", _resources(args),
                                                                Path.cwd(), log_dir), comment, look_command, None,
                                          threads=False)
    if args.dry_run:
        print(script, end="")
        print(f"# then a look job, sbatch --dependency=afterany:<the array's job id>, for {what}:")
        print(look_script, end="")
        return 0
    job = sbatch(log_dir, f"danet-{grid.name}.sbatch", script)
    if job is None:
        return EXIT_FAILED
    look_job = sbatch(log_dir, f"danet-{grid.name}-look.sbatch", look_script, f"--dependency=afterany:{job}")
    if look_job is None:
        print(f"job array {job} was submitted without its look job: when it ends, submit the grid again",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"submitted job array {job}: {array} ({len(cells)} cells of grid {grid.name} before {what}); look job "
          f"{look_job} follows it; logs {log_dir}/danet-{grid.name}_{job}_*.out, "
          f"{log_dir}/danet-{grid.name}-look_{look_job}.out; watch: squeue -j {job},{look_job}")
    return 0


def task(args: argparse.Namespace, run_flags: list[str]) -> int:
    """Inside the job: supervise this array task's cell or Optuna worker."""
    if args.study:
        command = slurm_jobs.worker_command(args.grid, args.study, args.storage, args.gpus_per_task, run_flags)
        return slurm_jobs.supervise(command, args.max_requeues, None)
    if not args.cell:
        raise UsageError("--task needs --cell or --study")
    rendezvous = slurm_jobs.slurm_rendezvous(dict(os.environ)) if args.gpus_per_task > 1 else ("", "")
    command = slurm_jobs.cell_command(args.grid, args.cell, args.gpus_per_task, run_flags, rendezvous)
    return slurm_jobs.supervise(command, args.max_requeues,
                           lambda reason: slurm_jobs.record_given_up(args.grid, args.cell, run_flags, args.gpus_per_task,
                                                                reason))


if __name__ == "__main__":
    sys.exit(main())
