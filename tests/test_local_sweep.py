"""W&B sweep files without a W&B server (sweeps/local_sweep.py): commands as `wandb agent` renders them,
proposals from Optuna, Hyperband from the runs' metrics.jsonl, several executors sharing one sweep."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from danet.config import UsageError
from danet.grids import load_grid
from danet.launch.contract import target_of
from danet.launch.sweep_files import load_sweep, render_command
from danet.launch.yaml_executor import MetricHistory, program_argv
from danet.tracking import mark_pruned
from tests.conftest import GRIDS, REPO, load_script, tiny_flags, wait_for_checkpoint

SCRIPT = REPO / "sweeps" / "local_sweep.py"
local_sweep = load_script("sweeps/local_sweep.py")


def _sweep_file(tmp_path, **fields):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"program": "ablations/run.py", "metric": {"name": "val/mIoU", "goal": "maximize"},
                                    **fields}, sort_keys=False))
    return path


def _executor(sweep_path, *args, run_flags):
    """sweeps/local_sweep.py as a user runs it, from the repository root (the sweep's program is relative)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), str(sweep_path), *args, "--", *run_flags], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO), "WANDB_SILENT": "true"})


def _finish(process, timeout=900):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _study(journal, name):
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def _records(runs):
    return {path.parent: json.loads(path.read_text()) for path in runs.glob("*/summary.json")}


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_commands_are_rendered_as_wandb_agent_renders_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_TAG", "tagged")
    path = _sweep_file(tmp_path, method="random", parameters={"lr": {"values": [0.01]}, "pam": {"value": False}},
                       command=["${env}", "${interpreter}", "${program}", "--resume", "${args}", "${args_no_hyphens}",
                                "${args_json}", "--run-name=${envvar:SWEEP_TAG}", "${no_such_macro}"])
    sweep = load_sweep(path)
    rendered = render_command(sweep, {"lr": 0.01, "pam": False})
    args = create_sweep_command_args({"args": {"lr": {"value": 0.01}, "pam": {"value": False}}})
    assert rendered == ["/usr/bin/env", sys.executable, "ablations/run.py", "--resume", *args["args"],
                        *args["args_no_hyphens"], *args["args_json"], "--run-name=tagged"]
    assert rendered[4:8] == ["--lr=0.01", "--pam=False", "lr=0.01", "pam=False"]
    assert json.loads(rendered[8]) == {"lr": 0.01, "pam": False}
    # no command in the file: the agent's default, ${env} ${interpreter} ${program} ${args}
    default = load_sweep(_sweep_file(tmp_path, method="grid", parameters={"seed": {"values": [3]}}))
    assert render_command(default, {"seed": 3}) == ["/usr/bin/env", sys.executable, "ablations/run.py", "--seed=3"]


def test_the_generated_grid_sweeps_run_their_cells_and_flags_after_the_file_win(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(REPO / "sweeps" / "demo.yaml")
    command = render_command(sweep, {"grid": "demo", "cell": "pam_seed=1", "wandb": "online"})
    assert command[3:] == ["--resume", "--quiet", "--grid=demo", "--cell=pam_seed=1", "--wandb=online"]
    cfg = target_of(program_argv(sweep, [*command, "--wandb", "offline", "--backbone", "resnet18"])).cfg
    assert (cfg.model.pam, cfg.model.cam, cfg.train.seed) == (True, False, 1)
    assert cfg.tracking.wandb == "offline" and cfg.model.backbone == "resnet18"
    assert cfg.model.num_classes > 0  # settled by the dataset, as in the run's record (its cell hash)
    assert isinstance(sweep.sampler(), optuna.samplers.GridSampler)
    assert isinstance(sweep.pruner(), optuna.pruners.NopPruner)


def test_methods_and_parameter_forms_map_to_optuna(tmp_path):
    hparams = load_sweep(REPO / "sweeps" / "hparams.yaml")
    assert isinstance(hparams.sampler(), optuna.samplers.GPSampler)
    assert hparams.parameters["lr"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    assert hparams.parameters["config"] == "camvid_cpu"
    inferred = load_sweep(_sweep_file(tmp_path, method="random", parameters={
        "seed": {"min": 0, "max": 4}, "lr": {"min": 0.01, "max": 0.02}}))
    assert isinstance(inferred.sampler(), optuna.samplers.RandomSampler)
    assert inferred.parameters == {"seed": optuna.distributions.IntDistribution(0, 4),
                                   "lr": optuna.distributions.FloatDistribution(0.01, 0.02)}
    grid = load_sweep(_sweep_file(tmp_path, method="grid", parameters={"seed": {"min": 0, "max": 2},
                                                                       "pam": {"values": [True, False]}}))
    study = optuna.create_study(sampler=grid.sampler())
    assert study.sampler.is_exhausted(study) is False
    for _ in range(6):
        study.optimize(lambda trial: trial.suggest_int("seed", 0, 2) + trial.suggest_categorical("pam", [True, False]),
                       n_trials=1)
    assert sorted((t.params["seed"], t.params["pam"]) for t in study.trials) == [
        (seed, pam) for seed in range(3) for pam in (False, True)]


@pytest.mark.parametrize("fields, message", [
    ({"method": "hyperopt", "parameters": {"seed": {"values": [0]}}}, "method must be grid, random or bayes"),
    ({"method": "grid", "parameters": {"lr": {"min": 0.1, "max": 0.2}}}, "method grid needs values for parameter lr"),
    ({"method": "bayes", "parameters": {"lr": {"distribution": "q_normal", "mu": 0}}},
     "has a form this driver does not read"),
    ({"method": "random", "parameters": {"seed": {"values": [0]}}, "early_terminate": {"type": "hyperband", "eta": 2}},
     "hyperband needs min_iter, or max_iter and s"),
    ({"method": "random", "parameters": {"seed": {"values": [0]}}, "command": ["${args_json_file}"]},
     "${args_json_file} is not supported"),
    ({"method": "random"}, "needs program and parameters"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, fields, message):
    path = _sweep_file(tmp_path, **fields)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_sweep(path)
    assert local_sweep.main([str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error
    assert local_sweep.main([str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: No such file or directory" in capsys.readouterr().err


def test_a_program_missing_from_the_working_directory_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, method="grid", parameters={"seed": {"values": [0]}})
    assert local_sweep.main([str(path), "--storage", str(tmp_path / "s.journal")]) == 2
    assert "program ablations/run.py not found from" in capsys.readouterr().err


def test_hyperband_rungs_are_wandb_bands_counted_in_logged_values(tmp_path):
    # W&B with min_iter 2 compares runs at the 3rd logged value (history index 2); so must the pruner
    pruner = load_sweep(_sweep_file(tmp_path, method="random", parameters={"seed": {"values": [0]}},
                                    early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3})).pruner()
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)

    def report_all(values):
        trial = study.ask()
        decisions = []
        for step, value in enumerate(values):
            trial.report(value, step)
            decisions.append(trial.should_prune())
        study.tell(trial, values[-1])
        return decisions

    assert report_all([0.5] * 5) == [False] * 5  # the first run sets the bar at the band
    assert report_all([0.1] * 5)[:3] == [False, False, True]  # the second is stopped there: W&B's top 1/eta
    assert report_all([0.6] * 5) == [False] * 5


def test_bayes_proposals_stay_in_range_and_follow_earlier_results(tmp_path):
    sweep = load_sweep(_sweep_file(tmp_path, method="bayes", parameters={
        "lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1}, "crop_size": {"values": [32, 48]}}))
    distributions = {name: value for name, value in sweep.parameters.items()}
    proposals = {}
    for better in (0.002, 0.05):  # two earlier results, the better one low or high
        study = optuna.create_study(direction="maximize", sampler=sweep.sampler())
        for lr in (0.002, 0.05):
            study.add_trial(optuna.create_trial(params={"lr": lr, "crop_size": 32}, distributions=distributions,
                                                value=0.9 if lr == better else 0.1))
        trial = study.ask(distributions)
        assert 0.001 <= trial.params["lr"] <= 0.1 and trial.params["crop_size"] in (32, 48)
        proposals[better] = trial.params["lr"]
    # on a log scale, the next proposal goes past the better result, away from the worse one
    assert proposals[0.002] < math.sqrt(0.002 * 0.05) < proposals[0.05]


def test_metric_history_reads_whole_lines_as_they_are_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "val/mIoU": 0.25}\n{"step": 3, "train/loss": 1.0}\n{"step": 4, "val/mIoU": nu')
    history = MetricHistory(path, "val/mIoU")
    assert history.new_values() == [(0, 0.25)]
    with path.open("a") as file:
        file.write('ll}\n{"step": 6, "val/mIoU": 0.5}\n')
    assert history.new_values() == [(1, 0.5)]  # the NaN (null) is not a logged value, as in W&B's history


def test_mark_pruned_turns_a_stopped_run_into_a_pruned_one(tmp_path):
    stopped, finished = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for run_dir, status in ((stopped, "preempted"), (finished, "complete")):
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "reason": "stopped by a signal"}))
    assert mark_pruned(stopped, "pruned by Hyperband") and not mark_pruned(finished, "pruned by Hyperband")
    assert json.loads((stopped / "summary.json").read_text()) == {"status": "pruned", "reason": "pruned by Hyperband"}
    assert json.loads((finished / "summary.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_demo_grid_two_executors_every_cell_once_and_a_killed_executors_run_resumes(tmp_path):
    runs, journal = tmp_path / "runs", tmp_path / "demo.journal"
    storage = ["--storage", str(journal)]
    flags = tiny_flags(runs, "--iterations", "8", "--eval-every", "4")
    first = _executor(REPO / "sweeps" / "demo.yaml", *storage, run_flags=flags)
    assert wait_for_checkpoint(runs, first), first.communicate()
    first.send_signal(signal.SIGKILL)  # its run gets SIGTERM, checkpoints and says preempted
    killed_at = time.time()
    first.communicate()
    executors = [_executor(REPO / "sweeps" / "demo.yaml", *storage, run_flags=flags) for _ in range(2)]
    outputs = [_finish(executor) for executor in executors]

    cells = load_grid("demo", GRIDS).cells
    records = _records(runs)
    assert len(records) == len(cells) and {r["status"] for r in records.values()} == {"complete"}
    assert len({r["cell_hash"] for r in records.values()}) == len(cells)
    trials = _study(journal, "danet-demo").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed, = [t for t in trials if t.state == TrialState.FAIL]
    trained = Counter(t.params["cell"] for t in trials if t.state == TrialState.COMPLETE
                      and "reused_record" not in t.user_attrs)
    assert trained == Counter(list(cells))  # every cell trained by exactly one trial
    resumed, = [t for t in trials if t.user_attrs.get("resumes_trial") == killed.number]
    assert resumed.state == TrialState.COMPLETE and resumed.params == killed.params
    assert resumed.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    times = [event["time"] for event in _events(Path(killed.user_attrs["run_dir"]))]
    assert min(times) < killed_at < max(times)  # continued from its checkpoint, not started over
    assert any(f"trial {killed.number}: its worker died" in output for output in outputs)
    assert all("complete" in output for output in outputs)


@pytest.mark.slow
def test_hyperband_stops_a_tiny_run_whose_record_says_pruned(tmp_path):
    runs, journal = tmp_path / "runs", tmp_path / "hb.journal"
    sweep = _sweep_file(tmp_path, method="random", parameters={"lr": {"values": [0.05, 0.000001]}},
                        early_terminate={"type": "hyperband", "min_iter": 2, "eta": 3},
                        command=["${env}", "${interpreter}", "${program}", "--resume", "${args}"])
    # the good run first (a tiny lr barely moves the model off its starting mIoU), then the poor one
    study = optuna.create_study(study_name="hb", storage=JournalStorage(JournalFileBackend(str(journal))),
                                direction="maximize")
    study.enqueue_trial({"lr": 0.05})
    study.enqueue_trial({"lr": 0.000001})
    # 6 values of val/mIoU per run (every 2 of 12 iterations); the first band is at the 3rd value
    flags = tiny_flags(runs, "--iterations", "12", "--eval-every", "2")
    output = _finish(_executor(sweep, "--count", "2", "--study", "hb", "--storage", str(journal),
                               run_flags=flags))
    good, poor = _study(journal, "hb").trials
    assert (good.state, poor.state) == (TrialState.COMPLETE, TrialState.PRUNED), output
    # decided at the first band (its 3rd value); the run may log one more value before it stops at a checkpoint
    assert sorted(poor.intermediate_values)[:3] == [0, 1, 2] and len(poor.intermediate_values) < 6
    assert poor.intermediate_values[2] < good.intermediate_values[2]
    poor_dir, good_dir = Path(poor.user_attrs["run_dir"]), Path(good.user_attrs["run_dir"])
    record = json.loads((poor_dir / "summary.json").read_text())
    assert record["status"] == "pruned" and record["reason"].startswith("pruned by Hyperband at val/mIoU value 3")
    assert (poor_dir / "checkpoints" / "last.pt").exists()  # stopped at a checkpoint
    assert json.loads((good_dir / "summary.json").read_text())["status"] == "complete"
    assert "pruned: pruned by Hyperband" in output


@pytest.mark.slow
def test_bayes_sweep_runs_a_proposal_from_earlier_results_with_its_wandb_offline_run(tmp_path):
    runs, journal = tmp_path / "runs", tmp_path / "bayes.journal"
    sweep_path = _sweep_file(tmp_path, method="bayes", parameters={
        "lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1}, "crop_size": {"values": [32]},
        "wandb": {"value": "online"}})
    sweep = load_sweep(sweep_path)
    distributions = {name: value for name, value in sweep.parameters.items() if name != "wandb"}
    study = optuna.create_study(study_name="bo", storage=JournalStorage(JournalFileBackend(str(journal))),
                                direction="maximize")
    for lr, value in ((0.002, 0.1), (0.05, 0.9)):  # earlier results: the higher lr did better
        study.add_trial(optuna.create_trial(params={"lr": lr, "crop_size": 32}, distributions=distributions, value=value))
    flags = tiny_flags(runs, "--wandb", "offline")
    output = _finish(_executor(sweep_path, "--count", "1", "--study", "bo", "--storage", str(journal),
                               run_flags=flags))
    proposed = _study(journal, "bo").trials[2]
    assert proposed.state == TrialState.COMPLETE, output
    assert 0.05 <= proposed.params["lr"] <= 0.1  # past the better earlier result, inside the range
    assert proposed.distributions["lr"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    run_dir = Path(proposed.user_attrs["run_dir"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["lr"] == proposed.params["lr"] and config["tracking"]["wandb"] == "offline"
    values = [event["val/mIoU"] for event in _events(run_dir) if "val/mIoU" in event]
    assert proposed.value == max(values)
    offline, = (run_dir / "wandb").glob("offline-run-*")  # what `wandb sync` uploads
    assert list(offline.glob("*.wandb"))
