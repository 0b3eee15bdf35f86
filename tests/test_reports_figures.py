"""Figures that do not exaggerate (issue 15, section 4): one colour per cell across every figure,
the per-class difference panel over pairs of seeds, and the legend that says what is drawn."""

import numpy as np
import pandas as pd
import pytest

from reports import figures
from tests.conftest import REPORT_CELLS, load_script, write_run

make_tables = load_script("reports/make_tables.py")


def test_class_differences_are_paired_by_seed():
    runs = pd.DataFrame({"cell": ["base"] * 3 + ["PAM"] * 3, "seed": [0, 1, 2, 1, 2, 3],
                         "IoU/road": [0.50, 0.60, 0.70, 0.65, 0.71, 0.99]})
    differences, pairs = figures.class_differences(runs, ["base", "PAM"], "base")
    assert pairs == {"PAM": 2}  # seeds 1 and 2: seed 3 has no partner
    assert differences.loc["PAM", "road"] == pytest.approx(100 * np.mean([0.65 - 0.60, 0.71 - 0.70]))


def test_every_figure_of_a_report_gets_the_same_colour_per_cell(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for (pam, cam), values in REPORT_CELLS.items():
        for seed, miou in enumerate(values):
            write_run(runs, f"r_{pam}_{cam}_s{seed}", miou, pam=pam, cam=cam, seed=seed)
    palettes = []

    def spy(name):
        original = getattr(figures, name)

        def record(*args, **kwargs):
            palettes.append((name, next(arg for arg in args if isinstance(arg, dict))))
            return original(*args, **kwargs)

        monkeypatch.setattr(figures, name, record)

    for name in ("point_intervals", "miou_curves", "gamma_curves"):
        spy(name)
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out")]) == 0
    assert [name for name, _ in palettes] == ["point_intervals", "miou_curves", "gamma_curves"]
    first = palettes[0][1]
    assert list(first) == ["DANet head, no attention", "PAM", "CAM", "PAM+CAM"]
    assert len(set(first.values())) == 4 and all(palette == first for _, palette in palettes)


def test_the_interval_figure_draws_the_paper_only_where_it_has_the_configuration(tmp_path, monkeypatch):
    table = pd.DataFrame({"cell": ["DANet head, no attention", "PAM"], "mean": [70.0, 75.0], "ci_low": [69.0, np.nan],
                          "ci_high": [71.0, np.nan], "n": [3, 1], "paper": [None, 75.74]})
    runs = pd.DataFrame({"cell": ["DANet head, no attention"] * 3 + ["PAM"], "score": [69.5, 70.0, 70.5, 75.0]})
    captured = {}
    original = figures.save
    monkeypatch.setattr(figures, "save", lambda figure, out, name: captured.setdefault("axis", figure.axes[0])
                        and original(figure, out, name))
    figures.point_intervals(table, runs, {"DANet head, no attention": (0, 0, 1), "PAM": (1, 0, 0)}, tmp_path, "f", "t")
    axis = captured["axis"]
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert legend == ["one run (seed)", "mean and 95% t-interval over seeds (no interval for n = 1)",
                      "the paper's number for this configuration (its dataset and scale)"]
    points = np.concatenate([collection.get_offsets() for collection in axis.collections])
    assert points[points[:, 1] == 75.74].tolist() == [[1.1, 75.74]]  # PAM's cross only: the baseline has none
