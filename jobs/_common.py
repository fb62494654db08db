"""Shared bits of the job entry points: run a CLI command inside a Ray job."""

from __future__ import annotations

import sys


def run(command: str) -> None:
    """Run ``ray-rec COMMAND`` with this script's arguments; exit with its code."""
    from ray_rec.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
