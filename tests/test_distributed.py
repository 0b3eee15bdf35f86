"""torchrun with 2 CPU processes (gloo): equivalence with one process, one record, resume, rank death."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from danet.distributed import Context, from_environment
from danet.engine import SeededBatchSampler
from tests.conftest import REPO, only_run_dir, run_cli, summary_of, tiny_flags, wait_for_checkpoint, write_grid

# 8 iterations of a global batch of 4 (2 per rank); dropout off, so the only difference between
# 2 ranks and 1 process is BatchNorm: without SyncBatchNorm (CUDA only) each rank normalises with
# the statistics of its 2 images instead of all 4.
SETTINGS = ("--batch-size", "4", "--iterations", "8", "--eval-every", "4", "--dropout", "0", "--no-sync-bn",
            "--synthetic-val-images", "5")


def _torchrun(runs, *extra, processes=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "ablations" / "run.py"), *tiny_flags(runs, *SETTINGS, *extra)]
    return subprocess.Popen(command, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rank_slices_of_the_global_batch_cover_it_exactly():
    whole = list(SeededBatchSampler(12, 4, seed=3, start=0, stop=6))
    ranks = [list(SeededBatchSampler(12, 4, seed=3, start=0, stop=6, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == whole
    assert from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Context(1, 2, 1)
    assert not from_environment({}).enabled


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    assert run_cli(tiny_flags(single, *SETTINGS)) == 0
    process = _torchrun(double)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    run_dir = only_run_dir(double)  # one record, written by rank 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    one, two = summary_of(single), summary_of(double)
    assert two["status"] == "complete" and two["world_size"] == 2 and one["cell_hash"] == two["cell_hash"]
    losses_one = [e["train/loss"] for e in _events(only_run_dir(single)) if "train/loss" in e]
    losses_two = [e["train/loss"] for e in _events(run_dir) if "train/loss" in e]
    # step 1 starts from identical weights: only the per-rank BatchNorm statistics differ
    assert losses_two[0] == pytest.approx(losses_one[0], rel=0.02)
    # after 8 SGD steps the two trajectories stay close; mIoU over 5 tiny images moves in steps of
    # about 0.01, so 0.03 allows a pixel-level disagreement without hiding a broken reduction
    assert two["final_miou"] == pytest.approx(one["final_miou"], abs=0.03)
    assert len(losses_two) == 8  # rank 0 logged each step once


def _rank_pids(parent_pid):
    """The worker processes of a torchrun job, by rank."""
    pids = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{parent_pid}\n" not in status.read_text():
                continue
            environment = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environment:
            if entry.startswith(b"RANK="):
                pids[int(entry[5:])] = int(status.parent.name)
    return pids


@pytest.mark.slow
def test_resume_under_two_processes_ends_like_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    longer = ("--iterations", "40", "--checkpoint-every", "5", "--eval-every", "20", "--synthetic-train-images", "16")
    process = _torchrun(reference, *longer)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    process = _torchrun(killed, *longer)
    assert wait_for_checkpoint(killed, process), process.communicate()
    for pid in [*_rank_pids(process.pid).values(), process.pid]:  # the whole job, without a word
        os.kill(pid, signal.SIGKILL)  # (torchrun starts its workers in sessions of their own)
    process.communicate()
    assert summary_of(killed)["status"] == "running"

    process = _torchrun(killed, *longer, "--resume")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert summary_of(killed)["final_miou"] == summary_of(reference)["final_miou"]
    assert summary_of(killed)["per_class_iou"] == summary_of(reference)["per_class_iou"]


@pytest.mark.slow
def test_a_dying_rank_stops_the_job_and_the_record_says_failed(tmp_path):
    runs = tmp_path / "runs"
    process = _torchrun(runs, "--iterations", "400", "--checkpoint-every", "4", "--synthetic-train-images", "16")
    assert wait_for_checkpoint(runs, process), process.communicate()
    pids = _rank_pids(process.pid)
    assert set(pids) == {0, 1}, pids
    os.kill(pids[1], signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    summary = summary_of(runs)
    assert summary["status"] == "failed", output
    assert "continue with --resume" in summary["reason"] or "another rank" in summary["reason"]


@pytest.mark.slow
def test_an_optuna_worker_runs_each_trial_as_a_torchrun_job(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    grid = write_grid(tmp_path / "one.yaml", {"pam": {"pam": True, "cam": False}})
    runs = tmp_path / "runs"
    command = [sys.executable, str(REPO / "sweeps" / "optuna_study.py"), "--grid", str(grid), "--study", "ddp",
               "--nproc-per-trial", "2", "--", *tiny_flags(runs, *SETTINGS)]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    trial, = optuna.load_study(study_name="ddp", storage=JournalStorage(JournalFileBackend(
        str(tmp_path / "optuna" / "ddp.journal")))).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    summary = summary_of(runs)
    assert summary["world_size"] == 2 and summary["study"] == "ddp" and summary["trial"] == 0
    assert trial.value == summary["final_miou"]
