"""Benchmarks that print numbers (never timed tests).

    python -m danet.bench attention [--sizes 32 64 96] [--batch 2] [--channels 512] [--device cpu]
    python -m danet.bench data [--data-root CAMVID] [--images 64] [--workers 0 2]
    python -m danet.bench train [--device cpu|cuda] [--backbone resnet101 --crop 768 --batch 8]
                                [--channels-last] [--compile] [--iterations N]
    python -m danet.bench launch [--root CHECKOUT] [--repeats 5]   # start-up of the processes that do not train
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

from danet.config import DataConfig, ModelConfig
from danet.losses import SegmentationLoss
from danet.models import DilatedResNet
from danet.models import build as build_model
from danet.models.attention import PositionAttention, fused_impl
from danet.paths import REPO

BENCH_IMPLS = ("explicit", "sdpa", "chunked")


def _rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _triton_available(device: str) -> bool:
    return device.startswith("cuda") and importlib.util.find_spec("triton") is not None


def measure_attention(impl: str, size: int, batch: int, channels: int, device: str,
                      repeats: int) -> tuple[float, float]:
    """Median seconds and peak bytes above baseline of one PAM forward + backward."""
    torch.manual_seed(0)
    module = PositionAttention(channels, reduction=8, impl=impl).to(device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    grad = torch.randn_like(x)

    def step() -> None:
        module(x).backward(grad)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (kernel selection, allocator)
    x.grad = None
    module.zero_grad(set_to_none=False)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        baseline = _rss_bytes("VmRSS")
        _reset_peak_rss()
        step()
        peak = _rss_bytes("VmHWM") - baseline
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def _measure_in_fresh_process(*args) -> tuple[float, float]:
    # A fresh process per measurement: memory freed by an earlier one cannot hide a peak.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure_attention, args)


def bench_attention(args: argparse.Namespace) -> None:
    console = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fused = fused_impl(torch.device(device))
    table = Table(title=f"PAM forward + backward, batch {args.batch}, C = {args.channels}, {device} "
                        f"(fused = {fused})")
    for column in ("feature map", "impl", "time (ms)", "peak memory (MiB)", "time / explicit",
                   "memory / explicit"):
        table.add_column(column, justify="right")
    for size in args.sizes:
        results = {}
        for impl in BENCH_IMPLS + (("triton",) if _triton_available(device) else ()):
            measure = measure_attention if device.startswith("cuda") else _measure_in_fresh_process
            results[impl] = measure(impl, size, args.batch, args.channels, device, args.repeats)
        base_time, base_memory = results["explicit"]
        for impl, (seconds, peak) in results.items():
            name = f"{impl} (fused)" if impl == fused else impl
            table.add_row(f"{size}x{size}", name, f"{seconds * 1e3:.0f}", f"{peak / 2**20:.0f}",
                          f"{seconds / base_time:.2f}x", f"{peak / max(base_memory, 1):.2f}x")
        table.add_section()
    console.print(table)


# Training-step sizes per device: the paper's scale on CUDA, about a minute for the table on a CPU.
TRAIN_DEFAULTS = {
    "cuda": dict(backbone="resnet101", crop=768, batch=8, iterations=20, warmup=5),
    "cpu": dict(backbone="resnet18", crop=64, batch=2, iterations=5, warmup=2),
}


@dataclasses.dataclass(frozen=True)
class TrainRow:
    """One configuration of the training benchmark: ModelConfig overrides, or the backbone alone."""

    name: str
    model: dict = dataclasses.field(default_factory=dict)
    backbone_only: bool = False
    compile: bool = False


class _BackboneOnly(nn.Module):
    """The floor: the dilated ResNet with a 1x1 classifier on stage 4, logits at input size."""

    def __init__(self, backbone: DilatedResNet, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.channels["stage4"], num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.backbone(images)["stage4"])
        return {"out": F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)}


def train_rows(device: str) -> list[TrainRow]:
    """The backbone floor, the DANet head without attention, PAM+CAM per PAM kernel, the FCN head."""
    impls = ["explicit", "chunked", "sdpa"] + (["triton"] if _triton_available(device) else [])
    rows = [TrainRow("backbone alone (floor)", backbone_only=True),
            TrainRow("DANet head, no attention", {"pam": False, "cam": False})]
    rows += [TrainRow(f"PAM+CAM, {impl}", {"pam_impl": impl}) for impl in impls]
    rows.append(TrainRow("FCN head (the dilated-FCN baseline)", {"head": "fcn", "pam": False, "cam": False}))
    return rows


def measure_training(row: TrainRow, device: str, backbone: str, crop: int, batch: int, classes: int,
                     iterations: int, warmup: int, channels_last: bool) -> tuple[float, float]:
    """Images/s and peak bytes of full training steps: forward, losses, backward, SGD step.

    bf16 autocast on CUDA, fp32 on the CPU. Peak memory: torch.cuda.max_memory_allocated on CUDA
    (weights, optimizer state and activations); on the CPU the rise of the process's peak RSS over
    its RSS before the model was built.
    """
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    baseline = 0 if cuda else _rss_bytes("VmRSS")
    cfg = ModelConfig(backbone=backbone, num_classes=classes, **row.model)
    model: nn.Module = (_BackboneOnly(DilatedResNet(backbone, cfg.output_stride), classes) if row.backbone_only
                        else build_model(cfg))
    loss_fn = SegmentationLoss({"out": 1.0} if row.backbone_only else cfg.loss_weights())
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    network = torch.compile(model) if row.compile else model
    images = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, classes, (batch, crop, crop), device=device)

    def step() -> None:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            outputs = network(images)
        loss = loss_fn(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    for _ in range(warmup):  # kernel selection, allocator, compilation
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM") - baseline
    return batch * iterations / seconds, peak


def _train_in_fresh_process(*args) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(measure_training, args)


def bench_train(args: argparse.Namespace) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = {name: getattr(args, name) if getattr(args, name) is not None else default
                for name, default in TRAIN_DEFAULTS["cuda" if device.startswith("cuda") else "cpu"].items()}
    rows = train_rows(device)
    results = {}
    for row in rows:
        results[row.name] = _train_in_fresh_process(row, device, settings["backbone"], settings["crop"],
                                               settings["batch"], args.classes, settings["iterations"],
                                               settings["warmup"], args.channels_last)
    if args.compile:  # the fastest PAM+CAM kernel again, compiled (minutes per graph on a GPU)
        winner = max((row for row in rows if row.name.startswith("PAM+CAM")), key=lambda row: results[row.name][0])
        compiled = dataclasses.replace(winner, name=f"{winner.name}, compiled", compile=True)
        rows.append(compiled)
        results[compiled.name] = _train_in_fresh_process(compiled, device, settings["backbone"], settings["crop"],
                                                    settings["batch"], args.classes, settings["iterations"],
                                                    settings["warmup"], args.channels_last)
    print(format_train_table(rows, results, device, settings, args))


def format_train_table(rows: list[TrainRow], results: dict, device: str, settings: dict,
                       args: argparse.Namespace) -> str:
    """The markdown table: speed and peak memory per row (results by row name), against the head
    without attention."""
    base_rate, base_peak = results[rows[1].name]  # the DANet head without attention
    precision = "bf16 autocast" if device.startswith("cuda") else "fp32"
    lines = [f"Training step on {device}: {settings['backbone']}, output stride 8, crop {settings['crop']}, "
             f"batch {settings['batch']}, {args.classes} classes, {precision}"
             f"{', channels-last' if args.channels_last else ''}; {settings['iterations']} timed steps after "
             f"{settings['warmup']} warm-up, each row in a fresh process.",
             "",
             "| configuration | images/s | step (ms) | peak memory (MiB) | step / no attention "
             "| memory over no attention (MiB) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        rate, peak = results[row.name]
        lines.append(f"| {row.name} | {rate:.1f} | {settings['batch'] / rate * 1e3:.0f} | {peak / 2**20:.0f} "
                     f"| {base_rate / rate:.2f}x | {(peak - base_peak) / 2**20:+.0f} |")
    return "\n".join(lines)


def _fake_camvid(root: Path, count: int) -> None:
    """Random 360x480 images and labels in the SegNet layout, when no real CamVid is at hand."""
    rng = np.random.default_rng(0)
    for index in range(count):
        for folder, array in (("train", rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)),
                              ("trainannot", rng.integers(0, 12, (360, 480), dtype=np.uint8))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / folder / f"{index:04d}.png")
    for folder in ("val", "valannot"):
        (root / folder).mkdir(exist_ok=True)


def bench_data(args: argparse.Namespace) -> None:
    # imported here: the training benchmark's fresh processes import this module and need neither
    from danet.data import build as build_data
    from danet.engine import SeededBatchSampler

    console = Console()
    root = args.data_root or os.environ.get("DANET_DATA", "")
    with tempfile.TemporaryDirectory() as scratch:
        source = f"CamVid at {root}"
        if not root:
            root, source = scratch, f"{args.images} generated CamVid-sized images (360x480 PNG)"
            _fake_camvid(Path(scratch), args.images)
        cfg = DataConfig(dataset="camvid", data_root=root, val_split="train", crop_size=args.crop_size,
                         random_scale=True, scale_min=0.5, scale_max=2.0, batch_size=8)
        dataset = build_data(cfg).train
        table = Table(title=f"training pipeline (decode PNG, random scale 0.5-2, pad, crop {args.crop_size}, "
                            f"flip, normalize, collate) on {source}")
        for column in ("workers", "images / s", "images / s per worker"):
            table.add_column(column, justify="right")
        for workers in args.workers:
            batches = max(1, args.images // cfg.batch_size)
            sampler = SeededBatchSampler(len(dataset), cfg.batch_size, seed=0, start=0, stop=batches)
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
            start = time.perf_counter()
            count = sum(images.shape[0] for images, _ in loader)
            rate = count / (time.perf_counter() - start)
            table.add_row(str(workers), f"{rate:.1f}", f"{rate / max(workers, 1):.1f}")
        console.print(table)


# The processes that launch runs or read records, and never train: each runs to its first real work.
LAUNCH_COMMANDS = (("W&B-YAML executor", ["sweeps/local_sweep.py", "--help"]),
                   ("Optuna driver", ["sweeps/optuna_study.py", "--help"]),
                   ("Slurm launcher", ["sweeps/slurm.py", "--grid", "demo", "--dry-run"]),
                   ("run script --help", ["ablations/run.py", "--help"]),
                   ("report script", ["reports/make_tables.py", "--help"]))


def measure_start_up(root: Path, argv: list[str], repeats: int) -> tuple[float, float, bool]:
    """Median wall seconds and peak RSS (MiB) of `python ROOT/argv...` run `repeats` times in fresh
    processes (with ROOT first on the import path, so that another checkout times its own code), and
    whether it imported torch. The peak is the process's own VmHWM (a forked child's rusage would count
    this benchmark's memory too)."""
    probe = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
             "print('torch' in sys.modules, peak, file=sys.stderr)")
    environment = dict(os.environ, PYTHONPATH=str(root))
    times, peaks, torch_loaded = [], [], False
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", probe, str(root / argv[0]), *argv[1:]], cwd=root,
                                env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                check=False)
        times.append(time.perf_counter() - started)
        loaded, peak_kib = result.stderr.split()[-2:]
        peaks.append(int(peak_kib) / 1024)
        torch_loaded = loaded == "True"
    return statistics.median(times), statistics.median(peaks), torch_loaded


def bench_launch(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    console = Console()
    table = Table(title=f"start-up of the processes that do not train ({root}, median of {args.repeats})")
    for column in ("process", "command", "wall s", "peak RSS MiB", "imports torch"):
        table.add_column(column, justify="left" if column in ("process", "command") else "right")
    for name, argv in LAUNCH_COMMANDS:
        if not (root / argv[0]).is_file():
            continue
        wall, peak, torch_loaded = measure_start_up(root, argv, args.repeats)
        table.add_row(name, " ".join(argv), f"{wall:.2f}", f"{peak:.0f}", "yes" if torch_loaded else "no")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m danet.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    attention = commands.add_parser("attention", help="PAM time and peak memory, explicit vs fused kernels")
    attention.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96],
                           help="feature map sides to measure (default: 32 64 96)")
    attention.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    attention.add_argument("--channels", type=int, default=512, help="PAM input channels C (default: 512)")
    attention.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    attention.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default: 3)")
    attention.set_defaults(run=bench_attention)
    data = commands.add_parser("data", help="training data pipeline throughput on CamVid-sized images")
    data.add_argument("--data-root", default=None,
                      help="a CamVid folder (default: DANET_DATA, else generated CamVid-sized images)")
    data.add_argument("--images", type=int, default=64, help="images to load per measurement (default: 64)")
    data.add_argument("--crop-size", type=int, default=352, help="training crop (default: 352)")
    data.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                      help="DataLoader worker counts to measure; 0 = in the main process (default: 0 2)")
    data.set_defaults(run=bench_data)
    train = commands.add_parser("train", help="images/s and peak memory of a full training step per head and PAM kernel")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    for name, kind, what in (("backbone", str, "ResNet depth"), ("crop", int, "square crop side"),
                             ("batch", int, "batch size"), ("iterations", int, "timed steps per row"),
                             ("warmup", int, "untimed steps first")):
        defaults = ", ".join(f"{device} {TRAIN_DEFAULTS[device][name]}" for device in TRAIN_DEFAULTS)
        train.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (default: {defaults})")
    train.add_argument("--classes", type=int, default=19, help="classes of the logits (default: 19, Cityscapes)")
    train.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    train.add_argument("--compile", action="store_true",
                       help="add the fastest PAM+CAM row again under torch.compile (minutes per graph)")
    train.set_defaults(run=bench_train)
    launch = commands.add_parser("launch", help="start-up time and memory of the launchers and report script")
    launch.add_argument("--root", default=str(REPO),
                        help="the checkout whose scripts to time (default: this one); another commit's checkout "
                             "gives the before of a change")
    launch.add_argument("--repeats", type=int, default=5, help="fresh processes per command, median reported "
                                                               "(default: 5)")
    launch.set_defaults(run=bench_launch)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
