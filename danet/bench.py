"""Benchmarks that print numbers (never timed tests).

    python -m danet.bench attention [--sizes 32 64 96] [--batch 2] [--channels 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from danet.models.attention import PositionAttention, fused_impl_for

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
    fused = fused_impl_for(torch.device(device))
    table = Table(title=f"PAM forward + backward, batch {args.batch}, C = {args.channels}, {device} "
                        f"(fused = {fused} here)")
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
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
