#!/usr/bin/env python3
"""Header indexing at scale: files/s on 1 and 2 workers, local pool against Dask.

Generates a tree of small CT DICOM files (real headers written by pydicom, 8 x 8 pixels, 100
slices per series), then times :func:`lungct.prepare.header_index.read_headers`: every header
read (no index) with ``--executor local`` and ``dask`` on 1 and 2 workers (median of
``--repeats`` rounds, the settings side by side in each); building the
persistent index, and a second run with it in place; the overhead of one task (a no-op) on
each executor; and prepare end to end on the synthetic cohort with both executors.

    python benchmarks/bench_index.py --files 50000 --out benchmarks/out/index.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from lungct.prepare.cli import main as prepare_main
from lungct.prepare.executors import open_executor
from lungct.prepare.header_index import read_headers

LOG = logging.getLogger("bench_index")
SLICES_PER_SERIES = 100
UID_ROOT = "1.2.826.0.1.3680043.10.1013"


def generate_tree(root: Path, n_files: int) -> float:
    """Write ``n_files`` CT slices under ``root``/patient/series/; returns the seconds taken."""
    start = time.perf_counter()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.Manufacturer, ds.ConvolutionKernel = "BENCH", "B30f"
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    for i in range(n_files):
        series, slice_index = divmod(i, SLICES_PER_SERIES)
        ds.PatientID = f"BENCH-{series // 3:05d}"
        ds.StudyInstanceUID = f"{UID_ROOT}.1.{series // 3}"
        ds.SeriesInstanceUID = f"{UID_ROOT}.2.{series}"
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{i}"
        ds.InstanceNumber = slice_index + 1
        ds.ImagePositionPatient = [-175.0, -175.0, -2.5 * slice_index]
        path = root / ds.PatientID / f"series-{series:05d}" / f"{slice_index:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return time.perf_counter() - start


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


def time_indexing(root: Path, files: list[Path], repeats: int) -> dict:
    """Every header read, no index: files/s per executor and worker count (median of
    ``repeats`` rounds, the four settings side by side in each round); task overhead."""
    settings = [(kind, workers) for kind in ("local", "dask") for workers in (1, 2)]
    rounds: dict[str, list[dict]] = {f"{kind}_{workers}": [] for kind, workers in settings}
    for _ in range(repeats):
        for kind, workers in settings:
            start = time.perf_counter()
            with open_executor(kind, workers, dashboard_address=None) as executor:
                ready = time.perf_counter()
                read_headers(files, root, executor, None)
                done = time.perf_counter()
                overhead = _task_overhead_s(executor) if workers == 2 else None
            run = {"start_s": ready - start, "read_s": done - ready,
                   **({"task_overhead_ms": overhead * 1e3} if overhead else {})}
            rounds[f"{kind}_{workers}"].append(run)
            LOG.info("%s on %d: %.1f files/s", kind, workers, len(files) / run["read_s"])
    results = {}
    for key, runs in rounds.items():
        median = {name: round(float(np.median([run[name] for run in runs])), 3)
                  for name in runs[0]}
        median["files_per_s"] = round(len(files) / median["read_s"], 1)
        median["files_per_s_each_round"] = [round(len(files) / run["read_s"], 1) for run in runs]
        results[key] = median
    return results


def _task_overhead_s(executor: object, n_tasks: int = 2000) -> float:
    """Seconds per no-op task (``abs``), end to end through the executor."""
    start = time.perf_counter()
    list(executor.map(abs, list(range(n_tasks)), "no-op"))  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / n_tasks


def time_index_reuse(root: Path, files: list[Path], work: Path) -> dict:
    """Building the index (2 local workers), then a second run with it in place."""
    index = work / "headers.parquet"
    with open_executor("local", 2) as executor:
        start = time.perf_counter()
        read_headers(files, root, executor, index)
        built = time.perf_counter()
        read_headers(files, root, executor, index)
        reused = time.perf_counter()
    return {"build_s": round(built - start, 3), "second_run_s": round(reused - built, 3),
            "second_run_files_per_s": round(len(files) / (reused - built), 1),
            "index_bytes": index.stat().st_size}


def time_end_to_end(work: Path, patients: int) -> dict:
    """prepare on the synthetic cohort, 2 workers, local then dask (cohort made beforehand)."""
    common = ["--source", "synthetic", "--synthetic-patients", str(patients), "--quiet",
              "--work-dir", str(work), "--workers", "2", "--image-size", "128"]
    prepare_main([*common, "--output", str(work / "warm")])  # the cohort, and the index
    results = {}
    for kind in ("local", "dask"):
        start = time.perf_counter()
        code = prepare_main([*common, "--output", str(work / kind), "--executor", kind])
        results[kind] = {"seconds": round(time.perf_counter() - start, 3), "exit_code": code}
    identical = all((work / "local" / p.relative_to(work / "dask")).read_bytes() == p.read_bytes()
                    for p in (work / "dask").rglob("*") if p.is_file())
    results["identical"] = identical
    results["images"] = json.loads((work / "local" / "dataset.json").read_text())["n_images"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--patients", type=int, default=10, help="synthetic cohort, end to end")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the indexing timings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/index.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench_index-"))
    try:
        root = work / "tree"
        generate_s = generate_tree(root, args.files)
        files = _files(root)
        LOG.info("generated %d files in %.1f s", len(files), generate_s)
        result = {
            "files": len(files), "generate_s": round(generate_s, 1),
            "tree_bytes": sum(p.stat().st_size for p in files),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
            "indexing": time_indexing(root, files, args.repeats),
            "index_reuse": time_index_reuse(root, files, work),
            "end_to_end": time_end_to_end(work / "e2e", args.patients),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's result


if __name__ == "__main__":
    main()
