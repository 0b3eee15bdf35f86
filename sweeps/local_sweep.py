"""Run a W&B sweep file without a W&B server: each proposal comes from Optuna, each run is the
sweep's command as `wandb agent` renders it.

    python sweeps/local_sweep.py sweeps/demo.yaml -- --wandb offline
    python sweeps/local_sweep.py sweeps/hparams.yaml --count 20 -- --data-root /data/camvid --wandb offline

Run it from where `wandb agent` would run (the repository root: the file's program is relative to it).
Start the same command on several machines or terminals sharing the runs folder and the storage: they
share the sweep (one study), and no run is trained twice. Flags after `--` go last on every run's command,
so they win over the file's values. grid -> Optuna's GridSampler over the same values, random ->
RandomSampler, bayes -> GPSampler, early_terminate hyperband -> SuccessiveHalvingPruner on W&B's bands
(runs it stops are recorded as pruned). Exit status: 0 done, 1 a run of this executor failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import optuna

from danet.config import UsageError
from danet.console import stderr_console
from danet.launch.contract import OneLineErrorParser
from danet.launch.ledger import LedgerError
from danet.launch.storages import open_study_storage
from danet.launch.sweep_files import load_sweep
from danet.launch.yaml_executor import run_executor


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the executor stops its run at a checkpoint and proposes it again


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    own_flags = argv[:argv.index("--")] if "--" in argv else argv
    parser = OneLineErrorParser(prog="sweeps/local_sweep.py", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a W&B sweep file (what `wandb sweep` takes)")
    parser.add_argument("--count", type=int, default=None,
                        help="runs for this executor, as `wandb agent --count` (default: until the grid is done; "
                             "random and bayes go on until stopped)")
    parser.add_argument("--runs-dir", default=None, help="records folder of every run (default: the runs' own, runs)")
    parser.add_argument("--study", default=None, help="the study that holds the sweep (default: the file's name)")
    parser.add_argument("--storage", default=None,
                        help="a journal file PATH.journal (default: optuna/STUDY.journal), sqlite:///FILE.db or "
                             "postgresql://USER:PW@HOST/DB: the strings Optuna's own tools take")
    args = parser.parse_args(own_flags)
    if args.count is not None and args.count < 1:
        parser.error("--count must be at least 1")
    console = stderr_console()
    try:
        sweep = load_sweep(args.sweep)
        study = args.study or sweep.name
        storage = open_study_storage(args.storage, study, workers=1, heartbeat=60)
        flags = (["--runs-dir", args.runs_dir] if args.runs_dir else []) + run_flags
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            return run_executor(sweep, storage, study, args.count, flags, console)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except LedgerError as error:  # the grid's plan and its records disagree: a person must look
        print(f"{parser.prog}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: stopped; the run it had is proposed again and resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
