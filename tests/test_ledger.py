"""Sequential plans in action: each look decided once into the ledger, from fabricated records; the
Optuna driver, the W&B-YAML executor and ablations/run.py running and respecting a plan on tiny runs."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from danet.grids import load_grid
from danet.launch.contract import cell_argv, sweep_for_grid, target_of
from danet.launch.ledger import LedgerError, advance, ledger_path, read_ledger, replay
from danet.plans import BETTER, CONTINUE, EQUIVALENT, FUTILE, INCONCLUSIVE, WORSE, Plan, decide_look
from tests.conftest import REPO, tiny_flags, write_grid

CELLS = {"a": {"pam": False, "cam": False}, "b": {"pam": True, "cam": False},
         "c": {"pam": False, "cam": False, "seed_offset": 100}}
COMPARISONS = [{"name": "b vs a", "treatment": "b", "baseline": "a"}, {"name": "A/A", "treatment": "c", "baseline": "a"}]


def _planned_grid(tmp_path: Path, looks=(2, 3), **plan) -> Path:
    seeds = tuple(range(looks[-1]))
    return write_grid(tmp_path / "planned.yaml", CELLS, seeds, design="as-released", comparisons=COMPARISONS,
                      plan={"looks": list(looks), "futility": True, "alpha": 0.5, **plan})


def _fabricate(runs: Path, grid: Path, cell: str, miou: float, flags: list[str]) -> Path:
    """A complete record of a grid cell as run.py would name it (its real cell hash), with a made-up result."""
    cfg = target_of(cell_argv(str(grid), cell, flags)).cfg
    run_dir = runs / cfg.run_id()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (run_dir / "summary.json").write_text(json.dumps({"status": "complete", "run_id": cfg.run_id(), "cell_hash":
                                                      cfg.cell_hash(), "final_miou": miou, "wall_time_s": 1.0}))
    return run_dir


def _hashes(grid: Path, flags: list[str]) -> dict[str, str]:
    return {cell: target_of(cell_argv(str(grid), cell, flags)).cell_hash for cell in load_grid(str(grid), REPO).cells}


# round 1 (seeds 0 and 1): b beats a, c (A/A) is below a: futile at the first look
ROUND_1 = {"a_seed=0": 0.50, "a_seed=1": 0.50, "b_seed=0": 0.55, "b_seed=1": 0.56, "c_seed=0": 0.49, "c_seed=1": 0.48}


def _round_1_made(tmp_path: Path):
    """The planned grid with round 1's records made up (ROUND_1); its look not yet taken."""
    grid_path, runs = _planned_grid(tmp_path), tmp_path / "runs"
    flags = tiny_flags(runs)
    made = {cell: _fabricate(runs, grid_path, cell, miou, flags) for cell, miou in ROUND_1.items()}
    return load_grid(str(grid_path), REPO), grid_path, runs, flags, _hashes(grid_path, flags), made


def test_interim_looks_stop_for_futility_and_spending_efficacy():
    plan = Plan((6, 8), futility=True, efficacy="spending", alpha=0.05)
    d = {"clear": np.ones(8), "null": np.array([1, -1, -1, 1, -1, -0.5, 2, 2.0]),
         "open": np.array([1, 2, -1, 1, 1, 1, 0, 0])}
    decided = decide_look(plan, 0, d, rows=3)
    # level 0.05 * 6/8 split over 3 rows = 0.0125 < 2^-6: no row can be better at 6 seeds, only futile
    assert {name: result.decision for name, result in decided.items()} == {"clear": CONTINUE, "null": FUTILE,
                                                                            "open": CONTINUE}
    assert decided["clear"].p_better == pytest.approx(2 ** -6) and decided["clear"].level == pytest.approx(0.0125)
    two_rows = decide_look(plan, 0, {"clear": np.ones(8)}, rows=2)  # 0.01875 >= 2^-6
    assert two_rows["clear"].decision == BETTER and two_rows["clear"].n == 6


def test_the_last_look_is_holms_step_down_then_worse_and_equivalence_at_its_level():
    plan = Plan((8,), futility=False, alpha=0.05, margin=1.0)
    d = {"better": np.ones(8) * 3, "worse": -np.ones(8) * 3,
         "same": np.array([0.1, -0.1, 0.05, -0.05, 0.0, 0.1, -0.1, 0.02]), "noisy": np.array([5, -4, 3, -6, 2, -1, 4, -3.0])}
    decided = decide_look(plan, 0, d, rows=4)
    assert {name: r.decision for name, r in decided.items()} == {"better": BETTER, "worse": WORSE, "same": EQUIVALENT,
                                                                  "noisy": INCONCLUSIVE}
    assert decided["better"].level == pytest.approx(0.05 / 4)  # the first Holm step
    assert decided["same"].level == pytest.approx(0.05 / 3)  # the step where it stopped
    # a row stopped earlier counts in the family: one live row of two is tested at alpha / 2
    assert decide_look(plan, 0, {"better": np.ones(8)}, rows=2)["better"].level == pytest.approx(0.025)


def test_each_look_is_decided_once_from_the_records_and_kept(tmp_path):
    grid_path, runs = _planned_grid(tmp_path), tmp_path / "runs"
    flags = tiny_flags(runs)
    grid = load_grid(str(grid_path), REPO)
    hashes = _hashes(grid_path, flags)
    state = advance(grid, runs, hashes)
    assert state.looks_taken == 0 and state.round_cells() == ["a_seed=0", "a_seed=1", "b_seed=0", "b_seed=1",
                                                              "c_seed=0", "c_seed=1"]
    for cell, miou in list(ROUND_1.items())[:-1]:
        _fabricate(runs, grid_path, cell, miou, flags)
    assert advance(grid, runs, hashes).looks_taken == 0  # one record of the round is missing: no look
    _fabricate(runs, grid_path, "c_seed=1", ROUND_1["c_seed=1"], flags)
    state = advance(grid, runs, hashes)
    assert state.looks_taken == 1 and state.decisions["A/A"].decision == FUTILE
    assert state.decisions["b vs a"].decision == CONTINUE
    assert state.round_cells() == ["a_seed=2", "b_seed=2"]  # the A/A row stopped; a still serves b vs a
    assert list(state.stopped_cell_ids()) == ["c_seed=2"]
    entries = read_ledger(ledger_path(runs, grid.name))
    assert [(e["look"], e["comparison"], e["result"]["decision"]) for e in entries] == [(0, "b vs a", CONTINUE),
                                                                                         (0, "A/A", FUTILE)]
    assert set(entries[1]["records"]) == {"a_seed=0", "a_seed=1", "c_seed=0", "c_seed=1"}
    advance(grid, runs, hashes)
    assert len(read_ledger(ledger_path(runs, grid.name))) == 2  # replayed, not decided again
    for cell, miou in {"a_seed=2": 0.50, "b_seed=2": 0.57}.items():
        _fabricate(runs, grid_path, cell, miou, flags)
    state = advance(grid, runs, hashes)
    assert state.next_look() is None and state.decisions["b vs a"].decision == BETTER
    assert state.cell_seeds() == {"a": 3, "b": 3, "c": 2}
    assert len(read_ledger(ledger_path(runs, grid.name))) == 3


def test_a_record_a_decision_used_that_disappears_or_changes_is_an_error_naming_it(tmp_path):
    grid, _, runs, _, hashes, made = _round_1_made(tmp_path)
    advance(grid, runs, hashes)
    summary = made["c_seed=0"] / "summary.json"
    original = summary.read_text()
    summary.write_text(original.replace('"final_miou": 0.49', '"final_miou": 0.99'))
    with pytest.raises(LedgerError, match=f"{made['c_seed=0'].name}.*changed after look 1"):
        advance(grid, runs, hashes)
    summary.unlink()
    with pytest.raises(LedgerError, match=f"{made['c_seed=0'].name}.*is gone"):
        advance(grid, runs, hashes)
    summary.write_text(original)
    assert advance(grid, runs, hashes).looks_taken == 1


def test_a_ledger_is_kept_to_its_plan_and_survives_a_torn_last_line(tmp_path):
    grid, grid_path, runs, flags, hashes, _ = _round_1_made(tmp_path)
    advance(grid, runs, hashes)
    path = ledger_path(runs, grid.name)
    with open(path, "a") as ledger:
        ledger.write('{"grid": "planned", "look": 1, "compar')  # a writer killed mid-line
    assert replay(grid, read_ledger(ledger_path(runs, grid.name))).looks_taken == 1
    for cell, miou in {"a_seed=2": 0.50, "b_seed=2": 0.57}.items():
        _fabricate(runs, grid_path, cell, miou, flags)
    advance(grid, runs, hashes)
    assert [e["look"] for e in read_ledger(path)] == [0, 0, 1] and path.read_text().endswith("}\n")
    edited = _planned_grid(tmp_path, margin=2.0)
    with pytest.raises(LedgerError, match="another plan"):
        advance(load_grid(str(edited), REPO), runs, hashes)


def test_a_look_left_half_written_is_decided_again_to_the_same_decisions(tmp_path):
    grid, _, runs, _, hashes, _ = _round_1_made(tmp_path)
    whole = advance(grid, runs, hashes).decisions
    path = ledger_path(runs, grid.name)
    path.write_text(path.read_text().splitlines(keepends=True)[0])  # the writer died after the first comparison
    assert replay(grid, read_ledger(path)).looks_taken == 0
    again = advance(grid, runs, hashes)
    assert again.looks_taken == 1 and again.decisions == whole
    assert [(e["look"], e["comparison"]) for e in read_ledger(path)] == [(0, "b vs a"), (0, "b vs a"), (0, "A/A")]


def test_a_plan_whose_seeds_do_not_match_its_looks_is_refused_in_one_line(tmp_path):
    path = write_grid(tmp_path / "short.yaml", CELLS, (0, 1), comparisons=COMPARISONS,
                      plan={"looks": [2, 3], "alpha": 0.5})
    process = subprocess.run([sys.executable, str(REPO / "ablations" / "run.py"), "--grid", str(path), "--cell",
                              "a_seed=0", "--print-config"], capture_output=True, text=True)
    assert process.returncode == 2 and process.stderr.count("\n") == 1
    assert "cell a has seeds [0, 1]; a planned grid gives each compared cell the same 3 seeds" in process.stderr


def _run(*argv, cwd):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=600)


def _trained(runs: Path) -> set[str]:
    """The cells that have a record trained here (fabricated ones have no metrics.jsonl)."""
    return {yaml.safe_load((path.parent / "config.yaml").read_text())["tracking"]["grid_cell"] + "_seed=" +
            str(yaml.safe_load((path.parent / "config.yaml").read_text())["train"]["seed"])
            for path in runs.glob("*/metrics.jsonl")}


@pytest.mark.slow
def test_the_optuna_driver_runs_rounds_restarts_between_looks_and_stops_on_a_lost_record(tmp_path):
    grid_path, runs = _planned_grid(tmp_path), tmp_path / "runs"
    flags = tiny_flags(runs)
    made = {cell: _fabricate(runs, grid_path, cell, miou, flags) for cell, miou in list(ROUND_1.items())[:4]}
    driver = [REPO / "sweeps" / "optuna_study.py", "--grid", grid_path, "--study", "planned"]
    first = _run(*driver, "--n-trials", "6", "--", *flags, cwd=tmp_path)  # round 1 only, then it stops
    assert first.returncode == 0, first.stderr[-3000:]
    assert _trained(runs) == {"c_seed=0", "c_seed=1"} and not ledger_path(runs, "planned").exists()
    # restarted between looks: takes look 1 (c's tiny runs, about 0.2 mIoU, are below a's made-up 0.5: A/A is
    # futile; b is above a on both seeds: b vs a continues) and runs round 2
    again = _run(*driver, "--", *flags, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    entries = read_ledger(ledger_path(runs, "planned"))
    looks = [(e["look"], e["comparison"]) for e in entries]
    assert len(looks) == len(set(looks)) and looks[:2] == [(0, "b vs a"), (0, "A/A")]
    grid = load_grid(str(grid_path), REPO)
    state = replay(grid, read_ledger(ledger_path(runs, grid.name)))
    stopped = state.stopped_cell_ids()
    assert _trained(runs) == {"c_seed=0", "c_seed=1", "a_seed=2", "b_seed=2", "c_seed=2"} - set(stopped)
    expected = "cells complete, 1 stopped by its plan" if stopped else "9/9 cells complete"
    assert expected in again.stderr
    (made["a_seed=0"] / "summary.json").unlink()
    lost = _run(*driver, "--", *flags, cwd=tmp_path)
    assert lost.returncode == 1 and f"{made['a_seed=0'].name}/summary.json: the record of a_seed=0" in lost.stderr


@pytest.mark.slow
def test_the_yaml_executor_and_run_py_respect_the_plan(tmp_path):
    _, grid_path, runs, flags, _, _ = _round_1_made(tmp_path)
    sweep = sweep_for_grid(str(grid_path), REPO) | {"program": str(REPO / "ablations" / "run.py")}
    sweep["parameters"]["wandb"]["value"] = "disabled"
    sweep["parameters"]["grid"]["value"] = str(grid_path)
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(sweep))
    run_py = REPO / "ablations" / "run.py"
    stopped = _run(run_py, "--grid", grid_path, "--cell", "c_seed=2", *flags, cwd=tmp_path)
    assert stopped.returncode == 0 and "c_seed=2: not trained: cell c stopped by the plan of grid planned " \
                                       "(A/A: futile at 2 seeds)" in stopped.stderr
    assert _trained(runs) == set()
    executor = _run(REPO / "sweeps" / "local_sweep.py", sweep_path, "--", *flags, cwd=tmp_path)
    assert executor.returncode == 0, executor.stderr[-3000:]
    assert _trained(runs) == {"a_seed=2", "b_seed=2"}
    assert "grid" in executor.stderr and "1 stopped by its plan" in executor.stderr
    ignored = _run(run_py, "--grid", grid_path, "--cell", "c_seed=2", "--ignore-plan", *flags, cwd=tmp_path)
    assert ignored.returncode == 0 and _trained(runs) == {"a_seed=2", "b_seed=2", "c_seed=2"}
    record, = [path.parent for path in runs.glob("*/metrics.jsonl")
               if yaml.safe_load((path.parent / "config.yaml").read_text())["train"].get("seed_offset") == 100]
    assert yaml.safe_load((record / "config.yaml").read_text())["tracking"]["ignore_plan"] is True


@pytest.mark.slow
def test_a_round_whose_look_cannot_be_taken_ends_the_driver_naming_the_cell(tmp_path):
    """A cell given up (its run fails every time) leaves its round without a look: the driver says so and
    exits 1 instead of waiting for a look that cannot come."""
    grid_path = write_grid(tmp_path / "broken.yaml", {"a": {"pam": False, "cam": False},
                                                      "b": {"pam": False, "cam": False, "lr": 1e30}}, (0, 1),
                           comparisons=[{"name": "b vs a", "treatment": "b", "baseline": "a"}],
                           plan={"looks": [1, 2], "futility": True, "alpha": 0.5})
    runs = tmp_path / "runs"
    driver = _run(REPO / "sweeps" / "optuna_study.py", "--grid", grid_path, "--study", "broken", "--",
                  *tiny_flags(runs), cwd=tmp_path)
    assert driver.returncode == 1, driver.stderr[-3000:]
    assert "grid broken: 1/4 cells complete" in driver.stderr and "b_seed=0" in driver.stderr
    assert "0 of 2 looks taken" in driver.stderr and not ledger_path(runs, "broken").exists()
