"""One cell, exactly once: the run lifecycle that every launcher calls.

`prepare` builds the data and the model for a config; `run_cell` trains and evaluates it with its
record: it skips a cell whose complete record exists, continues a partial one from its checkpoint,
holds the run's lock so that two processes never train the same cell, mirrors the run to W&B,
turns SIGTERM and SIGUSR1 into a checkpointed, resumable stop (status preempted), and under
torchrun lets rank 0 decide for all ranks. `ablations/run.py`, the Optuna driver and any other launcher end here.
"""

from __future__ import annotations

import shutil
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console

from danet import data as datasets
from danet import distributed
from danet.config import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, RunConfig, UsageError, resolve_for_dataset
from danet.console import stderr_console
from danet.engine import (
    STOP_REQUEST,
    NonFiniteLoss,
    Preempted,
    StopRun,
    fit,
    load_checkpoint,
    peak_memory_mb,
    pick_device,
    request_stop,
    seed_everything,
)
from danet.models import DANet, build
from danet.provenance import run_info, use_deterministic_algorithms
from danet.tracking import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_PREEMPTED,
    STATUS_PRUNED,
    FanOut,
    NullTracker,
    RunStore,
    Tracker,
    WandbSink,
    find_complete,
    read_summary,
)

# Outcomes of run_cell that train nothing (the record statuses are in danet.tracking):
SKIPPED = "skipped"  # a complete record of this config exists
BUSY = "busy"  # another process holds the run's lock
EXISTS = "exists"  # a record exists and neither resume nor overwrite was asked for


# What asks a run to stop: SIGTERM (a W&B agent, a scheduler's preemption or requeue) and SIGUSR1
# (Slurm's warning before a time limit, `--signal`). Either way the run checkpoints at the next
# step boundary and is recorded as preempted: resumable, not failed.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def stop_requests() -> Iterator[None]:
    """While a run trains and until its record is written, SIGTERM and SIGUSR1 ask it to stop at its next step
    (STOP_REQUEST) instead of ending the process: a signal that arrives while a failed run records why (torchrun
    stops the other ranks the moment one dies) must not leave the record saying running."""
    STOP_REQUEST.clear()
    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def one_line(error: BaseException) -> str:
    """The message of an error, on one line; from a DataLoader worker, the original message only."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return error.__class__.__name__
    last = lines[-1]
    for prefix in ("danet.data.base.DataError: ", "DataError: "):
        last = last.removeprefix(prefix)
    return last


@dataclass
class Outcome:
    """What became of a run: a record status (complete, failed, pruned, preempted) or SKIPPED, BUSY, EXISTS,
    with the exit status the command line should give."""

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
    cfg = resolve_for_dataset(cfg, data.num_classes, len(data.train), context.world_size)
    device = distributed.device_for(context, pick_device(cfg.train.device))
    if context.enabled and cfg.train.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm); pass --no-sync-bn for torchrun on the CPU")
    use_deterministic_algorithms(cfg.train.deterministic)
    seed_everything(cfg.train.drawn_seed)  # the initial weights depend on the seed only
    return Prepared(cfg, data, build(cfg.model), device)


def run_cell(prepared: Prepared, *, resume: bool, overwrite: bool = False, extra_trackers: tuple[Tracker, ...] = (),
             on_eval: Callable[[int, float], None] | None = None, console: Console | None = None,
             context: distributed.Context = distributed.SINGLE) -> Outcome:
    """Train and evaluate one cell with its record, exactly once per resolved config.

    With `resume`, a complete record of the same config anywhere under the runs folder means
    nothing to do, and a partial one is continued from its last checkpoint. A run folder is held
    by one process at a time (a lock), so two workers given the same cell cannot both train it.
    Under torchrun, rank 0 decides all this and keeps the record; the other ranks follow it.
    """
    if not context.is_main:
        return _follow_main(prepared, context)
    cfg = prepared.cfg
    if resume and (done := find_complete(cfg.tracking.runs_dir, cfg.cell_hash())) is not None:
        return _stop_all(context, Outcome(SKIPPED, EXIT_OK, read_summary(done) or {}, done,
                                          f"run {done} is already complete (same config)"))
    store = RunStore(cfg.tracking.runs_dir, cfg)
    lock = store.lock()
    if lock is None:
        return _stop_all(context, Outcome(BUSY, EXIT_USAGE, {}, store.dir,
                                          f"run {store.dir} is being trained by another process"))
    with lock:
        previous = store.previous_summary()
        checkpoint = None
        if previous is not None:
            if overwrite:
                shutil.rmtree(store.dir)
                previous = None
            elif not resume:
                return _stop_all(context, Outcome(
                    EXISTS, EXIT_USAGE, previous, store.dir, f"run {store.dir} exists ({previous.get('status')}): "
                    "pass --resume to continue it or --overwrite to start over"))
            elif previous.get("status") == STATUS_COMPLETE:
                return _stop_all(context, Outcome(SKIPPED, EXIT_OK, previous, store.dir,
                                                  f"run {store.dir} is already complete"))
            elif (store.checkpoint_dir / "last.pt").exists():
                checkpoint = load_checkpoint(store.checkpoint_dir / "last.pt")
        distributed.broadcast(("train", str(store.checkpoint_dir / "last.pt") if checkpoint else None), context)
        wandb_id = (previous or {}).get("wandb_id") if checkpoint else None
        return _train(store, prepared, checkpoint, wandb_id, extra_trackers, on_eval, console or stderr_console(),
                      context, _earlier_segments(previous) if checkpoint else {})


def _earlier_segments(previous: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run's earlier segments cost: their count and the wall time they recorded (a
    segment killed without a word, SIGKILL, leaves none; its time is not in the sum)."""
    earlier = previous.get("wall_time_s", previous.get("earlier_wall_time_s", 0.0))
    return {"segments": previous.get("segments", 1) + 1, "earlier_wall_time_s": earlier}


def _stop_all(context: distributed.Context, outcome: Outcome) -> Outcome:
    """Tell the other ranks that nothing is trained, and why."""
    distributed.broadcast(("stop", outcome.status), context)
    return outcome


def _follow_main(prepared: Prepared, context: distributed.Context) -> Outcome:
    """A rank other than 0: train when rank 0 trains, from the checkpoint it names; no record."""
    run_dir = RunStore(prepared.cfg.tracking.runs_dir, prepared.cfg).dir
    decision, argument = distributed.broadcast(None, context)
    if decision == "stop":
        return Outcome(argument, EXIT_OK if argument == SKIPPED else EXIT_USAGE, {}, run_dir)
    checkpoint = load_checkpoint(Path(argument)) if argument else None
    with stop_requests():
        status, exit_code, summary = _fit(prepared, NullTracker(), run_dir / "checkpoints", checkpoint, None, context)
    return Outcome(status, exit_code, summary, run_dir, summary.get("reason", ""))


def _train(store: RunStore, prepared: Prepared, checkpoint: dict | None, wandb_id: str | None,
           extra_trackers: tuple[Tracker, ...], on_eval, console: Console, context: distributed.Context,
           earlier: dict[str, Any]) -> Outcome:
    """Rank 0 with the lock: start the record and the trackers, train, finish the record. A
    resumed run's wall_time_s is the sum over its segments (`earlier`: those before this one)."""
    cfg = prepared.cfg
    resume_step = checkpoint["iteration"] if checkpoint else None
    info = run_info(cfg, prepared.device, context.world_size)
    store.start(info | earlier, resume_from_step=resume_step)
    trackers: list[Tracker] = [store, *extra_trackers]
    if cfg.tracking.wandb != "disabled":
        try:
            sink = WandbSink(cfg, store.dir, resume_id=wandb_id)
            store.update(wandb_id=sink.run_id)
            trackers.append(sink)
        except Exception as error:  # W&B problems must not cost the run: it still has its own record
            console.print(f"[yellow]W&B disabled for this run: {one_line(error)}[/yellow]")
    tracker = FanOut(*trackers)
    if not cfg.tracking.quiet:
        start = f"resuming at iteration {resume_step}" if checkpoint else "starting"
        ranks = f" x {context.world_size} ranks" if context.enabled else ""
        console.print(f"{cfg.cell_name()}: {start}, {cfg.train.iterations} iterations on {info['device']}{ranks}")
    with stop_requests():
        status, exit_code, summary = _fit(prepared, tracker, store.checkpoint_dir, checkpoint, on_eval, context)
        summary["wall_time_s"] += earlier.get("earlier_wall_time_s", 0.0)
        tracker.finish(status, summary)
    message = "" if status == STATUS_COMPLETE else f"run {status}: {summary['reason']} (record: {store.dir})"
    return Outcome(status, exit_code, store.summary, store.dir, message)


def _fit(prepared: Prepared, tracker: Tracker, checkpoint_dir: Path, checkpoint: dict | None, on_eval,
         context: distributed.Context) -> tuple[str, int, dict[str, Any]]:
    """fit() with every way a run can end turned into (status, exit code, summary)."""
    cfg, data = prepared.cfg, prepared.data
    started = time.perf_counter()
    status, exit_code, summary = STATUS_FAILED, EXIT_FAILED, {}
    try:
        result = fit(cfg, prepared.model, data, tracker, checkpoint_dir, from_checkpoint=checkpoint, on_eval=on_eval,
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
    except Preempted as error:
        status, exit_code, summary = STATUS_PREEMPTED, EXIT_PREEMPTED, {"reason": str(error)}
    except KeyboardInterrupt:
        summary = {"reason": "interrupted; continue with --resume"}
    except StopRun as error:  # a sweep driver stopped it (pruning): a legitimate end, not a crash
        status, exit_code, summary = STATUS_PRUNED, EXIT_OK, {"reason": str(error)}
    except Exception as error:
        traceback.print_exc()
        reason = f"{error.__class__.__name__}: {one_line(error)}"
        if context.enabled and isinstance(error, RuntimeError) and any(
                backend in reason.lower() for backend in ("gloo", "nccl")):
            reason += " (another rank of this torchrun job probably failed first: see its output)"
        summary = {"reason": reason}
    device = prepared.device
    summary |= {"wall_time_s": time.perf_counter() - started, "peak_memory_mb": peak_memory_mb(device),
                "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS"}
    return status, exit_code, summary
