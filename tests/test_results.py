"""The published results: every committed CPU record is a complete run of a cell of its grid
(camvid_cpu, camvid_cpu_controlled, synthetic_control) under the current preset, one record per
cell (for synthetic_sequential, exactly the cells its ledger ran), and each committed table (the
CPU grids, the GPU check, the controlled grid under both test protocols, the synthetic positive
control and the sequential study) and each folder's results page (README.md) is what the
report command (reports/controls.py for results/controls) rebuilds from its records and the
folder's hand-written about.md and reading.md; each published replay of a plan (reports/plan.py
--replay) is what that command writes from the records."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from danet.config import resolve_for_dataset
from danet.grids import load_grid
from danet.launch.ledger import ledger_path, read_ledger, replay, verify
from danet.paths import RESULTS_DIR
from reports.sources import read_run_store
from tests.conftest import GRIDS, load_script, resolve

make_tables = load_script("reports/make_tables.py")
controls = load_script("reports/controls.py")
plan_script = load_script("reports/plan.py")

CAMVID = (11, 367)  # classes, training images
SYNTHETIC = (5, 2048)  # the synthetic training set's default size


@pytest.mark.slow
@pytest.mark.parametrize("folder, grid, cells, dataset", [("camvid_cpu", "camvid_cpu", 26, CAMVID),
                                                          ("camvid_cpu_controlled", "camvid_cpu_controlled", 40, CAMVID),
                                                          ("synthetic", "synthetic_control", 16, SYNTHETIC)])
def test_committed_records_are_cells_of_the_grid_under_the_current_preset(folder, grid, cells, dataset):
    runs = read_run_store(RESULTS_DIR / folder / "runs")
    assert (runs["status"] == "complete").all(), runs.loc[runs["status"] != "complete", "run_id"].tolist()
    grid_hashes = {resolve_for_dataset(resolve(["--grid", grid, "--cell", cell_id]), *dataset)
                   .cell_hash() for cell_id in load_grid(grid, GRIDS).cells}
    assert len(grid_hashes) == cells and len(runs) == cells
    foreign = runs.loc[~runs["cell_hash"].isin(grid_hashes), "run_id"].tolist()
    assert not foreign, f"records that are not cells of the grid under the current preset: {foreign}"
    assert runs["cell_hash"].is_unique


@pytest.mark.slow
def test_a_sequential_studys_records_are_exactly_the_cells_its_ledger_ran():
    grid, runs_dir = load_grid("synthetic_sequential", GRIDS), RESULTS_DIR / "synthetic_sequential" / "runs"
    state = replay(grid, read_ledger(ledger_path(runs_dir, grid.name)))
    assert state.next_look() is None  # the plan is done
    seeds = state.cell_seeds()
    ran = [cell_id for name, order in grid.seeds_in_order().items() for _, cell_id in order[:seeds[name]]]
    runs = read_run_store(runs_dir)
    assert (runs["status"] == "complete").all() and set(runs["grid"]) == {"synthetic_sequential"}
    hashes = {resolve_for_dataset(resolve(["--grid", grid.name, "--cell", cell_id]), *SYNTHETIC).cell_hash()
              for cell_id in ran}
    assert sorted(runs["cell_hash"]) == sorted(hashes)  # no stopped cell trained, none missing, none twice
    verify(read_ledger(ledger_path(runs_dir, grid.name)), runs_dir)  # every record a look used, unchanged


@pytest.mark.slow
def test_controlled_records_carry_their_grid_and_their_test_time_augmentation():
    runs = read_run_store(RESULTS_DIR / "camvid_cpu_controlled" / "runs")
    assert set(runs["design"]) == {"controlled"} and set(runs["grid"]) == {"camvid_cpu_controlled"}
    for run in runs.itertuples():  # each run's final checkpoint, evaluated with flip + 3 scales right after it
        path, = Path(run.run_dir).glob("evaluations/val-ms0.75-1-1.25-flip-*.json")
        evaluation = json.loads(path.read_text())
        assert (evaluation["cell_hash"], evaluation["split"], evaluation["checkpoint"]) == (run.cell_hash, "val", "last")
        assert evaluation["checkpoint_iteration"] == run.iterations == 300
        assert evaluation["protocol_settings"] | {"eval_window": None, "eval_stride": None} == {
            "eval_mode": "whole", "eval_window": None, "eval_stride": None, "eval_scales": [0.75, 1.0, 1.25],
            "eval_flip": True}
        assert 0 < evaluation["miou"] < 1 and evaluation["miou"] != run.final_miou


PUBLISHED = [  # results folder, extra make_tables arguments, the tables it holds
    ("camvid_cpu", [], ["table1"]),
    ("camvid_gpu", [], ["table1"]),
    ("camvid_cpu_controlled", [], ["cells", "comparisons", "plan"]),
    ("camvid_cpu_controlled", ["--protocol", "ms0.75-1-1.25-flip"],
     ["cells-ms0.75-1-1.25-flip", "comparisons-ms0.75-1-1.25-flip", "plan-ms0.75-1-1.25-flip"]),
    ("synthetic", [], ["cells", "comparisons"]),
    ("synthetic_sequential", [], ["cells", "comparisons", "plan"]),
]


def _copy_files(folder: Path, to: Path) -> None:
    """What a results folder holds besides its records (its tables of the other protocol, figures of
    other scripts, the page's hand-written parts): a rebuild in `to` starts from the same folder."""
    for path in folder.iterdir():
        if path.is_file():
            shutil.copy(path, to / path.name)


@pytest.mark.slow
@pytest.mark.parametrize("folder, arguments, tables", PUBLISHED,
                         ids=[" ".join([folder, *arguments]) for folder, arguments, _ in PUBLISHED])
def test_published_tables_and_pages_rebuild_from_the_committed_records(folder, arguments, tables, tmp_path):
    results = RESULTS_DIR / folder
    _copy_files(results, tmp_path)
    for name in [f"{table}.{ext}" for table in tables for ext in ("md", "tex", "csv")] + ["README.md"]:
        (tmp_path / name).unlink()  # rebuilt, not copied
    assert make_tables.main(["--runs-dir", str(results / "runs"), "--out", str(tmp_path), *arguments]) == 0
    for table in tables:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / f"{table}.csv"), pd.read_csv(results / f"{table}.csv"))
        for name in (f"{table}.md", f"{table}.tex"):
            assert (tmp_path / name).read_text() == (results / name).read_text(), name
    assert (tmp_path / "README.md").read_text() == (results / "README.md").read_text()


REPLAYS = [  # results folder, reports/plan.py --replay arguments (besides --runs-dir and --csv), the csv it holds
    ("camvid_cpu_controlled", ["--grid", "camvid_cpu_controlled", "--looks", "4,6,8", "--futility"], "replay-4-6-8.csv"),
]


@pytest.mark.slow
@pytest.mark.parametrize("folder, arguments, name", REPLAYS, ids=[name for _, _, name in REPLAYS])
def test_published_replays_rebuild_from_the_committed_records(folder, arguments, name, tmp_path):
    results = RESULTS_DIR / folder
    assert plan_script.main(["--replay", "--runs-dir", str(results / "runs"), *arguments,
                             "--csv", str(tmp_path / name)]) == 0
    assert (tmp_path / name).read_text() == (results / name).read_text()


@pytest.mark.slow
def test_the_controls_page_rebuilds(tmp_path):
    results = RESULTS_DIR / "controls"
    _copy_files(results, tmp_path)
    (tmp_path / "README.md").unlink()
    assert controls.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == (results / "README.md").read_text()


STUDIES = ["camvid_cpu", "camvid_gpu", "camvid_cpu_controlled", "synthetic", "synthetic_sequential", "controls"]


@pytest.mark.parametrize("folder", STUDIES)
def test_every_study_has_a_page_whose_links_stay_in_the_repository(folder):
    """A page, its hand-written parts, every link and image resolving inside the repository, and
    nothing that points outside it or depends on where it was written."""
    results = RESULTS_DIR / folder
    assert {"README.md", "about.md", "reading.md"} <= {path.name for path in results.iterdir()}
    page = (results / "README.md").read_text()
    assert page.startswith("<!-- Written by ") and "## Reading" in page
    for target in re.findall(r"\]\(([^)]+)\)", page):
        assert not re.match(r"[a-z]+://", target), target
        assert (results / target).resolve().is_relative_to(RESULTS_DIR.parent.resolve()), target
        assert (results / target).exists(), target
    for outside in ("../shared", "SWEEPS.md", "PAPER.md", str(RESULTS_DIR.parent)):
        assert outside not in page, outside
    pngs = sorted(path.name for path in results.glob("*.png"))
    assert [name for name in pngs if f"]({name})" not in page] == []
