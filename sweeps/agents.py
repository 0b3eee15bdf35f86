"""Start one `wandb agent` per visible GPU, each pinned to its GPU, and stop them all on Ctrl-C.

    python sweeps/agents.py ENTITY/PROJECT/SWEEP_ID [--count 6] [--gpus 0,1,2,3]

GPUs come from --gpus, else CUDA_VISIBLE_DEVICES, else every GPU torch sees (one agent on the
CPU when there is none). Each agent runs `--count` runs at most (default: until the sweep ends).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from danet.studies import visible_gpus

STOP_GRACE_SECONDS = 30  # what wandb agent itself gives a run between SIGTERM and SIGKILL


def agent_commands(sweep_id: str, gpus: list[str], count: int | None, agent: str) -> list[tuple[str, list[str]]]:
    """(CUDA_VISIBLE_DEVICES value, argv) for each agent; '' means the CPU."""
    argv = [*shlex.split(agent), sweep_id] + (["--count", str(count)] if count else [])
    return [(gpu, argv) for gpu in (gpus or [""])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("sweep_id", help="ENTITY/PROJECT/SWEEP_ID as printed by `wandb sweep`")
    parser.add_argument("--count", type=int, default=None, help="runs per agent (default: until the sweep ends)")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids (default: CUDA_VISIBLE_DEVICES or all)")
    parser.add_argument("--agent-command", default="wandb agent",
                        help="the agent program (default: 'wandb agent'); tests use a stand-in")
    args = parser.parse_args(argv)

    processes = []
    for gpu, command in agent_commands(args.sweep_id, visible_gpus(args.gpus), args.count, args.agent_command):
        environment = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
        processes.append(subprocess.Popen(command, env=environment, start_new_session=True))
        print(f"agent pid {processes[-1].pid} on {'GPU ' + gpu if gpu else 'the CPU'}: {' '.join(command)}", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while any(process.poll() is None for process in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping agents (their runs get SIGTERM, are recorded as failed and resume later)", flush=True)
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return 130
    return max(process.returncode for process in processes)


if __name__ == "__main__":
    sys.exit(main())
