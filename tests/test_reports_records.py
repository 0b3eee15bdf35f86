"""Records that cannot mislead a table (issue 15, section 3): each bad record is listed with its
reason, warned about and left out of every statistic; duplicates are refused; a failed call leaves
no stale tables; the LaTeX compiles with pdflatex."""

import json
import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from reports.tables import latex_escape, to_latex
from tests.conftest import REPORT_CELLS, load_script, write_run

make_tables = load_script("reports/make_tables.py")


def _table1_records(runs_dir):
    for (pam, cam), values in REPORT_CELLS.items():
        for seed, miou in enumerate(values):
            write_run(runs_dir, f"r50_{pam}_{cam}_s{seed}", miou, pam=pam, cam=cam, seed=seed)
    return runs_dir


def _edit_summary(run_dir, **changes):
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _MISSING:
            summary.pop(key)
        else:
            summary[key] = value
    path.write_text(json.dumps(summary))  # json writes float("nan") as NaN, as Python's json.dumps did for us


_MISSING = object()


@pytest.fixture
def records(tmp_path):
    return _table1_records(tmp_path / "runs")


def _call(runs_dir, out, *extra):
    return make_tables.main(["--runs-dir", str(runs_dir), "--out", str(out), "--no-figures", *extra])


@pytest.mark.parametrize("bad", [float("nan"), None, _MISSING], ids=["nan", "null", "missing"])
def test_a_complete_record_without_a_final_miou_is_listed_warned_and_left_out(records, tmp_path, capsys, bad):
    _edit_summary(records / "r50_True_False_s2", final_miou=bad)
    assert _call(records, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "r50_True_False_s2" in err and "final_miou is missing, null or NaN" in err
    not_complete = pd.read_csv(tmp_path / "out" / "not_complete.csv")
    assert not_complete["run_id"].tolist() == ["r50_True_False_s2"]
    assert "final_miou" in not_complete["reason"].iloc[0]
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    pam = table[(table["pam"]) & (~table["cam"])].iloc[0]
    kept = np.delete(np.array(REPORT_CELLS[(True, False)]) * 100, 2)
    fcn = np.delete(np.array(REPORT_CELLS[(False, False)]) * 100, 2)
    assert pam["n"] == 4 and pam["mean"] == pytest.approx(kept.mean())  # out of the cell's mean and n
    assert pam["delta_n"] == 4 and pam["delta"] == pytest.approx(np.mean(kept - fcn))  # out of the pairs
    assert pam["p_value"] == pytest.approx(2 ** -4)  # 4 positive pairs, not a p of 0 from a NaN
    assert pam["p_improvement"] == pytest.approx(1.0)  # a NaN would have counted as a loss


def test_best_miou_missing_is_left_out_too(records, tmp_path, capsys):
    _edit_summary(records / "r50_False_True_s0", best_miou=None)  # e.g. a run made with --eval-every 0
    assert _call(records, tmp_path / "out", "--metric", "best_miou") == 0
    assert "best_miou is missing, null or NaN" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert table[(~table["pam"]) & (table["cam"])]["n"].iloc[0] == 4


def test_unreadable_summary_and_a_folder_without_config_are_listed_and_warned(records, tmp_path, capsys):
    (records / "r50_True_True_s0" / "summary.json").write_text('{"status": "compl')  # truncated
    (records / "r50_True_True_s1" / "config.yaml").unlink()
    assert _call(records, tmp_path / "out") == 0
    err = capsys.readouterr().err
    not_complete = pd.read_csv(tmp_path / "out" / "not_complete.csv").set_index("run_id")
    assert not_complete.loc["r50_True_True_s0", "status"] == "unreadable"
    assert "summary.json unreadable (JSONDecodeError" in not_complete.loc["r50_True_True_s0", "reason"]
    assert not_complete.loc["r50_True_True_s1", "reason"] == "no config.yaml"
    assert "r50_True_True_s0 (unreadable)" in err and "r50_True_True_s1 (unreadable): no config.yaml" in err
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert table[(table["pam"]) & (table["cam"])]["n"].iloc[0] == 2


def _duplicate(records, name, copy, finished_at, miou, wall_time_s):
    shutil.copytree(records / name, records / copy)
    _edit_summary(records / name, finished_at=1000.0)
    _edit_summary(records / copy, finished_at=finished_at, final_miou=miou, wall_time_s=wall_time_s)


def test_two_records_of_one_cell_and_seed_are_refused_naming_both_folders(records, tmp_path, capsys):
    _duplicate(records, "r50_False_True_s1", "r50_False_True_s1_again", 2000.0, 0.9, 60.0)
    assert _call(records, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(records / "r50_False_True_s1") in err and str(records / "r50_False_True_s1_again") in err
    assert "--duplicates newest" in err and err.count("\n") == 1


def test_duplicates_newest_keeps_the_newest_and_says_so(records, tmp_path, capsys):
    _duplicate(records, "r50_False_True_s1", "r50_False_True_s1_again", 2000.0, 0.9, 60.0)
    assert _call(records, tmp_path / "out", "--duplicates", "newest") == 0
    err = capsys.readouterr().err
    assert "r50_False_True_s1 (complete): duplicate of r50_False_True_s1_again" in err
    not_complete = pd.read_csv(tmp_path / "out" / "not_complete.csv")
    assert not_complete["run_id"].tolist() == ["r50_False_True_s1"]
    cam = pd.read_csv(tmp_path / "out" / "table1.csv").query("cam and not pam").iloc[0]
    values = np.array(REPORT_CELLS[(False, True)]) * 100
    values[1] = 90.0
    assert cam["n"] == 5 and cam["mean"] == pytest.approx(values.mean())
    assert cam["minutes"] == pytest.approx((4 * 600 + 60) / 5 / 60)  # costs of the kept records only


def test_a_failed_call_leaves_no_stale_tables_beside_its_runs_csv(records, tmp_path):
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(records), "--out", str(out), "--rows", "pam", "--cols", "cam"]) == 0
    assert (out / "table1.md").exists() and (out / "table1_intervals.png").exists() and (out / "generic.md").exists()
    (out / "notes.txt").write_text("mine")  # not ours: never removed
    _duplicate(records, "r50_False_True_s1", "r50_False_True_s1_again", 2000.0, 0.9, 60.0)
    assert _call(records, out) == 2
    assert sorted(path.name for path in out.iterdir()) == ["not_complete.csv", "notes.txt", "runs.csv"]
    assert len(pd.read_csv(out / "runs.csv")) == 20  # this call's 19 records and the copy
    (tmp_path / "no-runs").mkdir()
    assert _call(tmp_path / "no-runs", out) == 2  # nothing to report: nothing of an earlier call stays either
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


NASTY = r"50% of a_b & c #1 $x {y} ~z^2 \w <a> |b| ± Δ − ≤ P(> FCN)"


def test_latex_escapes_every_special_in_cells_headers_and_caption():
    table = pd.DataFrame({NASTY: [NASTY], "b": ["1"]})
    text = NASTY
    latex = to_latex(table, caption=text, label="tab:x")
    assert latex.isascii()
    assert latex.count(latex_escape(text)) == 3  # header, cell, caption
    body = latex.replace(r"\%", "").replace(r"\&", "").replace(r"\_", "").replace(r"\#", "").replace(r"\$", "")
    assert not any(char in body for char in "%_#") and "&" in body  # only the column separators remain
    assert r"$\pm$" in latex and r"$\Delta$" in latex


def _compile(tex):
    # booktabs is in Debian's texlive-latex-recommended; texlive-latex-base alone lacks it: its three
    # rules as plain \hline keep the test about our table, not about that package
    document = (r"\documentclass{article}\usepackage[T1]{fontenc}"
                r"\IfFileExists{booktabs.sty}{\usepackage{booktabs}}{\newcommand\toprule{\hline}"
                r"\newcommand\midrule{\hline}\newcommand\bottomrule{\hline}}"
                r"\begin{document}\input{" + tex.name + r"}\end{document}")
    (tex.parent / "document.tex").write_text(document)
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "document.tex"], cwd=tex.parent,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex not installed (Debian: apt-get install texlive-latex-base)")
def test_generated_table_compiles_with_pdflatex(records, tmp_path):
    for seed in range(3):  # a variant row puts an underscore in a cell
        write_run(records, f"paper_energy_s{seed}", 0.74, pam=True, cam=True, seed=seed, cam_energy="paper")
    out = tmp_path / "out"
    assert _call(records, out) == 0
    tex = (out / "table1.tex").read_text()
    assert tex.isascii() and r"cam\_energy=paper" in tex and r"$\Delta$" in tex and r"$\pm$" in tex
    result = _compile(out / "table1.tex")
    assert result.returncode == 0, result.stdout[-3000:]
    assert (out / "document.pdf").stat().st_size > 1000
    nasty = out / "nasty.tex"
    nasty.write_text(to_latex(pd.DataFrame({NASTY: [NASTY], "b": ["1"]}), caption=NASTY, label="tab:nasty"))
    result = _compile(nasty)
    assert result.returncode == 0, result.stdout[-3000:]


def test_markdown_note_says_what_the_holm_family_and_the_pairing_are(records, tmp_path):
    shutil.rmtree(records / "r50_True_False_s4")  # PAM: 4 seeds, so 4 pairs
    assert _call(records, tmp_path / "out") == 0
    note = (tmp_path / "out" / "table1.md").read_text().split("\n\n")[1]
    assert "Holm's correction runs over the family of the 1 row with a test" in note  # CAM only (5 pairs)
    assert "over the seeds both cells have (n pairs, which may be fewer than either cell's n)" in note
    assert "P(>): probability of improvement, Mann-Whitney U / (n_A n_B), over all seeds of both cells, paired or not" \
        in note
    table = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert table["p_holm"].notna().sum() == 1 and not math.isnan(table.iloc[2]["p_holm"])
