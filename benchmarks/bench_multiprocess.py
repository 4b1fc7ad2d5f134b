#!/usr/bin/env python3
"""Two-process data-parallel training against one process, on one machine (issue 13).

Writes a dataset of random disc PNGs in the output_dataset/ layout to a temporary folder and
runs ``training_lung_cnn.py`` (JAX backend, CPU) three ways on it: one process
(``--distribute none``), one process over 2 CPU devices (``--distribute data-parallel``,
``XLA_FLAGS=--xla_force_host_platform_device_count=2``) and a 2-process job (one CPU device
each, ``KERAS_DISTRIBUTION_*`` variables, localhost coordinator). Training images/s is the
global images per epoch over the median epoch time from ``runs/baseline/history.csv``, the
first (compiling) epoch left out. On one machine's cores this is an overhead figure
(cross-process gloo all-reduce, two interpreters), not a speed-up. Prints JSON.

    python benchmarks/bench_multiprocess.py --out benchmarks/out/multiprocess.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from lungct import contract
from lungct.cli import add_logging_flags, configure_logging, run_main
from lungct.fileio import atomic_write_json

LOG = logging.getLogger("bench_multiprocess")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1800


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64, help="PNG side, px")
    parser.add_argument("--n-train", type=int, default=512, help="training images")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs; the first is not timed")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    add_logging_flags(parser)
    return parser


def write_dataset(folder: Path, n_train: int, image_size: int) -> None:
    """Disc PNGs (large bright: cancer) in train/val/test, val and test an eighth of train."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:image_size, :image_size]
    rows = []
    for split, count in (("train", n_train), ("val", n_train // 8), ("test", n_train // 8)):
        for index in range(count):
            label = index % 2
            image = rng.normal(70, 20, (image_size, image_size))
            centre = rng.uniform(0.35, 0.65, 2) * image_size
            disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= (
                image_size * (0.25 if label else 0.08)) ** 2
            image[disc] += 120 if label else 40
            relative = f"{contract.CLASS_NAMES[label]}/{split}_{index:05d}.png"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / relative), np.clip(image, 0, 255).astype(np.uint8))
            rows.append({column: "" for column in contract.MANIFEST_COLUMNS} | {
                "path": relative, "label": label, "class_name": contract.CLASS_NAMES[label],
                "split": split, "patient_id": f"P-{split}-{index // 2:05d}",
                "series_uid": f"1.2.{index}", "slice_z_mm": "0.0", "n_readers": "0",
                "negative_kind": "" if label else "no_finding", "mm_per_px": "0.7"})
    contract.write_manifest(folder, rows)


def free_port() -> int:
    """A TCP port free on localhost now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def train(args: argparse.Namespace, dataset: Path, out: Path, distribute: str,
          envs: list[dict[str, str]]) -> None:
    """Run one training per environment in ``envs`` at once; fail if any exits non-zero."""
    base = {name: value for name, value in os.environ.items()
            if not name.startswith(("KERAS_DISTRIBUTION_", "SLURM_", "XLA_FLAGS"))}
    base.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, str(REPO / "training_lung_cnn.py"), "--dataset", str(dataset),
               "--out", str(out), "--models", "baseline", "--epochs", str(args.epochs),
               "--patience", str(args.epochs), "--batch-size", str(args.batch_size),
               "--preset", "quick", "--distribute", distribute, "-q"]
    processes = [subprocess.Popen(command, env={**base, **env}, stderr=subprocess.PIPE,
                                  text=True) for env in envs]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT_S)
            if process.returncode:
                raise RuntimeError(f"training exited {process.returncode}: {stderr[-2000:]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


def images_per_second(out: Path, n_train: int, batch_size: int) -> dict:
    """Global training images/s over the median epoch after the first."""
    with (out / "runs/baseline/history.csv").open(encoding="utf-8") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)][1:]
    per_epoch = (n_train // batch_size) * batch_size
    median = statistics.median(seconds)
    return {"epoch_seconds": seconds, "images_per_epoch": per_epoch,
            "images_per_second": round(per_epoch / median, 1)}


def measure(args: argparse.Namespace, root: Path) -> dict:
    dataset = root / "output_dataset"
    write_dataset(dataset, args.n_train, args.image_size)
    address = f"localhost:{free_port()}"
    variants = {
        "one_process": ("none", [{}]),
        "one_process_two_devices": (
            "data-parallel", [{"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}]),
        "two_processes": ("data-parallel", [
            {"KERAS_DISTRIBUTION_JOB_ADDRESSES": address,
             "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
             "KERAS_DISTRIBUTION_PROCESS_ID": str(index)} for index in (0, 1)]),
    }
    results = {}
    for name, (distribute, envs) in variants.items():
        LOG.info("training: %s", name)
        train(args, dataset, root / name, distribute, envs)
        results[name] = images_per_second(root / name, args.n_train, args.batch_size)
    single = results["one_process"]["images_per_second"]
    return {
        "settings": {"image_size": args.image_size, "n_train": args.n_train,
                     "batch_size": args.batch_size, "epochs": args.epochs, "model": "baseline",
                     "backend": "jax", "device": "cpu"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "runs": results,
        "two_processes_vs_one": round(results["two_processes"]["images_per_second"] / single, 3),
        "two_devices_vs_one": round(
            results["one_process_two_devices"]["images_per_second"] / single, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="bench_multiprocess-") as root:
            report = measure(args, Path(root))
        text = json.dumps(report, indent=2)
        if args.out:
            atomic_write_json(args.out, report)
        sys.stdout.write(text + "\n")
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
