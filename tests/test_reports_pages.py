"""The results page a report writes beside its tables (OUT/README.md): built from what the folder
holds, the same whichever protocol's call wrote it last, never over a hand-written README, and
naming the two baselines apart; the note under a table of records that declare no design says
what they hold."""

import pytest

from reports import pages
from reports.sources import read_run_store
from reports.tables import loss_names, model_description, provenance_lines
from tests.conftest import load_script, write_run
from tests.test_reports_grids import TTA, controlled_grid, write_evaluation

make_tables = load_script("reports/make_tables.py")


@pytest.fixture
def controlled(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path, seeds=3)
    for run_dir in sorted(runs.iterdir()):
        write_evaluation(run_dir, "val", "ms0.75-1-1.25-flip", 0.5, TTA)
    out = tmp_path / "out"
    out.mkdir()
    (out / "about.md").write_text("# A study\n\nWhat it asks.\n\n## How it was run\n\n```bash\npython x.py\n```\n")
    (out / "reading.md").write_text("- It says little.\n")
    return runs, grids, out


def _report(runs, grids, out, *extra):
    return make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures",
                             *extra])


def test_the_page_lists_every_protocol_whichever_call_came_last(controlled):
    runs, grids, out = controlled
    assert _report(runs, grids, out) == 0
    assert _report(runs, grids, out, "--protocol", "ms0.75-1-1.25-flip") == 0
    page = (out / "README.md").read_text()
    assert _report(runs, grids, out) == 0
    assert (out / "README.md").read_text() == page  # the same page after either call
    headings = [line for line in page.splitlines() if line.startswith("#")]
    assert headings == ["# A study", "## The records", "## How it was run", "## Tables", "### Cells (`cells.md`; also "
                        "`.tex`, `.csv`)", "### Comparisons (`comparisons.md`; also `.tex`, `.csv`)",
                        "### Cells, protocol ms0.75-1-1.25-flip (`cells-ms0.75-1-1.25-flip.md`; also `.tex`, `.csv`)",
                        "### Comparisons, protocol ms0.75-1-1.25-flip (`comparisons-ms0.75-1-1.25-flip.md`; also "
                        "`.tex`, `.csv`)", "## Reading"]
    assert page.index("What it asks.") < page.index("## The records")  # about.md's lead under the title
    assert (out / "cells.md").read_text().strip() in page and "- It says little." in page
    assert "evaluation records: val `ms0.75-1-1.25-flip` of the `last` checkpoint (15 runs)" in page
    assert str(runs.parent) not in page  # no absolute path: the records are `runs/`
    assert "| `danet-head` | DANet head, no attention | 1: main |" in page
    assert "| `fcn-head` | Dilated FCN (FCN head) | 1: main |" in page
    assert "| `pam-cam-ds` | DANet head with PAM+CAM, deep supervision of both branches | 3: main, PAM branch, " \
           "CAM branch |" in page


def test_figures_are_listed_with_a_caption_in_a_stable_order(controlled):
    runs, grids, out = controlled
    for name in ("attention", "cells_class_iou", "comparisons_intervals", "cells_intervals"):
        (out / f"{name}.png").write_bytes(b"png")
    page = pages.study_page(out, "## The records\n", "reports/make_tables.py", "Untitled")
    order = [page.index(f"]({name}.png)") for name in ("cells_intervals", "cells_class_iou", "comparisons_intervals",
                                                         "attention")]
    assert order == sorted(order)
    assert "`attention.png`: PAM attention of three query points" in page
    assert pages.figure_caption("cells-ms0.75-1-1.25-flip_intervals").endswith("(test protocol ms0.75-1-1.25-flip)")
    assert pages.figure_caption("comparisons_intervals").startswith("paired differences by seed")


def test_a_hand_written_readme_is_never_replaced_or_removed(controlled, capsys):
    runs, grids, out = controlled
    (out / "README.md").write_text("# Mine\n")
    assert _report(runs, grids, out) == 0
    assert (out / "README.md").read_text() == "# Mine\n"
    assert "is not a page this script wrote: left as it is" in capsys.readouterr().err


def test_a_failed_call_leaves_no_page(controlled, tmp_path):
    runs, grids, out = controlled
    assert _report(runs, grids, out) == 0 and (out / "README.md").exists()
    (tmp_path / "empty").mkdir()
    assert _report(tmp_path / "empty", grids, out) == 2
    assert not (out / "README.md").exists() and (out / "about.md").exists()  # the hand-written parts stay


def test_the_two_baselines_are_never_one_name():
    no_attention = {"head": "danet", "pam": False, "cam": False, "aux": True, "aux_branches": "attention"}
    assert model_description(no_attention) == "DANet head, no attention" and loss_names(no_attention) == ["main"]
    assert model_description(no_attention | {"head": "fcn"}) == "Dilated FCN (FCN head)"
    deep = no_attention | {"aux_branches": "all"}
    assert model_description(deep).endswith("deep supervision of both branches") and len(loss_names(deep)) == 3
    assert loss_names(no_attention | {"pam": True}) == ["main", "PAM branch"]


def test_records_without_a_design_say_what_they_hold(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_run(runs, f"base_s{seed}", 0.70, pam=False, cam=False, seed=seed, lr=0.02)
        write_run(runs, f"pam-cam_s{seed}", 0.71, pam=True, cam=True, seed=seed, lr=0.02)
    line = provenance_lines(read_run_store(runs), "x")[-1]
    assert line == ("What the records without a design hold: a branch-loss design: one recipe in every run (lr 0.02); "
                    "loss terms per run: 1 (DANet head, no attention), 3 (DANet head with PAM+CAM); "
                    "launched one run at a time, outside an Optuna study.")
    other_lr = read_run_store(runs).assign(lr=[0.01, 0.003, 0.01, 0.003], study="table1")
    assert provenance_lines(other_lr, "x")[-1].startswith("What the records without a design hold: recipes that "
                                                          "differ between runs (lr 0.003 or 0.01")
    assert provenance_lines(other_lr, "x")[-1].endswith("; from Optuna study table1.")
