"""Write the W&B sweep files from the grids, so the grids stay the one definition.

    python sweeps/make_sweeps.py          # rewrites sweeps/<grid>.yaml for every ablations/grids/*.yaml

Each grid becomes a `method: grid` sweep over one parameter, `cell`, whose values are the grid's
cell ids (a W&B grid is a plain product and cannot tie settings such as lr to the PAM+CAM cell);
run.py turns `--grid NAME --cell ID` into the cell's preset and settings. The agent command adds
`--resume`, so a cell whose complete record exists is skipped and a crashed one continues.
"""

from __future__ import annotations

import argparse

import yaml

from danet.launch.contract import sweep_for_grid
from danet.paths import GRID_DIR, REPO, SWEEP_DIR


def render(sweep: dict) -> str:
    return yaml.safe_dump(sweep, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="sweeps/make_sweeps.py", description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for path in sorted(GRID_DIR.glob("*.yaml")):
        target = SWEEP_DIR / f"{path.stem}.yaml"
        target.write_text(render(sweep_for_grid(path.stem)))
        print(f"wrote {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
