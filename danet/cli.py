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
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from danet import data as datasets
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
    batches_per_epoch,
    fit,
    load_checkpoint,
    peak_memory_mb,
    pick_device,
    seed_everything,
)
from danet.models import build
from danet.models.backbone import BackboneWeightsError
from danet.tracking import STATUS_COMPLETE, STATUS_FAILED, FanOut, RunStore, WandbSink

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
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
        epilog="Records go to RUNS_DIR/<run-id>/ (config.yaml, metrics.jsonl, summary.json, checkpoints/); "
               "python reports/make_tables.py turns them into tables.")
    parser.add_argument("--config", default="demo", metavar="PRESET",
                        help="preset name from ablations/configs/ or a YAML file (default: demo, CPU + synthetic data)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--dry-run", action="store_true", help="build data and model, print what would run, exit")
    parser.add_argument("--resume", action="store_true",
                        help="continue this run (same config) from its last checkpoint; a complete run is left as is")
    parser.add_argument("--overwrite", action="store_true", help="delete this run's earlier record and start over")
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


def main(argv: list[str] | None = None, preset_dir: Path | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    prog = parser.prog

    def usage_error(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        cfg = resolve_run_config(args.config, explicit_settings(args), preset_dir or Path("ablations/configs"),
                                 dict(os.environ))
        data = datasets.build(cfg.data)
        cfg = resolve_for_dataset(cfg, data.num_classes, batches_per_epoch(len(data.train), cfg.data.batch_size))
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return EXIT_OK
        device = pick_device(cfg.train.device)
        seed_everything(cfg.train.seed)  # the initial weights depend on the seed only
        model = build(cfg.model)
    except (UsageError, ValueError, datasets.DataError, BackboneWeightsError) as error:
        return usage_error(one_line(error))

    store = RunStore(cfg.tracking.runs_dir, cfg)
    if args.dry_run:
        parameters = sum(p.numel() for p in model.parameters())
        console.print(f"{cfg.cell_name()}: {parameters / 1e6:.2f} M parameters, {len(data.train)} train / "
                      f"{len(data.val)} val images, {cfg.train.iterations} iterations on {device}; record: {store.dir}")
        return EXIT_OK

    checkpoint = None
    previous = store.previous_summary()
    if previous is not None:
        if args.overwrite:
            shutil.rmtree(store.dir)
        elif not args.resume:
            return usage_error(f"run {store.dir} exists ({previous.get('status')}): pass --resume to continue it "
                               "or --overwrite to start over")
        elif previous.get("status") == STATUS_COMPLETE:
            console.print(f"run {store.dir} is already complete (final val mIoU {previous.get('final_miou')})")
            return EXIT_OK
        elif (store.checkpoint_dir / "last.pt").exists():
            checkpoint = load_checkpoint(store.checkpoint_dir / "last.pt")
    resume_step = checkpoint["iteration"] if checkpoint else None

    info = environment_info(cfg, device)
    store.start(info, resume_from_step=resume_step)
    trackers = [store]
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
        console.print(f"{cfg.cell_name()}: {start}, {cfg.train.iterations} iterations on {info['device']}")
    previous_signal = signal.signal(signal.SIGTERM, _raise_terminated)
    started = time.perf_counter()
    status, exit_code, summary = STATUS_FAILED, EXIT_FAILED, {}
    try:
        result = fit(cfg, model, data, tracker, store.checkpoint_dir, resume=checkpoint)
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
    except Exception as error:
        traceback.print_exc()
        summary = {"reason": f"{error.__class__.__name__}: {one_line(error)}"}
    finally:
        signal.signal(signal.SIGTERM, previous_signal)
        summary |= {"wall_time_s": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(device),
                    "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}
        tracker.finish(status, summary)

    if status != STATUS_COMPLETE:
        print(f"{prog}: run failed: {summary['reason']} (record: {store.dir})", file=sys.stderr)
        return exit_code
    if not cfg.tracking.quiet:
        print_summary(console, cfg, store.summary, data.class_names, store.dir)
    print(f"final val mIoU {summary['final_miou']:.4f}  record: {store.dir}")
    return EXIT_OK
