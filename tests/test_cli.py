import dataclasses
import os
import subprocess
import sys
import typing

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from danet.config import SECTIONS, RunConfig, UsageError, resolve_for_dataset
from danet.launch.contract import build_parser, parse_float_list
from tests.conftest import PRESETS, REPO, resolve, run_cli, tiny_flags


@pytest.mark.parametrize("argv, expected", [
    (["--pam"], True), (["--no-pam"], False), (["--pam=True"], True), (["--pam=False"], False),
    (["--pam=false"], False), (["--pam=TRUE"], True), (["--pam=1"], True), (["--pam=0"], False),
    (["--pam", "False"], False), (["--no-pam=false"], True), ([], True),
])
def test_boolean_switches_accept_every_form(argv, expected):
    assert resolve(argv).model.pam is expected


def test_wandb_agent_arguments_reach_the_config():
    # exactly what `wandb agent` renders for ${args}
    params = {"pam": False, "cam": True, "output_stride": 16, "lr": 0.003, "eval_scales": [0.75, 1.0, 1.25],
              "multi_grid": True, "aux": False}
    argv = create_sweep_command_args({"args": {key: {"value": value} for key, value in params.items()}})["args"]
    assert "--pam=False" in argv and "--eval_scales=[0.75, 1.0, 1.25]" in argv
    cfg = resolve(argv)
    assert (cfg.model.pam, cfg.model.cam, cfg.model.output_stride, cfg.model.multi_grid, cfg.model.aux) == (
        False, True, 16, True, False)
    assert cfg.train.lr == 0.003 and cfg.eval.eval_scales == (0.75, 1.0, 1.25)


def test_presets_then_flags_override_defaults():
    cfg = resolve(["--config", "demo", "--lr", "0.5"])
    assert cfg.model.backbone == "resnet18"  # from the preset
    assert cfg.train.lr == 0.5  # from the flag
    assert cfg.model.pam_reduction == 8  # from the defaults


def test_every_config_field_is_a_documented_flag():
    help_text = build_parser().format_help()
    for section in SECTIONS.values():
        for field in dataclasses.fields(section):
            if field.metadata["flag"]:
                assert f"--{field.name.replace('_', '-')}" in help_text
            assert field.metadata["help"] in " ".join(help_text.split()) or not field.metadata["flag"]


@pytest.mark.parametrize("argv, message", [
    (["--pamm"], "unrecognized arguments: --pamm"),
    (["--no-pa"], "unrecognized arguments: --no-pa"),  # no abbreviations
    (["--pam=maybe"], "argument --pam/--no-pam: expected one of"),
    (["--output-stride", "four"], "argument --output-stride"),
])
def test_bad_flags_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--no-pam", "--pam-reduction", "1"], "--pam-reduction needs --pam"),
    (["--no-aux", "--loss-weight-cam", "0.5"], "--loss-weight-cam needs a CAM branch classifier (--aux with"),
    (["--no-aux", "--aux-branches", "all"], "--aux-branches needs --aux"),
    (["--head", "fcn"], "head fcn is the baseline without attention: it needs --no-pam --no-cam"),
    (["--head", "fcn", "--no-cam"], "it needs --no-pam --no-cam"),
    (["--head", "fcn", "--no-pam", "--no-cam", "--aux-branches", "all"], "--aux-branches needs --aux and --head danet"),
    (["--output-stride", "32", "--multi-grid"], "multi_grid needs output_stride 8 or 16"),
    (["--scale-min", "0.5"], "--scale-min needs --random-scale"),
    (["--eval-window", "1024"], "--eval-window needs --eval-mode slide"),
    (["--output-stride", "4"], "output_stride must be one of [8, 16, 32], got 4"),
    (["--config", "nonexistent"], "--config nonexistent: no such file or name (names: "),
])
def test_impossible_settings_are_usage_errors(argv, message):
    with pytest.raises(UsageError) as error:
        resolve(argv)
    assert message in str(error.value)


def test_usage_errors_exit_2_with_one_line_through_the_cli(tmp_path, capsys):
    assert run_cli(tiny_flags(tmp_path, "--no-pam", "--pam-impl", "explicit")) == 2
    error = capsys.readouterr().err
    assert error.strip() == "ablations/run.py: error: --pam-impl needs --pam"
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_data_root_comes_from_the_environment_for_real_datasets():
    cfg = resolve(["--dataset", "camvid"], environment={"DANET_DATA": "/somewhere/camvid"})
    assert cfg.data.data_root == "/somewhere/camvid"
    assert resolve([], environment={"DANET_DATA": "/x"}).data.data_root == ""  # synthetic needs none


def test_num_classes_is_taken_from_the_dataset_or_must_agree():
    cfg = resolve([])
    assert resolve_for_dataset(cfg, 5, 10).model.num_classes == 5
    with pytest.raises(UsageError, match="--num-classes 19 contradicts dataset synthetic, which has 5 classes"):
        resolve_for_dataset(resolve(["--num-classes", "19"]), 5, 10)
    assert resolve_for_dataset(resolve(["--epochs", "3"]), 5, 80).train.iterations == 30  # 10 batches of 8


def test_batches_that_cannot_be_drawn_are_usage_errors_before_any_record(tmp_path, capsys):
    with pytest.raises(UsageError, match="--batch-size 8 is larger than the training set \\(4 images\\)"):
        resolve_for_dataset(resolve([]), 5, 4)
    with pytest.raises(UsageError, match="--batch-size 8 is the global batch: it must divide among 3 ranks"):
        resolve_for_dataset(resolve([]), 5, 80, world_size=3)
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--batch-size", "16")) == 2
    assert "--batch-size 16 is larger than the training set (8 images)" in capsys.readouterr().err
    assert not runs.exists()


def test_cell_identity_ignores_paths_devices_and_tracking():
    base = resolve([])
    moved = resolve(["--runs-dir", "elsewhere", "--device", "cpu", "--workers", "0", "--wandb", "online", "--quiet"])
    assert base.cell_hash() == moved.cell_hash() and base.run_id() == moved.run_id()
    assert resolve(["--seed", "1"]).cell_hash() != base.cell_hash()
    assert resolve(["--no-cam"]).run_id().startswith("danet_r18-d8_pam_synthetic_s0-")
    assert resolve(["--no-cam", "--no-pam"]).cell_name() == "danet_r18-d8_fcn_synthetic_s0"


def test_float_lists_accept_the_forms_people_and_agents_write():
    assert parse_float_list("0.5,0.75") == [0.5, 0.75]
    assert parse_float_list("[0.5, 1.0, 2]") == [0.5, 1.0, 2.0]
    assert parse_float_list("1.0") == [1.0]


def test_print_config_shows_the_resolved_config_without_data_or_weights(tmp_path, capsys):
    assert run_cli(tiny_flags(tmp_path, "--print-config", "--no-cam")) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["cam"] is False and printed["model"]["num_classes"] == 0  # from the dataset, at run time
    assert RunConfig.from_dict(printed) == resolve(tiny_flags(tmp_path, "--no-cam"))
    assert not any(tmp_path.iterdir())
    # a Cityscapes preset with ImageNet weights, on a machine with neither: still printed
    assert run_cli(["--config", "cityscapes_table1", "--data-root", str(tmp_path / "nowhere"), "--epochs", "3",
                    "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["weights"] == "imagenet" and printed["train"]["epochs"] == 3  # as given


def test_help_shows_the_defaults_of_the_preset_that_will_run_and_needs_no_torch():
    script = ("import sys\nfrom danet.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')")

    def help_of(*argv):
        result = subprocess.run([sys.executable, "-c", script, *argv, "--help"], cwd=REPO, capture_output=True,
                                text=True, env=dict(os.environ, COLUMNS="200"), timeout=60)
        return result.stdout

    demo = help_of()
    assert demo.rstrip().endswith("no torch")
    assert "(default: resnet18, from preset demo)" in demo and "(default: 500, from preset demo)" in demo
    flat = " ".join(demo.split())
    assert "(default: )" not in flat and "(1.0,)" not in flat
    assert "test scales, e.g. 0.5,0.75,1.0 (probabilities averaged) (default: 1.0)" in flat
    assert "(default: none)" in flat  # an empty string, e.g. --data-root
    camvid = help_of("--config", "camvid_cpu")
    assert "(default: 0.02, from preset camvid_cpu)" in camvid and "(default: disabled, from preset camvid_cpu)" in camvid
    grid = help_of("--grid", "camvid_cpu_controlled", "--cell", "pam-cam_seed=0")
    assert "(default: 300, from preset camvid_cpu)" in grid


def test_make_sweeps_help_writes_nothing():
    before = {path: path.stat().st_mtime_ns for path in (REPO / "sweeps").glob("*.yaml")}
    result = subprocess.run([sys.executable, str(REPO / "sweeps" / "make_sweeps.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("usage: sweeps/make_sweeps.py")
    assert {path: path.stat().st_mtime_ns for path in (REPO / "sweeps").glob("*.yaml")} == before


def test_dry_run_builds_everything_and_writes_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs, "--dry-run")) == 0
    assert "M parameters" in capsys.readouterr().err
    assert not runs.exists()


def test_presets_load_and_validate():
    for preset in sorted(PRESETS.glob("*.yaml")):
        assert isinstance(resolve(["--config", preset.stem]), RunConfig), preset
    names = {path.stem for path in PRESETS.glob("*.yaml")}
    assert {"demo", "camvid_cpu", "camvid", "cityscapes_table1", "cityscapes_table2", "voc"} <= names


def test_config_field_types_are_supported():
    for section in SECTIONS.values():
        for kind in typing.get_type_hints(section).values():
            assert kind in (bool, int, float, str) or typing.get_origin(kind) is tuple
