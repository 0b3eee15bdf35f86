"""The reports side of issue 14, on hand-made records of the record contract: controlled grids
with declared comparisons, evaluation records (--split / --protocol), the two baselines labelled
apart, the design and the machines under a table, and old records without the new fields."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from danet.config import IN_CELL_UNLESS_DEFAULT, defaults_by_cell_rule
from reports.sources import read_run_store
from reports.stats import holm, sign_flip_p_value
from tests.conftest import load_script, write_run

make_tables = load_script("reports/make_tables.py")

CONTROLLED = {"design": "controlled", "preset": "camvid_cpu",
              "blocks": [{"axes": {"seed": list(range(8))},
                          "cells": {"danet-head": {"pam": False, "cam": False, "aux": False},
                                    "danet-head-ds": {"pam": False, "cam": False, "aux": True, "aux_branches": "all"},
                                    "pam-cam": {"pam": True, "cam": True, "aux": False},
                                    "pam-cam-ds": {"pam": True, "cam": True, "aux": True, "aux_branches": "all"},
                                    "fcn-head": {"head": "fcn", "pam": False, "cam": False, "aux": False}}}],
              "comparisons": [
                  {"name": "attention without deep supervision", "treatment": "pam-cam", "baseline": "danet-head"},
                  {"name": "attention with deep supervision", "treatment": "pam-cam-ds", "baseline": "danet-head-ds"},
                  {"name": "deep supervision without attention", "treatment": "danet-head-ds", "baseline": "danet-head"},
                  {"name": "FCN head vs DANet head", "treatment": "fcn-head", "baseline": "danet-head"}]}
MEANS = {"danet-head": 0.370, "danet-head-ds": 0.375, "pam-cam": 0.380, "pam-cam-ds": 0.376, "fcn-head": 0.360}
SECTIONS = {"head": "model", "aux_branches": "model", "deterministic": "train", "grid": "tracking",
            "grid_cell": "tracking", "design": "tracking"}


def new_record(runs_dir, name, miou, seed, machine=None, **fields):
    """A record with the fields of the new contract (config keys the installed danet may lack)."""
    old = {key: value for key, value in fields.items() if key not in SECTIONS}
    write_run(runs_dir, name, miou, seed=seed, **old)
    config = yaml.safe_load((runs_dir / name / "config.yaml").read_text())
    for key, value in fields.items():
        if key in SECTIONS:
            config[SECTIONS[key]][key] = value
    (runs_dir / name / "config.yaml").write_text(yaml.safe_dump(config))
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    summary["machine"] = machine or {"kind": "cpu", "cpu_model": "Intel Xeon Platinum 8480+", "gpu_name": None,
                                     "threads": 2, "deterministic": False}
    (runs_dir / name / "summary.json").write_text(json.dumps(summary))


def controlled_grid(tmp_path, seeds=8, grid=CONTROLLED):
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "camvid_cpu_controlled.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    values = {}
    for cell, switches in grid["blocks"][0]["cells"].items():
        values[cell] = MEANS[cell] + rng.normal(0, 0.004, seeds)
        for seed in range(seeds):
            new_record(runs, f"{cell}_s{seed}", float(values[cell][seed]), seed, grid="camvid_cpu_controlled",
                       grid_cell=cell, design="controlled", **switches)
    return runs, grids, values


def test_a_controlled_grid_gets_a_cells_table_and_its_comparisons(tmp_path):
    runs, grids, values = controlled_grid(tmp_path)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids)]) == 0
    for name in ("cells", "comparisons"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{name}.{ext}").exists(), name
    for figure in ("cells_intervals", "comparisons_intervals", "cells_class_iou", "cells_val_miou"):
        assert (out / f"{figure}.png").stat().st_size > 1000, figure
    assert not (out / "table1.md").exists()  # the table1 layout would pool the aux and no-aux cells
    cells = pd.read_csv(out / "cells.csv").set_index("cell")
    assert list(cells.index) == list(MEANS)
    assert cells.loc["pam-cam", "mean"] == pytest.approx(values["pam-cam"].mean() * 100, rel=1e-5)
    assert cells.loc["fcn-head", "head"] == "fcn" and cells.loc["pam-cam-ds", "aux_branches"] == "all"
    comparisons = pd.read_csv(out / "comparisons.csv").set_index("comparison")
    differences = {name: (values[item["treatment"]] - values[item["baseline"]]) * 100
                   for item in CONTROLLED["comparisons"] for name in [item["name"]]}
    for name, difference in differences.items():
        assert comparisons.loc[name, "delta"] == pytest.approx(difference.mean(), rel=1e-5)  # csv: 6 digits
        assert comparisons.loc[name, "p_value"] == pytest.approx(sign_flip_p_value(difference), rel=1e-5)
        assert comparisons.loc[name, "holm_k"] == 4 and comparisons.loc[name, "delta_n"] == 8
    expected = holm([sign_flip_p_value(difference) for difference in differences.values()])
    assert comparisons["p_holm"].tolist() == pytest.approx(expected, rel=1e-5)
    markdown = (out / "comparisons.md").read_text()
    assert markdown.split("\n\n")[1].startswith("Δ: against the comparison's baseline cell, paired by seed")
    assert "| attention with deep supervision | pam-cam-ds − danet-head-ds |" in markdown
    assert "Design: controlled (40 runs); grid camvid_cpu_controlled." in markdown
    assert "more than one kind of machine" not in markdown
    cells_md = (out / "cells.md").read_text()  # which branches get a classifier is shown only where aux is on
    assert "| danet-head | danet |  |  |  |  | " in cells_md
    assert "| pam-cam-ds | danet | yes | yes | yes | all | " in cells_md


def test_a_grid_whose_cells_never_set_the_head_still_blanks_aux_branches_without_aux(tmp_path):
    cells = {name: switches for name, switches in CONTROLLED["blocks"][0]["cells"].items() if name != "fcn-head"}
    grid = {**CONTROLLED, "blocks": [{**CONTROLLED["blocks"][0], "cells": cells}],
            "comparisons": [item for item in CONTROLLED["comparisons"] if item["treatment"] != "fcn-head"]}
    runs, grids, _ = controlled_grid(tmp_path, seeds=2, grid=grid)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids),
                             "--no-figures"]) == 0
    cells_md = (out / "cells.md").read_text()
    assert "| danet-head |  |  |  |  | " in cells_md and "| pam-cam-ds | yes | yes | yes | all | " in cells_md


def test_six_seeds_cannot_reach_significance_over_four_comparisons(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path, seeds=6)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    assert "cannot reach p < 0.05 after Holm with 4 rows and 6 seeds" in (out / "comparisons.md").read_text()


def test_a_controlled_grid_refuses_cells_that_differ_in_more_than_its_switches(tmp_path, capsys):
    runs, grids, _ = controlled_grid(tmp_path, seeds=2)
    for seed in range(2):
        config = yaml.safe_load((runs / f"pam-cam_s{seed}" / "config.yaml").read_text())
        config["train"]["lr"] = 0.003
        (runs / f"pam-cam_s{seed}" / "config.yaml").write_text(yaml.safe_dump(config))
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--grids-dir", str(grids)]) == 2
    err = capsys.readouterr().err
    assert "(design: controlled) has cells that differ in ['lr']" in err
    config["train"]["lr"] = 0.02
    (runs / "pam-cam_s1" / "config.yaml").write_text(yaml.safe_dump(config))  # now one cell mixes two lrs
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--grids-dir", str(grids)]) == 2
    assert "cell pam-cam (design: controlled) mixes runs that differ in ['lr']" in capsys.readouterr().err


def test_a_broken_grid_file_is_an_error_that_names_it(tmp_path, capsys):
    runs, grids, _ = controlled_grid(tmp_path, seeds=2)  # read by the launchers' loader, with its checks
    (grids / "camvid_cpu_controlled.yaml").write_text(yaml.safe_dump({**CONTROLLED, "design": "casual"}))
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--grids-dir", str(grids)]) == 2
    assert "camvid_cpu_controlled.yaml: design must be one of" in capsys.readouterr().err


def test_a_missing_grid_file_is_tolerated_with_a_warning(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(3):
        for pam in (False, True):
            new_record(runs, f"{pam}_s{seed}", 0.37 + 0.01 * pam, seed, pam=pam, cam=False, grid="gone",
                       grid_cell="pam" if pam else "base", design="as-released")
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(tmp_path), "--no-figures"]) == 0
    assert "grid gone: no" in capsys.readouterr().err
    assert "Design: as-released (6 runs); grid gone." in (out / "table1.md").read_text()


def test_the_two_baselines_are_labelled_apart_and_the_paper_number_goes_to_the_fcn_head(tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        new_record(runs, f"danet_s{seed}", 0.70 + 0.001 * seed, seed, pam=False, cam=False)
        new_record(runs, f"fcn_s{seed}", 0.69 + 0.002 * seed, seed, pam=False, cam=False, head="fcn")
        new_record(runs, f"pam_s{seed}", 0.74, seed, pam=True, cam=False)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--no-figures"]) == 0
    table = pd.read_csv(out / "table1.csv")
    markdown = (out / "table1.md").read_text()
    assert "| DANet head, no attention | resnet50 |" in markdown and "| Dilated FCN (FCN head) | resnet50 |" in markdown
    fcn = table[table["head"] == "fcn"].iloc[0]
    assert fcn["baseline"] == "DANet head, no attention" and fcn["delta"] == pytest.approx(-0.9)
    no_attention = table[(table["head"] == "danet") & ~table["pam"]].iloc[0]
    assert fcn["paper_resnet50"] == 70.03 and pd.isna(no_attention["paper_resnet50"])


def test_runs_from_several_kinds_of_machine_are_said_under_the_table(tmp_path):
    runs = tmp_path / "runs"
    h200 = {"kind": "cuda", "cpu_model": "AMD EPYC", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
    epyc = {"kind": "cpu", "cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "cpu_flags": "fpu sse avx2"}
    for seed in range(2):
        new_record(runs, f"base_s{seed}", 0.70, seed, pam=False, cam=False, machine=h200)
        new_record(runs, f"pam_s{seed}", 0.72, seed, pam=True, cam=False)
        new_record(runs, f"cam_s{seed}", 0.71, seed, pam=False, cam=True, machine=epyc)
    # the same name on another CPU generation: told apart by its capability and flags
    new_record(runs, "cam_s2", 0.71, 2, pam=False, cam=True, machine=epyc | {"cpu_capability": "AVX512",
                                                                              "cpu_flags": "fpu sse avx2 avx512f"})
    write_run(runs, "old_s2", 0.71, pam=True, cam=False, seed=2)  # made before records said their machine
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--no-figures"]) == 0
    digest = hashlib.sha256(b"fpu sse avx2").hexdigest()[:6]
    assert ("Runs from more than one kind of machine: AMD EPYC (AVX2, CPU flags " + digest + ") (2 runs); AMD EPYC "
            "(AVX512, CPU flags ") in (out / "table1.md").read_text()
    assert ") (1 runs); Intel Xeon Platinum 8480+ (2 runs); NVIDIA H200 (compute capability 9.0) (2 runs); "\
        "machine not recorded (1 runs)." in (out / "table1.md").read_text()


def old_record(runs_dir, name, miou, seed, **fields):
    """A record made before the fields added later (in the cell unless at their default) and before
    grids declared a design: its config.yaml lacks them."""
    write_run(runs_dir, name, miou, seed=seed, **fields)
    config = yaml.safe_load((runs_dir / name / "config.yaml").read_text())
    added = set(defaults_by_cell_rule(IN_CELL_UNLESS_DEFAULT)) | {"grid", "grid_cell", "design"}
    config = {section: {key: value for key, value in values.items() if key not in added}
              for section, values in config.items()}
    (runs_dir / name / "config.yaml").write_text(yaml.safe_dump(config))


def test_old_records_read_with_the_defaults_of_the_new_fields(tmp_path):
    old_record(tmp_path / "runs", "old", 0.7, seed=0)
    assert "synthetic_key" not in (tmp_path / "runs" / "old" / "config.yaml").read_text()
    row = read_run_store(tmp_path / "runs").iloc[0]
    added = defaults_by_cell_rule(IN_CELL_UNLESS_DEFAULT)
    assert {"head", "aux_branches", "synthetic_key", "deterministic"} <= set(added)
    assert {name: row[name] for name in added} == added
    assert (row["grid"], row["grid_cell"], row["design"], row["machine"]) == \
        ("", "", "not recorded", "machine not recorded")


def test_an_old_record_pools_with_new_ones_at_the_default_but_not_with_another_value(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(3):
        old_record(runs, f"old_s{seed}", 0.70, seed, pam=False, cam=False)
        write_run(runs, f"pam_s{seed}", 0.72, seed=seed, pam=True, cam=False)
    write_run(runs, "new_s3", 0.71, seed=3, pam=False, cam=False)  # synthetic_key: frame, written out
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    write_run(runs, "marker_s4", 0.71, seed=4, pam=False, cam=False, synthetic_key="marker")
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(tmp_path / "out"), "--no-figures"]) == 2
    assert "synthetic_key" in capsys.readouterr().err


def write_evaluation(run_dir, split, protocol, miou, settings, checkpoint="last"):
    record = {"run_id": run_dir.name, "cell_hash": run_dir.name, "split": split, "protocol": protocol,
              "protocol_settings": settings, "checkpoint": checkpoint, "checkpoint_iteration": 300, "miou": miou,
              "pixel_accuracy": 0.8, "per_class_iou": {"road": miou}, "absent_classes": [], "images_per_second": 5.0,
              "wall_time_s": 30.0, "device": "cpu", "machine": None, "libraries": {}, "created_at": 1.0}
    folder = run_dir / "evaluations"
    folder.mkdir(exist_ok=True)
    (folder / f"{split}-{protocol}-{checkpoint}.json").write_text(json.dumps(record))


WHOLE = {"eval_mode": "whole", "eval_window": 768, "eval_stride": 512, "eval_scales": [1.0], "eval_flip": False}
TTA = {"eval_mode": "whole", "eval_window": 768, "eval_stride": 512, "eval_scales": [0.75, 1.0, 1.25], "eval_flip": True}


def test_evaluation_records_fill_the_table_when_asked(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(5):
        for pam in (False, True):
            name = f"{pam}_s{seed}"
            write_run(runs, name, 0.70 + 0.01 * pam, pam=pam, cam=False, seed=seed)
            write_evaluation(runs / name, "val", "ms0.75-1-1.25-flip", 0.72 + 0.02 * pam + 0.001 * seed, TTA)
            write_evaluation(runs / name, "val", "whole", 0.70 + 0.01 * pam, WHOLE)
            if name != "True_s4":
                write_evaluation(runs / name, "test", "whole", 0.60 + 0.01 * pam, WHOLE)
    write_evaluation(runs / "True_s0", "val", "ms0.75-1-1.25-flip", 0.10, TTA, checkpoint="best")  # not the last
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--no-figures",
                             "--protocol", "ms0.75-1-1.25-flip"]) == 0
    table = pd.read_csv(out / "table1-ms0.75-1-1.25-flip.csv")
    assert table["mean"].tolist() == pytest.approx([72.2, 74.2])
    assert ("Numbers: evaluation records on each run's val split, protocol ms0.75-1-1.25-flip"
            in (out / "table1-ms0.75-1-1.25-flip.md").read_text())
    assert not (out / "table1.md").exists()  # the default table is another file
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--no-figures", "--split", "test"]) == 0
    assert "True_s4 (complete): no evaluation record for split test" in capsys.readouterr().err
    assert pd.read_csv(out / "not_complete-test.csv")["run_id"].tolist() == ["True_s4"]
    table = pd.read_csv(out / "table1-test.csv")
    assert table["n"].tolist() == [5, 4] and table["mean"].tolist() == pytest.approx([60.0, 61.0])
    text = (out / "table1-test.md").read_text()
    assert "split test, protocol each run's own final protocol (whole)" in text
    assert (out / "table1-ms0.75-1-1.25-flip.md").exists()  # another suffix: left alone


def test_table2s_multi_scale_row_is_made_of_the_evaluations_of_the_trained_checkpoints(tmp_path, capsys):
    runs = tmp_path / "runs"
    cells = {"base": (False, False, 0.70), "da": (True, False, 0.72), "da-mg": (True, True, 0.73)}
    for cell, (random_scale, multi_grid, miou) in cells.items():
        for seed in range(3):
            name = f"{cell}_s{seed}"
            write_run(runs, name, miou + 0.001 * seed, random_scale=random_scale, multi_grid=multi_grid, seed=seed)
            if cell == "da-mg":
                write_evaluation(runs / name, "val", "ms0.75-1-1.25-flip", 0.75 + 0.001 * seed, TTA)
                write_evaluation(runs / name, "val", "ms0.75-1-1.25-flip", 0.10, TTA, checkpoint="best")  # not the last
    (runs / "da-mg_s0" / "evaluations" / "val-ms2-torn.json").write_text("{")
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--no-figures"]) == 0
    assert "warning: evaluation record" in capsys.readouterr().err  # a torn record is said, not skipped silently
    table = pd.read_csv(out / "table2.csv")
    assert table["mean"].tolist() == pytest.approx([70.1, 72.1, 73.1, 75.1]) and table["n"].tolist() == [3, 3, 3, 3]
    note = (out / "table2.md").read_text()
    assert "evaluation records (ms0.75-1-1.25-flip) of the trained cells' last checkpoints" in note
    assert len(pd.read_csv(out / "runs.csv")) == 9  # the evaluations are rows of the table, not runs


def test_the_grid_knows_its_file_its_varying_settings_and_its_named_cells(tmp_path):
    from danet.grids import load_grid

    grid = {"preset": "demo", "design": "as-released",
            "blocks": [{"axes": {"seed": [0, 1]}, "cells": {"base": {"pam": False, "lr": 0.01},
                                                             "pam": {"pam": True, "lr": 0.01}}}],
            "comparisons": [{"name": "PAM", "treatment": "pam", "baseline": "base"}]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    loaded = load_grid("tiny", tmp_path)
    assert loaded.path == path and loaded.name == "tiny"
    # lr is the same in every cell; grid_cell is a tracking field, but it differs between the cells
    assert loaded.varying() == ("grid_cell", "pam", "seed")
    assert loaded.named_cells() == {"base": {"pam": False, "lr": 0.01}, "pam": {"pam": True, "lr": 0.01}}
    assert loaded.switches() == {"pam", "lr"}
    # positional construction (the fields before `path`) still works, without a file
    assert type(loaded)(loaded.name, loaded.preset, loaded.design, loaded.cells).path is None


# The verdict column, the plan's runs and hours, and the convergence column (reports/sequential.py).

PLANNED = {**CONTROLLED, "plan": {"looks": [4, 8], "futility": True, "efficacy": "none", "alpha": 0.05, "margin": 1.0}}


def test_a_fixed_design_verdict_is_better_exactly_where_p_holm_is_at_most_alpha(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv", keep_default_na=False)
    better = comparisons["verdict"] == "better"
    assert better.tolist() == (comparisons["p_holm"].astype(float) <= 0.05).tolist()
    assert 0 < better.sum() < len(comparisons)  # the fabricated effects give both kinds of row
    assert set(comparisons["verdict_source"]) == {"fixed design"} and set(comparisons["verdict_n"]) == {8}
    assert set(comparisons["verdict_seeds"]) == {"0-7"} and not comparisons["verdict_stopped_early"].any()
    markdown = (out / "comparisons.md").read_text()
    assert "| better at n = 8 (seeds 0-7) |" in markdown
    assert "Verdict: the fixed design, one look at each row's n pairs" in markdown
    assert not (out / "plan.md").exists()  # no plan, no ledger: no runs and hours table
    for name in ("comparisons.tex", "comparisons.csv"):
        assert "better" in (out / name).read_text()


def test_a_fixed_design_row_with_too_few_seeds_has_no_test_and_no_verdict(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path, seeds=3)
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    assert "| no test: too few seeds (n=3) |" in (out / "comparisons.md").read_text()


def set_wall_times(runs, seconds_of):
    """Give each record its own wall_time_s (seconds_of(cell, seed))."""
    for summary_path in runs.glob("*/summary.json"):
        cell, seed = summary_path.parent.name.rsplit("_s", 1)
        summary = json.loads(summary_path.read_text())
        summary["wall_time_s"] = seconds_of(cell, int(seed))
        summary_path.write_text(json.dumps(summary))


def write_ledger(runs, grids):
    """The ledger a launcher would have kept over these records (every look decided from them)."""
    from danet.grids import load_grid
    from danet.launch.ledger import PlanState, SeedRecord, append_entries, ledger_path, summary_sha256, take_looks

    grid = load_grid("camvid_cpu_controlled", grids)
    records = {}
    for name, order in grid.seeds_in_order().items():
        for seed, cell_id in order:
            summary = runs / f"{name}_s{seed}" / "summary.json"
            value = 100 * json.loads(summary.read_text())["final_miou"]
            records[cell_id] = SeedRecord(value, f"{name}_s{seed}", summary_sha256(summary))
    entries = take_looks(grid, PlanState(grid), records)
    append_entries(ledger_path(runs, grid.name), entries)
    return entries


def test_a_planned_grid_takes_its_verdicts_from_the_ledger_and_marks_a_row_stopped_for_futility(tmp_path, capsys):
    runs, grids, _ = controlled_grid(tmp_path, grid=PLANNED)  # FCN head 1 point below the DANet head: futile at 4
    set_wall_times(runs, lambda cell, seed: 600.0 + 60 * seed)
    entries = write_ledger(runs, grids)
    assert {(entry["comparison"], entry["result"]["decision"]) for entry in entries if entry["look"] == 0} >= \
        {("FCN head vs DANet head", "futile")}
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv", keep_default_na=False).set_index("comparison")
    fcn = comparisons.loc["FCN head vs DANet head"]
    assert (fcn["verdict"], fcn["verdict_n"], fcn["verdict_seeds"], fcn["verdict_source"]) == ("futile", 4, "0-3", "ledger")
    assert fcn["verdict_stopped_early"] and fcn["delta_n"] == 8  # the table shows all 8 pairs; the plan used 4
    latest = {entry["comparison"]: entry["result"]["decision"] for entry in entries}
    assert comparisons["verdict"].to_dict() == latest
    markdown = (out / "comparisons.md").read_text()
    assert "| futile, stopped at n = 4 (seeds 0-3) |" in markdown
    assert "recorded in the grid's ledger" in markdown and "a futility stop was selected for Δ <= 0" in markdown
    hours = pd.read_csv(out / "plan.csv").set_index("cell")
    assert hours.loc["fcn-head", ["runs", "runs_fixed", "records"]].tolist() == [4, 8, 8]
    assert hours.loc["fcn-head", "hours"] == pytest.approx((600 * 4 + 60 * 6) / 3600, rel=1e-5)
    assert hours.loc["fcn-head", "hours_saved"] == pytest.approx((600 + 60 * 3.5) * 4 / 3600, rel=1e-5)
    assert hours.loc["danet-head", ["runs", "hours_saved"]].tolist() == [8, 0]
    cells = hours.drop(index="total")
    assert hours.loc["total"].tolist() == pytest.approx(cells.sum().tolist(), rel=1e-5)
    assert hours.loc["total", ["runs", "runs_fixed"]].tolist() == [36, 40]
    assert "| total | 36 | 40 | 40 |" in (out / "plan.md").read_text()
    assert "### Runs and hours of the plan (`plan.md`" in (out / "README.md").read_text()
    summary = runs / "pam-cam_s1" / "summary.json"  # a record a decision used, changed afterwards
    summary.write_text(summary.read_text().replace('"wall_time_s"', '"wall_time_s" ', 1))
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 2
    assert "changed after look" in capsys.readouterr().err


def test_without_a_ledger_a_planned_grid_replays_its_plan_over_the_records(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path, grid=PLANNED)
    entries = write_ledger(runs, tmp_path / "grids")  # the decisions a launcher would have taken ...
    (runs / "camvid_cpu_controlled.ledger.jsonl").unlink()  # ... and no ledger
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    comparisons = pd.read_csv(out / "comparisons.csv", keep_default_na=False).set_index("comparison")
    assert comparisons["verdict"].to_dict() == {entry["comparison"]: entry["result"]["decision"] for entry in entries}
    assert set(comparisons["verdict_source"]) == {"replay"}
    assert "the grid's plan replayed over these records" in (out / "comparisons.md").read_text()


def write_curve(run_dir, gain):
    """A metrics.jsonl of four validations at 25, 50, 75 and 100% of the run's iterations (its summary's);
    the last `gain` points (fraction / 100) above the one at 75%."""
    iterations = 300
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"iterations": iterations}))
    final = summary["final_miou"]
    values = [final - 0.1, final - 0.05, final - gain / 100, final]
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": iterations * quarter // 4, "val/mIoU": value}) + "\n"
        for quarter, value in zip(range(1, 5), values)))


def test_the_convergence_column_and_a_verdict_whose_cell_is_still_improving(tmp_path):
    runs, grids, _ = controlled_grid(tmp_path)
    for run_dir in runs.iterdir():
        cell, seed = run_dir.name.rsplit("_s", 1)
        write_curve(run_dir, 2.0 + 0.2 * int(seed) if cell == "pam-cam" else 0.1 * (-1) ** int(seed))
    for seed in range(8):
        (runs / f"fcn-head_s{seed}" / "metrics.jsonl").unlink()  # records without curves
    out = tmp_path / "out"
    assert make_tables.main(["--runs-dir", str(runs), "--out", str(out), "--grids-dir", str(grids), "--no-figures"]) == 0
    cells = pd.read_csv(out / "cells.csv").set_index("cell")
    assert cells.loc["pam-cam", "gain"] == pytest.approx(2.7, rel=1e-5) and cells.loc["pam-cam", "gain_low"] > 0
    assert cells.loc["danet-head", "gain"] == pytest.approx(0.0, abs=1e-9) and cells.loc["danet-head", "gain_low"] < 0
    assert cells.loc["fcn-head", "gain_n"] == 0 and pd.isna(cells.loc["fcn-head", "gain"])
    cells_md = (out / "cells.md").read_text()
    assert "gain, last quarter [95% CI]" in cells_md and "| pam-cam | danet | yes | yes |  |  | " in cells_md
    assert "| 8 | [" in cells_md and " | +2.70 [" in cells_md
    fcn_row = next(line for line in cells_md.splitlines() if line.startswith("| fcn-head |"))
    assert fcn_row.split(" | ")[9] == ""  # the gain column of records without curves
    comparisons = pd.read_csv(out / "comparisons.csv", keep_default_na=False).set_index("comparison")
    assert comparisons["not_converged"].to_dict() == {
        "attention without deep supervision": "pam-cam", "attention with deep supervision": "",
        "deep supervision without attention": "", "FCN head vs DANet head": ""}
    markdown = (out / "comparisons.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| attention without deep supervision |"))
    assert ", not converged at n = 8 (seeds 0-7)" in row
    assert markdown.count("not converged at") == 1


def test_the_gain_runs_from_the_last_evaluation_at_or_before_three_quarters(tmp_path):
    from reports.tables import last_quarter_gain

    run = tmp_path / "run"
    run.mkdir()
    events = [{"step": 50, "val/mIoU": 0.30}, {"step": 100, "val/mIoU": 0.35}, {"step": 100, "val/mIoU": 0.36},
              {"step": 10, "train/loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    gain, start, last = last_quarter_gain(str(run), 100)  # 75: the evaluation at 50; a step's last value counts
    assert (gain, start, last) == (pytest.approx(6.0), 50, 100)
    assert last_quarter_gain(str(run), 120)[0] == pytest.approx(6.0)  # 90: still the evaluation at 50
    assert pd.isna(last_quarter_gain(str(run), 140)[0])  # 105: the last evaluation is before the last quarter
    assert pd.isna(last_quarter_gain(str(run), 60)[0])  # 45: no evaluation at or before it
    assert pd.isna(last_quarter_gain(str(tmp_path / "none"), 100)[0]) and pd.isna(last_quarter_gain(None, 100)[0])
