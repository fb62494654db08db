"""Reliability figures: runs ``tests/test_reliability.py`` (faults injected for real, fuzzed input,
leak checks) and ``tests/test_user_state.py`` (Redis and replica faults) with their records switched on, and keeps each test's figures in
``reliability.json`` under the results folder, from which RELIABILITY.md is written.

    python -m bench.reliability            # every reliability test (about 9 minutes on 2 cores)
    python -m bench.reliability -k fuzzed  # some of them; the others keep their last figures
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.output import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]
RECORDS_ENV = "RAY_REC_RELIABILITY_RECORDS"  # read by tests/test_reliability.py's `record`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression: run only the matching tests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp, "records.jsonl")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *(str(ROOT / "tests" / name) for name in ("test_reliability.py", "test_user_state.py"))]
        rc = subprocess.call([*cmd, *(["-k", args.k] if args.k else [])], cwd=ROOT, env={**os.environ, RECORDS_ENV: str(records)})
        new = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    path = RESULTS / "reliability.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for row in new:
        data[row.pop("name")] = row
    write_json(path, dict(sorted(data.items())))
    print(f"{len(new)} reliability records kept in {path}")
    if rc != 0:
        raise SystemExit(f"the reliability tests failed (pytest rc {rc}): records of the passing ones were kept")


if __name__ == "__main__":
    main()
