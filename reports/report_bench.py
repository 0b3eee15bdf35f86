"""Time the whole report (reports/report.py, tables and figures) on 1,000 generated records.

    python -m reports.report_bench [--runs 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from reports.report import ReportRequest, make_report

CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist")
CELLS = [(False, False), (True, False), (False, True), (True, True)]


def write_records(runs_dir: Path, count: int, rng: np.random.Generator) -> None:
    """Table-1-shaped records: 2 backbones x 4 cells x seeds, with 10 validations each."""
    from danet.config import RunConfig  # only to write realistic config.yaml files

    base = RunConfig.from_dict({"model": {"num_classes": len(CLASSES)}, "data": {"dataset": "camvid"}}).to_dict()
    for index in range(count):
        backbone = ("resnet50", "resnet101")[index % 2]
        pam, cam = CELLS[(index // 2) % 4]
        seed = index // 8
        config = json.loads(json.dumps(base))
        config["model"].update(backbone=backbone, pam=pam, cam=cam)
        config["train"]["seed"] = seed
        miou = 0.6 + 0.03 * pam + 0.02 * cam + rng.normal(0, 0.01)
        run_dir = runs_dir / f"run{index:05d}"
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
        summary = {"status": "complete", "final_miou": miou, "best_miou": miou, "wall_time_s": 480.0,
                   "images_per_second": 4.6, "peak_memory_mb": 1300.0, "cell_hash": f"h{index}",
                   "per_class_iou": {name: float(rng.uniform(0.2, 0.9)) for name in CLASSES}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        events = [{"step": step, "val/mIoU": miou * step / 1000, "gamma/pam": 0.01, "gamma/cam": 0.02}
                  for step in range(100, 1001, 100)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="records to generate (default: 1000)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir, out = Path(scratch) / "runs", Path(scratch) / "out"
        write_records(runs_dir, args.runs, np.random.default_rng(0))
        start = time.perf_counter()
        code = make_report(ReportRequest(runs_dir=runs_dir, out=out))
        seconds = time.perf_counter() - start
        print(f"make_tables on {args.runs} records (tables + figures): {seconds:.1f} s, exit {code}")


if __name__ == "__main__":
    main()
