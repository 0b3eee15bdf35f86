"""Run an ablation grid or a hyper-parameter search as an Optuna study, with one or many workers.

    python sweeps/optuna_study.py --grid table1 --study table1 [--workers 4] [-- run.py flags ...]
    python sweeps/optuna_study.py --search sweeps/hparams.yaml --study hp --n-trials 40 --pruner median
    python sweeps/optuna_study.py --grid table1 --study table1 --storage postgresql://user:pw@host/db

Storage: a journal file optuna/<study>.journal by default (nothing to start; safe for several
workers on one host or NFS; `optuna trials --storage optuna/S.journal --storage-class
JournalFileBackend --study-name S` and `optuna-dashboard optuna/S.journal` read it),
sqlite:///FILE for one process, postgresql://... across machines:
each machine runs the same command and they share the work. The same command restarted continues
where it stopped: complete cells are skipped by their records, partial ones resume.
Flags after `--` go to every run (for example --data-root, --runs-dir, --wandb offline).
At the end: one summary line (complete / failed / pruned, the best cell). Exit status: 0 done,
1 some cell failed (its trial keeps the reason), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from danet.config import UsageError
from danet.console import stderr_console
from danet.grids import load_grid
from danet.launch.ledger import LedgerError
from danet.launch.optuna_driver import run_worker
from danet.launch.processes import run_together, visible_gpus
from danet.launch.storages import open_study_storage
from danet.launch.sweep_files import load_search
from danet.paths import GRID_DIR


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own_flags = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="sweeps/optuna_study.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--grid", help="an ablation grid from ablations/grids/ (each cell runs exactly once)")
    what.add_argument("--search", help="a W&B sweep file (or its name in sweeps/, e.g. hparams) whose parameters "
                                       "are the search space (TPE)")
    parser.add_argument("--study", required=True, help="study name (shared by all workers)")
    parser.add_argument("--storage", default=None,
                        help="a journal file PATH.journal (default: optuna/STUDY.journal), sqlite:///FILE.db (one "
                             "process) or postgresql://USER:PW@HOST/DB: the strings Optuna's own tools take")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="total trials across workers (default: the whole grid; required for --search)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: 1)")
    parser.add_argument("--pruner", choices=["median", "hyperband"], default=None,
                        help="pruner of --search studies, fed by the periodic val mIoU (default: the file's "
                             "early_terminate, W&B's hyperband as one bracket of successive halving; else median)")
    parser.add_argument("--nproc-per-trial", type=int, default=1,
                        help="run each trial as `torchrun --nproc_per_node=N` (several GPUs per trial; no pruning)")
    parser.add_argument("--heartbeat", type=int, default=60,
                        help="seconds between heartbeats on sqlite/postgresql storage; a worker silent for 3 of "
                             "them is declared dead and its trial retried (default: 60)")
    args = parser.parse_args(own_flags)
    console = stderr_console()
    if args.search and args.n_trials is None:
        parser.error("--search needs --n-trials")

    if args.workers > 1:  # the same command once per worker, each on its own GPUs when there are GPUs
        command = [sys.executable, str(Path(__file__).resolve()), *own_flags_without_workers(own_flags), "--", *run_flags]
        gpus, per_worker = visible_gpus(), max(1, args.nproc_per_trial)
        shares = [",".join(gpus[(index * per_worker + offset) % len(gpus)] for offset in range(per_worker))
                  if gpus else "" for index in range(args.workers)]
        return run_together([(share, command) for share in shares], "worker")

    try:
        grid = load_grid(args.grid, GRID_DIR) if args.grid else None
        search = load_search(args.search) if args.search else None
        storage = open_study_storage(args.storage, args.study, args.workers, args.heartbeat)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return run_worker(grid, search, storage, args.study, args.n_trials, run_flags, args.pruner, console,
                          args.nproc_per_trial)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except LedgerError as error:  # the grid's plan and its records disagree: a person must look
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 1


def own_flags_without_workers(flags: list[str]) -> list[str]:
    """The driver's flags with --workers K removed (each child is one worker)."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--workers":
            skip = True
        elif not flag.startswith("--workers="):
            kept.append(flag)
    return kept


if __name__ == "__main__":
    sys.exit(main())
