"""The rich console every command prints its messages to."""

from __future__ import annotations

import sys

from rich.console import Console


def stderr_console() -> Console:
    """stderr; without a terminal (agents, schedulers, pipes) lines are never wrapped at rich's
    default 80 columns, so a record's path or a trial line stays one greppable line."""
    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())
