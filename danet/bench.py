"""Benchmarks that print numbers (never timed tests).

    python -m danet.bench attention [--sizes 32 64 96] [--batch 2] [--channels 512] [--device cpu]
    python -m danet.bench data [--data-root CAMVID] [--images 64] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from danet.config import DataConfig
from danet.data import build as build_data
from danet.engine import SeededBatchSampler
from danet.models.attention import PositionAttention, fused_impl

BENCH_IMPLS = ("explicit", "sdpa", "chunked")


def _rss_bytes(field: str) -> int:
    """A memory figure of this process from /proc (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


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
        for impl in BENCH_IMPLS:
            measure = measure_attention if device.startswith("cuda") else _measure_in_fresh_process
            results[impl] = measure(impl, size, args.batch, args.channels, device, args.repeats)
        base_time, base_memory = results["explicit"]
        for impl, (seconds, peak) in results.items():
            name = f"{impl} (fused)" if impl == fused else impl
            table.add_row(f"{size}x{size}", name, f"{seconds * 1e3:.0f}", f"{peak / 2**20:.0f}",
                          f"{seconds / base_time:.2f}x", f"{peak / max(base_memory, 1):.2f}x")
        table.add_section()
    console.print(table)


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
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
