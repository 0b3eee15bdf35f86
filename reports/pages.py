"""The results page of a report folder, OUT/README.md: what the folder holds, in one page.

reports/make_tables.py (and reports/controls.py for its folder) (re)write it after their tables
and figures, from what the folder then holds, in this order:

- the title: the first line of OUT/about.md when it is a '# ' heading, else a generated one,
  and the lead of about.md (what comes before its first '## ' heading);
- "The records": generated from the records (records_header): the grid and design, the recipe
  settings every run shares, the test protocol and evaluation records, the machines, the software,
  the wall time, and one row per cell (model, loss terms, seeds, run folders);
- the rest of OUT/about.md (hand-written: the design, how it was run, the exact commands), verbatim;
- "Tables": every table Markdown file of the folder, each protocol suffix, in a stable order (the
  two calls that write a folder's two protocols both list both);
- "Figures": every .png of the folder as an image link with a one-line caption;
- "Reading": OUT/reading.md (hand-written), verbatim.

Nothing in it depends on the date, the machine that writes it or an absolute path, so a folder
rebuilt from the same records gets the same page byte for byte. A README.md that a person wrote
(one without the first line the writers put there) is never overwritten or removed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from reports.sources import MACHINE_NOT_RECORDED
from reports.tables import (
    DESIGN_NOT_RECORDED,
    find_grid,
    loss_names,
    model_description,
    plain_setting,
    recorded_values,
    seed_range,
    setting_columns,
    without_design,
)

PAGE = "README.md"
ABOUT = "about.md"  # hand-written: the design, how it was run, the commands
READING = "reading.md"  # hand-written: what the tables and figures say
MARKER = "<!-- Written by "  # the first line of every generated page: only such a page is replaced or removed
TABLES = {"table1": "Table 1 layout", "table2": "Table 2 layout", "cells": "Cells", "comparisons": "Comparisons",
          "plan": "Runs and hours of the plan", "generic": "Generic table"}
FIGURES = {  # figure kind (the file name's end) -> caption; the table it belongs to comes first in the name
    "intervals": "val mIoU per cell: every seed, the mean and its 95% t-interval",
    "class_iou": "per-class IoU of each cell and its paired difference from the baseline cell",
    "val_miou": "val mIoU during training, mean ± sd over seeds",
    "gamma": "the learned PAM and CAM gammas during training, mean ± sd over seeds",
}
COMPARISON_INTERVALS = "paired differences by seed for each comparison: every pair, the mean and its 95% t-interval"
TRAINING_CURVES = ("val_miou", "gamma")  # drawn from the training records: the same under every test protocol
OTHER_FIGURES = {  # figures another script writes into a results folder
    "attention": "PAM attention of three query points, two CAM channel responses, the prediction and the ground "
                 "truth, from one checkpoint (reports/attention_figure.py)",
    "aa": "the A/A control: p-values under the null and false-positive rates against the nominal alpha "
          "(reports/controls.py)",
}
RECIPE = ("dataset", "num_classes", "image_scale", "backbone", "weights", "output_stride", "multi_grid", "pam_impl",
          "crop_size",
          "random_scale", "hflip", "batch_size", "iterations", "lr", "head_lr_multiplier", "momentum",
          "weight_decay", "poly_power", "amp", "amp_dtype")
PROTOCOL = ("eval_mode", "eval_scales", "eval_flip")
MODEL = ("head", "pam", "cam", "aux", "aux_branches", "fcn_aux")
RUN_SUFFIX = re.compile(r"_s\d+-[0-9a-f]{8}$")  # a run folder's seed and hash: danet_r18-d8_fcn_camvid_s0-dab39a1e
TABLE_FILE = re.compile(rf"^({'|'.join(TABLES)})(-.+)?\.md$")


def is_ours(path: Path) -> bool:
    """A page one of the writers made (so it may be replaced or removed)."""
    try:
        return path.read_text().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def remove_page(out: Path) -> bool:
    """Remove a generated page (a hand-written README.md stays); whether one was removed."""
    path = out / PAGE
    if path.is_file() and is_ours(path):
        path.unlink()
        return True
    return False


def _suffix_order(suffix: str) -> tuple[int, str]:
    return (suffix != "", suffix)  # the runs' own final protocol first, then the others by name


def table_files(out: Path) -> list[tuple[str, str, Path]]:
    """(suffix, table, path) of every table Markdown file in `out`: by suffix, then in TABLES' order."""
    found = []
    for path in out.glob("*.md"):
        match = TABLE_FILE.match(path.name)
        if match:
            found.append((match.group(2) or "", match.group(1), path))
    return sorted(found, key=lambda item: (_suffix_order(item[0]), list(TABLES).index(item[1])))


def _figure_key(name: str) -> tuple:
    """Figures of a table by suffix, table and kind (TABLES' and FIGURES' orders); the others after."""
    for kind in FIGURES:
        for table in TABLES:
            match = re.fullmatch(rf"({table})(-.+)?_{kind}", name)
            if match:
                return (0, _suffix_order(match.group(2) or ""), list(TABLES).index(table), list(FIGURES).index(kind))
    return (1, name)


def figure_caption(name: str) -> str:
    """A figure's one-line caption, from its file name (stem)."""
    for kind, caption in FIGURES.items():
        for table in TABLES:
            match = re.fullmatch(rf"({table})(-.+)?_{kind}", name)
            if not match:
                continue
            caption = COMPARISON_INTERVALS if (table, kind) == ("comparisons", "intervals") else caption
            suffix = match.group(2)
            if suffix and kind in TRAINING_CURVES:
                return caption + f" (as in {table}_{kind}.png: the test protocol does not change training curves)"
            return caption + (f" (test protocol {suffix[1:]})" if suffix else "")
    return OTHER_FIGURES.get(name, name)


def _table_heading(suffix: str, table: str) -> str:
    protocol = f", protocol {suffix[1:]}" if suffix else ""
    return f"### {TABLES[table]}{protocol} (`{table}{suffix}.md`; also `.tex`, `.csv`)"


def _read(path: Path) -> str:
    return path.read_text().strip() + "\n" if path.is_file() else ""


def study_page(out: Path, header: str, writer: str, title: str) -> str:
    """The page's text: the title (about.md's own, or `title`) and about.md's lead, the generated
    header, the rest of about.md, the folder's tables, its figures and reading.md."""
    about = _read(out / ABOUT)
    if about.startswith("# "):
        first, _, about = about.partition("\n")
        title = first[2:].strip()
    lead, section, rest = ("\n" + about).partition("\n## ")  # about.md's lead comes before the header
    parts = [f"{MARKER}{writer} from the files beside it: edit {ABOUT} and {READING}, not this page. -->",
             f"# {title}", lead.strip(), header.strip(), (section + rest).strip()]
    parts = [part for part in parts if part]
    tables = table_files(out)
    if tables:
        parts.append("## Tables")
        parts += [f"{_table_heading(suffix, table)}\n\n{path.read_text().strip()}" for suffix, table, path in tables]
    figures = sorted((path.stem for path in out.glob("*.png")), key=_figure_key)
    if figures:
        parts.append("## Figures")
        parts += [f"![{figure_caption(stem)}]({stem}.png)\n\n`{stem}.png`: {figure_caption(stem)}." for stem in figures]
    reading = _read(out / READING)
    if reading:
        parts += ["## Reading", reading.strip()]
    return "\n\n".join(parts) + "\n"


def write_page(out: Path, header: str, writer: str, title: str) -> Path | None:
    """OUT/README.md (see study_page); None, writing nothing, when a hand-written README.md is there."""
    path = out / PAGE
    if path.exists() and not is_ours(path):
        return None
    path.write_text(study_page(out, header, writer, title))
    return path


# The generated header of a make_tables folder: what the records say about themselves.


def _values(runs: pd.DataFrame, name: str) -> list[str]:
    return sorted({plain_setting(value) for value in runs[name]}) if name in runs else []


def _settings_line(runs: pd.DataFrame, names: tuple[str, ...], varying: set[str]) -> str:
    parts = []
    for name in names:
        values = _values(runs, name)
        if values:
            parts.append(f"`{name}` by cell" if name in varying else f"`{name}` {values[0]}" if len(values) == 1
                         else f"`{name}` {' or '.join(values)}")
    return ", ".join(parts)


def _count(count: int, what: str) -> str:
    return f"{count} {what}" + ("" if count == 1 else "s")


def _summaries(runs: pd.DataFrame) -> list[dict]:
    """The summary.json of each local record (for what the tables do not carry: versions)."""
    summaries = []
    for run_dir in runs.get("run_dir", pd.Series(dtype=object)).dropna():
        try:
            summaries.append(json.loads(Path(run_dir, "summary.json").read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
    return summaries


def _software(summaries: list[dict]) -> str:
    """Python, library and math-library versions with their run counts, and the code's revisions."""
    combos: dict[str, int] = {}
    revisions = set()
    for summary in summaries:
        libraries = summary.get("libraries") or {}
        machine = summary.get("machine") if isinstance(summary.get("machine"), dict) else {}
        parts = [f"python {summary['python']}"] if summary.get("python") else []
        parts += [f"{name} {libraries[name]}" for name in ("torch", "torchvision", "numpy") if libraries.get(name)]
        parts += [f"{label} {machine[key]}" for key, label in (("blas", "BLAS"), ("onednn", "oneDNN"), ("cuda", "CUDA"),
                                                               ("cudnn", "cuDNN")) if machine.get(key)]
        combos[", ".join(parts) or "versions not recorded"] = combos.get(", ".join(parts) or "versions not recorded", 0) + 1
        if summary.get("git_revision"):
            revisions.add(str(summary["git_revision"])[:7])
    text = "; ".join(f"{combo} ({_count(count, 'run')})" for combo, count in sorted(combos.items()))
    if revisions:
        text += (f"; code at git revision {', '.join(sorted(revisions))}" if len(revisions) <= 3 else
                 f"; code at {len(revisions)} git revisions (each record's summary.json names its own)")
    return text


def _machines(runs: pd.DataFrame) -> str:
    device = runs.get("device", pd.Series(None, index=runs.index)).astype(object).fillna("device not recorded")
    machine = runs.get("machine", pd.Series(None, index=runs.index)).astype(object).fillna(MACHINE_NOT_RECORDED)
    pairs = pd.Series([f"`{d}`" + (" (CPU model and flags not recorded)" if m == MACHINE_NOT_RECORDED and
                                   str(d).startswith("cpu") else " (machine details not recorded)"
                                   if m == MACHINE_NOT_RECORDED else f" on {m}") for d, m in zip(device, machine)])
    return "; ".join(f"{pair} ({_count(count, 'run')})" for pair, count in pairs.value_counts().sort_index().items())


def _cell_names(runs: pd.DataFrame, grids_dir: Path) -> tuple[pd.Series, list[str], bool]:
    """Each run's cell: its grid cell where every record names one (in the grid's order), else the
    combination of the settings that differ between runs; whether the names are grid cells."""
    grid_cells = runs.get("grid_cell", pd.Series("", index=runs.index)).fillna("").astype(str)
    if (grid_cells != "").all():
        order = []
        for name in recorded_values(runs["grid"]):
            grid = find_grid(grids_dir, name)
            order += [cell for cell in (grid.named_cells() if grid else {}) if cell in set(grid_cells)]
        return grid_cells, order + sorted(set(grid_cells) - set(order)), True
    varying = [name for name in _differing(runs) if name not in MODEL]
    modal = {name: runs[name].map(plain_setting).mode().iloc[0] for name in varying}
    keys = [(model_description(row), tuple(plain_setting(row[name]) for name in varying)) for _, row in runs.iterrows()]
    names = pd.Series([model + "".join(f", {name} {value}" for name, value in zip(varying, values)
                                       if value != modal[name]) for model, values in keys], index=runs.index)
    first = {key: runs.iloc[position] for position, key in reversed(list(enumerate(keys)))}

    def order(key: tuple) -> tuple:
        model, values = key
        row = first[key]
        return (sum(plain_setting(row.get(name)) == "True" for name in ("pam", "cam")),
                plain_setting(row.get("pam")) != "True",
                "deep supervision" in model, row.get("head") != "fcn",
                sum(value != modal[name] for name, value in zip(varying, values)), values)

    ordered = [names.iloc[keys.index(key)] for key in sorted(set(keys), key=order)]
    return names, ordered, False


def _differing(runs: pd.DataFrame) -> list[str]:
    """The settings (iterations among them) whose values differ between runs, the seed aside."""
    columns = [name for name in setting_columns(runs) if name != "seed"] + (["iterations"] if "iterations" in runs else [])
    return [name for name in columns if runs[name].map(plain_setting).nunique() > 1]


def _cells_table(runs: pd.DataFrame, grids_dir: Path) -> str:
    names, order, from_grid = _cell_names(runs, grids_dir)
    others = [name for name in _differing(runs) if name not in MODEL]
    header = (["Cell"] if from_grid else []) + ["Model", "Loss terms"] + (["Other settings that differ"] if others
                                                                        else []) + ["Seeds", "Runs", "Run folders"]
    rows = []
    for name in order:
        cell = runs[names == name]
        first = cell.iloc[0]
        losses = loss_names(first)
        complete = int((cell["status"] == "complete").sum()) if "status" in cell else len(cell)
        folders = sorted({f"`{RUN_SUFFIX.sub('_s*', str(run_id))}`" for run_id in cell["run_id"]})
        seeds = sorted({int(seed) for seed in cell["seed"].dropna()}) if "seed" in cell else []
        rows.append(([f"`{name}`"] if from_grid else []) + [
            model_description(first), f"{len(losses)}: {', '.join(losses)}"] + (
            [", ".join(f"`{other}` {plain_setting(first[other])}" for other in others)] if others else []) + [
            seed_range(seeds), f"{len(cell)}" + (f" ({complete} complete)" if complete != len(cell) else ""),
            ", ".join(folders)])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _grid_line(runs: pd.DataFrame, grids_dir: Path) -> str:
    grids = recorded_values(runs["grid"]) if "grid" in runs else []
    designs = recorded_values(runs["design"]) if "design" in runs else []
    if not grids:
        undeclared = [design for design in designs if design == DESIGN_NOT_RECORDED] or [DESIGN_NOT_RECORDED]
        return (f"**Grid and design**: {undeclared[0]} in these records (made before a record named its grid and "
                f"design). What they hold: {without_design(runs)}.")
    parts = []
    for name in grids:
        grid = find_grid(grids_dir, name)
        parts.append(f"`{name}` (`ablations/grids/{name}.yaml`" + (f", preset `{grid.preset}`" if grid else
                                                                  ", its file is not in the grids folder") + ")")
    return f"**Grid**: {', '.join(parts)}; **design**: {', '.join(designs)}."


def _evaluations_line(evaluations: pd.DataFrame) -> str:
    if evaluations is None or evaluations.empty:
        return "no evaluation records (every number is the run's own final evaluation)"
    counts = evaluations.groupby(["split", "protocol", "checkpoint"]).size()
    return "evaluation records: " + "; ".join(f"{split} `{protocol}` of the `{checkpoint}` checkpoint "
                                              f"({_count(count, 'run')})" for (split, protocol, checkpoint), count
                                              in counts.items())


def records_header(runs: pd.DataFrame, evaluations: pd.DataFrame, where: str, grids_dir: Path) -> str:
    """The generated "The records" section of a make_tables page: everything from the records."""
    complete = runs[runs["status"] == "complete"] if "status" in runs else runs
    statuses = runs["status"].value_counts().sort_index() if "status" in runs else pd.Series(dtype=int)
    others = ", ".join(f"{count} {status}" for status, count in statuses.items() if status != "complete")
    varying = set(_differing(complete)) if not complete.empty else set()
    described = complete if not complete.empty else runs
    lines = [f"**Records**: {_count(len(runs), 'run record')} in `{where}`, {len(complete)} complete"
             + (f" ({others}: listed in `not_complete.csv`, never averaged in)" if others else "") + ".",
             _grid_line(described, grids_dir),
             f"**Recipe** (every run's config; a setting marked 'by cell' is in the cells table): "
             f"{_settings_line(described, RECIPE, varying)}.",
             f"**Test protocol** of the runs' own final numbers: {_settings_line(described, PROTOCOL, varying)}; "
             f"{_evaluations_line(evaluations)}.",
             f"**Machine** (as the records name it): {_machines(described)}."]
    summaries = _summaries(described)
    if summaries:
        lines.append(f"**Software**: {_software(summaries)}.")
    if "wall_time_s" in described and described["wall_time_s"].notna().any():
        minutes = described["wall_time_s"].dropna() / 60
        lines.append(f"**Wall time** (each run's `wall_time_s`: training and its validations): {minutes.sum():.1f} "
                     f"minutes in all, {minutes.min():.1f} to {minutes.max():.1f} a run.")
    return "## The records\n\n" + "\n\n".join(lines) + "\n\n" + _cells_table(described, grids_dir) + "\n"


def default_title(runs: pd.DataFrame) -> str:
    grids = recorded_values(runs["grid"]) if "grid" in runs else []
    studies = recorded_values(runs["study"]) if "study" in runs else []
    return (f"Results of grid {', '.join(grids)}" if grids else f"Results of Optuna study {', '.join(studies)}"
            if studies else "Results")
