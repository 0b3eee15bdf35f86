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
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from danet.config import EXIT_FAILED, EXIT_USAGE, UsageError
from danet.grids import load_grid
from danet.launch import slurm_jobs
from danet.launch.contract import launcher_overrides
from danet.paths import GRID_DIR


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


def submit(args: argparse.Namespace, run_flags: list[str]) -> int:
    if args.storage and not args.study:
        raise UsageError("--storage belongs to --study")
    for name in ("array", "cpus_per_task", "max_requeues"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_requeues" else 1):
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least {0 if name == 'max_requeues' else 1}")
    grid = load_grid(args.grid, GRID_DIR)
    runs_dir = Path(vars(launcher_overrides(run_flags)).get("tracking.runs_dir", "runs"))
    cells = list(grid.cells)
    task = [sys.executable, str(Path(__file__).resolve()), "--task", "--grid", args.grid,
            "--max-requeues", str(args.max_requeues)]
    if args.gpus_per_task:
        task += ["--gpus-per-task", str(args.gpus_per_task)]
    if args.study:
        workers = args.array or len(cells)
        array = f"0-{workers - 1}"
        task += ["--study", args.study] + (["--storage", args.storage] if args.storage else [])
        runs = slurm_jobs.worker_command(args.grid, args.study, args.storage, args.gpus_per_task, run_flags)
        comment = [f"{workers} Optuna workers of study {args.study} (grid {grid.name}, {len(cells)} cells); "
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
    workdir = Path.cwd()
    log_dir = workdir / runs_dir / "slurm"
    resources = slurm_jobs.Resources(args.partition, args.account, args.gpus_per_task, args.cpus_per_task, args.mem,
                                args.time)
    header = slurm_jobs.sbatch_lines(f"danet-{grid.name}", array, resources, workdir, log_dir)
    script = slurm_jobs.batch_script(header, comment, [*task, "--", *run_flags], None if args.study else cells)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise UsageError("sbatch not found: run this on a Slurm login node (or pass --dry-run to see the script)")
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    script_path = log_dir / f"danet-{grid.name}.sbatch"
    script_path.write_text(script)
    submitted = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    if submitted.returncode != 0:
        print(f"sbatch failed: {submitted.stderr.strip()} (script: {script_path})", file=sys.stderr)
        return EXIT_FAILED
    job = submitted.stdout.strip().split(";")[0]
    print(f"submitted job array {job}: {array} ({'workers of study ' + args.study if args.study else 'cells'} of "
          f"grid {grid.name}); logs {log_dir}/danet-{grid.name}_{job}_*.out; watch: squeue -j {job}")
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
