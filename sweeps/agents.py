"""Start one `wandb agent` per visible GPU, each pinned to its GPU, and stop them all on Ctrl-C.

    python sweeps/agents.py ENTITY/PROJECT/SWEEP_ID [--count 6] [--gpus 0,1,2,3]

GPUs come from --gpus, else CUDA_VISIBLE_DEVICES, else every GPU torch sees (one agent on the
CPU when there is none). Each agent runs `--count` runs at most (default: until the sweep ends).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from danet.launch.processes import run_together, visible_gpus


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
    return run_together(agent_commands(args.sweep_id, visible_gpus(args.gpus), args.count, args.agent_command), "agent")


if __name__ == "__main__":
    sys.exit(main())
