"""ablations/evaluate.py: a checkpoint under another split or protocol, once, with the training code's metrics."""

import json
import re
import shutil
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from danet.config import EvalConfig
from tests.conftest import REPO, load_script, only_run_dir, run_cli, summary_of, tiny_flags, write_grid

evaluate_script = load_script("ablations/evaluate.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny complete run with its checkpoints (shared by the tests that only read it)."""
    runs = tmp_path_factory.mktemp("evaluate") / "runs"
    assert run_cli(tiny_flags(runs, "--iterations", "6", "--eval-every", "3")) == 0
    return only_run_dir(runs)


def _evaluations(run_dir):
    return sorted((run_dir / "evaluations").glob("*.json"))


def test_the_runs_own_protocol_reproduces_its_final_miou_exactly(trained, capsys):
    assert evaluate_script.main([str(trained), "--device", "cpu"]) == 0
    record_path, = [path for path in _evaluations(trained) if path.name.startswith("val-whole-")]
    record = json.loads(record_path.read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert record["miou"] == summary["final_miou"]  # exactly: one code path for metrics
    assert record["per_class_iou"] == summary["per_class_iou"]
    assert (record["split"], record["protocol"], record["checkpoint"], record["checkpoint_iteration"]) == (
        "val", "whole", "last", 6)
    assert record["machine"]["threads"] >= 1 and record["libraries"]["torch"]
    assert "val whole mIoU" in capsys.readouterr().out


def test_an_evaluation_is_computed_once_unless_overwritten(trained, tmp_path, capsys):
    argv = [str(trained), "--eval-scales", "0.75,1.0,1.25", "--eval-flip"]
    assert evaluate_script.main(argv) == 0
    path, = [path for path in _evaluations(trained) if path.name.startswith("val-ms0.75-1-1.25-flip-")]
    first = path.stat().st_mtime_ns
    record = json.loads(path.read_text())
    assert record["protocol_settings"]["eval_scales"] == [0.75, 1.0, 1.25] and record["protocol_settings"]["eval_flip"]
    assert 0 <= record["miou"] <= 1
    capsys.readouterr()
    assert evaluate_script.main(argv) == 0
    assert "stored earlier" in capsys.readouterr().out and path.stat().st_mtime_ns == first
    assert evaluate_script.main([*argv, "--overwrite"]) == 0
    assert path.stat().st_mtime_ns != first
    committed = tmp_path / trained.name  # a committed record: its evaluations, not its checkpoints
    shutil.copytree(trained, committed, ignore=shutil.ignore_patterns("checkpoints"))
    capsys.readouterr()
    assert evaluate_script.main([str(committed), *argv[1:]]) == 0
    assert "stored earlier" in capsys.readouterr().out
    assert evaluate_script.main([str(committed), *argv[1:], "--overwrite"]) == 2  # computing needs the checkpoint
    assert evaluate_script.main([str(committed), "--eval-flip"]) == 2  # and so does a protocol never evaluated
    assert "has no checkpoint" in capsys.readouterr().err
    stored, = (committed / "evaluations").glob("val-ms0.75-1-1.25-flip-*.json")
    record = json.loads(stored.read_text())
    record["protocol_settings"]["eval_window"] = 512  # a record of other settings under the same name
    stored.write_text(json.dumps(record))
    assert evaluate_script.main([str(committed), *argv[1:]]) == 2
    assert "has no checkpoint" in capsys.readouterr().err


def test_protocol_names_come_from_the_settings():
    assert EvalConfig().protocol_name() == "whole"
    assert EvalConfig(eval_mode="slide").protocol_name() == "slide-w768-s512"
    assert EvalConfig(eval_mode="slide", eval_window=512, eval_stride=256).protocol_name() == "slide-w512-s256"
    assert EvalConfig(eval_scales=(0.75, 1.0, 1.25), eval_flip=True).protocol_name() == "ms0.75-1-1.25-flip"
    assert EvalConfig(eval_mode="slide", eval_flip=True).protocol_name() == "slide-w768-s512-flip"


def test_bad_inputs_exit_2_with_one_line_naming_the_thing(tmp_path, trained, camvid_tree, capsys):
    def error_of(argv):
        assert evaluate_script.main(argv) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1, message
        return message

    assert "is not a run folder (no summary.json)" in error_of([str(tmp_path)])
    assert "has no checkpoint" in error_of([str(trained), "--checkpoint", "best-of-all.pt"])
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    assert f"checkpoint {tmp_path / 'torn.pt'} cannot be read" in error_of(
        [str(trained), "--checkpoint", str(tmp_path / "torn.pt")])
    assert "--eval-window needs --eval-mode slide (the run's own mode is whole)" in error_of(
        [str(trained), "--eval-window", "32"])

    runs = tmp_path / "runs"
    camvid = tiny_flags(runs, "--dataset", "camvid", "--data-root", str(camvid_tree), "--iterations", "2",
                        "--eval-every", "0")
    assert run_cli(camvid) == 0
    capsys.readouterr()  # the run's own lines
    run_dir = only_run_dir(runs)
    assert "no CamVid split 'test'" in error_of([str(run_dir), "--split", "test"])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["model"]["num_classes"] = 7
    torch.save(state, tmp_path / "seven.pt")
    assert "has 11 classes, but the checkpoint" in error_of([str(run_dir), "--checkpoint", str(tmp_path / "seven.pt")])
    for checkpoint in (run_dir / "checkpoints").iterdir():
        checkpoint.unlink()
    assert "has no checkpoint" in error_of([str(run_dir)])
    assert summary_of(runs)["status"] == "complete"  # evaluation never touches the run's own record


@pytest.mark.slow
def test_a_grid_study_evaluates_each_cell_after_it_trains(tmp_path):
    grid = write_grid(tmp_path / "tta.yaml", {"danet-head": {"pam": False, "cam": False},
                                              "fcn-head": {"head": "fcn", "pam": False, "cam": False}},
                      design="controlled",
                      evaluations=[{"of": ["fcn-head"], "eval_scales": [0.75, 1.0], "eval_flip": True}])
    runs = tmp_path / "runs"
    process = subprocess.run([sys.executable, str(REPO / "sweeps" / "optuna_study.py"), "--grid", str(grid), "--study",
                              "tta", "--", *tiny_flags(runs, "--iterations", "2", "--eval-every", "0")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout + process.stderr
    evaluated = {path.parent.parent.name.split("_")[2] for path in runs.glob("*/evaluations/*.json")}
    assert evaluated == {"fcn-head"}  # only the cells the evaluation names
    record, = [json.loads(path.read_text()) for path in runs.glob("*/evaluations/*.json")]
    assert record["protocol"] == "ms0.75-1-flip"
    trials = optuna.load_study(study_name="tta", storage=JournalStorage(JournalFileBackend(
        str(tmp_path / "optuna" / "tta.journal")))).trials
    assert sum("eval/val/ms0.75-1-flip" in trial.user_attrs for trial in trials) == 1
    for path in runs.glob("*/config.yaml"):  # the records carry their grid, named cell and design
        tracking = yaml.safe_load(path.read_text())["tracking"]
        assert tracking["grid"] == "tta" and tracking["design"] == "controlled"
        assert tracking["grid_cell"] in ("danet-head", "fcn-head")

    for checkpoints in runs.glob("*/checkpoints"):  # as in a fresh clone of the committed records
        shutil.rmtree(checkpoints)
    again = subprocess.run([sys.executable, str(REPO / "sweeps" / "optuna_study.py"), "--grid", str(grid), "--study",
                            "tta-again", "--", *tiny_flags(runs, "--iterations", "2", "--eval-every", "0")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "evaluation already there" in output and "skipped" not in output, output


def test_run_py_with_a_grid_cell_runs_the_grids_evaluations_so_every_launcher_does(tmp_path, capsys):
    """W&B agents, Slurm tasks and the offline executor launch run.py --grid G --cell C."""
    grid = write_grid(tmp_path / "tta.yaml", {"danet-head": {"pam": False, "cam": False},
                                              "fcn-head": {"head": "fcn", "pam": False, "cam": False}},
                      evaluations=[{"of": ["fcn-head"], "eval_scales": [0.75, 1.0], "eval_flip": True}])
    runs = tmp_path / "runs"
    flags = tiny_flags(runs, "--iterations", "2", "--eval-every", "0")
    for cell in ("danet-head_seed=0", "fcn-head_seed=0"):
        assert run_cli(["--grid", str(grid), "--cell", cell, *flags]) == 0
    record, = [json.loads(path.read_text()) for path in runs.glob("*/evaluations/*.json")]
    assert (record["protocol"], record["run_id"].split("_")[2]) == ("ms0.75-1-flip", "fcn-head")
    assert "evaluation done" in capsys.readouterr().err
    assert run_cli(["--grid", str(grid), "--cell", "fcn-head_seed=0", *flags, "--resume"]) == 0  # a reused record
    assert "evaluation already there" in capsys.readouterr().err


def test_an_evaluation_is_logged_to_the_w_and_b_run_it_evaluates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--iterations", "2", "--eval-every", "0", "--wandb", "offline")) == 0
    run_dir = only_run_dir(runs)
    wandb_id = summary_of(runs)["wandb_id"]
    assert evaluate_script.main([str(run_dir), "--eval-flip", "--wandb", "offline"]) == 0
    assert f"logged to W&B run {wandb_id}" in capsys.readouterr().out
    # wandb names a folder offline-run-DATE_TIME-ID and adds -1 when the resumption starts within the same second
    offline = [path for path in (run_dir / "wandb").glob("offline-run-*")
               if re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{wandb_id}(-\d+)?", path.name)]
    assert len(offline) == 2  # the training run and its resumption by the evaluation, one id
    without = tmp_path / "plain"
    assert run_cli(tiny_flags(without, "--iterations", "2", "--eval-every", "0")) == 0
    capsys.readouterr()
    assert evaluate_script.main([str(only_run_dir(without)), "--wandb", "offline"]) == 2
    assert "has no W&B run" in capsys.readouterr().err
