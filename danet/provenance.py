"""What a run ran on: code revision, library versions, and the machine (CPU model and flags or GPU
name and compute capability, BLAS / oneDNN / CUDA / cuDNN, threads, deterministic mode).

Bitwise reproduction holds only on the same hardware and software: the CPU's instruction set picks
the BLAS and oneDNN kernels, and their rounding differs between CPU models, so a record says where
it was made.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from danet.config import RunConfig

LIBRARIES = ("torch", "torchvision", "albumentations", "numpy", "wandb", "optuna")
# cuBLAS needs a fixed workspace to be deterministic (PyTorch "Reproducibility" notes)
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_fields() -> dict[str, str]:
    """'model name' and 'flags' of the first processor in /proc/cpuinfo (Linux; empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features") and key not in fields:
            fields[key] = value.strip()
    return fields


def _build_info(pattern: str) -> str | None:
    match = re.search(pattern, torch.__config__.show())
    return match.group(1) if match else None


def machine_info(device: torch.device, deterministic: bool) -> dict[str, Any]:
    """The hardware and numeric libraries behind a run's numbers."""
    cpu = _cpu_fields()
    cuda = device.type == "cuda"
    blas = _build_info(r"BLAS_INFO=(\w+)")
    mkl = _build_info(r"Math Kernel Library Version ([\w.]+)")
    return {
        "kind": device.type,
        "cpu_model": cpu.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": cpu.get("flags") or cpu.get("Features"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernel ISA PyTorch dispatches to
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "blas": f"{blas} {mkl}" if blas == "mkl" and mkl else blas,
        "onednn": _build_info(r"MKL-DNN v([\w.]+)"),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": str(torch.backends.cudnn.version()) if cuda and torch.backends.cudnn.is_available() else None,
        "threads": torch.get_num_threads(),
        "deterministic": deterministic,
    }


def run_info(cfg: RunConfig, device: torch.device, world_size: int) -> dict[str, Any]:
    """The provenance part of a run's summary.json."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    tracking = cfg.tracking
    return {"seed": cfg.train.seed, "device": device_name, "git_revision": git_revision(), "host": platform.node(),
            "python": platform.python_version(), "libraries": library_versions(), "pid": os.getpid(),
            "study": tracking.study or None, "trial": tracking.trial if tracking.study else None,
            "world_size": world_size, "machine": machine_info(device, cfg.train.deterministic)}


def use_deterministic_algorithms(enabled: bool) -> None:
    """PyTorch's deterministic mode with the environment it needs (before the first CUDA call)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)
