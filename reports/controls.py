"""The negative control (A/A): how often the tables' tests call a difference where there is none.

    python reports/controls.py --out results/controls [--draws 20000]

Draws null paired data (both arms from one distribution, a shared per-seed effect as in real
pairs), applies the exact one-sided sign-flip test and Holm over 3 rows as the tables do, and draws
the distribution of p-values and the false-positive rates against the nominal alpha (aa.png, .pdf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from reports.stats import holm, sign_flip_p_values


def null_differences(rng: np.random.Generator, draws: int, n: int, seed_sd: float = 1.0, run_sd: float = 1.2,
                     mean: float = 38.0) -> np.ndarray:
    """(draws, n) paired differences of two arms with no true difference: each seed shifts both arms
    alike, and each run adds its own noise (mIoU points, the scale of the CamVid records)."""
    shared = mean + rng.normal(0, seed_sd, (draws, n))
    return (shared + rng.normal(0, run_sd, (draws, n))) - (shared + rng.normal(0, run_sd, (draws, n)))


def false_positive_rates(p_values: np.ndarray, alphas: np.ndarray, rows: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per alpha: the rate of p <= alpha of single tests, and the family-wise rate (any row with a
    Holm-adjusted p <= alpha) over families of `rows` independent null rows."""
    single = (p_values[:, None] <= alphas[None, :]).mean(axis=0)
    families = p_values[: len(p_values) // rows * rows].reshape(-1, rows)
    smallest_adjusted = np.array([min(holm(family.tolist())) for family in families])
    family_wise = (smallest_adjusted[:, None] <= alphas[None, :]).mean(axis=0)
    return single, family_wise


def aa_figure(out_dir: Path, draws: int = 20_000, seed: int = 0) -> list[Path]:
    from reports.figures import plt, save

    rng = np.random.default_rng(seed)
    alphas = np.linspace(0.005, 0.2, 40)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for n, colour in ((5, "tab:orange"), (8, "tab:blue"), (12, "tab:green")):
        p_values = sign_flip_p_values(null_differences(rng, draws, n))
        axes[0].ecdf(p_values, color=colour, label=f"n = {n} pairs (smallest p 2^-{n} = {2.0 ** -n:.4f})")
        single, family_wise = false_positive_rates(p_values, alphas)
        axes[1].plot(alphas, single, color=colour, label=f"one test, n = {n}")
        axes[1].plot(alphas, family_wise, color=colour, linestyle="--", label=f"Holm over 3 rows, n = {n}")
    for axis in axes:
        axis.plot([0, 1], [0, 1], color="gray", linewidth=0.8, label="rate = alpha")
    axes[0].set(xlabel="p-value (exact one-sided sign-flip test)", ylabel="fraction of null draws with p <= x",
                title=f"p-values under the null ({draws} draws per n)")
    axes[1].set(xlim=(0, 0.2), ylim=(0, 0.2), xlabel="nominal alpha", ylabel="false-positive rate",
                title="false positives: one test and Holm's family-wise rate")
    for axis in axes:
        axis.legend(fontsize=8, loc="upper left")
    figure.suptitle("A/A control: both arms from one distribution (paired by seed)")
    return save(figure, out_dir, "aa")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/controls.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/out/controls"), help="output folder")
    parser.add_argument("--draws", type=int, default=20_000, help="null draws per number of pairs (default 20000)")
    args = parser.parse_args(argv)
    for path in aa_figure(args.out, args.draws):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
