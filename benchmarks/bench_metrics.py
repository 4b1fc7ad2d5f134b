#!/usr/bin/env python3
"""Why lungct keeps its own metric kernels: bootstrap CIs against scikit-learn in a loop.

The interpretation stage computes every metric of every level on 2,000 patient-level bootstrap
resamples. lungct.metrics evaluates one resample per row of a weight matrix in a few NumPy
calls; the library alternative is one ``sklearn.metrics`` call per resample with
``sample_weight``. This script times both, side by side in one run, on a synthetic test split
(units of one patient each, patients drawn like lungct.metrics.bootstrap_counts), checks they
agree, and prints JSON: median seconds of ``--repeats`` runs and the ratio.

    python benchmarks/bench_metrics.py --units 150 --out benchmarks/out/metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from lungct.cli import add_logging_flags, configure_logging, run_main
from lungct.fileio import atomic_write_json
from lungct.metrics import (
    BOOTSTRAP_CHUNK,
    bootstrap_counts,
    weighted_auc,
    weighted_average_precision,
)

LOG = logging.getLogger("bench_metrics")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=150, help="test slices (one per patient)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    add_logging_flags(parser)
    return parser


def lungct_kernels(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUC and AP of every resample, in chunks of rows as lungct.metrics evaluates them."""
    out = []
    for start in range(0, len(counts), BOOTSTRAP_CHUNK):
        weights = counts[start:start + BOOTSTRAP_CHUNK].astype(np.float64)
        out.append(np.column_stack([weighted_auc(y, p, weights),
                                    weighted_average_precision(y, p, weights)]))
    return np.concatenate(out)


def sklearn_loop(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The same numbers with one scikit-learn call per resample and metric."""
    rows = []
    for weights in counts.astype(np.float64):
        present = weights > 0
        if len(np.unique(y[present])) < 2:
            rows.append((np.nan, np.nan))
            continue
        rows.append((roc_auc_score(y[present], p[present], sample_weight=weights[present]),
                     average_precision_score(y[present], p[present],
                                             sample_weight=weights[present])))
    return np.asarray(rows)


def median_seconds(function, repeats: int, *args) -> tuple[float, np.ndarray]:
    durations, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        durations.append(time.perf_counter() - started)
    return statistics.median(durations), result


def main(argv: list[str] | None = None) -> int:
    """Time both ways, check they agree, print and optionally write the JSON."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        rng = np.random.default_rng(args.seed)
        y = (rng.random(args.units) < 0.4).astype(np.float64)
        p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1), 3)  # ties, as in float32
        counts = bootstrap_counts(y.astype(int), args.resamples, args.seed)
        ours_s, ours = median_seconds(lungct_kernels, args.repeats, y, p, counts)
        theirs_s, theirs = median_seconds(sklearn_loop, args.repeats, y, p, counts)
        defined = np.isfinite(theirs)
        figures = {
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "units": args.units, "resamples": args.resamples, "repeats": args.repeats,
            "lungct_kernels_seconds_median": round(ours_s, 4),
            "sklearn_loop_seconds_median": round(theirs_s, 4),
            "speed_up": round(theirs_s / ours_s, 1),
            "max_abs_difference": float(np.max(np.abs(ours[defined] - theirs[defined]))),
        }
        print(json.dumps(figures, indent=2))  # noqa: T201 - the JSON is the script's output
        if args.out is not None:
            atomic_write_json(args.out, figures)
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
