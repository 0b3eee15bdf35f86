"""The negative control (A/A): how often the tables' tests call a difference where there is none.

    python reports/controls.py --out results/controls [--draws 20000]

Draws null paired data (both arms from one distribution, a shared per-seed effect as in real
pairs), applies the exact one-sided sign-flip test and Holm over 3 rows as the tables do, and draws
the distribution of p-values and the false-positive rates against the nominal alpha (aa.png, .pdf),
then the folder's results page (README.md, reports/pages.py: the simulation's settings, about.md,
the figure and reading.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from reports import pages
from reports.stats import holm, sign_flip_p_values

PAIRS = (5, 8, 12)  # numbers of pairs drawn
ROWS = 3  # rows of a Holm family, as in Table 1's three attention rows
SEED_SD, RUN_SD, MEAN = 1.0, 1.2, 38.0  # mIoU points: the scale of the CamVid records
ALPHAS = np.linspace(0.005, 0.2, 40)


def null_differences(rng: np.random.Generator, draws: int, n: int, seed_sd: float = SEED_SD, run_sd: float = RUN_SD,
                     mean: float = MEAN) -> np.ndarray:
    """(draws, n) paired differences of two arms with no true difference: each seed shifts both arms
    alike, and each run adds its own noise (mIoU points, the scale of the CamVid records)."""
    shared = mean + rng.normal(0, seed_sd, (draws, n))
    return (shared + rng.normal(0, run_sd, (draws, n))) - (shared + rng.normal(0, run_sd, (draws, n)))


def false_positive_rates(p_values: np.ndarray, alphas: np.ndarray, rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
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
    alphas = ALPHAS
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for n, colour in zip(PAIRS, ("tab:orange", "tab:blue", "tab:green")):
        p_values = sign_flip_p_values(null_differences(rng, draws, n))
        axes[0].ecdf(p_values, color=colour, label=f"n = {n} pairs (smallest p 2^-{n} = {2.0 ** -n:.4f})")
        single, family_wise = false_positive_rates(p_values, alphas)
        axes[1].plot(alphas, single, color=colour, label=f"one test, n = {n}")
        axes[1].plot(alphas, family_wise, color=colour, linestyle="--", label=f"Holm over {ROWS} rows, n = {n}")
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


def page_header(draws: int, seed: int = 0) -> str:
    """The generated part of the controls page: the simulation's settings."""
    return (f"## The simulation\n\n**Null data**: {draws} draws for each number of pairs n = "
            f"{', '.join(map(str, PAIRS))} of paired differences between two arms with no true difference: each seed "
            f"shifts both arms alike (sd {SEED_SD:g} mIoU point) and each run adds its own noise (sd {RUN_SD:g} "
            f"points) around {MEAN:g}, the scale of the CamVid records; numpy's default generator seeded {seed}.\n\n"
            f"**Tests**: the tables' exact one-sided sign-flip test (smallest p 2^-n), and Holm's correction over "
            f"families of {ROWS} independent null rows; nominal alpha from {ALPHAS[0]:g} to {ALPHAS[-1]:g} in "
            f"{len(ALPHAS)} steps.\n")


def write_page(out_dir: Path, draws: int, seed: int = 0) -> Path | None:
    """The folder's results page, after its figure."""
    return pages.write_page(out_dir, page_header(draws, seed), "reports/controls.py", "Controls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reports/controls.py", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/out/controls"), help="output folder")
    parser.add_argument("--draws", type=int, default=20_000, help="null draws per number of pairs (default 20000)")
    args = parser.parse_args(argv)
    pages.remove_page(args.out)
    for path in aa_figure(args.out, args.draws):
        print(f"wrote {path}")
    page = write_page(args.out, args.draws)
    print(f"wrote {page}" if page else f"reports/controls.py: warning: {args.out / pages.PAGE} is not a page this "
                                       "script wrote: left as it is", file=sys.stdout if page else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
