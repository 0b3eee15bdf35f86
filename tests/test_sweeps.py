"""Grids, W&B sweep files and agents, without a W&B server."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from danet.config import UsageError
from danet.grids import load_grid
from danet.tracking import RunStore
from tests.conftest import GRIDS, REPO, load_script, resolve, run_cli, tiny_flags

agents = load_script("sweeps/agents.py")
make_sweeps = load_script("sweeps/make_sweeps.py")


@pytest.mark.parametrize("name, cells", [("table1", 30), ("table2", 9), ("camvid_cpu", 26), ("demo", 8)])
def test_grids_expand_to_their_cells(name, cells):
    grid = load_grid(name, GRIDS)
    assert len(grid.cells) == cells
    for cell_id in grid.cells:  # every cell resolves to a valid config
        resolve(["--grid", name, "--cell", cell_id])


def test_a_grid_declares_its_design_and_a_controlled_one_shares_one_recipe(tmp_path):
    controlled = load_grid("camvid_cpu_controlled", GRIDS)
    assert controlled.design == "controlled" and len(controlled.cells) == 40 and len(controlled.comparisons) == 4
    configs = {cell_id: resolve(["--grid", "camvid_cpu_controlled", "--cell", cell_id]) for cell_id in controlled.cells}
    assert not configs["danet-head_seed=0"].model.aux and not configs["pam-cam_seed=3"].model.aux  # aux off by default
    assert configs["pam-cam-ds_seed=0"].model.loss_weights().keys() == {"out", "pam", "cam"}
    assert configs["danet-head-ds_seed=0"].model.loss_weights().keys() == {"out", "pam", "cam"}
    assert configs["fcn-head_seed=7"].model.head == "fcn"
    assert {cfg.train.lr for cfg in configs.values()} == {0.02}
    assert {(cfg.tracking.grid, cfg.tracking.design) for cfg in configs.values()} == {
        ("camvid_cpu_controlled", "controlled")}
    assert configs["pam-cam-ds_seed=2"].tracking.grid_cell == "pam-cam-ds"

    def grid_file(**overrides):
        path = tmp_path / "g.yaml"
        path.write_text(yaml.safe_dump({"preset": "demo", "design": "controlled", "blocks": [{"axes": {"seed": [0]},
                        "cells": {"a": {"pam": False}, "b": {"pam": True}}}], **overrides}))
        return path

    assert len(load_grid(str(grid_file()), GRIDS).cells) == 2
    with pytest.raises(UsageError, match="differ in their recipe"):
        load_grid(str(grid_file(blocks=[{"cells": {"a": {"lr": 0.1}, "b": {"lr": 0.2}}}])), GRIDS)
    schedule = [{"cells": {"a": {"iterations": 9}, "b": {"iterations": 3}}}]
    assert len(load_grid(str(grid_file(blocks=schedule, studies=["iterations"])), GRIDS).cells) == 2
    with pytest.raises(UsageError, match="differ in their recipe"):  # a studied field does not excuse another
        load_grid(str(grid_file(blocks=[{"cells": {"a": {"iterations": 9}, "b": {"lr": 0.2}}}],
                                studies=["iterations"])), GRIDS)
    with pytest.raises(UsageError, match="itterations"):
        load_grid(str(grid_file(studies=["itterations"])), GRIDS)
    with pytest.raises(UsageError, match="design must be one of"):
        load_grid(str(grid_file(design=None)), GRIDS)
    with pytest.raises(UsageError, match="evaluation of unknown cells"):
        load_grid(str(grid_file(evaluations=[{"of": ["c"], "eval_flip": True}])), GRIDS)
    with pytest.raises(UsageError, match="a comparison needs name, treatment and baseline"):
        load_grid(str(grid_file(comparisons=[{"name": "x", "treatment": "a", "baseline": "zz"}])), GRIDS)


def test_table1_cells_carry_the_papers_tied_settings():
    fcn = resolve(["--grid", "table1", "--cell", "fcn-head_backbone=resnet101_seed=2"])
    no_attention = resolve(["--grid", "table1", "--cell", "danet-head_backbone=resnet101_seed=2"])
    both = resolve(["--grid", "table1", "--cell", "pam-cam_backbone=resnet50_seed=0"])
    assert (fcn.model.head, fcn.model.pam, fcn.model.cam, fcn.model.aux, fcn.train.lr) == ("fcn", False, False, False, 0.01)
    assert fcn.model.backbone == "resnet101" and fcn.train.seed == 2 and fcn.data.crop_size == 768
    assert no_attention.model.head == "danet" and dataclasses.replace(no_attention.model, head="fcn") == fcn.model
    assert (both.model.pam, both.model.cam, both.model.aux, both.train.lr) == (True, True, True, 0.003)
    table2 = load_grid("table2", GRIDS)
    assert not any(cell_id.startswith("da-mg-ms") for cell_id in table2.cells)  # MS is an evaluation, not a retrain
    multi_scale, = table2.evaluations
    assert multi_scale.of == ("da-mg",) and multi_scale.applies_to("da-mg") and not multi_scale.applies_to("da")
    assert multi_scale.protocol == {"eval_scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.2], "eval_flip": True}
    camvid = load_grid("camvid_cpu", GRIDS).cells
    assert sum(cell_id.startswith("pam-cam-") for cell_id in camvid) == 6


@pytest.mark.parametrize("argv, message", [
    (["--grid", "demo"], "--grid and --cell go together"),
    (["--grid", "demo", "--cell", "nope"], "--cell nope: not a cell of grid demo (8 cells, e.g. fcn_seed=0"),
    (["--grid", "nope", "--cell", "x"], "--grid nope: no such file or name (names: "),
    (["--grid", "demo", "--cell", "fcn_seed=0", "--config", "demo"], "--config with --grid"),
])
def test_grid_usage_errors(argv, message):
    with pytest.raises(UsageError) as error:
        resolve(argv)
    assert message in str(error.value)


def test_sweep_files_are_generated_from_the_grids():
    for grid_path in sorted(GRIDS.glob("*.yaml")):
        committed = (REPO / "sweeps" / f"{grid_path.stem}.yaml").read_text()
        assert committed == make_sweeps.render(make_sweeps.sweep_for_grid(grid_path.stem)), (
            f"sweeps/{grid_path.stem}.yaml is stale: run python sweeps/make_sweeps.py")
        sweep = yaml.safe_load(committed)
        assert sweep["method"] == "grid" and sweep["metric"] == {"name": "val/mIoU", "goal": "maximize"}
        assert sweep["parameters"]["cell"]["values"] == list(load_grid(grid_path.stem, GRIDS).cells)
        assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "--resume", "--quiet", "${args}"]


def test_hparams_sweep_is_a_bayes_search_with_hyperband_on_known_flags():
    sweep = yaml.safe_load((REPO / "sweeps" / "hparams.yaml").read_text())
    assert sweep["method"] == "bayes" and sweep["early_terminate"]["type"] == "hyperband"
    values = {name: spec.get("value", spec.get("values", [spec.get("min")])) for name, spec in
              sweep["parameters"].items()}
    params = {name: {"value": value[0] if isinstance(value, list) else value} for name, value in values.items()}
    argv = create_sweep_command_args({"args": params})["args"]
    resolve(argv)  # every parameter is a flag run.py accepts


def _agent_argv(sweep: dict, params: dict) -> list[str]:
    """What `wandb agent` runs for these parameter values, minus ${env} ${interpreter} ${program}."""
    args = create_sweep_command_args({"args": {key: {"value": value} for key, value in params.items()}})["args"]
    command = [item for item in sweep["command"] if not item.startswith("${") or item == "${args}"]
    return [part for item in command for part in (args if item == "${args}" else [item])]


@pytest.mark.slow
def test_agent_command_lines_run_the_right_cells_for_real(tmp_path):
    sweep = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    runs = tmp_path / "runs"
    for cell in ("fcn_seed=1", "pam-cam_seed=0"):
        argv = _agent_argv(sweep, {"grid": "demo", "cell": cell})
        assert "--grid=demo" in argv and f"--cell={cell}" in argv
        # the agent's argv, then tiny sizes so the test takes seconds (flags override the cell)
        assert run_cli(argv + tiny_flags(runs)) == 0
    records = {path.parent.name: yaml.safe_load((path.parent / "config.yaml").read_text())
               for path in runs.glob("*/summary.json")}
    switches = sorted((c["model"]["pam"], c["model"]["cam"], c["train"]["seed"]) for c in records.values())
    assert switches == [(False, False, 1), (True, True, 0)]
    # the same agent command again (W&B re-running a cell): skipped, nothing retrained
    assert run_cli(_agent_argv(sweep, {"grid": "demo", "cell": "fcn_seed=1"}) + tiny_flags(runs)) == 0
    assert len(list(runs.glob("*/summary.json"))) == 2


def test_a_complete_cell_is_found_by_its_config_whatever_the_run_name(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--run-name", "first")) == 0
    assert run_cli(tiny_flags(runs, "--run-name", "second", "--resume")) == 0
    assert "already complete (same config)" in capsys.readouterr().err
    assert [path.name.split("-")[0] for path in runs.iterdir() if path.is_dir() and not path.name.startswith(".")] \
        == ["first"]


def test_a_run_held_by_another_process_is_not_trained_twice(tmp_path, capsys):
    runs = tmp_path / "runs"
    cfg = resolve(tiny_flags(runs))
    with RunStore(runs, cfg.replace("model", num_classes=5)).lock() as held:
        assert held is not None
        assert run_cli(tiny_flags(runs)) == 2
    assert "is being trained by another process" in capsys.readouterr().err
    assert run_cli(tiny_flags(runs)) == 0  # released


@pytest.mark.slow
def test_agents_start_one_per_gpu_and_stop_on_ctrl_c(tmp_path):
    stand_in = tmp_path / "agent.py"
    stand_in.write_text("import os, sys, time\n"
                        "mark = os.path.join(sys.argv[1], os.environ['CUDA_VISIBLE_DEVICES'])\n"
                        "open(mark, 'w').write(' '.join(sys.argv[2:]))\n"
                        "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, str(REPO / "sweeps" / "agents.py"), "me/proj/abc123", "--count", "3",
                                "--gpus", "0,2", "--agent-command", f"{sys.executable} {stand_in} {tmp_path}"],
                               stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not ((tmp_path / "0").exists() and (tmp_path / "2").exists()):
        time.sleep(0.1)
    assert (tmp_path / "0").read_text() == "me/proj/abc123 --count 3"
    assert (tmp_path / "2").read_text() == "me/proj/abc123 --count 3"
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130 and "stopping agents" in output
    pids = [int(line.split()[2].rstrip(":")) for line in output.splitlines() if line.startswith("agent pid")]
    assert len(pids) == 2
    for pid in pids:  # the agents are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert agents.agent_commands("s", [], None, "wandb agent") == [("", ["wandb", "agent", "s"])]
