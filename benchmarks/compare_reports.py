"""Compare two report.json files and list every difference that two identical runs would not show.

Used to check that a refactor leaves ``make demo``'s report unchanged for the same seed:

    python benchmarks/compare_reports.py before/report.json after/report.json

Ignored, because they differ between two identical runs anyway: timings
(``timing_seconds``, ``seconds``, ``train_seconds``, ``images_per_second``), absolute paths
(``dataset_dir``, ``model_path``, ``results_path``, ``out_dir``), input fingerprints
(``inputs_sha256``) and the environment block. Floats are compared with a relative tolerance
(``--rtol``, default 1e-9). Exits 0 when nothing else differs, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lungct.cli import add_logging_flags, configure_logging, run_main

LOG = logging.getLogger("compare_reports")

VOLATILE_KEYS = frozenset({
    "timing_seconds", "seconds", "train_seconds", "images_per_second", "dataset_dir",
    "model_path", "results_path", "out_dir", "inputs_sha256", "environment",
})


def differences(before: Any, after: Any, rtol: float, where: str = "") -> Iterator[str]:
    """Yield ``path: before -> after`` for every differing leaf, skipping volatile keys."""
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            if key in VOLATILE_KEYS:
                continue
            if key not in before or key not in after:
                yield f"{where}.{key}: {'absent' if key not in before else 'present'} -> " \
                      f"{'absent' if key not in after else 'present'}"
                continue
            yield from differences(before[key], after[key], rtol, f"{where}.{key}")
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (a, b) in enumerate(zip(before, after, strict=True)):
            yield from differences(a, b, rtol, f"{where}[{index}]")
    elif (isinstance(before, float) and isinstance(after, float)
          and not isinstance(before, bool) and not isinstance(after, bool)):
        if not math.isclose(before, after, rel_tol=rtol, abs_tol=1e-12):
            yield f"{where}: {before!r} -> {after!r}"
    elif before != after:
        shown = [json.dumps(v)[:120] for v in (before, after)]
        yield f"{where}: {shown[0]} -> {shown[1]}"


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=1e-9, help="relative float tolerance")
    add_logging_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the differences; exit 1 when there are any."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        before, after = (json.loads(p.read_text(encoding="utf-8")) for p in (args.before,
                                                                              args.after))
        found = list(differences(before, after, args.rtol))
        for line in found:
            print(line)  # noqa: T201 - the listing is the script's output
        LOG.info("%d differences", len(found))
        return 1 if found else 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
