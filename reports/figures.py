"""Figures (seaborn, PNG and PDF) that a reader understands without the code."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports.sources import IOU_PREFIX, read_metrics  # noqa: E402
from reports.tables import Layout  # noqa: E402


def cell_label(row: pd.Series | dict, layout: Layout) -> str:
    """'FCN', 'PAM', 'CAM', 'PAM+CAM' (+ the other row fields that are on, + variant fields that
    differ from their standard value) for a table row or a run."""
    parts = [name.upper() for name in ("pam", "cam") if row.get(name)]
    label = "+".join(parts) if parts else ("FCN" if "pam" in row else "base")
    extras = [f"{name}={row[name]}" for name in layout.rows if name not in ("pam", "cam", "backbone")
              and row.get(name)]
    extras += [f"{name}={row[name]}" for name, standard in layout.variants.items()
               if name in row and row[name] != standard]
    return " ".join([label, *extras])


def save(figure: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        figure.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(figure)
    return paths


def ablation_bars(table: pd.DataFrame, layout: Layout, out_dir: Path, title: str) -> list[Path]:
    """Mean mIoU per cell; whiskers are the table's 95% t-intervals (not seaborn's bootstrap,
    which is far too narrow at 3-5 seeds); crosses mark the paper's numbers."""
    labels = list(_cell_names(table.assign(seed=0), layout))
    figure, axis = plt.subplots(figsize=(1.5 + 1.2 * len(table), 4.2))
    sns.barplot(x=labels, y=table["mean"].to_numpy(), order=labels, errorbar=None, color="steelblue", ax=axis)
    has_interval = table["ci_low"].notna().to_numpy()
    axis.errorbar(np.arange(len(table))[has_interval], table["mean"][has_interval],
                  yerr=[(table["mean"] - table["ci_low"])[has_interval], (table["ci_high"] - table["mean"])[has_interval]],
                  fmt="none", color="black", capsize=4, linewidth=1.2, label="95% t-interval over seeds")
    paper = pd.to_numeric(table["paper"], errors="coerce").to_numpy()
    if np.isfinite(paper).any():
        axis.scatter(np.arange(len(table))[np.isfinite(paper)], paper[np.isfinite(paper)], marker="x", s=60,
                     color="crimson", zorder=5, label="paper (Cityscapes, different data and scale)")
    low = np.nanmin(np.concatenate([table["ci_low"].fillna(table["mean"]).to_numpy(), paper[np.isfinite(paper)]]))
    axis.set_ylim(max(0.0, low - 5), None)
    axis.set_xlabel("cell (n seeds each: " + ", ".join(str(n) for n in table["n"]) + ")")
    axis.set_ylabel("val mIoU (%), mean over seeds")
    axis.set_title(title)
    axis.tick_params(axis="x", labelrotation=20)
    axis.legend(loc="lower right", fontsize=8)
    return save(figure, out_dir, f"{layout.name}_bars")


def _cell_names(runs: pd.DataFrame, layout: Layout) -> pd.Series:
    return pd.Series([cell_label(row, layout) + (f" ({row['backbone']})" if "backbone" in row else "")
                      for _, row in runs.iterrows()], index=runs.index)


def _histories(runs: pd.DataFrame, layout: Layout, columns: list[str]) -> pd.DataFrame:
    frames = []
    names = _cell_names(runs, layout)
    for index, run in runs.iterrows():
        events = read_metrics(run["run_dir"])
        present = [column for column in columns if column in events]
        if not present:
            continue
        events = events.dropna(subset=present, how="all")[["step", *present]]
        events["cell"], events["seed"] = names[index], run["seed"]
        frames.append(events)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def miou_curves(runs: pd.DataFrame, layout: Layout, out_dir: Path, title: str) -> list[Path]:
    """Validation mIoU against iteration per cell; the band spans mean +- sd over seeds."""
    history = _histories(runs, layout, ["val/mIoU"])
    if history.empty:
        return []
    history = history[~history.duplicated(["cell", "seed", "step"], keep="last")]
    history["val/mIoU"] *= 100
    figure, axis = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=history, x="step", y="val/mIoU", hue="cell", errorbar="sd", marker="o", ax=axis)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # keep the curves visible
    axis.set_xlabel("training iteration")
    axis.set_ylabel("val mIoU (%), mean ± sd over seeds")
    axis.set_title(title)
    return save(figure, out_dir, f"{layout.name}_val_miou")


def gamma_curves(runs: pd.DataFrame, layout: Layout, out_dir: Path, title: str) -> list[Path]:
    """The learned PAM and CAM gammas (residual weights, 0 at the start) over training."""
    history = _histories(runs, layout, ["gamma/pam", "gamma/cam"])
    if history.empty:
        return []
    long = history.melt(id_vars=["step", "cell", "seed"], value_vars=[c for c in ("gamma/pam", "gamma/cam")
                                                                     if c in history], var_name="module",
                        value_name="gamma").dropna()
    long["module"] = long["module"].str.replace("gamma/", "").str.upper()
    figure, axis = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=long, x="step", y="gamma", hue="cell", style="module", errorbar="sd", ax=axis)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xlabel("training iteration")
    axis.set_ylabel("gamma (mean ± sd over seeds)")
    axis.set_title(title)
    return save(figure, out_dir, f"{layout.name}_gamma")


def class_heatmap(runs: pd.DataFrame, table: pd.DataFrame, layout: Layout, out_dir: Path, title: str) -> list[Path]:
    """Per-class IoU of each cell (mean over seeds) and its difference from the baseline cell."""
    complete = runs[runs["status"] == "complete"].copy()
    classes = [column for column in complete.columns if column.startswith(IOU_PREFIX)]
    if not classes:
        return []
    complete["cell"] = _cell_names(complete, layout)
    order = list(dict.fromkeys(_cell_names(table.assign(**{"seed": 0}), layout)))
    means = complete.groupby("cell")[classes].mean().reindex([c for c in order if c in set(complete["cell"])]) * 100
    means.columns = [column.removeprefix(IOU_PREFIX) for column in means.columns]
    baseline = means.iloc[0]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(classes), 2 + 0.6 * len(means)), layout="constrained")
    sns.heatmap(means, annot=True, fmt=".1f", cmap="viridis", ax=axes[0], cbar_kws={"label": "IoU (%)"})
    axes[0].set_title("per-class IoU (%), mean over seeds")
    sns.heatmap(means - baseline, annot=True, fmt="+.1f", cmap="RdBu", center=0, ax=axes[1],
                cbar_kws={"label": f"IoU difference (points) vs {means.index[0]}"})
    axes[1].set_title(f"difference from {means.index[0]}")
    for axis in axes:
        axis.set_xlabel("class")
    axes[0].set_ylabel("cell")
    axes[1].set_ylabel("")
    axes[1].set_yticklabels([])
    figure.suptitle(title)
    return save(figure, out_dir, f"{layout.name}_class_iou")
