"""Where a run reports: the RunStore (the source of truth that reports read) and W&B.

The engine talks to a Tracker only; FanOut sends every event to several of them.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from danet.config import RunConfig, dump_yaml

# The statuses a record (summary.json) can have; a preempted run stopped at a checkpoint on request
STATUS_RUNNING, STATUS_COMPLETE, STATUS_FAILED, STATUS_PRUNED = "running", "complete", "failed", "pruned"
STATUS_PREEMPTED = "preempted"


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def log_predictions(self, step: int, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                        class_names: tuple[str, ...]) -> None: ...

    def finish(self, status: str, summary: dict[str, Any]) -> None: ...


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers and readers choke on them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def complete_runs(runs_dir: str | Path) -> dict[str, Path]:
    """The run folder of each cell hash that has a complete record under runs_dir (the first by name)."""
    found: dict[str, Path] = {}
    for summary_path in sorted(Path(runs_dir).glob("*/summary.json")):
        summary = read_summary(summary_path.parent)
        if summary and summary.get("status") == STATUS_COMPLETE and summary.get("cell_hash"):
            found.setdefault(summary["cell_hash"], summary_path.parent)
    return found


def find_complete(runs_dir: str | Path, cell_hash: str) -> Path | None:
    """A run folder under runs_dir whose complete record has this cell hash, whatever its name."""
    return complete_runs(runs_dir).get(cell_hash)


class RunLock:
    """An exclusive lock on one run: a POSIX record lock (`fcntl.lockf`) on a lock file.

    A record lock belongs to the process alone: the DataLoader workers forked after it is taken do
    not inherit it, so it is gone the moment its holder dies, even by SIGKILL (an flock would live
    on in the orphaned workers for seconds). It works over NFS. Closing any descriptor of the file
    in the holder drops it, so the file is opened once per process: the set of held paths also
    makes a second request from the same process see the run as held.
    """

    held: ClassVar[set[Path]] = set()

    def __init__(self, path: Path, handle) -> None:
        self.path, self.handle = path, handle

    @classmethod
    def acquire(cls, path: Path) -> RunLock | None:
        """The lock, or None when another process (or this one) holds it."""
        path = path.resolve()
        if path in cls.held:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES, depending on the system
            handle.close()
            return None
        cls.held.add(path)
        return cls(path, handle)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.held.discard(self.path)
        self.handle.close()


def run_lock(run_dir: Path) -> RunLock | None:
    """The lock of the run in run_dir (RUNS_DIR/.locks/<run-id>.lock), or None when another process holds it."""
    return RunLock.acquire(run_dir.parent / ".locks" / f"{run_dir.name}.lock")


def mark_pruned(run_dir: Path, reason: str) -> bool:
    """Record a run that a sweep stopped (SIGTERM: it checkpointed and said preempted) as pruned, with the reason.

    Done under the run's lock, once its process has ended; False when the record is not a preempted one
    (it finished before the signal landed, or another process holds it again).
    """
    lock = run_lock(run_dir)
    if lock is None:
        return False
    with lock:
        summary = read_summary(run_dir)
        if summary is None or summary.get("status") != STATUS_PREEMPTED:
            return False
        summary.update(status=STATUS_PRUNED, reason=reason)
        atomic_write_text(run_dir / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")
    return True


class RunStore:
    """runs/<run-id>/: config.yaml, metrics.jsonl (one JSON object per event), summary.json,
    checkpoints/. summary.json says running, complete or failed (with the reason)."""

    def __init__(self, runs_dir: str | Path, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.dir = Path(runs_dir) / cfg.run_id()
        self.checkpoint_dir = self.dir / "checkpoints"
        self.metrics_path = self.dir / "metrics.jsonl"
        self.summary: dict[str, Any] = {}

    def lock(self) -> RunLock | None:
        """Hold this run for this process, or None when another process holds it."""
        return run_lock(self.dir)

    def previous_summary(self) -> dict[str, Any] | None:
        return read_summary(self.dir)

    def start(self, info: dict[str, Any], resume_from_step: int | None) -> None:
        """Write the config and a 'running' summary. On resume, drop events after the checkpoint."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", dump_yaml(self.cfg))
        if resume_from_step is None:
            atomic_write_text(self.metrics_path, "")
        else:
            self._truncate_after(resume_from_step)
        self.summary = {"status": STATUS_RUNNING, "run_id": self.cfg.run_id(), "name": self.cfg.cell_name(),
                        "cell_hash": self.cfg.cell_hash(), "started_at": time.time(), **info}
        self._write_summary()

    def _truncate_after(self, step: int) -> None:
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short when the process died
                if event.get("step", 0) <= step:
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(json_safe({"step": step, "time": time.time(), **metrics})) + "\n")

    def log_predictions(self, step, samples, class_names) -> None:
        pass  # images belong in W&B; the record keeps numbers only

    def update(self, **values: Any) -> None:
        self.summary.update(values)
        self._write_summary()

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.summary.update(summary, status=status, finished_at=time.time())
        self._write_summary()

    def give_up(self, reason: str) -> bool:
        """Record this run as failed because its launcher gave up on it (a Slurm task requeued too
        often). Its checkpoints stay: `--resume` can still continue it. False, and nothing written,
        when another process holds the run or its record is complete."""
        lock = self.lock()
        if lock is None:
            return False
        with lock:
            previous = self.previous_summary() or {"run_id": self.cfg.run_id(), "name": self.cfg.cell_name(),
                                                   "cell_hash": self.cfg.cell_hash()}
            if previous.get("status") == STATUS_COMPLETE:
                return False
            last = f" (the run's own record said: {previous['reason']})" if previous.get("reason") else ""
            self.summary = previous | {"status": STATUS_FAILED, "reason": reason + last, "finished_at": time.time()}
            self._write_summary()
        return True

    def _write_summary(self) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(json_safe(self.summary), indent=2) + "\n")


class WandbSink:
    """Mirrors the run to W&B. Inside a `wandb agent`, wandb.init joins the agent's run."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume_id: str | None = None) -> None:
        import wandb  # imported here: runs with --wandb disabled never pay for it

        self.wandb = wandb
        tracking = cfg.tracking
        self.run = wandb.init(
            mode=tracking.wandb, project=tracking.wandb_project, entity=tracking.wandb_entity or None,
            name=tracking.run_name or cfg.cell_name(), config=cfg.to_dict(), dir=str(run_dir),
            group=tracking.study or None, id=resume_id, resume="allow" if resume_id else None,
            tags=[cfg.data.dataset, cfg.model.backbone],
        )
        self.run.define_metric("val/mIoU", summary="max")
        self.run.define_metric("final/mIoU", summary="last")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({key: value for key, value in metrics.items() if value is not None}, step=step)

    def log_predictions(self, step, samples, class_names) -> None:
        labels = dict(enumerate(class_names)) | {255: "ignored"}
        images = [self.wandb.Image(image, masks={"prediction": {"mask_data": prediction, "class_labels": labels},
                                                 "ground_truth": {"mask_data": target, "class_labels": labels}})
                  for image, prediction, target in samples]
        self.run.log({"val/predictions": images}, step=step)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        for key in ("best_miou", "final_miou", "images_per_second", "peak_memory_mb", "wall_time_s"):
            if summary.get(key) is not None:
                self.run.summary[key] = summary[key]
        if status == STATUS_PREEMPTED:  # a W&B sweep then hands the run out again instead of counting it done
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == STATUS_COMPLETE else 1)


class NullTracker:
    """Where the ranks other than 0 report under torchrun: nowhere."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_predictions(self, step, samples, class_names) -> None:
        pass

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        pass


class FanOut:
    """Sends every event to each tracker in turn."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = list(trackers)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def log_predictions(self, step, samples, class_names) -> None:
        for tracker in self.trackers:
            tracker.log_predictions(step, samples, class_names)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.finish(status, summary)
