"""Where the repository's folders are: the one module that knows (stdlib only, no torch).

The scripts, the launch layer and the reports find presets, grids, sweep files, the run script and
the committed results through these names, whatever the working directory.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "ablations" / "configs"
GRID_DIR = REPO / "ablations" / "grids"
SWEEP_DIR = REPO / "sweeps"
RUN_SCRIPT = REPO / "ablations" / "run.py"
REPORTS_SCRIPT = REPO / "reports" / "make_tables.py"
RESULTS_DIR = REPO / "results"
