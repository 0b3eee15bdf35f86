import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # one fresh process per row: about a minute on two cores
def test_train_benchmark_prints_one_markdown_table_with_every_row_on_the_cpu():
    result = subprocess.run([sys.executable, "-m", "danet.bench", "train", "--device", "cpu", "--crop", "32",
                             "--batch", "1", "--iterations", "1", "--warmup", "1", "--classes", "5"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Training step on cpu: resnet18, output stride 8, crop 32, batch 1, 5 classes, fp32")
    header, rule, *rows = lines[2:]
    assert header.startswith("| configuration | images/s | step (ms) | peak memory (MiB) |") and rule.startswith("|---|")
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert names == ["backbone alone (floor)", "DANet head, no attention", "PAM+CAM, explicit", "PAM+CAM, chunked",
                     "PAM+CAM, sdpa", "FCN head (the dilated-FCN baseline)"]  # triton rows are CUDA-only
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 6 and float(cells[1]) > 0 and float(cells[3]) > 0, row
        assert re.fullmatch(r"\d+\.\d\dx", cells[4]) and re.fullmatch(r"[+-]\d+", cells[5]), row
    assert rows[1].split(" | ")[4] == "1.00x"  # ratios are against the head without attention


def test_the_report_benchmark_times_the_whole_report_of_generated_records():
    result = subprocess.run([sys.executable, "-m", "reports.report_bench", "--runs", "16"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"make_tables on 16 records \(tables \+ figures\): \d+\.\d s, exit 0", result.stdout), result.stdout
    # table1 .md/.tex/.csv, runs.csv, not_complete.csv, 4 figures as .png and .pdf, and the folder's page README.md
    assert "16 runs from" in result.stderr and "wrote 14 files" in result.stderr
