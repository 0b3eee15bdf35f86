"""The run contract (danet.launch.contract): one argv per cell, and the record it writes known without torch."""

import subprocess
import sys

import pytest

from danet.config import UsageError
from danet.data import build
from danet.data.catalog import CLASS_COUNTS, train_images
from danet.grids import load_grid
from danet.launch.contract import cell_argv, launcher_overrides, resolve_without_data, search_argv, target_of
from danet.launch.slurm_jobs import cell_command
from danet.paths import GRID_DIR, RUN_SCRIPT
from danet.runner import prepare
from tests.conftest import REPO, resolve, tiny_flags


@pytest.mark.parametrize("argv", [
    ["--grid", "demo", "--cell", "pam-cam_seed=1"],
    ["--config", "demo", "--epochs", "2", "--pam", "--no-cam"],
    ["--grid", "camvid_cpu_controlled", "--cell", "pam-cam-ds_seed=3", "--synthetic-size", "32"],
])
def test_the_record_a_launcher_expects_is_the_one_the_run_writes(argv, tmp_path, request):
    if "camvid_cpu_controlled" in argv:  # a real grid on a tiny CamVid tree: the class count from the catalog
        argv = [*argv[:4], "--data-root", str(request.getfixturevalue("camvid_tree")), "--batch-size", "2"]
    target = target_of([*argv, "--runs-dir", str(tmp_path / "runs")])
    prepared = prepare(resolve([*argv, "--runs-dir", str(tmp_path / "runs")]))
    assert target.cfg == prepared.cfg
    assert target.cell_hash == prepared.cfg.cell_hash() and target.run_dir.parent == tmp_path / "runs"


@pytest.mark.parametrize("dataset", ["camvid", "cityscapes"])
def test_the_catalog_counts_what_the_datasets_list(dataset, request):
    from danet.config import DataConfig

    root = request.getfixturevalue(f"{dataset}_tree")
    cfg = DataConfig(dataset=dataset, data_root=str(root))
    data = build(cfg)
    assert (CLASS_COUNTS[dataset], train_images(cfg)) == (data.num_classes, len(data.train))


def test_the_catalog_knows_every_datasets_class_count():
    from danet.data import catalog
    from danet.data.camvid import CLASS_NAMES as CAMVID
    from danet.data.cityscapes import CLASS_NAMES as CITYSCAPES
    from danet.data.synthetic import CLASS_NAMES as SYNTHETIC
    from danet.data.voc import CLASS_NAMES as VOC

    assert catalog.CLASS_COUNTS == {"synthetic": len(SYNTHETIC), "camvid": len(CAMVID),
                                    "cityscapes": len(CITYSCAPES), "voc": len(VOC)}


def test_epochs_resolve_from_the_catalog_and_a_missing_dataset_is_a_usage_error(tmp_path):
    cfg = resolve_without_data(resolve(["--epochs", "3", "--batch-size", "4", "--synthetic-train-images", "10"]))
    assert (cfg.train.iterations, cfg.train.epochs) == (3 * (10 // 4), 0)
    with pytest.raises(UsageError, match="CamVid root .* does not exist"):
        target_of(["--config", "camvid_cpu", "--data-root", str(tmp_path / "nowhere")])


def test_every_launcher_builds_a_cells_argv_the_same_way():
    argv = cell_argv("demo", "pam_seed=0", ["--quiet"])
    assert argv == ["--grid", "demo", "--cell", "pam_seed=0", "--resume", "--quiet"]
    assert cell_command("demo", "pam_seed=0", 1, ["--quiet"]) == [sys.executable, str(RUN_SCRIPT), *argv]
    assert search_argv("demo", {"lr": 0.01, "pam": False}) == ["--config", "demo", "--resume", "--lr=0.01",
                                                               "--pam=False"]
    grid = load_grid("demo", GRID_DIR)
    assert grid.path == GRID_DIR / "demo.yaml" and grid.varying() == ("cam", "grid_cell", "pam", "seed")


@pytest.mark.parametrize("flag", ["--config=demo", "--grid=demo", "--cell=x", "--overwrite"])
def test_launchers_refuse_the_flags_they_set_themselves(flag):
    with pytest.raises(UsageError, match="leave them out of the run flags"):
        launcher_overrides([flag])


@pytest.mark.parametrize("command", [
    [str(REPO / "sweeps" / "local_sweep.py"), "--help"],
    [str(REPO / "sweeps" / "optuna_study.py"), "--help"],
    [str(REPO / "sweeps" / "slurm.py"), "--help"],
    [str(REPO / "sweeps" / "slurm.py"), "--grid", "demo", "--dry-run"],
    [str(REPO / "sweeps" / "make_sweeps.py"), "--help"],
    [str(REPO / "sweeps" / "agents.py"), "--help"],
    [str(REPO / "ablations" / "evaluate.py"), "--help"],
])
def test_processes_that_do_not_train_import_no_torch(command):
    """Run the script under an import hook that fails on torch: launchers and --help stay light."""
    guard = ("import sys, runpy\n"
             "class NoTorch:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
             "            raise ImportError('torch imported by a process that does not train')\n"
             "sys.meta_path.insert(0, NoTorch())\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", guard, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_executor_loads_its_sweep_and_records_without_torch(tmp_path):
    """The W&B-YAML executor up to its first trial: the grid's every record is found through the contract."""
    guard = ("import sys\n"
             "from danet.launch.sweep_files import load_sweep\n"
             "from danet.launch.yaml_executor import sweep_target\n"
             "sweep = load_sweep(__import__('pathlib').Path('sweeps/demo.yaml'))\n"
             "targets = [sweep_target(sweep, values, sys.argv[1:]) for values in sweep.grid_points()]\n"
             "assert len({t.cell_hash for t in targets}) == 8\n"
             "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", guard, *tiny_flags(tmp_path / "runs")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
