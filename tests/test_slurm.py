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


PLANNED_CELLS = {"a": {"pam": False, "cam": False}, "b": {"pam": True, "cam": False},
                 "c": {"pam": False, "cam": False, "seed_offset": 100}}
PLANNED_COMPARISONS = [{"name": "b vs a", "treatment": "b", "baseline": "a"},
                       {"name": "A/A", "treatment": "c", "baseline": "a"}]


def _planned_grid(path):
    """Three named cells over seeds 0-2, two comparisons with a common baseline, looks after 2 and 3 seeds."""
    return write_grid(path, PLANNED_CELLS, seeds=(0, 1, 2), comparisons=PLANNED_COMPARISONS,
                      plan={"looks": [2, 3], "futility": True, "alpha": 0.5})


def test_dry_run_of_a_planned_grid_prints_its_first_round_and_the_look_job_after_it(tmp_path):
    grid = _planned_grid(tmp_path / "seqplan.yaml")
    result = _launch(["--grid", str(grid), "--dry-run", "--partition", "gpu", "--account", "lab", "--gpus-per-task",
                      "1", "--time", "04:00:00", "--array", "2", "--", "--runs-dir", "scratch/runs"], tmp_path)
    assert result.returncode == 0, result.stderr
    script, look = result.stdout.split("# then a look job, sbatch --dependency=afterany:<the array's job id>, "
                                       "for look 1 of 2:\n")
    assert "#SBATCH --array=0-5%2\n" in script and "#SBATCH --gpus-per-task=1\n" in script
    assert "\ncells=(a_seed=0 a_seed=1 b_seed=0 b_seed=1 c_seed=0 c_seed=1)\n" in script  # seed index 2 waits
    assert script.splitlines()[-1].endswith('--cell "${cells[$SLURM_ARRAY_TASK_ID]}" -- --runs-dir scratch/runs')
    header = [line for line in look.splitlines() if line.startswith("#SBATCH ")]
    assert header == ["#SBATCH --job-name=danet-seqplan-look", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=1",
                      "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --time=00:10:00",
                      f"#SBATCH --chdir={tmp_path}", f"#SBATCH --output={tmp_path}/scratch/runs/slurm/%x_%j.out",
                      "#SBATCH --open-mode=append", "#SBATCH --no-requeue", "#SBATCH --export=ALL"]
    assert "OMP_NUM_THREADS" not in look  # the next round's tasks get the look job's environment
    assert look.splitlines()[-1] == (f"exec {sys.executable} {LAUNCHER} --look 0 --grid {grid} --partition gpu "
                                     "--account lab --gpus-per-task 1 --cpus-per-task 1 --time 04:00:00 --array 2 "
                                     "--max-requeues 3 -- --runs-dir scratch/runs")
    assert "0 of 2 looks taken (next: look 1 at 2 seeds)" in result.stderr and "b vs a: no look yet" in result.stderr
    assert not (tmp_path / "scratch").exists()  # a dry run writes nothing, the ledger included
    study = _launch(["--grid", str(grid), "--study", "s", "--dry-run"], tmp_path)  # the Optuna workers run the rounds
    assert study.returncode == 0 and "#SBATCH --array=0-8\n" in study.stdout and "look job" not in study.stdout


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


@pytest.mark.slow
def test_a_planned_grid_runs_in_rounds_of_arrays_each_followed_by_its_look_job(tmp_path, slurm_cluster):
    from danet.grids import load_grid
    from danet.launch.contract import cell_argv, target_of
    from danet.launch.ledger import ledger_path, read_ledger, replay
    from danet.tracking import complete_runs

    grid_path = _planned_grid(tmp_path / "seqplan.yaml")
    runs = tmp_path / "runs"
    result = _launch(["--grid", str(grid_path), "--", *tiny_flags(runs)], tmp_path,
                     dict(slurm_cluster, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    first = re.search(r"submitted job array (\d+): 0-5 \(6 cells of grid seqplan before look 1 of 2\); "
                      r"look job (\d+) follows it", result.stdout)
    assert first, result.stdout

    def chain_done():  # a look job submits the next round before it ends: an empty queue is the end of the chain
        return not _slurm(slurm_cluster, "squeue", "-h", "-n", "danet-seqplan,danet-seqplan-look").strip()

    _wait_until(chain_done, slurm_cluster, first.group(1), timeout=900, what="the rounds and their look jobs")
    logs = runs / "slurm"
    arrays = sorted({int(m.group(1)) for p in logs.glob("danet-seqplan_*.out")
                     if (m := re.fullmatch(r"danet-seqplan_(\d+)_\d+\.out", p.name))})
    look_jobs = sorted(int(re.fullmatch(r"danet-seqplan-look_(\d+)\.out", p.name).group(1))
                       for p in logs.glob("danet-seqplan-look_*.out"))
    for job in look_jobs:  # every look job ended well (a look it could not take would exit 1)
        assert "JobState=COMPLETED" in _slurm(slurm_cluster, "scontrol", "-o", "show", "job", str(job))

    entries = read_ledger(ledger_path(runs, "seqplan"))
    first_look = {entry["comparison"]: entry["result"]["decision"] for entry in entries if entry["look"] == 0}
    assert set(first_look) == {"b vs a", "A/A"} and all(entry["n"] == 2 for entry in entries if entry["look"] == 0)
    going_on = [c for c in PLANNED_COMPARISONS if first_look[c["name"]] == "continue"]
    # the second look decides exactly the comparisons the first one let go on, on 3 seeds
    assert sorted(e["comparison"] for e in entries if e["look"] == 1) == sorted(c["name"] for c in going_on)
    assert all(entry["n"] == 3 for entry in entries if entry["look"] == 1) and len(entries) == 2 + len(going_on)

    grid = load_grid(str(grid_path), tmp_path)
    hashes = {cell: target_of(cell_argv(str(grid_path), cell, tiny_flags(runs))).cell_hash for cell in grid.cells}
    complete = complete_runs(runs)
    stopped = replay(grid, read_ledger(ledger_path(runs, grid.name))).stopped_cell_ids()
    assert replay(grid, read_ledger(ledger_path(runs, grid.name))).next_look() is None  # the plan is done
    for cell, cell_hash in hashes.items():  # every cell is complete or stopped by the plan, never both
        assert (cell_hash in complete) != (cell in stopped), cell
    # round 2 ran seed index 2 of exactly the cells of a comparison that went on
    live = {name for c in going_on for name in (c["treatment"], c["baseline"])}
    assert {cell.split("_")[0] for cell in grid.cells if cell.endswith("_seed=2") and hashes[cell] in complete} == live
    assert {cell for cell in stopped} == {f"{name}_seed=2" for name in PLANNED_CELLS if name not in live}
    assert all(hashes[f"{name}_seed={seed}"] in complete for name in PLANNED_CELLS for seed in (0, 1))
    # one array and one look job per round: two rounds when a comparison went on after the first look
    rounds = 2 if going_on else 1
    assert len(arrays) == rounds and len(look_jobs) == rounds and arrays[0] == int(first.group(1))
    assert look_jobs[0] == int(first.group(2))
    assert len(list(logs.glob(f"danet-seqplan_{arrays[0]}_*.out"))) == 6
    if going_on:
        assert len(list(logs.glob(f"danet-seqplan_{arrays[1]}_*.out"))) == len(live)
        handed_on = (logs / f"danet-seqplan-look_{look_jobs[0]}.out").read_text()
        assert f"submitted job array {arrays[1]}: 0-{len(live) - 1} ({len(live)} cells of grid seqplan before look " \
               f"2 of 2); look job {look_jobs[1]} follows it" in handed_on
    last = (logs / f"danet-seqplan-look_{look_jobs[-1]}.out").read_text()
    assert f"grid seqplan: its plan is done: {len(grid.cells) - len(stopped)} cells complete, {len(stopped)} " \
           "stopped by the plan; nothing to submit" in last
    latest = {entry["comparison"]: entry for entry in entries}  # each comparison's final decision, as printed
    for name, entry in latest.items():
        assert f"  {name}: {entry['result']['decision']} at {entry['n']} seeds (final; delta " in last
    # submitting again submits nothing: the plan is done
    again = _launch(["--grid", str(grid_path), "--", *tiny_flags(runs)], tmp_path,
                    dict(slurm_cluster, PYTHONPATH=str(REPO)))
    assert again.returncode == 0 and "its plan is done" in again.stdout and "submitted" not in again.stdout


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
