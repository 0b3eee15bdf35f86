"""The command line of one run (`ablations/run.py` is a thin wrapper around `main`).

Exit status: 0 done, 2 usage / config / data error, 1 failure during the run (recorded as failed).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from danet import data as datasets
from danet import distributed
from danet.config import (
    OneLineErrorParser,
    RunConfig,
    UsageError,
    add_config_arguments,
    dump_yaml,
    explicit_settings,
    resolve_for_dataset,
    resolve_run_config,
)
from danet.engine import (
    NonFiniteLoss,
    StopRun,
    batches_per_epoch,
    fit,
    load_checkpoint,
    peak_memory_mb,
    pick_device,
    seed_everything,
)
from danet.grids import grid_cell, load_grid
from danet.models import DANet, build
from danet.models.backbone import BackboneWeightsError
from danet.tracking import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_PRUNED,
    FanOut,
    NullTracker,
    RunStore,
    WandbSink,
    find_complete,
    read_summary,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PRESET = "demo"
# the reports tool of a source checkout (it reads records; the library does not need it)
REPORTS_SCRIPT = Path(__file__).resolve().parents[1] / "reports" / "make_tables.py"
LIBRARIES = ("torch", "torchvision", "albumentations", "numpy", "wandb", "optuna")


class Terminated(Exception):
    """SIGTERM (a W&B agent or a scheduler stopping the run)."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="ablations/run.py", allow_abbrev=False,
        description="Train and evaluate one DANet ablation cell. Settings come from the defaults, then the "
                    "preset (--config), then these flags. Boolean switches take --pam, --no-pam or --pam=true|false.",
        epilog="Records go to RUNS_DIR/<run-id>/: config.yaml, metrics.jsonl (curves), summary.json (status and "
               "final numbers), checkpoints/. Exit status: 0 done, 2 usage/config/data error, 1 failed run.")
    parser.add_argument("--config", default=None, metavar="PRESET",
                        help="preset name from ablations/configs/ or a YAML file (default: demo, CPU + synthetic data)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--dry-run", action="store_true", help="build data and model, print what would run, exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue this run (same config) from its last checkpoint; a complete run is left as is")
    parser.add_argument("--overwrite", action="store_true", help="delete this run's earlier record and start over")
    parser.add_argument("--grid", metavar="GRID",
                        help="an ablation grid from ablations/grids/ (or a YAML file); needs --cell")
    parser.add_argument("--cell", metavar="ID", help="the grid cell to run, e.g. pam-cam_seed=0 (its preset and settings)")
    add_config_arguments(parser)
    return parser


def git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def environment_info(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"seed": cfg.train.seed, "device": device_name, "git_revision": git_revision(), "host": platform.node(),
            "python": platform.python_version(), "libraries": versions, "pid": os.getpid(),
            "study": cfg.tracking.study or None, "trial": cfg.tracking.trial if cfg.tracking.study else None}


def one_line(error: BaseException) -> str:
    """The message of an error, on one line; from a DataLoader worker, the original message only."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return error.__class__.__name__
    last = lines[-1]
    for prefix in ("danet.data.base.DataError: ", "DataError: "):
        last = last.removeprefix(prefix)
    return last


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def print_summary(console: Console, cfg: RunConfig, summary: dict[str, Any], class_names: tuple[str, ...],
                  run_dir: Path) -> None:
    table = Table(title=f"{cfg.cell_name()}  ({summary['status']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, fmt in (("final val mIoU", "final_miou", "{:.4f}"), ("best val mIoU", "best_miou", "{:.4f}"),
                            ("pixel accuracy", "final_pixel_accuracy", "{:.4f}"),
                            ("iterations", "iterations", "{}"), ("images / s (training)", "images_per_second", "{:.1f}"),
                            ("peak memory (MiB)", "peak_memory_mb", "{:.0f}"), ("wall time (s)", "wall_time_s", "{:.0f}")):
        if summary.get(key) is not None:
            table.add_row(label, fmt.format(summary[key]))
    for name in class_names:
        value = summary.get("per_class_iou", {}).get(name)
        table.add_row(f"  IoU {name}", "absent" if value is None else f"{value:.4f}")
    console.print(table)
    console.print(f"record: {run_dir} (summary.json: the numbers above; metrics.jsonl: the curves)")
    if REPORTS_SCRIPT.exists():
        console.print(f"tables: python reports/make_tables.py --runs-dir {run_dir.parent}")


@dataclass
class Outcome:
    """What became of a run: status complete, failed, skipped (a complete record exists) or busy
    (another process holds it), with the exit status the command line should give."""

    status: str
    exit_code: int
    summary: dict[str, Any]
    run_dir: Path
    message: str = ""


@dataclass
class Prepared:
    cfg: RunConfig  # resolved for the dataset
    data: datasets.DataBundle
    model: DANet
    device: torch.device


def prepare(cfg: RunConfig, context: distributed.Context = distributed.SINGLE) -> Prepared:
    """Build the data and the model; settle what the dataset decides. Raises usage-type errors."""
    data = datasets.build(cfg.data)
    cfg = resolve_for_dataset(cfg, data.num_classes, batches_per_epoch(len(data.train), cfg.data.batch_size))
    device = distributed.device_for(context, pick_device(cfg.train.device))
    if context.enabled and cfg.train.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm); pass --no-sync-bn for torchrun on the CPU")
    if context.enabled and cfg.data.batch_size % context.world_size:
        raise UsageError(f"--batch-size {cfg.data.batch_size} is the global batch: it must divide among "
                         f"{context.world_size} ranks")
    seed_everything(cfg.train.seed)  # the initial weights depend on the seed only
    return Prepared(cfg, data, build(cfg.model), device)


def run_cell(prepared: Prepared, *, resume: bool, overwrite: bool = False, extra_trackers: tuple = (),
             on_eval: Callable[[int, float], None] | None = None, console: Console | None = None,
             context: distributed.Context = distributed.SINGLE) -> Outcome:
    """Train and evaluate one cell with its record, exactly once per resolved config.

    With `resume`, a complete record of the same config anywhere under the runs folder means
    nothing to do, and a partial one is continued from its last checkpoint. A run folder is held
    by one process at a time (a lock file), so two workers given the same cell cannot both train it.
    Under torchrun, rank 0 decides all this and keeps the record; the other ranks follow it.
    """
    if not context.is_main:
        return _follow_main(prepared, context)
    cfg = prepared.cfg
    console = console or Console(stderr=True)
    store = RunStore(cfg.tracking.runs_dir, cfg)
    outcome = None
    if resume:
        done = find_complete(cfg.tracking.runs_dir, cfg.cell_hash())
        if done is not None:
            outcome = Outcome("skipped", EXIT_OK, read_summary(done) or {}, done,
                              f"run {done} is already complete (same config)")
    lock = store.lock() if outcome is None else None
    if outcome is None and lock is None:
        outcome = Outcome("busy", EXIT_USAGE, {}, store.dir, f"run {store.dir} is being trained by another process")
    if outcome is not None:
        distributed.broadcast(("stop", outcome.status), context)
        return outcome
    with lock:
        return _train_locked(store, prepared, resume, overwrite, extra_trackers, on_eval, console, context)


def _fit(prepared: Prepared, tracker, checkpoint_dir: Path, checkpoint: dict | None, on_eval,
         context: distributed.Context) -> tuple[str, int, dict[str, Any]]:
    """fit() with every way a run can end turned into (status, exit code, summary)."""
    cfg, data = prepared.cfg, prepared.data
    previous_signal = signal.signal(signal.SIGTERM, _raise_terminated)
    started = time.perf_counter()
    status, exit_code, summary = STATUS_FAILED, EXIT_FAILED, {}
    try:
        result = fit(cfg, prepared.model, data, tracker, checkpoint_dir, resume=checkpoint, on_eval=on_eval,
                     context=context)
        final = result.final
        summary = {
            "final_miou": final.miou, "best_miou": result.best_miou, "final_pixel_accuracy": final.pixel_accuracy,
            "per_class_iou": dict(zip(data.class_names, final.iou)),
            "absent_classes": [data.class_names[i] for i in final.absent],
            "iterations": result.iterations, "images_per_second": result.images_per_second,
            "train_time_s": result.train_seconds,
        }
        status, exit_code = STATUS_COMPLETE, EXIT_OK
    except NonFiniteLoss as error:
        summary = {"reason": str(error)}
    except datasets.DataError as error:
        summary, exit_code = {"reason": one_line(error)}, EXIT_USAGE
    except (KeyboardInterrupt, Terminated) as error:
        summary = {"reason": f"{one_line(error) if str(error) else 'interrupted'}; continue with --resume"}
    except StopRun as error:  # a sweep driver stopped it (pruning): a legitimate end, not a crash
        status, exit_code, summary = STATUS_PRUNED, EXIT_OK, {"reason": str(error)}
    except Exception as error:
        traceback.print_exc()
        reason = f"{error.__class__.__name__}: {one_line(error)}"
        if context.enabled and isinstance(error, RuntimeError) and any(
                backend in reason.lower() for backend in ("gloo", "nccl")):
            reason += " (another rank of this torchrun job probably failed first: see its output)"
        summary = {"reason": reason}
    finally:
        signal.signal(signal.SIGTERM, previous_signal)
    device = prepared.device
    summary |= {"wall_time_s": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(device),
                "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}
    return status, exit_code, summary


def _follow_main(prepared: Prepared, context: distributed.Context) -> Outcome:
    """A rank other than 0: train when rank 0 trains, from the checkpoint it names; no record."""
    run_dir = RunStore(prepared.cfg.tracking.runs_dir, prepared.cfg).dir
    decision, argument = distributed.broadcast(None, context)
    if decision == "stop":
        return Outcome(argument, EXIT_OK if argument == "skipped" else EXIT_USAGE, {}, run_dir)
    checkpoint = load_checkpoint(Path(argument)) if argument else None
    status, exit_code, summary = _fit(prepared, NullTracker(), run_dir / "checkpoints", checkpoint, None, context)
    return Outcome(status, exit_code, summary, run_dir, summary.get("reason", ""))


def _train_locked(store: RunStore, prepared: Prepared, resume: bool, overwrite: bool, extra_trackers: tuple,
                  on_eval, console: Console, context: distributed.Context) -> Outcome:
    cfg, device = prepared.cfg, prepared.device
    checkpoint = None
    previous = store.previous_summary()
    if previous is not None:
        outcome = None
        if overwrite:
            shutil.rmtree(store.dir)
        elif not resume:
            outcome = Outcome("exists", EXIT_USAGE, previous, store.dir,
                              f"run {store.dir} exists ({previous.get('status')}): pass --resume to continue it "
                              "or --overwrite to start over")
        elif previous.get("status") == STATUS_COMPLETE:
            outcome = Outcome("skipped", EXIT_OK, previous, store.dir, f"run {store.dir} is already complete")
        elif (store.checkpoint_dir / "last.pt").exists():
            checkpoint = load_checkpoint(store.checkpoint_dir / "last.pt")
        if outcome is not None:
            distributed.broadcast(("stop", outcome.status), context)
            return outcome
    distributed.broadcast(("train", str(store.checkpoint_dir / "last.pt") if checkpoint else None), context)
    resume_step = checkpoint["iteration"] if checkpoint else None

    info = environment_info(cfg, device) | {"world_size": context.world_size}
    store.start(info, resume_from_step=resume_step)
    trackers = [store, *extra_trackers]
    try:
        if cfg.tracking.wandb != "disabled":
            sink = WandbSink(cfg, store.dir, resume_id=(previous or {}).get("wandb_id") if checkpoint else None)
            store.update(wandb_id=sink.run_id)
            trackers.append(sink)
    except Exception as error:  # W&B problems must not cost the run: it still has its own record
        console.print(f"[yellow]W&B disabled for this run: {one_line(error)}[/yellow]")
    tracker = FanOut(*trackers)

    if not cfg.tracking.quiet:
        start = f"resuming at iteration {resume_step}" if checkpoint else "starting"
        ranks = f" x {context.world_size} ranks" if context.enabled else ""
        console.print(f"{cfg.cell_name()}: {start}, {cfg.train.iterations} iterations on {info['device']}{ranks}")
    status, exit_code, summary = _fit(prepared, tracker, store.checkpoint_dir, checkpoint, on_eval, context)
    tracker.finish(status, summary)
    message = "" if status == STATUS_COMPLETE else f"run {status}: {summary['reason']} (record: {store.dir})"
    return Outcome(status, exit_code, store.summary, store.dir, message)


def config_from_args(args: argparse.Namespace, preset_dir: Path, environment: dict[str, str]) -> RunConfig:
    """The run config a command line asks for: preset (or grid cell), then flags."""
    preset, cell = args.config or DEFAULT_PRESET, None
    if args.grid or args.cell:
        if not (args.grid and args.cell):
            raise UsageError("--grid and --cell go together")
        if args.config:
            raise UsageError("--config with --grid: the grid names its preset")
        grid = load_grid(args.grid, preset_dir.parent / "grids")
        preset, cell = grid.preset, grid_cell(grid, args.cell)
    return resolve_run_config(preset, explicit_settings(args), preset_dir, environment, cell)


def main(argv: list[str] | None = None, preset_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    prog = parser.prog
    preset_dir = preset_dir or Path("ablations/configs")

    context = distributed.from_environment()

    def usage_error(message: str) -> int:
        if context.is_main:
            print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        cfg = config_from_args(args, preset_dir, dict(os.environ))
        distributed.start(context, distributed.device_for(context, pick_device(cfg.train.device)))
        prepared = prepare(cfg, context)
    except (UsageError, ValueError, datasets.DataError, BackboneWeightsError) as error:
        return usage_error(one_line(error))
    try:
        return _run_and_report(args, prepared, context, console, prog, usage_error)
    finally:
        distributed.stop()


def _run_and_report(args: argparse.Namespace, prepared: Prepared, context: distributed.Context, console: Console,
                    prog: str, usage_error: Callable[[str], int]) -> int:
    cfg = prepared.cfg
    if args.print_config:
        if context.is_main:
            print(dump_yaml(cfg), end="")
        return EXIT_OK
    if args.dry_run:
        parameters = sum(p.numel() for p in prepared.model.parameters())
        console.print(f"{cfg.cell_name()}: {parameters / 1e6:.2f} M parameters, {len(prepared.data.train)} train / "
                      f"{len(prepared.data.val)} val images, {cfg.train.iterations} iterations on {prepared.device}; "
                      f"record: {RunStore(cfg.tracking.runs_dir, cfg).dir}")
        return EXIT_OK

    outcome = run_cell(prepared, resume=args.resume, overwrite=args.overwrite, console=console, context=context)
    if not context.is_main:
        return outcome.exit_code
    if outcome.status in ("exists", "busy"):
        return usage_error(outcome.message)
    if outcome.status == "skipped":
        console.print(outcome.message)
        return EXIT_OK
    if outcome.status != STATUS_COMPLETE:
        print(f"{prog}: {outcome.message}", file=sys.stderr)
        return outcome.exit_code
    if not cfg.tracking.quiet:
        print_summary(console, cfg, outcome.summary, prepared.data.class_names, outcome.run_dir)
    print(f"final val mIoU {outcome.summary['final_miou']:.4f}  record: {outcome.run_dir}")
    return EXIT_OK
