"""output_dataset/ -> uint8 arrays, decoded once and cached beside the dataset.

Each split's PNGs are decoded once into ``<dataset>/cache/<split>-<key>.npy`` (uint8,
``(N, S, S, channels)``), memory-mapped on later runs. The key is the fingerprint of
manifest.csv and the size and modification time of every PNG of the split, so a changed
manifest or image rebuilds the cache. In a multi-process job only process 0 writes the cache;
the others read it (``write_cache=False``) or, when they cannot see it, decode into memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from lungct import contract
from lungct.errors import UserError
from lungct.fileio import atomic_path
from lungct.fingerprint import fingerprint

__all__ = [
    "SplitData",
    "check_split_classes",
    "decode_images",
    "load_split",
]

LOG = logging.getLogger(__name__)

CACHE_FOLDER = "cache"


@dataclass(frozen=True)
class SplitData:
    """One split of the dataset, in manifest order.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        paths: image paths relative to the dataset folder.
        patient_ids: one per image.
        labels: int8 ``(N,)``, 1 = cancer.
        images: uint8 ``(N, S, S, C)``, a memory map of the cache when it could be written.
    """

    name: str
    paths: tuple[str, ...]
    patient_ids: tuple[str, ...]
    labels: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray) -> SplitData:
        """Return the rows ``indices`` (sorted, so reads of the memory map stay sequential)."""
        order = np.sort(np.asarray(indices, dtype=np.int64))
        return SplitData(
            name=self.name,
            paths=tuple(self.paths[i] for i in order),
            patient_ids=tuple(self.patient_ids[i] for i in order),
            labels=self.labels[order],
            images=np.asarray(self.images[order]),
        )


def check_split_classes(manifest: pd.DataFrame) -> None:
    """Refuse a train or validation split without both classes; warn for the test split.

    Raises:
        UserError: a train or val split lacks a class (nothing can be learnt or selected).
    """
    for split in contract.SPLITS:
        present = set(manifest.loc[manifest["split"] == split, "label"])
        missing = [contract.CLASS_NAMES[label] for label in (0, 1) if label not in present]
        if not missing:
            continue
        if split == "test":
            LOG.warning("the test split has no %s images: test AUC is undefined", missing[0])
            continue
        raise UserError(
            f"the {split} split has no {' or '.join(missing)} images, so a classifier cannot "
            "be trained and selected; prepare a dataset with both classes in every split."
        )


def load_split(dataset_dir: Path, manifest: pd.DataFrame, split: str,
               channels: int = 1, *, write_cache: bool = True) -> SplitData:
    """Return ``split`` with its images, from the cache or decoded (then cached when
    ``write_cache``; kept in memory otherwise).

    Raises:
        ValueError: ``split`` is not one of train/val/test.
        UserError: an image is missing, unreadable, not 8-bit grayscale or not square.
    """
    if split not in contract.SPLITS:
        raise ValueError(f"split must be one of {contract.SPLITS}, got {split!r}")
    dataset_dir = Path(dataset_dir)
    rows = manifest[manifest["split"] == split]
    paths = tuple(rows["path"])
    images = _cached_images(dataset_dir, split, paths, channels, write_cache)
    return SplitData(
        name=split,
        paths=paths,
        patient_ids=tuple(rows["patient_id"]),
        labels=rows["label"].to_numpy(dtype=np.int8),
        images=images,
    )


def _cache_key(dataset_dir: Path, split: str, paths: tuple[str, ...], channels: int) -> str:
    listing = ((relative, dataset_dir / relative) for relative in paths)
    return fingerprint({"split": split, "channels": channels},
                       contents=(dataset_dir / contract.MANIFEST_FILE,), listing=listing)[:16]


def _cached_images(dataset_dir: Path, split: str, paths: tuple[str, ...],
                   channels: int, write_cache: bool) -> np.ndarray:
    cache_dir = dataset_dir / CACHE_FOLDER
    cache_path = cache_dir / f"{split}-{_cache_key(dataset_dir, split, paths, channels)}.npy"
    if cache_path.is_file():
        images = np.load(cache_path, mmap_mode="r")
        if images.shape[0] == len(paths) and images.dtype == np.uint8:
            LOG.debug("%s split: %d images memory-mapped from %s", split, len(paths), cache_path)
            return images
    images = decode_images(dataset_dir, paths, channels, desc=f"decoding {split} images")
    if not write_cache:
        LOG.info("%s split: no image cache at %s; %d images decoded into memory", split,
                 cache_path, len(paths))
        return images
    try:
        with atomic_path(cache_path) as temporary:
            np.save(temporary, images)
    except OSError as error:
        LOG.warning(
            "cannot write the image cache %s (%s): images stay in memory", cache_path, error
        )
        return images
    for stale in cache_dir.glob(f"{split}-*.npy"):
        if stale != cache_path:
            stale.unlink(missing_ok=True)
    return np.load(cache_path, mmap_mode="r")


def decode_images(dataset_dir: Path, paths: tuple[str, ...], channels: int = 1,
                  desc: str = "decoding") -> np.ndarray:
    """Decode 8-bit square PNGs of one size into uint8 ``(N, S, S, channels)`` (RGB order).

    Raises:
        UserError: an image is unreadable, not 8-bit with ``channels`` channels, not square,
            or its size differs from the first image's.
    """
    images: np.ndarray | None = None
    for index, relative in enumerate(tqdm(paths, desc=desc, unit="img", leave=False, disable=None)):
        image = contract.read_png(Path(dataset_dir) / relative, channels=channels)
        image = image.reshape(*image.shape[:2], channels)
        if images is None:
            images = np.empty((len(paths), *image.shape), dtype=np.uint8)
        elif image.shape[:2] != images.shape[1:3]:
            raise UserError(
                f"image {relative} is {image.shape[1]}x{image.shape[0]} px but earlier images "
                f"are {images.shape[2]}x{images.shape[1]} px; all images must share one size."
            )
        images[index] = image
    if images is None:
        raise UserError(f"no images to decode in {dataset_dir}.")
    return images
