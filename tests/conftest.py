import importlib.util
import json
import os
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under `pytest -n 2` each test process (and every run it starts) gets one core: torch's second
    # thread only adds contention to the tiny runs of the tests. Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PRESETS = REPO / "ablations" / "configs"
GRIDS = REPO / "ablations" / "grids"


def resolve(argv: list[str], environment: dict | None = None):
    """The RunConfig that ablations/run.py would build from `argv`."""
    from danet.launch.contract import build_parser, config_from_args

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


def write_grid(path: Path, cells: dict, seeds: tuple[int, ...] = (0,), **extra) -> Path:
    """A grid file of demo-preset cells (in this order: task i of a Slurm array is cell i) over `seeds`."""
    import yaml

    grid = {"preset": "demo", "design": "as-released", **extra,
            "blocks": [{"axes": {"seed": list(seeds)}, "cells": cells}]}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def write_run(runs_dir: Path, name: str, miou, status: str = "complete", **settings) -> None:
    """A hand-made run record (ResNet-50, Cityscapes; `settings` overrides config fields) for the report tests."""
    import yaml

    from danet.config import RunConfig

    cfg = RunConfig.from_dict({"model": {"backbone": "resnet50", "num_classes": 19}, "data": {"dataset": "cityscapes"}})
    sections = cfg.to_dict()
    for key, value in settings.items():
        for section in sections.values():
            if key in section:
                section[key] = value
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(sections))
    summary = {"status": status, "final_miou": miou, "best_miou": miou, "wall_time_s": 600.0,
               "images_per_second": 10.0, "peak_memory_mb": 2048.0, "per_class_iou": {"road": miou},
               "cell_hash": name}
    if status != "complete":
        summary = {"status": status, "reason": "boom"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    events = [{"step": step, "val/mIoU": (miou or 0) * step / 200, "gamma/pam": 0.01 * step,
               "gamma/cam": 0.02 * step} for step in (100, 200)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))


REPORT_CELLS = {  # (pam, cam) -> final val mIoU per seed, for the report tests
    (False, False): [0.700, 0.705, 0.698, 0.710, 0.702], (True, False): [0.750, 0.758, 0.747, 0.761, 0.755],
    (False, True): [0.740, 0.738, 0.745, 0.744, 0.741], (True, True): [0.760, 0.770, 0.765, 0.768]}


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


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SLURM_CONF = """\
ClusterName=danet-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=30
NodeName=danet-node NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=danet-node Default=YES MaxTime=INFINITE State=UP
"""


def _private_slurm(base: Path) -> tuple[dict[str, str], callable]:
    """Start munged, slurmctld and slurmd (Debian's slurm-wlm and munge) as a one-node cluster
    whose files all live in `base`; return the environment its clients need and a stop function.
    Skips the test when Slurm is not installed or does not come up."""
    import shutil
    import socket
    import subprocess

    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    base.chmod(0o755)  # munged runs as the munge user and must reach its own folder
    munge_dir = base / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o711)  # munged wants its socket's folder searchable by all and writable by itself only
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for path in (munge_dir, key):
        shutil.chown(path, "munge", "munge")
    for name in ("state", "spool"):
        (base / name).mkdir()
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=_free_port(), slurmd_port=_free_port(),
                                      base=base, cpus=os.cpu_count()))
    environment = dict(os.environ, SLURM_CONF=str(conf))
    daemons: list[subprocess.Popen] = []

    def stop() -> None:
        if len(daemons) == 3:  # end every job first: its slurmstepd and processes would outlive slurmd
            jobs = subprocess.run(["squeue", "-h", "-o", "%A"], env=environment, capture_output=True, text=True)
            if jobs.stdout.split():
                subprocess.run(["scancel", "--signal=KILL", "--full", *jobs.stdout.split()], env=environment,
                               capture_output=True)
            _wait_for(lambda: not subprocess.run(["squeue", "-h"], env=environment, capture_output=True,
                                                 text=True).stdout.strip(), 60)
        for daemon in reversed(daemons):  # slurmd, slurmctld, munged: by the pids started here
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()

    def start(command: list[str], **options) -> None:
        daemons.append(subprocess.Popen(command, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, **options))

    try:
        start(["munged", "--foreground", f"--socket={munge_dir}/munge.socket", f"--key-file={key}",
               f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
               f"--seed-file={munge_dir}/munged.seed"], user="munge", group="munge")
        if not _wait_for(lambda: (munge_dir / "munge.socket").exists(), 30):
            raise RuntimeError("munged did not create its socket within 30 s")
        start(["slurmctld", "-D", "-i", "-f", str(conf)])
        start(["slurmd", "-D", "-N", "danet-node", "-f", str(conf)])

        def node_idle() -> bool:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=environment, capture_output=True, text=True)
            return state.stdout.strip() == "idle"

        if not _wait_for(node_idle, 60):
            raise RuntimeError("the node did not become idle within 60 s")
    except Exception as error:
        stop()
        logs = "; ".join(f"{path.name}: {path.read_text().strip().splitlines()[-1:]}"
                         for path in sorted(base.rglob("*.log")) if path.stat().st_size)
        pytest.skip(f"Slurm could not start ({error}); {logs}")
    return environment, stop


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node Slurm cluster for this session: the environment its clients (sbatch, squeue,
    scontrol) need. Its daemons are stopped by pid at the end of the session."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="danet-slurm-"))
    environment, stop = _private_slurm(base)
    yield environment
    stop()
    shutil.rmtree(base, ignore_errors=True)
