"""Readers that turn logged runs into one tidy DataFrame: one row per run, config fields as
columns (field names are unique across config sections), results, costs and status.

A run folder that cannot be read (no config.yaml, an unreadable summary.json) is not skipped: it
becomes a row with status "unreadable" and the reason, so that the reports list it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from danet.config import IN_CELL_UNLESS_DEFAULT, PROTOCOL_FIELDS, RunConfig, defaults_by_cell_rule

RESULT_COLUMNS = ("status", "reason", "final_miou", "best_miou", "final_pixel_accuracy", "wall_time_s",
                  "images_per_second", "peak_memory_mb", "iterations", "device", "cell_hash", "study", "trial",
                  "finished_at")
IOU_PREFIX = "IoU/"
UNREADABLE = "unreadable"
# Config fields added after records were committed (in the cell unless at their default): a record
# without one ran with its default. A missing or empty design is not a default: records made before
# grids declared one, or runs launched outside any grid.
FIELD_DEFAULTS = {**defaults_by_cell_rule(IN_CELL_UNLESS_DEFAULT), "grid": "", "grid_cell": "", "design": "not recorded"}
MACHINE_NOT_RECORDED = "machine not recorded"


class NoRunsFound(Exception):
    """Nothing to report; the message says where we looked and how to make runs."""


def flatten_config(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row = dict(FIELD_DEFAULTS)
    for values in config.values():
        for name, value in values.items():
            row[name] = tuple(value) if isinstance(value, list) else value
    row["design"] = row["design"] or FIELD_DEFAULTS["design"]  # "": a run launched outside any grid
    return row


def machine_label(summary: dict[str, Any]) -> tuple[str, str]:
    """(kind, label) of the machine a run used: on CUDA the GPU name and compute capability, else
    the CPU model with its vector capability and a digest of its flags (a virtual machine may name
    only the vendor, as "AMD EPYC", for CPUs whose kernels differ)."""
    machine = summary.get("machine")
    if not isinstance(machine, dict):
        return MACHINE_NOT_RECORDED, MACHINE_NOT_RECORDED
    kind = str(machine.get("kind") or "")
    if kind == "cuda":
        name, details = machine.get("gpu_name"), [f"compute capability {machine['compute_capability']}"
                                                   if machine.get("compute_capability") else ""]
    else:
        flags = machine.get("cpu_flags")
        name = machine.get("cpu_model")
        details = [machine.get("cpu_capability") or "",
                   f"CPU flags {hashlib.sha256(flags.encode()).hexdigest()[:6]}" if flags else ""]
    label = str(name or f"{kind or 'unknown'} (model not recorded)")
    details = [detail for detail in details if detail]
    return kind or MACHINE_NOT_RECORDED, f"{label} ({', '.join(details)})" if details else label


def record_row(config: dict[str, dict[str, Any]], summary: dict[str, Any], run_id: str) -> dict[str, Any]:
    row = {"run_id": run_id, **flatten_config(config)}
    row.update({column: summary.get(column) for column in RESULT_COLUMNS})
    row["machine_kind"], row["machine"] = machine_label(summary)
    for name, value in (summary.get("per_class_iou") or {}).items():
        row[IOU_PREFIX + name] = value
    return row


def _unreadable(run_dir: Path, reason: str) -> dict[str, Any]:
    return {"run_id": run_dir.name, "status": UNREADABLE, "reason": reason, "run_dir": str(run_dir)}


def read_record(run_dir: Path) -> dict[str, Any]:
    """One run folder as a row. The run store writes atomically, so a folder without a readable
    config.yaml and summary.json is corrupt, not being written: it becomes an "unreadable" row."""
    parts = {}
    for name, parse in (("config.yaml", yaml.safe_load), ("summary.json", json.loads)):
        path = run_dir / name
        if not path.is_file():
            return _unreadable(run_dir, f"no {name}")
        try:
            parts[name] = parse(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
            return _unreadable(run_dir, f"{name} unreadable ({type(error).__name__}: {str(error).splitlines()[0]})")
        if not isinstance(parts[name], dict):
            return _unreadable(run_dir, f"{name} unreadable (not a mapping)")
    return record_row(parts["config.yaml"], parts["summary.json"], run_dir.name) | {"run_dir": str(run_dir)}


def _frame(rows: list[dict[str, Any]], where: str) -> pd.DataFrame:
    if not rows:
        raise NoRunsFound(f"no runs found in {where}; make some with python ablations/run.py (one cell) or "
                          "python sweeps/optuna_study.py --grid NAME --study NAME (a grid)")
    return pd.DataFrame(rows)


def read_run_store(runs_dir: str | Path) -> pd.DataFrame:
    """Every run folder under runs_dir (its subfolders, except hidden ones such as .locks)."""
    runs_dir = Path(runs_dir)
    folders = sorted(path for path in runs_dir.iterdir() if path.is_dir() and not path.name.startswith(".")) \
        if runs_dir.is_dir() else []
    return _frame([read_record(path) for path in folders], f"{runs_dir.resolve()} (looked for run folders)")


def read_evaluations(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The evaluation records (RUN_DIR/evaluations/*.json) of local runs, one row each, and a
    warning line for each file that cannot be read."""
    rows, warnings = [], []
    for run_dir in runs.get("run_dir", pd.Series(dtype=object)).dropna():
        for path in sorted(Path(run_dir, "evaluations").glob("*.json")):
            try:
                record = json.loads(path.read_text())
                row = {"run_dir": str(run_dir), "evaluation": f"{Path(run_dir).name}/evaluations/{path.name}",
                       "split": record["split"], "protocol": record["protocol"],
                       "protocol_settings": record.get("protocol_settings") or {},
                       "checkpoint": str(record.get("checkpoint")), "created_at": record.get("created_at"),
                       "miou": record.get("miou"), "pixel_accuracy": record.get("pixel_accuracy"),
                       "per_class_iou": record.get("per_class_iou") or {}}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
                warnings.append(f"evaluation record {path} unreadable ({type(error).__name__}: {error})")
                continue
            rows.append(row)
    return pd.DataFrame(rows), warnings


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """metrics.jsonl of one run as a DataFrame (one row per event)."""
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines if line.strip()])


def _cell_hash(config: dict[str, dict[str, Any]]) -> str | None:
    try:
        return RunConfig.from_dict(config).cell_hash()
    except (TypeError, ValueError, KeyError):  # a config this version cannot read: no hash, no duplicate check
        return None


def read_wandb(path: str, sweep: str | None = None, api=None) -> pd.DataFrame:
    """Runs of a W&B project (ENTITY/PROJECT), optionally of one sweep: summaries and configs in
    one paged query (Api.runs pages by per_page). No histories: Run.history() returns a sampled
    subset of the logged steps (500 by default) and Run.scan_history() pages through every step,
    one request per run (W&B docs, "Export data" and the public API reference of wandb.apis.public)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs = api.sweep(f"{path}/{sweep}").runs if sweep else api.runs(path, per_page=200)
    rows: list[dict[str, Any]] = []
    for run in runs:
        config = {key: value for key, value in dict(run.config).items() if isinstance(value, dict)}
        summary = dict(run.summary)
        summary.setdefault("status", "complete" if run.state == "finished" else
                           "running" if run.state == "running" else "failed")
        summary.setdefault("final_miou", summary.get("final/mIoU"))
        summary.setdefault("best_miou", (summary.get("val/mIoU") or {}).get("max")
                           if isinstance(summary.get("val/mIoU"), dict) else summary.get("val/mIoU"))
        summary.setdefault("cell_hash", _cell_hash(config))  # so that re-runs of a cell are seen as duplicates
        summary.setdefault("finished_at", getattr(run, "heartbeat_at", None))
        if config:
            rows.append(record_row(config, summary, run.id))
    return _frame(rows, f"W&B {path}" + (f" sweep {sweep}" if sweep else ""))


def read_optuna(storage: str, study_name: str) -> pd.DataFrame:
    """The records that an Optuna study's trials wrote (their user attribute run_dir)."""
    import optuna

    from danet.launch.storages import open_storage

    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:  # optuna's way of saying the study is not there
        raise NoRunsFound(f"no study {study_name} in {storage}") from None
    run_dirs = sorted({trial.user_attrs["run_dir"] for trial in study.trials if "run_dir" in trial.user_attrs})
    return _frame([read_record(Path(run_dir)) for run_dir in run_dirs], f"Optuna study {study_name} at {storage}")


OWN_PROTOCOL = "each run's own final protocol"
VAL_SPLIT = "each run's val split"


def _own_protocol(run: pd.Series) -> dict[str, Any]:
    """The run's final-evaluation settings, as an evaluation record's protocol_settings."""
    return _normalised({name: run.get(name) for name in PROTOCOL_FIELDS})


def _settings(evaluation: pd.Series) -> dict[str, Any]:
    return _normalised({name: evaluation["protocol_settings"].get(name) for name in PROTOCOL_FIELDS})


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """Protocol settings comparable whether read from a run row or from an evaluation record's JSON."""
    return settings | {"eval_scales": tuple(float(scale) for scale in settings["eval_scales"] or ()),
                       "eval_flip": bool(settings["eval_flip"])}


def _evaluations_of(run: pd.Series, evaluations: pd.DataFrame, split: str) -> pd.DataFrame:
    if evaluations.empty:
        return evaluations
    return evaluations[(evaluations["run_dir"] == run.get("run_dir")) & (evaluations["split"] == split)]


def _scored_by(run: pd.Series, evaluation: pd.Series) -> pd.Series:
    """The run's row with mIoU, pixel accuracy and per-class IoU taken from one evaluation record."""
    row = run.copy()
    row[[column for column in row.index if column.startswith(IOU_PREFIX)]] = float("nan")
    for name, value in evaluation["per_class_iou"].items():
        row[IOU_PREFIX + name] = value
    row["final_miou"], row["final_pixel_accuracy"] = evaluation["miou"], evaluation["pixel_accuracy"]
    row["score_source"] = evaluation["evaluation"]
    return row


def _frame_of(rows: list[pd.Series], like: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(rows).infer_objects() if rows else like.iloc[0:0]


def with_evaluation_numbers(runs: pd.DataFrame, evaluations: pd.DataFrame, split: str | None,
                            protocol: str | None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The complete runs with final_miou, final_pixel_accuracy and the per-class IoUs taken from
    their evaluation record of `split` (default: the run's val split) and `protocol` (default: the
    run's own final protocol), the last checkpoint preferred; the complete runs without such a
    record (run_id, status, reason); and a label of the numbers for the table."""
    complete = runs[runs["status"] == "complete"]
    scored, missing, protocols = [], [], set()
    for _, run in complete.iterrows():
        run_split = split or run.get("val_split")
        candidates = _evaluations_of(run, evaluations, run_split)
        if protocol:
            candidates = candidates[candidates["protocol"] == protocol]
        elif not candidates.empty:
            candidates = candidates[[_settings(row) == _own_protocol(run) for _, row in candidates.iterrows()]]
        if candidates.empty:
            missing.append({"run_id": run["run_id"], "status": "complete",
                            "reason": f"no evaluation record for split {run_split}, protocol "
                                      f"{protocol or OWN_PROTOCOL}: left out of every statistic"})
            continue
        last = candidates[candidates["checkpoint"] == "last"]
        evaluation = (last if not last.empty else candidates).sort_values("created_at").iloc[-1]
        protocols.add(evaluation["protocol"])
        scored.append(_scored_by(run, evaluation))
    label = (f"evaluation records on {f'split {split}' if split else VAL_SPLIT}, protocol "
             f"{protocol or OWN_PROTOCOL + ' (' + ', '.join(sorted(protocols)) + ')'}, last checkpoint where evaluated")
    return _frame_of(scored, complete), pd.DataFrame(missing, columns=["run_id", "status", "reason"]), label


TRAINING_COST_COLUMNS = ("wall_time_s", "images_per_second", "peak_memory_mb")


def multi_scale_rows(runs: pd.DataFrame, evaluations: pd.DataFrame) -> pd.DataFrame:
    """Table 2's MS row from evaluation records, not from training: for each run, the latest
    evaluation of its last checkpoint on its own val split under each protocol with several scales
    or flip (other than the run's own) becomes a row of its own: the run's settings with that
    protocol's, the evaluation's numbers, run_id RUN@PROTOCOL. The cost columns are left empty:
    they measured the training, not this evaluation."""
    if evaluations.empty:
        return runs.iloc[0:0]
    rows = []
    for _, run in runs.iterrows():
        mine = _evaluations_of(run, evaluations, run.get("val_split"))
        mine = mine[mine["checkpoint"] == "last"]
        for _, evaluation in mine.sort_values("created_at").groupby("protocol").tail(1).iterrows():
            settings = _settings(evaluation)
            if settings == _own_protocol(run) or (len(settings["eval_scales"]) <= 1 and not settings["eval_flip"]):
                continue
            row = _scored_by(run, evaluation)
            for key, value in settings.items():
                row[key] = value
            row["run_id"] = f"{run['run_id']}@{evaluation['protocol']}"
            for column in TRAINING_COST_COLUMNS:
                row[column] = float("nan")
            rows.append(row)
    return _frame_of(rows, runs)
