"""Figures (seaborn, PNG and PDF) that a reader understands without the code.

Every function takes the runs of one table with a "cell" column (the table row each run belongs
to) and a "score" column (its mIoU in %), and a palette: one colour per cell across all figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from reports.sources import IOU_PREFIX, read_metrics  # noqa: E402

Palette = dict[str, tuple]


def save(figure: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(figure)
    return paths


def _seed_dots(axis: plt.Axes, positions: dict[str, float], values: pd.DataFrame, palette: Palette) -> None:
    """Every run as a dot beside its cell, spread sideways so that equal values stay visible."""
    for cell, group in values.groupby("cell"):
        offsets = np.linspace(-0.12, 0.12, len(group)) if len(group) > 1 else np.zeros(1)
        axis.scatter(positions[cell] - 0.22 + offsets, group["value"], s=18, color=palette[cell], alpha=0.8,
                     edgecolor="none", zorder=3)


def _interval_legend(axis: plt.Axes, dot: str, extra: list[tuple[Line2D, str]]) -> None:
    handles = [Line2D([], [], marker="o", linestyle="none", color="gray", markersize=5),
               Line2D([], [], marker="D", linestyle="-", color="black", markersize=5)] + [h for h, _ in extra]
    labels = [dot, "mean and 95% t-interval over seeds (no interval for n = 1)"] + [t for _, t in extra]
    axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, fontsize=8)


def _mean_and_interval(axis: plt.Axes, x: float, mean: float, low: float, high: float) -> None:
    has_interval = np.isfinite(low) and np.isfinite(high)
    axis.errorbar([x], [mean], yerr=[[mean - low], [high - mean]] if has_interval else None, fmt="D", color="black",
                  markersize=5, capsize=4, linewidth=1.2, zorder=4)


def point_intervals(table: pd.DataFrame, runs: pd.DataFrame, palette: Palette, out_dir: Path, name: str,
                    title: str) -> list[Path]:
    """Per cell: each seed as a dot, the mean with the table's 95% t-interval (not seaborn's
    bootstrap, far too narrow at 3-10 seeds), and the paper's number only where the paper has that
    very configuration (same head, switches and backbone)."""
    cells = table["cell"].tolist()
    positions = {cell: float(index) for index, cell in enumerate(cells)}
    figure, axis = plt.subplots(figsize=(2.5 + 1.1 * len(cells), 4.2))
    _seed_dots(axis, positions, runs.assign(value=runs["score"]), palette)
    for _, row in table.iterrows():
        _mean_and_interval(axis, positions[row["cell"]] + 0.1, row["mean"], row["ci_low"], row["ci_high"])
    extra = []
    paper = pd.to_numeric(table.get("paper", pd.Series(np.nan, index=table.index)), errors="coerce")
    if paper.notna().any():
        axis.scatter([positions[c] + 0.1 for c in table.loc[paper.notna(), "cell"]], paper[paper.notna()], marker="x",
                     s=60, color="crimson", zorder=5)
        extra.append((Line2D([], [], marker="x", linestyle="none", color="crimson"),
                      "the paper's number for this configuration (its dataset and scale)"))
    axis.set_xticks(list(positions.values()), [f"{cell}\n(n={n})" for cell, n in zip(cells, table["n"])],
                    rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("val mIoU (%)")
    axis.set_title(title, fontsize=10)
    _interval_legend(axis, "one run (seed)", extra)
    return save(figure, out_dir, name)


def paired_differences(runs: pd.DataFrame, treatment: str, baseline: str) -> pd.Series:
    """treatment - baseline score per seed, over the seeds both cells have."""
    by_seed = runs.pivot_table(index="seed", columns="cell", values="score")
    if treatment not in by_seed or baseline not in by_seed:
        return pd.Series(dtype=float)
    return (by_seed[treatment] - by_seed[baseline]).dropna()


def comparison_intervals(comparisons: pd.DataFrame, runs: pd.DataFrame, palette: Palette, out_dir: Path, name: str,
                         title: str) -> list[Path]:
    """Per comparison: each seed's paired difference as a dot (the treatment's colour), the mean
    difference with its 95% t-interval, and zero."""
    labels = comparisons["comparison"].tolist()
    positions = {label: float(index) for index, label in enumerate(labels)}
    figure, axis = plt.subplots(figsize=(2.5 + 1.3 * len(labels), 4.2))
    axis.axhline(0, color="gray", linewidth=0.8)
    colours = {}
    for _, row in comparisons.iterrows():
        differences = paired_differences(runs, row["treatment"], row["baseline"])
        colours[row["comparison"]] = palette.get(row["treatment"], (0.3, 0.3, 0.3))
        _seed_dots(axis, positions, pd.DataFrame({"cell": row["comparison"], "value": differences}), colours)
        if "delta" in row and pd.notna(row["delta"]):
            _mean_and_interval(axis, positions[row["comparison"]] + 0.1, row["delta"], row["delta_low"],
                               row["delta_high"])
    axis.set_xticks(list(positions.values()), [f"{label}\n({t} − {b})" for label, t, b in
                                               zip(labels, comparisons["treatment"], comparisons["baseline"])],
                    rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("Δ val mIoU (points), paired by seed")
    axis.set_title(title, fontsize=10)
    _interval_legend(axis, "one seed: treatment − baseline", [])
    return save(figure, out_dir, name)


def _histories(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    frames = []
    for _, run in runs.iterrows():
        events = read_metrics(run["run_dir"])
        present = [column for column in columns if column in events]
        if not present:
            continue
        events = events.dropna(subset=present, how="all")[["step", *present]]
        events["cell"], events["seed"] = run["cell"], run["seed"]
        frames.append(events)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def miou_curves(runs: pd.DataFrame, palette: Palette, out_dir: Path, name: str, title: str) -> list[Path]:
    """Validation mIoU against iteration per cell; the band spans mean +- sd over seeds."""
    history = _histories(runs, ["val/mIoU"])
    if history.empty:
        return []
    history = history[~history.duplicated(["cell", "seed", "step"], keep="last")]
    history["val/mIoU"] *= 100
    figure, axis = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=history, x="step", y="val/mIoU", hue="cell", palette=palette,
                 hue_order=[cell for cell in palette if cell in set(history["cell"])], errorbar="sd", marker="o", ax=axis)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # keep the curves visible
    axis.set_xlabel("training iteration")
    axis.set_ylabel("val mIoU (%), mean ± sd over seeds")
    axis.set_title(title)
    return save(figure, out_dir, name)


def gamma_curves(runs: pd.DataFrame, palette: Palette, out_dir: Path, name: str, title: str) -> list[Path]:
    """The learned PAM and CAM gammas (residual weights, 0 at the start) over training."""
    history = _histories(runs, ["gamma/pam", "gamma/cam"])
    if history.empty:
        return []
    long = history.melt(id_vars=["step", "cell", "seed"], value_vars=[c for c in ("gamma/pam", "gamma/cam")
                                                                     if c in history], var_name="module",
                        value_name="gamma").dropna()
    long["module"] = long["module"].str.replace("gamma/", "").str.upper()
    figure, axis = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=long, x="step", y="gamma", hue="cell", style="module", palette=palette,
                 hue_order=[cell for cell in palette if cell in set(long["cell"])], errorbar="sd", ax=axis)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel("training iteration")
    axis.set_ylabel("gamma (mean ± sd over seeds)")
    axis.set_title(title)
    return save(figure, out_dir, name)


def class_differences(runs: pd.DataFrame, cells: list[str], baseline: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per-class IoU difference (points) of each cell from the baseline cell, the mean over the
    seeds both have (paired, as the table's Δ), and the number of pairs per cell."""
    classes = [column for column in runs.columns if column.startswith(IOU_PREFIX)]
    base = runs[runs["cell"] == baseline].set_index("seed")[classes]
    rows, pairs = {}, {}
    for cell in cells:
        if cell == baseline:
            continue
        own = runs[runs["cell"] == cell].set_index("seed")[classes]
        seeds = own.index.intersection(base.index)
        pairs[cell] = len(seeds)
        if len(seeds):
            rows[cell] = (own.loc[seeds] - base.loc[seeds]).mean() * 100
    differences = pd.DataFrame(rows).T if rows else pd.DataFrame(columns=classes)
    differences.columns = [column.removeprefix(IOU_PREFIX) for column in differences.columns]
    return differences, pairs


def class_heatmap(runs: pd.DataFrame, cells: list[str], baseline: str | None, out_dir: Path, name: str,
                  title: str) -> list[Path]:
    """Per-class IoU of each cell (mean over seeds) and, against the baseline cell, the mean of the
    per-seed differences over the seeds both cells have."""
    classes = [column for column in runs.columns if column.startswith(IOU_PREFIX)]
    if not classes:
        return []
    order = [cell for cell in cells if cell in set(runs["cell"])]
    means = runs.groupby("cell")[classes].mean().reindex(order) * 100
    means.columns = [column.removeprefix(IOU_PREFIX) for column in means.columns]
    panels = [(means, "per-class IoU (%), mean over seeds", ".1f", {"cmap": "viridis"}, "IoU (%)")]
    if baseline in order:
        differences, pairs = class_differences(runs, order, baseline)
        differences.index = [f"{cell} ({pairs[cell]} pairs)" for cell in differences.index]
        limit = float(np.nanmax(np.abs(differences.to_numpy()))) if differences.size else 1.0
        panels.append((differences, f"difference from {baseline}, paired by seed (points)", "+.1f",
                       {"cmap": "RdBu", "center": 0, "vmin": -limit, "vmax": limit}, "IoU difference (points)"))
    label_width = max(len(str(label)) for panel in panels for label in panel[0].index) * 0.07
    figure, axes = plt.subplots(len(panels), 1, figsize=(2.5 + label_width + 0.75 * len(classes),
                                                         1.8 + sum(0.45 * len(panel[0]) + 1.2 for panel in panels)),
                                layout="constrained", squeeze=False)
    for axis, (frame, heading, fmt, colours, unit) in zip(axes[:, 0], panels):
        sns.heatmap(frame.astype(float), annot=True, fmt=fmt, annot_kws={"fontsize": 8}, ax=axis,
                    cbar_kws={"label": unit}, **colours)
        axis.set_title(heading, fontsize=10)
        axis.set_xlabel("")
        axis.set_ylabel("")
        axis.tick_params(axis="x", labelrotation=45)
        plt.setp(axis.get_xticklabels(), ha="right", rotation_mode="anchor")
        axis.tick_params(axis="y", labelrotation=0)
    figure.suptitle(title)
    return save(figure, out_dir, name)
