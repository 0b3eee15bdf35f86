"""Grids on Slurm (sweeps/slurm.py): the batch script, and job arrays on a real one-node Slurm
(the `slurm_cluster` fixture): whole grids, preemption and requeue, cells given up."""

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime

import pytest

from tests.conftest import REPO, tiny_flags, write_grid

LAUNCHER = REPO / "sweeps" / "slurm.py"


def _launch(args, cwd, environment=None):
    return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_prints_the_batch_script(tmp_path):
    result = _launch(["--grid", "demo", "--dry-run", "--partition", "gpu", "--account", "lab", "--time", "04:00:00",
                      "--mem", "32G", "--cpus-per-task", "8", "--gpus-per-task", "2", "--array", "3",
                      "--max-requeues", "5", "--", "--runs-dir", "scratch/runs", "--iterations", "10"], tmp_path)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    header = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert header == ["#SBATCH --job-name=danet-demo", "#SBATCH --array=0-7%3", "#SBATCH --ntasks=1",
                      "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=lab",
                      "#SBATCH --gpus-per-task=2", "#SBATCH --mem=32G", "#SBATCH --time=04:00:00",
                      f"#SBATCH --chdir={tmp_path}", f"#SBATCH --output={tmp_path}/scratch/runs/slurm/%x_%A_%a.out",
                      "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300",
                      "#SBATCH --export=ALL"]
    assert "\nexport OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}\n" in script
    assert "cells=(fcn_seed=0 fcn_seed=1 pam_seed=0 pam_seed=1 cam_seed=0 cam_seed=1 pam-cam_seed=0 pam-cam_seed=1)" \
        in script
    assert re.search(r"srun --ntasks=1 \S+ -m torch\.distributed\.run --nnodes=1 --nproc_per_node=2 "
                     r"--rdzv_backend=c10d --rdzv_endpoint=FIRST_NODE:PORT --rdzv_id=\$SLURM_JOB_ID \S+/ablations/run\.py "
                     r"--grid demo --cell CELL --resume --runs-dir scratch/runs --iterations 10", script)
    last = script.splitlines()[-1]
    assert last.startswith(f"exec {sys.executable} {LAUNCHER} --task --grid demo --max-requeues 5 --gpus-per-task 2 ")
    assert last.endswith('--cell "${cells[$SLURM_ARRAY_TASK_ID]}" -- --runs-dir scratch/runs --iterations 10')
    assert not (tmp_path / "scratch").exists()  # a dry run writes nothing


def test_dry_run_defaults_fit_a_cpu_only_cluster_and_studies_get_one_worker_per_task(tmp_path):
    plain = _launch(["--grid", "demo", "--dry-run"], tmp_path).stdout
    assert "--gpus" not in plain and "--mem" not in plain and "--partition" not in plain and "--time" not in plain
    assert "#SBATCH --cpus-per-task=1" in plain and "#SBATCH --array=0-7\n" in plain
    study = _launch(["--grid", "demo", "--study", "s", "--storage", "postgresql://db/x", "--array", "2", "--dry-run"],
                    tmp_path).stdout
    assert "#SBATCH --array=0-1\n" in study and "cells=(" not in study
    assert "sweeps/optuna_study.py --grid demo --study s --storage postgresql://db/x --" in study
    assert study.splitlines()[-1].endswith("--task --grid demo --max-requeues 3 --study s --storage postgresql://db/x --")


@pytest.mark.parametrize("args, message", [
    (["--grid", "nope"], "--grid nope: no such file or name"),
    (["--grid", "demo", "--storage", "sqlite:///x.db"], "--storage belongs to --study"),
    (["--grid", "demo", "--array", "0"], "--array 0: must be at least 1"),
    (["--grid", "demo", "--", "--overwrite"], "--overwrite would restart a run at every requeue"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    result = _launch([*args, "--dry-run"], tmp_path)
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- against a real Slurm -------------------------------------------------------------------------

def _slurm(environment, *command):
    return subprocess.run(list(command), env=environment, capture_output=True, text=True, check=True).stdout


def _submit(grid, runs, environment, *launcher_flags, run_flags=()):
    result = _launch(["--grid", str(grid), *launcher_flags, "--", *tiny_flags(runs, *run_flags)], grid.parent,
                     dict(environment, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    return re.search(r"submitted job array (\d+)", result.stdout).group(1)


def _release_requeued(environment, job):
    """Slurm holds a requeued task for two minutes (BeginTime); the tests wait 10 s of them, for the
    task's previous run to be cleaned up (a task started at once can fail to launch)."""
    for line in _slurm(environment, "squeue", "-h", "-j", job, "-o", "%i %r %S").splitlines():
        task, reason, begin = line.split()
        if reason == "BeginTime" and (datetime.fromisoformat(begin) - datetime.now()).total_seconds() < 110:
            _slurm(environment, "scontrol", "update", f"jobid={task}", "starttime=now")


def _wait_until(condition, environment, job, timeout=300, what="the condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        _release_requeued(environment, job)
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; queue: {_slurm(environment, 'squeue', '-j', job)}")


def _finished(environment, job):
    return lambda: not _slurm(environment, "squeue", "-h", "-j", job).strip()


def _tasks(environment, job):
    """{array task id: (job state, restarts)} from scontrol (this cluster keeps no accounting)."""
    shown = _slurm(environment, "scontrol", "-o", "show", "job", job)
    return {int(re.search(r"ArrayTaskId=(\d+)", line).group(1)):
            (re.search(r"JobState=(\S+)", line).group(1), int(re.search(r"Restarts=(\d+)", line).group(1)))
            for line in shown.splitlines()}


def _records(runs):
    return {path.parent.name: json.loads(path.read_text()) for path in runs.glob("*/summary.json")}


@pytest.mark.slow
def test_a_grid_submitted_as_an_array_completes_with_one_record_per_cell(tmp_path, slurm_cluster):
    grid = write_grid(tmp_path / "trio.yaml", {"fcn": {"pam": False, "cam": False}, "pam": {"cam": False},
                                                "pam-cam": {}})
    runs = tmp_path / "runs"
    job = _submit(grid, runs, slurm_cluster)
    _wait_until(_finished(slurm_cluster, job), slurm_cluster, job, what="the array to finish")
    assert _tasks(slurm_cluster, job) == {0: ("COMPLETED", 0), 1: ("COMPLETED", 0), 2: ("COMPLETED", 0)}
    records = _records(runs).values()
    assert sorted(record["name"] for record in records) == \
        sorted(["danet_r18-d8_fcn_synthetic_s0", "danet_r18-d8_pam_synthetic_s0", "danet_r18-d8_pam-cam_synthetic_s0"])
    assert all(record["status"] == "complete" for record in records)
    assert len({record["cell_hash"] for record in records}) == 3
    logs = sorted((runs / "slurm").glob(f"danet-trio_{job}_*.out"))
    assert len(logs) == 3 and all("final val mIoU" in log.read_text() for log in logs)


@pytest.mark.slow
def test_a_preempted_task_resumes_its_cell_to_exactly_an_uninterrupted_runs_metrics(tmp_path, slurm_cluster):
    grid = write_grid(tmp_path / "one.yaml", {"pam": {"cam": False}})
    settings = ("--iterations", "120", "--checkpoint-every", "1000", "--eval-every", "0",
                "--synthetic-train-images", "12", "--log-every", "1")
    reference_runs, runs = tmp_path / "reference", tmp_path / "runs"
    reference_run = subprocess.run([sys.executable, str(REPO / "ablations" / "run.py"), "--grid", str(grid), "--cell",
                                    "pam_seed=0", *tiny_flags(reference_runs, *settings)], capture_output=True, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))  # as in a task
    assert reference_run.returncode == 0, reference_run.stderr
    reference = next(iter(_records(reference_runs).values()))
    job = _submit(grid, runs, slurm_cluster, run_flags=settings)
    task = f"{job}_0"

    def record():
        return next(iter(_records(runs).values()), {})

    def steps():
        paths = list(runs.glob("*/metrics.jsonl"))
        return [json.loads(line)["step"] for line in paths[0].read_text().splitlines()] if paths else []

    stops = []
    for interrupt in (["scontrol", "requeue", task],  # what a preempting partition does, too: SIGTERM, requeue
                      ["scancel", "--signal=USR1", "--batch", task]):  # the time-limit warning (--signal=B:USR1)
        _wait_until(lambda: record().get("status") == "running" and max(steps(), default=0) > max(stops, default=0),
                    slurm_cluster, job, what="training to (re)start")
        _slurm(slurm_cluster, *interrupt)
        _wait_until(lambda: record().get("status") == "preempted", slurm_cluster, job, what="the preempted record")
        assert "continue with --resume" in record()["reason"]
        stops.append(int(record()["reason"].split("at iteration ")[1].split()[0]))
        assert (runs / record()["run_id"] / "checkpoints" / "last.pt").exists()
    assert 0 < stops[0] < stops[1] < 120  # the second attempt resumed from the first one's checkpoint

    _wait_until(_finished(slurm_cluster, job), slurm_cluster, job, what="the resumed task to finish")
    assert _tasks(slurm_cluster, job) == {0: ("COMPLETED", 2)}  # requeued by scontrol, then by the launcher
    final = record()
    assert final["status"] == "complete" and final["iterations"] == 120
    assert final["final_miou"] == reference["final_miou"] and final["per_class_iou"] == reference["per_class_iou"]
    log = (runs / "slurm" / f"danet-one_{job}_0.out").read_text()
    assert "stopped at the time limit: requeueing Slurm job" in log and "restart 2:" in log


@pytest.mark.slow
def test_a_cell_that_always_fails_is_given_up_after_its_requeues_and_the_rest_completes(tmp_path, slurm_cluster):
    grid = write_grid(tmp_path / "mixed.yaml", {"fcn": {"pam": False, "cam": False}, "boom": {"lr": 1.0e30},
                                                 "pam": {"cam": False}})
    runs = tmp_path / "runs"
    job = _submit(grid, runs, slurm_cluster, "--max-requeues", "1")
    _wait_until(_finished(slurm_cluster, job), slurm_cluster, job, what="the array to finish")
    assert _tasks(slurm_cluster, job) == {0: ("COMPLETED", 0), 1: ("FAILED", 1), 2: ("COMPLETED", 0)}
    records = _records(runs).values()
    failed = [record for record in records if record["status"] != "complete"]
    assert len(records) == 3 and len(failed) == 1
    reason = failed[0]["reason"]
    assert reason.startswith(f"given up after 1 requeue(s) of Slurm job {job}_1 (--max-requeues 1): last attempt")
    assert failed[0]["status"] == "failed" and "exited with status 1" in reason and "non-finite loss" in reason


class _StandInRun:
    """What WandbSink uses of a W&B run, recording the calls (there is no W&B server here)."""

    def __init__(self, **init):
        self.init, self.id, self.summary, self.calls = init, init.get("id") or "new-id", {}, []

    def define_metric(self, *args, **kwargs):
        pass

    def mark_preempting(self):
        self.calls.append("mark_preempting")

    def finish(self, exit_code):
        self.calls.append(f"finish({exit_code})")


@pytest.mark.parametrize("status, calls", [("preempted", ["mark_preempting", "finish(1)"]),
                                           ("complete", ["finish(0)"]), ("failed", ["finish(1)"])])
def test_wandb_hears_of_a_preemption_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch, status, calls):
    from types import SimpleNamespace

    from danet.tracking import WandbSink
    from tests.conftest import resolve

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=lambda **init: _StandInRun(**init)))
    cfg = resolve(["--wandb", "offline"])
    sink = WandbSink(cfg, tmp_path, resume_id="abc123")
    assert sink.run.init["id"] == "abc123" and sink.run.init["resume"] == "allow" and sink.run_id == "abc123"
    sink.finish(status, {"final_miou": 0.5})
    assert sink.run.calls == calls
