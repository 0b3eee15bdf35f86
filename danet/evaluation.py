"""Evaluation as its own step: a run's checkpoint under another split or test protocol.

The model is rebuilt from the config inside the checkpoint and scored by the same
`engine.evaluate` that training uses, so the run's own final protocol on its val split gives its
`final_miou` again. Each (checkpoint, split, protocol) is evaluated once: the record
RUN_DIR/evaluations/<split>-<protocol>-<hash>.json is written atomically and read back next time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from torch.utils.data import DataLoader

from danet import data as datasets
from danet.config import EvalConfig, RunConfig, UsageError, section_from_dict
from danet.engine import autocast_options, evaluate, load_checkpoint, pick_device
from danet.grids import Evaluation
from danet.models import build
from danet.provenance import library_versions, machine_info
from danet.tracking import atomic_write_text, json_safe, read_summary

CHECKPOINT_NAMES = ("last", "best")


@dataclass(frozen=True)
class EvaluationRequest:
    """Which checkpoint, which split, which protocol (EvalConfig fields that differ from the run's)."""

    checkpoint: str = "last"  # "last", "best" or a path
    split: str = ""  # "": the run's own validation split
    protocol: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_root: str = ""  # "": the run's own
    device: str = "auto"


def checkpoint_file(run_dir: Path, checkpoint: str) -> Path:
    """Where the named checkpoint ("last", "best") of a run is, or the path given."""
    return run_dir / "checkpoints" / f"{checkpoint}.pt" if checkpoint in CHECKPOINT_NAMES else Path(checkpoint)


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    path = checkpoint_file(run_dir, checkpoint)
    if not path.is_file():
        raise UsageError(f"run {run_dir} has no checkpoint {path} (checkpoints are kept beside the record; "
                         "a committed record without them cannot be evaluated again)")
    return path


def resolve(run_dir: Path, request: EvaluationRequest) -> tuple[RunConfig, EvalConfig, str, Path, dict]:
    """The run's config (from its checkpoint), the protocol, the split, the checkpoint path and its state."""
    if not (run_dir / "summary.json").is_file():
        raise UsageError(f"{run_dir} is not a run folder (no summary.json)")
    path = checkpoint_path(run_dir, request.checkpoint)
    try:
        state = load_checkpoint(path)
        cfg = RunConfig.from_dict(state["config"])
    except Exception as error:  # torch.load raises many kinds, with many lines, on a truncated or foreign file
        first = (str(error).strip().splitlines() or [""])[0]
        raise UsageError(f"checkpoint {path} cannot be read ({type(error).__name__}: {first})") from None
    if request.data_root:
        cfg = cfg.replace("data", data_root=request.data_root)
    return cfg, requested_protocol(cfg, request), request.split or cfg.data.val_split, path, state


def requested_protocol(cfg: RunConfig, request: EvaluationRequest) -> EvalConfig:
    """The run's own protocol with the request's changes; a window or stride without slide is an error."""
    settings = dataclasses.asdict(cfg.eval) | request.protocol
    for name in ("eval_window", "eval_stride"):
        if name in request.protocol and settings["eval_mode"] != "slide":
            raise UsageError(f"--{name.replace('_', '-')} needs --eval-mode slide (the run's own mode is "
                             f"{cfg.eval.eval_mode})")
    try:
        return section_from_dict(EvalConfig, settings)
    except ValueError as error:
        raise UsageError(str(error)) from None


def record_path(run_dir: Path, split: str, protocol: EvalConfig, checkpoint: Path, iteration: int) -> Path:
    identity = {"checkpoint": checkpoint.name if checkpoint.parent == run_dir / "checkpoints" else str(checkpoint),
                "iteration": iteration, "split": split, "protocol": dataclasses.asdict(protocol)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:8]
    return run_dir / "evaluations" / f"{split}-{protocol.protocol_name()}-{digest}.json"


def stored_evaluation(run_dir: Path, request: EvaluationRequest) -> tuple[dict[str, Any], Path] | None:
    """The newest evaluation record of the run for this checkpoint name, split and protocol, found
    without the checkpoint (a committed record keeps its evaluations, not its checkpoints)."""
    if request.checkpoint not in CHECKPOINT_NAMES or not (run_dir / "config.yaml").is_file():
        return None
    cfg = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    protocol = requested_protocol(cfg, request)
    split = request.split or cfg.data.val_split
    settings = json.loads(json.dumps(protocol.protocol_settings(), default=list))
    found = []
    for path in (run_dir / "evaluations").glob(f"{split}-{protocol.protocol_name()}-*.json"):
        record = json.loads(path.read_text())
        if (record.get("checkpoint"), record.get("split"), record.get("protocol_settings")) == \
                (request.checkpoint, split, settings):
            found.append((record.get("created_at") or 0.0, str(path), record))
    if not found:
        return None
    _, path, record = max(found, key=lambda item: item[:2])
    return record, Path(path)


def evaluate_run(run_dir: Path, request: EvaluationRequest, overwrite: bool = False) -> tuple[dict[str, Any], Path, bool]:
    """Evaluate a run's checkpoint once: (record, its path, whether it was computed now).

    Raises UsageError (a run without the checkpoint, bad protocol) or datasets.DataError (a missing
    split, a dataset whose classes do not match the checkpoint), each one line naming the thing.
    A run whose checkpoint is gone still gives the record stored when it was there.
    """
    gone = request.checkpoint in CHECKPOINT_NAMES and not checkpoint_file(run_dir, request.checkpoint).is_file()
    stored = stored_evaluation(run_dir, request) if gone and not overwrite else None
    if stored is not None:
        return (*stored, False)
    cfg, protocol, split, path, state = resolve(run_dir, request)
    target = record_path(run_dir, split, protocol, path, state["iteration"])
    if target.is_file() and not overwrite:
        return json.loads(target.read_text()), target, False
    dataset = datasets.build_split(cfg.data, split)
    if dataset.num_classes != cfg.model.num_classes:
        raise datasets.DataError(f"split {split} of {cfg.data.dataset} has {dataset.num_classes} classes, but the "
                                 f"checkpoint {path} was trained for {cfg.model.num_classes}")
    device = pick_device(request.device)
    model = build(cfg.model)
    model.load_state_dict(state["model"])
    model.to(device)
    loader = DataLoader(dataset, batch_size=cfg.eval.eval_batch_size, shuffle=False, num_workers=cfg.data.workers)
    started = time.perf_counter()
    scores, _ = evaluate(model, loader, protocol, cfg.model.num_classes, device, autocast_options(cfg.train, device))
    seconds = time.perf_counter() - started
    summary = read_summary(run_dir) or {}
    record = {
        "run_id": run_dir.name, "cell_hash": summary.get("cell_hash", cfg.cell_hash()), "split": split,
        "protocol": protocol.protocol_name(), "protocol_settings": protocol.protocol_settings(),
        "checkpoint": request.checkpoint, "checkpoint_iteration": state["iteration"], "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy, "per_class_iou": dict(zip(dataset.class_names, scores.iou)),
        "absent_classes": [dataset.class_names[i] for i in scores.absent],
        "images_per_second": len(dataset) / max(seconds, 1e-9), "wall_time_s": seconds, "device": str(device),
        "machine": machine_info(device, cfg.train.deterministic), "libraries": library_versions(),
        "created_at": time.time(),
    }
    atomic_write_text(target, json.dumps(json_safe(record), indent=2, default=list) + "\n")
    return json.loads(target.read_text()), target, True


def run_grid_evaluations(run_dir: Path, grid_cell: str, evaluations: Sequence[Evaluation],
                         say: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[str]]:
    """A grid's evaluations of one named cell on the checkpoint its run just wrote, each protocol
    once, for every launcher (run.py --grid, so W&B agents and Slurm tasks; the Optuna driver): the
    records, and the reasons of those skipped (a reused record whose checkpoint is gone and that
    has no stored evaluation of that protocol)."""
    records, skipped = [], []
    for evaluation in evaluations:
        if not evaluation.applies_to(grid_cell):
            continue
        try:
            record, path, fresh = evaluate_run(run_dir, EvaluationRequest(evaluation.checkpoint, evaluation.split,
                                                                          evaluation.protocol))
        except (UsageError, datasets.DataError) as error:
            say(f"evaluation of {run_dir.name} skipped: {error}")
            skipped.append(str(error))
            continue
        say(f"evaluation {'done' if fresh else 'already there'}: {path} val mIoU {record['miou']:.4f}")
        records.append(record)
    return records, skipped


def log_to_wandb(run_dir: Path, record: dict[str, Any], mode: str) -> str:
    """Add the evaluation to the W&B run it evaluates (resumed by the stored id) under
    eval/<split>/<protocol>/..."""
    import wandb

    summary = read_summary(run_dir) or {}
    run_id = summary.get("wandb_id")
    if not run_id:
        raise UsageError(f"run {run_dir} has no W&B run (summary.json has no wandb_id): it ran with --wandb disabled")
    config = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    run = wandb.init(id=run_id, resume="allow", mode=mode, project=config.tracking.wandb_project,
                     entity=config.tracking.wandb_entity or None, dir=str(run_dir))
    prefix = f"eval/{record['split']}/{record['protocol']}"
    run.summary.update({f"{prefix}/mIoU": record["miou"], f"{prefix}/pixel_accuracy": record["pixel_accuracy"]}
                       | {f"{prefix}/IoU/{name}": value for name, value in record["per_class_iou"].items()
                          if value is not None})
    run.finish()
    return run_id
