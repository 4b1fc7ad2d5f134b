#!/usr/bin/env python3
"""Is the input pipeline the bottleneck? Training images/s from the project's loader vs memory.

Writes a dataset of random PNGs in the output_dataset/ layout to a temporary folder, loads it
through ``lungct.train.image_cache`` (uint8 cache, memory-mapped, served by
``ArrayBatches``), and trains one model with the project's on-device augmentation,
alternating epochs fed by the loader and epochs fed by the same images as an in-memory
NumPy array (same model, same compiled step, same augmentation). Prints JSON: median images/s
of each and their ratio (goal: >= 0.90 on a CPU, >= 0.95 on a GPU; issue 3).

    python benchmarks/bench_train.py --image-size 64 --out benchmarks/out/train.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lungct.cli import add_logging_flags, configure_logging, run_main
from lungct.fileio import atomic_write_json

LOG = logging.getLogger("bench_train")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="baseline", help="baseline, vgg16 or resnet50")
    parser.add_argument("--image-size", type=int, default=64, help="PNG side, px")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="side the model computes at (default: --image-size)",
    )
    parser.add_argument("--n-images", type=int, default=576, help="training images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measured epochs per feed, alternating, after one warm-up each",
    )
    parser.add_argument("--no-augment", action="store_true", help="measure without augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    add_logging_flags(parser)
    return parser


def write_random_dataset(folder: Path, n_images: int, image_size: int, seed: int) -> None:
    """Random 8-bit PNGs and a manifest.csv with every contract column, all in the train split."""
    import cv2

    from lungct import contract

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_images):
        label = index % 2
        class_name = contract.CLASS_NAMES[label]
        (folder / class_name).mkdir(parents=True, exist_ok=True)
        relative = f"{class_name}/{index:05d}.png"
        cv2.imwrite(
            str(folder / relative), rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)
        )
        rows.append({column: "" for column in contract.MANIFEST_COLUMNS} | {
            "path": relative, "label": label, "class_name": class_name, "split": "train",
            "patient_id": f"P{index:05d}"})
    contract.write_manifest(folder, rows)


def timed_epoch(model, *fit_args, **fit_kwargs) -> float:
    """Seconds of one ``fit`` epoch."""
    started = time.perf_counter()
    model.fit(*fit_args, epochs=1, verbose=0, **fit_kwargs)
    return time.perf_counter() - started


def measure(args: argparse.Namespace, dataset_dir: Path) -> dict:
    """Alternate loader-fed and array-fed epochs on one compiled model; return the figures."""
    import keras

    from lungct import backend, contract
    from lungct.train import image_cache as data
    from lungct.train import models
    from lungct.train.augment import AugmentationRanges, augmented_model
    from lungct.train.batches import ArrayBatches
    from lungct.train.loop import compile_for_training

    keras.utils.set_random_seed(args.seed)
    split = data.load_split(dataset_dir, contract.read_manifest(dataset_dir), "train")
    in_memory = np.array(split.images)
    labels = split.labels.astype(np.float32).reshape(-1, 1)
    weights = np.ones(len(labels), dtype=np.float32)
    classifier = models.build_model(args.model, args.image_size, args.train_size or args.image_size)
    model = augmented_model(
        classifier, None if args.no_augment else AugmentationRanges(), args.seed
    )
    compile_for_training(model, 1e-3)
    loader = ArrayBatches(
        split.images,
        split.labels,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        drop_remainder=True,
    )
    n_used = len(loader) * args.batch_size
    array_args = (in_memory[:n_used], labels[:n_used])
    array_kwargs = {
        "sample_weight": weights[:n_used],
        "batch_size": args.batch_size,
        "shuffle": True,
    }
    timed_epoch(model, loader)
    timed_epoch(model, *array_args, **array_kwargs)
    loader_s, array_s = [], []
    for _ in range(args.repeats):
        loader_s.append(timed_epoch(model, loader))
        array_s.append(timed_epoch(model, *array_args, **array_kwargs))
    loader_rate = n_used / statistics.median(loader_s)
    array_rate = n_used / statistics.median(array_s)
    return {
        "model": args.model,
        "image_size": args.image_size,
        "train_size": args.train_size or args.image_size,
        "batch_size": args.batch_size,
        "images_per_epoch": n_used,
        "augment": not args.no_augment,
        "repeats": args.repeats,
        "loader_images_per_second": round(loader_rate, 2),
        "in_memory_images_per_second": round(array_rate, 2),
        "loader_over_in_memory": round(loader_rate / array_rate, 3),
        "loader_epoch_seconds": [round(s, 3) for s in loader_s],
        "in_memory_epoch_seconds": [round(s, 3) for s in array_s],
        "environment": backend.environment(),
        "jit_compile": bool(model.jit_compile),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the JSON result."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    # JAX logs at INFO that it found no TPU on every start; that is not news to a user.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as folder:
            write_random_dataset(Path(folder), args.n_images, args.image_size, args.seed)
            result = measure(args, Path(folder))
        text = json.dumps(result, indent=2, sort_keys=True)
        sys.stdout.write(text + "\n")
        if args.out:
            atomic_write_json(args.out, result)
        LOG.info(
            "loader %.1f img/s, in-memory %.1f img/s: ratio %.3f",
            result["loader_images_per_second"],
            result["in_memory_images_per_second"],
            result["loader_over_in_memory"],
        )
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
