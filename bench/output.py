"""Where benchmarks write their results, and how: one JSON report per benchmark under RESULTS."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

# The committed results (bench/results), and where this process writes: there, or
# RAY_REC_BENCH_RESULTS (`python -m bench --quick` points it elsewhere so quick figures never
# overwrite the full ones).
STORED = Path(__file__).resolve().parent / "results"
RESULTS = Path(os.environ.get("RAY_REC_BENCH_RESULTS") or STORED)


def machine(cores: int | None = None) -> str:
    """The machine a report was measured on, e.g. 'x86_64, 2 cores' (``cores``: those the run could use)."""
    return f"{platform.machine()}, {cores or os.cpu_count()} cores"


def write_json(path: Path, report: dict, indent: int = 2) -> Path:
    """Write ``report`` to ``path`` whole or not at all: a temporary file beside it, then a rename, so
    a benchmark stopped mid-write leaves its previous result, never half of a new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=indent))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed (e.g. a full disk)
    return path


def write_result(name: str, report: dict, indent: int = 2) -> Path:
    """Write a benchmark's report as RESULTS/``name`` (see `write_json`)."""
    return write_json(RESULTS / name, report, indent)


def this_ray() -> str:
    """The address of the Ray this process is connected to, for Ray's state API (`list_actors`, ...):
    without one the API looks for "the" Ray on the machine and stops when it finds two (a test run
    or another benchmark beside this one)."""
    import ray

    return str(ray.get_runtime_context().gcs_address)
