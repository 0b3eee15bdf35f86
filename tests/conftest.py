import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "ablations" / "configs"
GRIDS = REPO / "ablations" / "grids"


def resolve(argv: list[str], environment: dict | None = None):
    """The RunConfig that ablations/run.py would build from `argv`."""
    from danet.cli import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(argv), PRESETS, environment or {})


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (sweeps/agents.py, ...) as a module, without touching sys.path."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_flags(runs_dir: Path, *extra: str) -> list[str]:
    """A run that takes seconds on the CPU: ResNet-18, 32x32 synthetic images, a few iterations."""
    return ["--backbone", "resnet18", "--synthetic-size", "32", "--crop-size", "32", "--batch-size", "2",
            "--synthetic-train-images", "8", "--synthetic-val-images", "4", "--iterations", "4",
            "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1", "--workers", "0",
            "--eval-batch-size", "2", "--wandb", "disabled", "--quiet", "--runs-dir", str(runs_dir), *extra]


def run_cli(argv: list[str]) -> int:
    from danet.cli import main

    return main(argv, preset_dir=PRESETS)


def wait_for_checkpoint(runs_dir: Path, process, timeout: float = 180) -> bool:
    """Poll until a run under runs_dir has written checkpoints/last.pt, while `process` still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if list(runs_dir.glob("*/checkpoints/last.pt")):
            return True
        time.sleep(0.02)
    return False


def only_run_dir(runs_dir: Path) -> Path:
    dirs = [path for path in runs_dir.iterdir() if path.is_dir() and not path.name.startswith(".")]  # not .locks
    assert len(dirs) == 1, dirs
    return dirs[0]


def summary_of(runs_dir: Path) -> dict:
    return json.loads((only_run_dir(runs_dir) / "summary.json").read_text())


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def random_pair(rng: np.random.Generator, height: int, width: int, values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, dtype=np.uint8), size=(height, width))
    return image, label


@pytest.fixture
def camvid_tree(tmp_path: Path) -> Path:
    """CamVid in the SegNet layout: 11 classes, 11 = void; 48x64 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "camvid"
    for split, count in (("train", 4), ("val", 2)):
        for index in range(count):
            image, label = random_pair(rng, 48, 64, list(range(12)))
            write_png(root / split / f"{split}_{index:03d}.png", image)
            write_png(root / f"{split}annot" / f"{split}_{index:03d}.png", label)
    return root


@pytest.fixture
def cityscapes_tree(tmp_path: Path) -> Path:
    """Cityscapes in the official layout with labelIds (0..33)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "cityscapes"
    for split, cities in (("train", ["aachen", "bochum"]), ("val", ["frankfurt"])):
        for city in cities:
            for index in range(2):
                stem = f"{city}_{index:06d}_000019"
                image, label = random_pair(rng, 32, 64, list(range(34)))
                write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
                write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return root


def _private_postgres(base: Path) -> tuple[str, callable]:
    """Start a throw-away PostgreSQL cluster on loopback (as the postgres user); return its URL."""
    import shutil
    import socket
    import subprocess

    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not versions:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (or set DANET_TEST_POSTGRES to a URL)")
    bin_dir = versions[-1].parent
    data = base / "pgdata"
    data.mkdir(parents=True)
    shutil.chown(base, "postgres")
    shutil.chown(data, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(as_postgres + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(as_postgres + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                                  f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)

    def stop():
        subprocess.run(as_postgres + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)

    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """DANET_TEST_POSTGRES (what .ci/run starts), else a private cluster for this session."""
    import os
    import shutil
    import tempfile

    if os.environ.get("DANET_TEST_POSTGRES"):
        yield os.environ["DANET_TEST_POSTGRES"]
        return
    base = Path(tempfile.mkdtemp(prefix="danet-postgres-"))  # pytest's tmp dirs are closed to other users
    url, stop = _private_postgres(base)
    yield url
    stop()
    shutil.rmtree(base, ignore_errors=True)
