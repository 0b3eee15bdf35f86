"""End-to-end runs of ablations/run.py on tiny data: records, resume, failures, W&B offline."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from danet.config import RunConfig
from tests.conftest import REPO, only_run_dir, run_cli, summary_of, tiny_flags, wait_for_checkpoint, write_png


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_synthetic_run_writes_a_complete_record(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--no-cam")) == 0
    run_dir = only_run_dir(runs)
    assert run_dir.name.startswith("danet_r18-d8_pam_synthetic_s0-")
    summary = summary_of(runs)
    assert summary["status"] == "complete"
    assert 0.0 <= summary["final_miou"] <= 1.0 and summary["iterations"] == 4
    assert set(summary["per_class_iou"]) == {"background", "bright, red key", "dark, red key", "bright, blue key",
                                             "dark, blue key"}
    for key in ("wall_time_s", "images_per_second", "peak_memory_mb", "device", "git_revision", "libraries", "seed"):
        assert key in summary
    assert summary["libraries"]["torch"]
    config = RunConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert config.model.cam is False and config.model.num_classes == 5
    assert summary["cell_hash"] == config.cell_hash()

    events = _events(run_dir)
    train_events = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train_events] == [1, 2, 3, 4]
    assert {"train/loss_out", "train/loss_pam", "train/lr", "train/images_per_s"} <= set(train_events[0])
    assert "train/loss_cam" not in train_events[0]
    evals = [e for e in events if "val/mIoU" in e]
    assert [e["step"] for e in evals] == [2, 4] and "gamma/pam" in evals[0] and "gamma/cam" not in evals[0]
    assert "final/mIoU" in evals[-1]
    assert (run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "checkpoints" / "best.pt").exists()
    assert f"record: {run_dir}" in capsys.readouterr().out


def test_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs)) == 0
    assert run_cli(tiny_flags(runs)) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert run_cli(tiny_flags(runs, "--resume")) == 0  # complete: nothing to do
    assert "already complete" in capsys.readouterr().err
    assert run_cli(tiny_flags(runs, "--overwrite")) == 0


@pytest.mark.slow
def test_camvid_and_cityscapes_layouts_train_end_to_end(tmp_path, camvid_tree, cityscapes_tree):
    for dataset, root, classes in (("camvid", camvid_tree, 11), ("cityscapes", cityscapes_tree, 19)):
        runs = tmp_path / f"runs_{dataset}"
        flags = tiny_flags(runs, "--dataset", dataset, "--data-root", str(root), "--eval-mode", "slide",
                           "--eval-window", "32", "--eval-stride", "24", "--eval-scales", "0.75,1.0", "--eval-flip",
                           "--eval-batch-size", "1")
        assert run_cli(flags) == 0
        summary = summary_of(runs)
        assert summary["status"] == "complete" and len(summary["per_class_iou"]) == classes


def test_num_classes_contradicting_the_dataset_is_a_usage_error(tmp_path, camvid_tree, capsys):
    flags = tiny_flags(tmp_path / "runs", "--dataset", "camvid", "--data-root", str(camvid_tree), "--num-classes", "19")
    assert run_cli(flags) == 2
    assert "--num-classes 19 contradicts dataset camvid, which has 11 classes" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing_root", "missing_label", "bad_value", "corrupt", "truncated"])
def test_bad_data_exits_2_naming_the_file_and_nothing_is_complete(tmp_path, camvid_tree, capsys, problem):
    root = camvid_tree
    if problem == "missing_root":
        root, culprit = tmp_path / "absent", str(tmp_path / "absent")
    elif problem == "missing_label":
        (root / "trainannot" / "train_003.png").unlink()
        culprit = "train_003.png"
    elif problem == "bad_value":  # met only when the DataLoader worker loads it, mid-training
        write_png(root / "trainannot" / "train_003.png", np.full((48, 64), 77, dtype=np.uint8))
        culprit = "train_003.png has values [77]"
    else:
        path = root / "train" / "train_003.png"
        data = path.read_bytes()
        path.write_bytes(b"\x89PNG garbage" if problem == "corrupt" else data[: len(data) // 3])
        culprit = "cannot read image"
    runs = tmp_path / "runs"
    flags = tiny_flags(runs, "--dataset", "camvid", "--data-root", str(root), "--workers", "1", "--iterations", "6")
    assert run_cli(flags) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert culprit in error[-1] and "Traceback" not in "\n".join(error)
    if runs.exists() and any(runs.iterdir()):
        summary = summary_of(runs)
        assert summary["status"] == "failed" and culprit in summary["reason"]


def test_non_finite_loss_exits_1_and_records_the_iteration(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--lr", "1e30", "--iterations", "20")) == 1
    summary = summary_of(runs)
    assert summary["status"] == "failed"
    assert summary["reason"].startswith("non-finite loss at iteration ")
    assert "non-finite loss" in capsys.readouterr().err


def _subprocess_run(flags, **kwargs):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / "ablations" / "run.py"), *flags], cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_sigkilled_run_resumes_at_once_to_exactly_the_same_metrics(tmp_path):
    # DataLoader workers (forked after the run takes its lock) outlive a SIGKILLed parent for a few
    # seconds: the lock must not live on in them, so --resume right away (no sleep) must train.
    settings = ("--iterations", "60", "--checkpoint-every", "5", "--eval-every", "20", "--synthetic-train-images", "12",
                "--workers", "2")
    reference_runs, killed_runs = tmp_path / "reference", tmp_path / "killed"
    assert run_cli(tiny_flags(reference_runs, *settings)) == 0

    process = _subprocess_run(tiny_flags(killed_runs, *settings))
    assert wait_for_checkpoint(killed_runs, process), process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert summary_of(killed_runs)["status"] == "running"  # died mid-run, without a word

    assert run_cli(tiny_flags(killed_runs, *settings, "--resume")) == 0
    reference, resumed = summary_of(reference_runs), summary_of(killed_runs)
    assert resumed["status"] == "complete"
    assert resumed["segments"] == 2 and resumed["earlier_wall_time_s"] == 0.0  # the killed segment left no time
    assert resumed["final_miou"] == reference["final_miou"]
    assert resumed["per_class_iou"] == reference["per_class_iou"]

    def comparable(events):
        return [{k: v for k, v in e.items() if k not in ("time", "train/images_per_s")} for e in events]

    assert comparable(_events(only_run_dir(killed_runs))) == comparable(_events(only_run_dir(reference_runs)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_checkpoints_records_preempted_and_resumes_exactly(tmp_path, signum):
    settings = ("--iterations", "60", "--checkpoint-every", "1000", "--eval-every", "0", "--synthetic-train-images",
                "12")
    reference_runs, runs = tmp_path / "reference", tmp_path / "runs"
    assert run_cli(tiny_flags(reference_runs, *settings)) == 0
    process = _subprocess_run(tiny_flags(runs, *settings, "--log-every", "1"))
    deadline = time.time() + 120
    while time.time() < deadline and not any(path.stat().st_size for path in runs.glob("*/metrics.jsonl")):
        time.sleep(0.02)  # until the first logged step
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 3, stderr
    summary = summary_of(runs)
    assert summary["status"] == "preempted" and "continue with --resume" in summary["reason"]
    stopped_at = int(summary["reason"].split("at iteration ")[1].split()[0])
    assert 0 < stopped_at < 60  # a checkpoint between the periodic ones (there are none here)
    assert torch.load(only_run_dir(runs) / "checkpoints" / "last.pt", weights_only=True)["iteration"] == stopped_at
    assert run_cli(tiny_flags(runs, *settings, "--resume")) == 0
    resumed = summary_of(runs)
    assert resumed["final_miou"] == summary_of(reference_runs)["final_miou"]
    # the record's cost is the whole run's: both segments' wall time
    assert resumed["segments"] == 2 and resumed["earlier_wall_time_s"] == summary["wall_time_s"]
    assert resumed["wall_time_s"] > summary["wall_time_s"]


def test_wandb_offline_writes_its_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--wandb", "offline")) == 0
    run_dir = only_run_dir(runs)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert summary_of(runs)["wandb_id"] in offline[0].name


@pytest.mark.slow
def test_each_validation_says_one_line_and_output_without_a_terminal_is_not_wrapped(tmp_path):
    runs = tmp_path / ("a-folder-name-long-enough-that-rich-would-have-wrapped-the-record-path-at-eighty-columns" * 2)
    quiet = _subprocess_run(tiny_flags(runs / "quiet"))
    _, stderr = quiet.communicate(timeout=300)
    assert quiet.returncode == 0, stderr
    assert "iteration 2/4: val mIoU " in stderr and "(best so far " in stderr
    assert "iteration 4/4: final whole val mIoU " in stderr

    flags = [flag for flag in tiny_flags(runs / "loud") if flag != "--quiet"]
    loud = _subprocess_run(flags)
    _, stderr = loud.communicate(timeout=300)
    assert loud.returncode == 0, stderr
    run_dir = only_run_dir(runs / "loud")
    assert f"record: {run_dir} (summary.json: the numbers above; metrics.jsonl: the curves)" in stderr.splitlines()
    assert any(line.startswith("iteration 2/4: val mIoU ") for line in stderr.splitlines())


def test_records_say_what_they_ran_on(tmp_path):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--deterministic")) == 0
    summary = summary_of(runs)
    machine = summary["machine"]
    assert machine["kind"] == "cpu" and machine["cpu_model"] and machine["threads"] == torch.get_num_threads()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and machine["blas"]
    assert machine["deterministic"] is True and machine["gpu_name"] is None and machine["cuda"] is None
    config = yaml.safe_load((only_run_dir(runs) / "config.yaml").read_text())
    assert config["train"]["deterministic"] is True
    assert torch.are_deterministic_algorithms_enabled()
    assert run_cli(tiny_flags(tmp_path / "again")) == 0 and not torch.are_deterministic_algorithms_enabled()
