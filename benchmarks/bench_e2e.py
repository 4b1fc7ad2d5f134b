#!/usr/bin/env python3
"""End-to-end wall time of ``make setup``, ``make demo`` and ``make test`` on a fresh clone.

Clones the committed HEAD of this repository into a temporary folder and times, in order:
``make setup`` (the first install into a new .venv; pip's download cache may help), then
``make demo`` and ``make test`` with .venv installed. Each figure is one run (the commands take
minutes); the JSON records the machine and the commit.

    python benchmarks/bench_e2e.py --out benchmarks/out/e2e.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

LOG = logging.getLogger("bench_e2e")
REPO = Path(__file__).resolve().parents[1]


def _timed(command: list[str], cwd: Path, log_file: Path) -> dict:
    start = time.perf_counter()
    with open(log_file, "w") as log:
        result = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                check=False)
    seconds = time.perf_counter() - start
    LOG.info("%s: %.1f s (exit %d)", " ".join(command), seconds, result.returncode)
    return {"command": " ".join(command), "seconds": round(seconds, 1),
            "exit_code": result.returncode, "log": str(log_file)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/e2e.json"))
    parser.add_argument("--keep", action="store_true", help="keep the clone for inspection")
    parser.add_argument("--skip-setup", action="store_true",
                        help="copy this checkout's .venv into the clone instead of installing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    clone = Path(tempfile.mkdtemp(prefix="lungct_e2e_")) / "lungct"
    logs = args.out.parent.resolve()
    logs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    steps = []
    try:
        if args.skip_setup:
            shutil.copytree(REPO / ".venv", clone / ".venv", symlinks=True)
            (clone / ".venv" / ".installed").touch()  # newer than the cloned requirements
        else:
            steps.append(_timed(["make", "setup"], clone, logs / "e2e_setup.log"))
        steps.append(_timed(["make", "demo"], clone, logs / "e2e_demo.log"))
        steps.append(_timed(["make", "test"], clone, logs / "e2e_test.log"))
    finally:
        if not args.keep:
            shutil.rmtree(clone.parent, ignore_errors=True)
    report = {
        "benchmark": "end_to_end",
        "commit": commit,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "steps": steps,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(step["exit_code"] == 0 for step in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
