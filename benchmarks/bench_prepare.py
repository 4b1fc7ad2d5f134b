#!/usr/bin/env python3
"""Prepare-stage conversion speed: lungct's slice conversion against a naive loop.

Both convert the same CT series (512 x 512 synthetic LIDC-format slices by default) to
``--image-size`` PNGs. Naive = the seed's way: ``pydicom.dcmread`` + ``pixel_array``, min-max
scaling to uint8, Pillow resize, Pillow's default ``save()``, one process. lungct = header +
pixels, HU with padding to air, area resize in HU, lung window, OpenCV PNG, on 1 and on all
workers. Each figure is the median of ``--repeats`` runs, measured side by side in one run.

    python benchmarks/bench_prepare.py --out benchmarks/out/prepare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from lungct.contract import encode_png
from lungct.fileio import atomic_write_bytes
from lungct.parallel import pool_map
from lungct.prepare import dicom
from lungct.prepare.candidates import Candidate
from lungct.prepare.render import RenderSettings, render
from lungct.synthetic.cohort import generate_cohort

LOG = logging.getLogger("bench_prepare")


def naive_convert(job: tuple[Path, Path, int]) -> None:
    """The seed's conversion of one slice."""
    source, target, size = job
    pixels = pydicom.dcmread(source).pixel_array.astype(np.float32)
    scaled = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-6) * 255
    Image.fromarray(scaled.astype(np.uint8)).resize((size, size)).save(target)


def slice_candidate(source: Path) -> Candidate:
    """What indexing knows about a slice before conversion (not timed: the naive loop has
    no index, and prepare reads every header once whatever it converts)."""
    header = dicom.read_header(source)
    return Candidate(source, source.name, header.patient_id, 0, "no_finding",
                     series_uid=header.series_uid, slice_z_mm=header.z_mm,
                     pixel_spacing_mm=header.pixel_spacing_mm)


def lungct_convert(job: tuple[Candidate, Path, RenderSettings]) -> None:
    """lungct's conversion of one slice, as prepare does it per sample."""
    candidate, target, settings = job
    atomic_write_bytes(target, encode_png(render(candidate, settings).image))


def _time(function, jobs: list, workers: int) -> float:
    start = time.perf_counter()
    for _ in pool_map(function, jobs, workers, "bench"):
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=2, help="synthetic patients to convert")
    parser.add_argument("--slice-size", type=int, default=512, help="CT slice side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="output PNG side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/bench_cohort"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/prepare.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    cohort = generate_cohort(args.cache, n_patients=args.patients,
                             image_size_px=args.slice_size, seed=0)
    series = sorted(p for p in cohort.rglob("*.dcm"))
    LOG.info("%d slices of %d px", len(series), args.slice_size)
    settings = RenderSettings(args.image_size, *dicom.LUNG_WINDOW, "slice", 64.0)
    start = time.perf_counter()
    candidates = [slice_candidate(p) for p in series]
    index_rate = len(series) / (time.perf_counter() - start)
    scratch = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    results: dict[str, list[float]] = {"naive_1": [], "lungct_1": [], "lungct_all": []}
    try:
        for _ in range(args.repeats):
            naive_jobs = [(p, scratch / f"n{i}.png", args.image_size) for i, p in enumerate(series)]
            ours = [(c, scratch / f"o{i}.png", settings) for i, c in enumerate(candidates)]
            results["naive_1"].append(len(series) / _time(naive_convert, naive_jobs, 1))
            results["lungct_1"].append(len(series) / _time(lungct_convert, ours, 1))
            results["lungct_all"].append(len(series) / _time(lungct_convert, ours, args.workers))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "benchmark": "prepare_conversion",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "slices": len(series), "slice_size_px": args.slice_size,
        "image_size_px": args.image_size, "repeats": args.repeats, "workers": args.workers,
        "slices_per_second": {k: round(v, 1) for k, v in median.items()},
        "runs": results,
        "header_index_slices_per_second_one_worker": round(index_rate, 1),
        "speedup_one_worker": round(median["lungct_1"] / median["naive_1"], 2),
        "scaling_all_workers": round(median["lungct_all"] / median["lungct_1"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    LOG.info("%s", json.dumps(report["slices_per_second"]))
    LOG.info("lungct/naive on one worker: %.2fx; %d workers/1 worker: %.2fx",
             report["speedup_one_worker"], args.workers, report["scaling_all_workers"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
