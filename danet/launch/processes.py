"""Launch one process per GPU (agents, workers) and stop them together.

Used by sweeps/agents.py (one `wandb agent` per GPU) and sweeps/optuna_study.py (--workers): each
child runs in its own process group with CUDA_VISIBLE_DEVICES set; Ctrl-C or SIGTERM sends SIGTERM
to every group, waits a grace period (what `wandb agent` gives a run), then SIGKILLs what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

STOP_GRACE_SECONDS = 30


def visible_gpus(requested: str | None = None) -> list[str]:
    """GPU ids from `requested` ("0,2"), else CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    listed = requested or os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if listed.strip():
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def _stop(processes: list[subprocess.Popen], grace_seconds: float) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.time() + grace_seconds
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_together(commands: list[tuple[str, list[str]]], describe: str,
                 grace_seconds: float = STOP_GRACE_SECONDS) -> int:
    """Run each (CUDA_VISIBLE_DEVICES value, argv) at once; '' leaves the variable as it is.

    Returns the largest exit status (a child killed by signal N counts as 128 + N, as a shell says it),
    or 130 after an interrupt (Ctrl-C or SIGTERM).
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    processes = []
    # both handlers set here: a process started in the background by a shell inherits an ignored SIGINT
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:  # from before the first start: an interrupt at any point stops what has started
        for gpus, argv in commands:
            environment = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus) if gpus else None
            processes.append(subprocess.Popen(argv, env=environment, start_new_session=True))
            print(f"{describe} pid {processes[-1].pid} on {'GPU ' + gpus if gpus else 'the CPU'}: {' '.join(argv)}",
                  flush=True)
        while any(process.poll() is None for process in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"stopping {describe}s (their runs get SIGTERM, are recorded and resume later)", flush=True)
        _stop(processes, grace_seconds)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return max(code if code >= 0 else 128 - code for code in (process.returncode for process in processes))
