"""Optuna studies: grids exactly once across workers, searches with pruning, failures, PostgreSQL."""

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from rich.console import Console

from danet.config import UsageError
from danet.grids import load_grid
from danet.launch.optuna_driver import StudyTrial
from danet.launch.storages import open_study_storage
from danet.launch.sweep_files import load_search
from danet.launch.trials import WorkerLock
from tests.conftest import REPO, load_script, tiny_flags, wait_for_checkpoint, write_grid

GRIDS = REPO / "ablations" / "grids"
DRIVER = REPO / "sweeps" / "optuna_study.py"


def _tiny_run_flags(runs, *extra):
    # run.py flags for every trial; --workers here is the DataLoader's, after the driver's `--`
    return tiny_flags(runs, *extra)


def _driver(*args, cwd, **kwargs):
    return subprocess.Popen([sys.executable, str(DRIVER), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _records(runs):
    return [json.loads(path.read_text()) for path in sorted(runs.glob("*/summary.json"))]


def _assert_grid_done_exactly_once(runs, grid_name="demo"):
    records = _records(runs)
    cells = load_grid(grid_name, GRIDS).cells
    assert len(records) == len(cells)
    assert all(record["status"] == "complete" for record in records)
    assert len({record["cell_hash"] for record in records}) == len(cells)


def _four_cell_grid(tmp_path):
    """Half the demo grid: enough cells for two workers to contend for, at half the cost."""
    return str(write_grid(tmp_path / "four.yaml", {"fcn": {"pam": False, "cam": False}, "pam": {"pam": True, "cam": False}},
                          seeds=(0, 1)))


def _journal_study(path, name):
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))


@pytest.mark.slow
def test_grid_study_with_two_workers_runs_every_cell_exactly_once_and_restarts_cleanly(tmp_path):
    runs = tmp_path / "runs"
    process = _driver("--grid", "demo", "--study", "demo", "--workers", "2", "--", *_tiny_run_flags(runs), cwd=tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    _assert_grid_done_exactly_once(runs)
    study = _journal_study(tmp_path / "optuna" / "demo.journal", "demo")
    trials = study.get_trials(deepcopy=False)
    assert all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    assert {trial.params["cell"] for trial in trials} == set(load_grid("demo", GRIDS).cells)
    for record in _records(runs):  # each record says which study and trial made it
        assert record["study"] == "demo" and isinstance(record["trial"], int)

    modified = {path: path.stat().st_mtime_ns for path in runs.glob("*/summary.json")}
    again = _driver("--grid", "demo", "--study", "demo", "--", *_tiny_run_flags(runs), cwd=tmp_path)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    assert {path: path.stat().st_mtime_ns for path in runs.glob("*/summary.json")} == modified  # nothing retrained
    assert "grid demo: 8/8 cells complete" in output  # the driver's last line


@pytest.mark.slow
def test_a_failing_cell_is_retried_a_bounded_number_of_times_then_given_up_with_the_reason(tmp_path):
    from danet.launch.trials import MAX_ATTEMPTS

    grid = write_grid(tmp_path / "one.yaml", {"fcn": {"pam": False, "cam": False}})
    runs = tmp_path / "runs"
    process = _driver("--grid", str(grid), "--study", "boom", "--", *_tiny_run_flags(runs, "--lr", "1e30",
                                                                                     "--iterations", "20"), cwd=tmp_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output  # a failed cell is a failed command
    assert "study boom: 0 complete, 1 failed, 0 pruned, 0 running" in output
    trials = _journal_study(tmp_path / "optuna" / "boom.journal", "boom").trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.FAIL] * MAX_ATTEMPTS
    assert [trial.user_attrs.get("attempt", 1) for trial in trials] == list(range(1, MAX_ATTEMPTS + 1))
    assert all(trial.user_attrs["reason"].startswith("non-finite loss at iteration") for trial in trials[:-1])
    assert trials[-1].user_attrs["reason"].startswith(f"given up after {MAX_ATTEMPTS} attempts: non-finite loss")
    record, = _records(runs)  # one record, resumed by every attempt
    assert record["status"] == "failed"
    assert record["reason"].startswith(f"given up after {MAX_ATTEMPTS} attempts: non-finite loss at iteration")
    assert "fail: non-finite loss at iteration" in output and "0/1 cells complete, 0 running, 1 failed" in output
    assert "grid one: 0/1 cells complete" in output and "given up" in output and "fcn_seed=0" in output


@pytest.mark.slow
def test_search_trials_report_val_miou_and_can_be_pruned(tmp_path):
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"method": "bayes", "parameters": {
        "config": {"value": "demo"}, "lr": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1},
        "crop_size": {"values": [32]}}}))
    spec = load_search(str(search), tmp_path)
    assert spec.preset == "demo" and isinstance(spec.space["lr"], optuna.distributions.FloatDistribution)
    runs = tmp_path / "runs"
    flags = _tiny_run_flags(runs, "--iterations", "6")

    def objective_of(study):
        return StudyTrial(None, spec, flags, study, WorkerLock(runs), Console(quiet=True))

    reported = optuna.create_study(direction="maximize")
    reported.optimize(objective_of(reported), n_trials=1)
    trial = reported.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and sorted(trial.intermediate_values) == [2, 4]

    always_prune = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    always_prune.optimize(objective_of(always_prune), n_trials=1)
    pruned = always_prune.trials[0]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert "pruned by Optuna at iteration 2" in pruned.user_attrs["reason"]
    record = json.loads((runs / pruned.user_attrs["run_dir"].rsplit("/", 1)[-1] / "summary.json").read_text())
    assert record["status"] == "pruned"


def test_sqlite_refuses_parallel_workers():
    with pytest.raises(UsageError, match="SQLite is for one process"):
        open_study_storage("sqlite:///x.db", "s", workers=2, heartbeat=60)


@pytest.mark.slow
def test_postgres_two_workers_share_the_grid_exactly_once(tmp_path, postgres_url):
    runs = tmp_path / "runs"
    study, grid = f"pg-{uuid.uuid4().hex[:8]}", _four_cell_grid(tmp_path)
    workers = [_driver("--grid", grid, "--study", study, "--storage", postgres_url, "--",
                       *_tiny_run_flags(runs), cwd=tmp_path) for _ in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output
    _assert_grid_done_exactly_once(runs, grid)
    trials = optuna.load_study(study_name=study, storage=postgres_url).get_trials(deepcopy=False)
    assert all(trial.state.is_finished() for trial in trials)  # no trial lost in RUNNING
    assert {trial.params["cell"] for trial in trials} == set(load_grid(grid, GRIDS).cells)


@pytest.mark.slow
def test_postgres_killed_worker_trial_is_retried_and_the_grid_completes(tmp_path, postgres_url):
    runs = tmp_path / "runs"
    study, grid = f"pg-kill-{uuid.uuid4().hex[:8]}", _four_cell_grid(tmp_path)
    flags = _tiny_run_flags(runs, "--iterations", "24", "--checkpoint-every", "4", "--synthetic-train-images", "12")
    first = _driver("--grid", grid, "--study", study, "--storage", postgres_url, "--heartbeat", "1", "--",
                    *flags, cwd=tmp_path)
    assert wait_for_checkpoint(runs, first), first.communicate()
    first.send_signal(signal.SIGKILL)
    first.communicate()
    storage = optuna.storages.RDBStorage(postgres_url)
    running = [t for t in optuna.load_study(study_name=study, storage=storage).trials
               if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1, "the killed worker should leave one trial running"
    killed = running[0]

    time.sleep(4)  # past the grace period (3 heartbeats)
    second = _driver("--grid", grid, "--study", study, "--storage", postgres_url, "--heartbeat", "1", "--",
                     *flags, cwd=tmp_path)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    trials = optuna.load_study(study_name=study, storage=storage).trials
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL  # declared dead: lock free, heartbeat stale
    retries = [t for t in trials if t.user_attrs.get("resumes_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == killed.params
    _assert_grid_done_exactly_once(runs, grid)


def _installed(tool: str) -> str:
    """The console script installed beside this interpreter (the venv need not be on PATH)."""
    return str(Path(sys.executable).parent / tool)


@pytest.mark.slow
def test_optunas_own_tools_read_the_study(tmp_path):
    """The storage strings are Optuna's own: its CLI and optuna-dashboard read the study, and so do our reports."""
    import urllib.request

    runs = tmp_path / "runs"
    grid = write_grid(tmp_path / "two.yaml", {"fcn": {"pam": False, "cam": False}}, seeds=(0, 1))
    flags = _tiny_run_flags(runs, "--iterations", "2", "--eval-every", "0")
    process = _driver("--grid", str(grid), "--study", "tools", "--", *flags, cwd=tmp_path)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    assert "study tools: 2 complete, 0 failed, 0 pruned, 0 running; best: fcn_seed=" in output
    assert "Warning" not in output, output  # no deprecation or experimental-API floods on a normal run
    journal = "optuna/tools.journal"
    trial = _journal_study(tmp_path / journal, "tools").trials[0]
    assert trial.user_attrs["seed"] in (0, 1) and "run_dir" in trial.user_attrs  # sliceable by setting
    assert _journal_study(tmp_path / journal, "tools").metric_names == ["val mIoU"]

    listed = subprocess.run([_installed("optuna"), "trials", "--storage", journal, "--storage-class", "JournalFileBackend",
                             "--study-name", "tools", "-f", "json"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert sorted(row["params"]["cell"] for row in json.loads(listed.stdout)) == ["fcn_seed=0", "fcn_seed=1"]
    assert all(0 <= row["value"]["val mIoU"] <= 1 for row in json.loads(listed.stdout))  # the named objective

    make_tables = load_script("reports/make_tables.py")
    assert make_tables.main(["--optuna-storage", str(tmp_path / journal), "--study", "tools", "--out",
                             str(tmp_path / "out"), "--no-figures"]) == 0
    assert (tmp_path / "out" / "runs.csv").read_text().count("\n") == 3  # a header and two runs
    for bad in ("journal:optuna/tools.journal", "optuna/tools.db"):
        assert make_tables.main(["--optuna-storage", bad, "--study", "tools", "--out", str(tmp_path / "x")]) == 2
        refused = subprocess.run([sys.executable, str(DRIVER), "--grid", str(grid), "--study", "t", "--storage", bad],
                                 cwd=tmp_path, capture_output=True, text=True)
        assert refused.returncode == 2 and "expected a database URL" in refused.stderr
        assert refused.stderr.count("\n") == 1

    sqlite = f"sqlite:///{tmp_path / 'copy.db'}"  # a database URL works the same way for Optuna's CLI
    optuna.copy_study(from_study_name="tools", from_storage=JournalStorage(JournalFileBackend(str(tmp_path / journal))),
                      to_storage=sqlite)
    listed = subprocess.run([_installed("optuna"), "trials", "--storage", sqlite, "--study-name", "tools", "-f", "json"],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 2, listed.stderr

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dashboard = subprocess.Popen([_installed("optuna-dashboard"), journal, "--host", "127.0.0.1", "--port", str(port)],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = None
        for _ in range(100):  # bounded: about 20 s
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.2)
        assert body is not None, "optuna-dashboard did not answer"
        study_id = next(study["study_id"] for study in body["study_summaries"] if study["study_name"] == "tools")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=5) as response:
            detail = json.loads(response.read())
        assert len(detail["trials"]) == 2 and all(trial["state"] == "Complete" for trial in detail["trials"])
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


@pytest.mark.parametrize("text, kind", [("optuna/s.journal", "journal"), ("/abs/path/s.journal", "journal"),
                                        ("sqlite:///study.db", "sqlite"), ("postgresql://u:p@host/db", "database")])
def test_storage_strings_are_the_forms_optunas_tools_take(text, kind):
    from danet.launch.storages import storage_kind

    assert storage_kind(text) == kind


@pytest.mark.parametrize("text", ["journal:optuna/s.journal", "optuna/s.db", "study", "redis://host"])
def test_other_storage_strings_are_one_line_usage_errors(text):
    from danet.launch.storages import storage_kind

    with pytest.raises(UsageError, match="expected a database URL .* or a journal file path ending in .journal"):
        storage_kind(text)


@pytest.mark.slow
def test_a_preempted_worker_offers_its_cell_again_and_the_next_worker_resumes_it(tmp_path):
    grid = write_grid(tmp_path / "one.yaml", {"fcn": {"pam": False, "cam": False}})
    runs = tmp_path / "runs"
    flags = _tiny_run_flags(runs, "--iterations", "80", "--checkpoint-every", "1000", "--eval-every", "0")
    first = _driver("--grid", str(grid), "--study", "pre", "--", *flags, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not any(path.stat().st_size for path in runs.glob("*/metrics.jsonl")):
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert _records(runs)[0]["status"] == "preempted", output
    trials = _journal_study(tmp_path / "optuna" / "pre.journal", "pre").trials
    assert [trial.state for trial in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert trials[1].user_attrs["resumes_trial"] == 0 and trials[1].params == trials[0].params

    again = _driver("--grid", str(grid), "--study", "pre", "--", *flags, cwd=tmp_path)
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    record, = _records(runs)
    assert record["status"] == "complete" and record["iterations"] == 80
    assert "study pre: 1 complete, 0 failed" in output


def test_search_files_are_searches_and_bring_their_own_early_termination(capsys):
    from danet.launch.sweep_files import sweep_pruner

    with pytest.raises(UsageError, match="is a grid .*: run it with --grid demo"):
        load_search("demo", REPO / "sweeps")
    driver = load_script("sweeps/optuna_study.py")
    assert driver.main(["--search", str(REPO / "sweeps" / "demo.yaml"), "--study", "x", "--n-trials", "1"]) == 2
    refused = capsys.readouterr().err
    assert "run it with --grid demo" in refused and refused.count("\n") == 1
    spec = load_search("hparams", REPO / "sweeps")
    assert spec.early_terminate == {"type": "hyperband", "min_iter": 2, "eta": 2}
    pruner = sweep_pruner(spec.early_terminate, "hparams")  # W&B's hyperband: one bracket of successive halving
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)


def test_a_postgresql_storage_without_its_driver_names_the_extra(monkeypatch):
    import importlib.util

    from danet.launch.storages import storage_kind

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    with pytest.raises(UsageError, match=r'PostgreSQL needs the psycopg driver: pip install -e "\.\[postgres\]"'):
        storage_kind("postgresql://u:p@host/db")
