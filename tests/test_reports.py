"""Reports: statistics against independent computations, tables from generated records, the CLI."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from danet.config import RunConfig
from reports import report
from reports.sources import NoRunsFound, read_run_store
from reports.stats import holm, paired_delta, probability_of_improvement, sign_flip_p_value, t_interval
from reports.tables import TABLE1, MixedCellError, ablation_table, presentable
from tests.conftest import REPORT_CELLS, load_script, run_cli, tiny_flags, write_run

make_tables = load_script("reports/make_tables.py")


def test_t_interval_matches_scipy():
    values = [71.2, 70.1, 72.9, 69.8]
    interval = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert interval.mean == pytest.approx(np.mean(values)) and interval.sd == pytest.approx(np.std(values, ddof=1))
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    single = t_interval([70.0])
    assert single.n == 1 and math.isnan(single.sd) and math.isnan(single.low)


def test_paired_delta_pairs_by_seed_and_lists_the_unpaired():
    treatment = {0: 75.0, 1: 76.5, 2: 74.0, 4: 80.0}
    baseline = {0: 70.0, 1: 71.0, 2: 70.5, 3: 69.0}
    delta = paired_delta(treatment, baseline)
    differences = [5.0, 5.5, 3.5]
    assert delta.seeds == [0, 1, 2] and delta.unpaired == [3, 4]
    result = scipy_stats.ttest_rel([75.0, 76.5, 74.0], [70.0, 71.0, 70.5])
    low, high = result.confidence_interval(0.95)
    assert delta.interval.mean == pytest.approx(np.mean(differences))
    assert (delta.interval.low, delta.interval.high) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize("differences", [[1.2, 0.4, -0.3, 2.0, 0.9], [0.5, 0.5, 0.5], [-1.0, 0.2, 0.3, -0.4]])
def test_sign_flip_p_value_matches_scipys_exact_permutation_test(differences):
    expected = scipy_stats.permutation_test((np.array(differences),), np.mean, permutation_type="samples",
                                            alternative="greater", n_resamples=np.inf).pvalue
    assert sign_flip_p_value(differences) == pytest.approx(expected)


def test_all_positive_differences_give_the_smallest_p():
    assert sign_flip_p_value([1.0, 2.0, 3.0]) == pytest.approx(2 ** -3)
    assert sign_flip_p_value([1.0, 2.0, 3.0, 1.0, 2.0]) == pytest.approx(2 ** -5)


def test_holm_adjustment_by_hand():
    p_values = [0.01, 0.04, 0.03, 0.20]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max(0.09, 0.08)=0.09, 0.20*1=0.20
    assert holm(p_values) == pytest.approx([0.04, 0.09, 0.09, 0.20])


def test_probability_of_improvement_is_mann_whitney_u_over_pairs():
    a, b = [3.0, 5.0, 5.0, 7.0], [1.0, 5.0, 6.0]
    u = scipy_stats.mannwhitneyu(a, b).statistic
    assert probability_of_improvement(a, b) == pytest.approx(u / (len(a) * len(b)))


@pytest.fixture
def table1_runs(tmp_path):
    runs = tmp_path / "runs"
    for (pam, cam), values in REPORT_CELLS.items():
        for seed, miou in enumerate(values):  # PAM+CAM lacks seed 4: paired deltas must drop it
            write_run(runs, f"r50_{pam}_{cam}_s{seed}", miou, pam=pam, cam=cam, seed=seed)
    write_run(runs, "crashed", None, status="failed", pam=True, cam=True, seed=4)
    return runs


def test_table1_statistics_from_records(table1_runs):
    runs = read_run_store(table1_runs)
    table = ablation_table(runs, TABLE1)
    assert [(row.pam, row.cam) for row in table.itertuples()] == [(False, False), (True, False), (False, True),
                                                                  (True, True)]
    fcn = np.array(REPORT_CELLS[(False, False)]) * 100
    both = np.array(REPORT_CELLS[(True, True)]) * 100
    row = table.iloc[3]
    assert row["n"] == 4 and row["mean"] == pytest.approx(both.mean())  # the failed run is not averaged in
    assert row["delta_n"] == 4 and row["unpaired_seeds"] == [4]
    assert row["delta"] == pytest.approx(np.mean(both - fcn[:4]))
    assert row["paper"] == 76.34 and row["ours_minus_paper"] == pytest.approx(both.mean() - 76.34)
    assert row["p_improvement"] == pytest.approx(1.0)
    pam = table.iloc[1]
    assert pam["p_value"] == pytest.approx(2 ** -5)
    # 4 pairs cannot reach p < 0.05 (2^-4 = 0.0625): PAM+CAM is not tested, Holm runs over 2 rows
    assert pam["p_holm"] == pytest.approx(2 * 2 ** -5)
    assert row["p_min"] == pytest.approx(2 ** -4) and math.isnan(row["p_holm"])
    assert math.isnan(table.iloc[0]["delta"])  # the baseline has no delta against itself
    text = presentable(table, TABLE1, "FCN", "cityscapes")
    assert text["p (one-sided, Holm)"].tolist() == ["", "0.062", "0.062", "too few seeds (n=4)"]


def test_cells_mixing_different_settings_are_refused(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "a", 0.7, pam=False, cam=False, seed=0, lr=0.01)
    write_run(runs, "b", 0.7, pam=False, cam=False, seed=1, lr=0.003)
    with pytest.raises(MixedCellError, match=r"mixes runs that differ in \['lr'\]"):
        ablation_table(read_run_store(runs), TABLE1)


def test_variant_rows_are_split_out_and_compared_with_their_standard_row(tmp_path):
    runs = tmp_path / "runs"
    standard, paper_energy = [0.50, 0.52, 0.51], [0.49, 0.50, 0.52]
    for seed in range(3):
        write_run(runs, f"fcn_s{seed}", 0.45, backbone="resnet18", pam=False, cam=False, seed=seed)
        write_run(runs, f"both_s{seed}", standard[seed], backbone="resnet18", pam=True, cam=True, seed=seed)
        write_run(runs, f"paper_s{seed}", paper_energy[seed], backbone="resnet18", pam=True, cam=True, seed=seed,
                   cam_energy="paper")
    table = ablation_table(read_run_store(runs), TABLE1)
    assert table["variant"].tolist() == ["", "", "cam_energy=paper"]  # the variant row comes last
    variant = table.iloc[2]
    assert variant["delta"] == pytest.approx(np.mean(paper_energy) * 100 - 45)  # against the FCN cell
    differences = (np.array(paper_energy) - np.array(standard)) * 100
    assert variant["standard_delta"] == pytest.approx(differences.mean())  # against PAM+CAM with the code's energy
    assert variant["standard_p_value"] == pytest.approx(sign_flip_p_value(list(differences)))
    assert math.isnan(table.iloc[1].get("standard_delta", math.nan))
    # ResNet-18 is not in the paper: its R50 and R101 numbers are context, for the standard rows only
    # the paper's baseline is the FCN head: the DANet head with both modules off has no paper number
    assert pd.isna(table["paper_resnet50"].iloc[0]) and table["paper_resnet50"].iloc[1] == 76.34
    assert table["paper_resnet101"].iloc[1] == 77.57
    assert pd.isna(variant["paper_resnet50"]) and table["ours_minus_paper"].isna().all()
    text = presentable(table, TABLE1, "FCN", "cityscapes")
    assert text["Variant"].tolist() == ["", "", "cam_energy=paper"]
    assert list(text.columns).index("paper R50 (cityscapes)") < list(text.columns).index("paper R101 (cityscapes)")
    assert "ours − paper" not in text and text["Δ vs standard [95% CI]"].iloc[2].startswith(f"{differences.mean():+.2f}")
    one_pair = ablation_table(read_run_store(runs).query("seed == 0"), TABLE1)
    assert presentable(one_pair, TABLE1, "FCN", "cityscapes")["Δ vs FCN [95% CI]"].iloc[1] == "+5.00 (one pair: no interval)"


def test_the_command_writes_tables_and_lists_incomplete_runs(table1_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(table1_runs), "--out", str(out), "--rows", "pam", "--cols", "cam"]) == 0
    for name in ("table1.md", "table1.tex", "table1.csv", "runs.csv", "not_complete.csv", "generic.md"):
        assert (out / name).exists(), name
    markdown = (out / "table1.md").read_text()
    assert "| DANet head, no attention | resnet50 |" in markdown and "paper R50 (cityscapes)" in markdown
    assert "\\toprule" in (out / "table1.tex").read_text()
    csv = pd.read_csv(out / "table1.csv")
    assert csv["mean"].iloc[0] == pytest.approx(np.mean(REPORT_CELLS[(False, False)]) * 100)
    assert pd.read_csv(out / "not_complete.csv")["run_id"].tolist() == ["crashed"]
    for figure in ("table1_intervals", "table1_val_miou", "table1_class_iou", "table1_gamma"):
        for suffix in (".png", ".pdf"):
            assert (out / f"{figure}{suffix}").stat().st_size > 1000, figure


def test_no_runs_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    assert make_tables.main(["--runs-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no runs found in" in error and "python ablations/run.py" in error and error.count("\n") == 1
    with pytest.raises(NoRunsFound):
        read_run_store(tmp_path)


def test_attention_figure_from_a_checkpoint(tmp_path):
    from PIL import Image

    from reports import attention_figure

    runs = tmp_path / "runs"
    assert run_cli(tiny_flags(runs)) == 0  # PAM + CAM
    checkpoint = next(runs.glob("*/checkpoints/best.pt"))
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(image)
    figure = attention_figure.attention_figure(checkpoint, image, [(3, 4), (20, 40)], [0, 5], why="the only run")
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["image and query points", "PAM: attention of point 1", "PAM: attention of point 2",
                      "CAM: channel 0 response", "CAM: channel 5 response", "prediction"]
    maps = {axis.get_title(): axis for axis in figure.axes if axis.get_title()[:3] in ("PAM", "CAM")}
    assert all(axis.images[-1].colorbar is not None for axis in maps.values())  # a colour bar per map
    pam_scales = {axis.images[-1].get_clim() for title, axis in maps.items() if title.startswith("PAM")}
    assert len(pam_scales) == 1 and min(pam_scales)[0] == 0.0  # one shared scale across the PAM maps
    assert ", seed 0 (the only run):" in figure._suptitle.get_text()
    out = tmp_path / "fig" / "attention.png"
    assert attention_figure.main([str(checkpoint), str(image), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.with_suffix(".pdf").exists()


class _FakeRun:
    def __init__(self, run_id, state, config, summary, heartbeat_at="2026-11-30T12:00:00Z"):
        self.id, self.state, self.config, self.summary = run_id, state, config, summary
        self.heartbeat_at = heartbeat_at


class _FakeApi:
    """The part of wandb.Api that read_wandb uses: runs(path) and sweep(path).runs."""

    def __init__(self, runs):
        self._runs = runs

    def runs(self, path, per_page=50):
        return self._runs

    def sweep(self, path):
        return type("Sweep", (), {"runs": self._runs[:1]})()


def test_wandb_source_reads_configs_and_summaries_in_one_query():
    config = RunConfig.from_dict({"model": {"num_classes": 19}}).to_dict()
    runs = [_FakeRun("a1", "finished", config, {"final/mIoU": 0.71, "val/mIoU": {"max": 0.72}}),
            _FakeRun("b2", "crashed", config, {}),
            _FakeRun("c3", "finished", {"lr": 0.1}, {})]  # not a DANet run: no config sections
    from reports.sources import read_wandb

    frame = read_wandb("me/proj", api=_FakeApi(runs))
    assert frame["run_id"].tolist() == ["a1", "b2"]
    assert frame["status"].tolist() == ["complete", "failed"]
    assert frame.loc[0, "final_miou"] == 0.71 and frame.loc[0, "best_miou"] == 0.72
    assert frame.loc[0, "backbone"] == "resnet50"
    assert len(read_wandb("me/proj", sweep="s1", api=_FakeApi(runs))) == 1


def test_wandb_reruns_of_a_cell_are_duplicates_like_local_ones():
    from reports.sources import read_wandb
    from reports.tables import DuplicateRunsError, resolve_duplicates

    config = RunConfig.from_dict({"model": {"num_classes": 19}}).to_dict()
    other = RunConfig.from_dict({"model": {"num_classes": 19}, "train": {"seed": 1}}).to_dict()
    runs = [_FakeRun("first", "finished", config, {"final/mIoU": 0.70}, "2026-11-30T10:00:00Z"),
            _FakeRun("again", "finished", config, {"final/mIoU": 0.71}, "2026-11-30T11:00:00Z"),
            _FakeRun("seed1", "finished", other, {"final/mIoU": 0.72})]
    frame = read_wandb("me/proj", api=_FakeApi(runs))
    assert frame.loc[0, "cell_hash"] == frame.loc[1, "cell_hash"] == RunConfig.from_dict(config).cell_hash()
    with pytest.raises(DuplicateRunsError, match="first and again are complete records of the same cell"):
        resolve_duplicates(frame, keep_newest=False)
    kept, dropped = resolve_duplicates(frame, keep_newest=True)
    assert kept["run_id"].tolist() == ["again", "seed1"] and dropped["run_id"].tolist() == ["first"]


def test_optuna_source_reads_the_records_of_the_studys_trials(table1_runs, tmp_path):
    import optuna

    from reports.sources import read_optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="t1", storage=storage)
    chosen = sorted(table1_runs.iterdir())[:3]
    for run_dir in chosen:
        trial = study.ask()
        trial.set_user_attr("run_dir", str(run_dir))
        study.tell(trial, 0.5)
    frame = read_optuna(storage, "t1")
    assert sorted(frame["run_id"]) == sorted(path.name for path in chosen)


def test_table2_layout_rows_and_paper_numbers(tmp_path):
    runs = tmp_path / "runs"
    rows = [({}, [0.770, 0.775, 0.772]), ({"random_scale": True}, [0.785, 0.790, 0.788]),
            ({"random_scale": True, "multi_grid": True}, [0.80, 0.79, 0.795]),
            ({"random_scale": True, "multi_grid": True, "eval_scales": [0.5, 1.0, 2.0], "eval_flip": True},
             [0.81, 0.815, 0.812])]
    for index, (settings, values) in enumerate(rows):
        for seed, miou in enumerate(values):
            write_run(runs, f"row{index}_s{seed}", miou, backbone="resnet101", seed=seed, **settings)
    from reports.tables import TABLE2

    table = ablation_table(read_run_store(runs), TABLE2)
    assert [(r.random_scale, r.multi_grid, r.multi_scale_test) for r in table.itertuples()] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert table["paper"].tolist() == [77.57, 78.83, 79.94, 81.50]
    assert table["delta"].iloc[3] == pytest.approx(100 * (np.mean(rows[3][1]) - np.mean(rows[0][1])))
    assert table["p_holm"].isna().all()  # three seeds: too few for any test


def test_a_table_too_wide_for_the_terminal_is_named_not_folded(table1_runs, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    screen = io.StringIO()
    monkeypatch.setattr(report, "stderr_console", lambda: Console(file=screen, force_terminal=True, width=60))
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(table1_runs), "--out", str(out), "--no-figures"]) == 0
    shown = screen.getvalue()
    assert "too wide for this 60-column terminal: see" in " ".join(shown.split())
    assert f"{out / 'table1'}.md" in "".join(shown.split())
    assert "| DANet head, no attention |" not in shown  # no folded table


@pytest.mark.parametrize("script", ["reports/make_tables.py", "reports/plan.py"])
def test_the_report_scripts_import_no_torch(script):
    """The scripts and every module they import (pandas, scipy, the config) load without torch."""
    import subprocess
    import sys

    from tests.conftest import REPO

    check = ("import runpy, sys\n"
             "sys.argv = [sys.argv[1], '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as stop:\n"
             "    assert stop.code == 0, stop.code\n"
             "import reports.report, reports.tables, reports.sources, reports.stats\n"
             "assert 'torch' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", check, script], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
