"""Readers that turn logged runs into one tidy DataFrame: one row per run, config fields as
columns (field names are unique across config sections), results, costs and status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RESULT_COLUMNS = ("status", "reason", "final_miou", "best_miou", "final_pixel_accuracy", "wall_time_s",
                  "images_per_second", "peak_memory_mb", "iterations", "device", "cell_hash", "study", "trial")
IOU_PREFIX = "IoU/"


class NoRunsFound(Exception):
    """Nothing to report; the message says where we looked and how to make runs."""


def flatten_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row = {}
    for values in config.values():
        for name, value in values.items():
            row[name] = tuple(value) if isinstance(value, list) else value
    return row


def record_row(config: dict[str, dict[str, Any]], summary: dict[str, Any], run_id: str) -> dict[str, Any]:
    row = {"run_id": run_id, **flatten_config(config)}
    row.update({column: summary.get(column) for column in RESULT_COLUMNS})
    for name, value in (summary.get("per_class_iou") or {}).items():
        row[IOU_PREFIX + name] = value
    return row


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """One run folder as a row, or None when it holds no complete pair of config and summary."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, json.JSONDecodeError, yaml.YAMLError):
        return None  # a record being written, or not a record
    return record_row(config, summary, run_dir.name) | {"run_dir": str(run_dir)}


def _frame(rows: list[dict[str, Any] | None], where: str) -> pd.DataFrame:
    rows = [row for row in rows if row is not None]
    if not rows:
        raise NoRunsFound(f"no runs found in {where}; make some with python ablations/run.py (one cell) or "
                          "python sweeps/optuna_study.py --grid NAME --study NAME (a grid)")
    return pd.DataFrame(rows)


def read_run_store(runs_dir: str | Path) -> pd.DataFrame:
    """Every run folder under runs_dir (folders holding summary.json and config.yaml)."""
    runs_dir = Path(runs_dir)
    return _frame([read_record(path.parent) for path in sorted(runs_dir.glob("*/summary.json"))],
                  f"{runs_dir.resolve()} (looked for */summary.json)")


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame (one row per event)."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def read_wandb(path: str, sweep: str | None = None, api=None) -> pd.DataFrame:
    """Runs of a W&B project (ENTITY/PROJECT), optionally of one sweep: summaries and configs in
    one paged query (no histories: those are down-sampled and slow to pull, SWEEPS.md)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path, per_page=200)
    rows: list[dict[str, Any] | None] = []
    for run in runs:
        config = {key: value for key, value in dict(run.config).items() if isinstance(value, dict)}
        summary = dict(run.summary)
        summary.setdefault("status", "complete" if run.state == "finished" else
                           "running" if run.state == "running" else "failed")
        summary.setdefault("final_miou", summary.get("final/mIoU"))
        summary.setdefault("best_miou", (summary.get("val/mIoU") or {}).get("max")
                           if isinstance(summary.get("val/mIoU"), dict) else summary.get("val/mIoU"))
        if config:
            rows.append(record_row(config, summary, run.id))
    return _frame(rows, f"W&B {path}" + (f" sweep {sweep}" if sweep else ""))


def read_optuna(storage: str, study_name: str) -> pd.DataFrame:
    """The records that an Optuna study's trials wrote (their user attribute run_dir)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    run_dirs = sorted({trial.user_attrs["run_dir"] for trial in study.trials if "run_dir" in trial.user_attrs})
    return _frame([read_record(Path(run_dir)) for run_dir in run_dirs], f"Optuna study {study_name} at {storage}")
