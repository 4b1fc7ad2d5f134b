"""output_dataset/ -> uint8 arrays (cached beside the dataset) -> batches for Keras.

Each split's PNGs are decoded once into ``<dataset>/cache/<split>-<key>.npy`` (uint8,
``(N, S, S, 1)``), memory-mapped on later runs. The key hashes manifest.csv and the size and
modification time of every PNG of the split, so a changed manifest or image rebuilds the
cache. Batches are served by :class:`ArrayBatches`, a ``keras.utils.PyDataset`` that works on
every Keras backend (no ``tf.data``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from lungct.errors import UserError
from lungct.fileio import atomic_path

__all__ = [
    "CLASS_NAMES",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "ArrayBatches",
    "SplitData",
    "balanced_class_weights",
    "check_split_classes",
    "decode_images",
    "load_split",
    "manifest_digest",
    "read_manifest",
    "read_provenance",
    "stratified_subset",
]

LOG = logging.getLogger(__name__)

#: Class names; the index is the label (0 non-cancer, 1 cancer).
CLASS_NAMES = ("non_cancer", "cancer")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = (
    "path",
    "label",
    "class_name",
    "split",
    "patient_id",
    "series_uid",
    "slice_z_mm",
    "nodule_id",
    "malignancy",
    "n_readers",
    "diameter_mm",
    "negative_kind",
    "mm_per_px",
    "mask_path",
    "source_file",
)
CACHE_FOLDER = "cache"


@dataclass(frozen=True)
class SplitData:
    """One split of the dataset, in manifest order.

    Attributes:
        name: ``"train"``, ``"val"`` or ``"test"``.
        paths: image paths relative to the dataset folder.
        patient_ids: one per image.
        labels: int8 ``(N,)``, 1 = cancer.
        images: uint8 ``(N, S, S, 1)``, a memory map of the cache when it could be written.
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


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Read and check ``dataset_dir/manifest.csv`` (DESIGN.md section 2).

    Raises:
        UserError: missing folder or manifest, missing columns, no rows, bad labels or splits.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(
            f"dataset folder {dataset_dir} does not exist; run prepare_lung_dataset.py first "
            "or pass --dataset."
        )
    manifest_path = dataset_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise UserError(
            f"dataset folder {dataset_dir} has no manifest.csv; run prepare_lung_dataset.py "
            "first or pass --dataset."
        )
    try:
        manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{manifest_path} is not a readable CSV file ({error}).") from error
    _check_manifest(manifest, manifest_path)
    manifest["label"] = manifest["label"].astype(int)
    return manifest


def _check_manifest(manifest: pd.DataFrame, manifest_path: Path) -> None:
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise UserError(f"{manifest_path} lacks the columns {', '.join(missing)}.")
    if manifest.empty:
        raise UserError(f"{manifest_path} lists no images; the dataset is empty.")
    bad_labels = sorted(set(manifest["label"]) - {"0", "1"})
    if bad_labels:
        raise UserError(f"{manifest_path} has labels {bad_labels}; only 0 and 1 are allowed.")
    bad_splits = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_splits:
        raise UserError(
            f"{manifest_path} has splits {bad_splits}; only {list(SPLITS)} are allowed."
        )


def read_provenance(dataset_dir: Path) -> dict:
    """Return dataset.json (the prepare stage's provenance), or ``{}`` with a warning."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        LOG.warning("%s is missing: the results will not record how the dataset was made", path)
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}).") from error


def manifest_digest(dataset_dir: Path) -> str:
    """SHA-256 of manifest.csv: identifies the dataset a run was trained on."""
    return hashlib.sha256((Path(dataset_dir) / "manifest.csv").read_bytes()).hexdigest()


def check_split_classes(manifest: pd.DataFrame) -> None:
    """Refuse a train or validation split without both classes; warn for the test split.

    Raises:
        UserError: a train or val split lacks a class (nothing can be learnt or selected).
    """
    for split in SPLITS:
        present = set(manifest.loc[manifest["split"] == split, "label"])
        missing = [CLASS_NAMES[label] for label in (0, 1) if label not in present]
        if not missing:
            continue
        if split == "test":
            LOG.warning("the test split has no %s images: test AUC is undefined", missing[0])
            continue
        raise UserError(
            f"the {split} split has no {' or '.join(missing)} images, so a classifier cannot "
            "be trained and selected; prepare a dataset with both classes in every split."
        )


def load_split(dataset_dir: Path, manifest: pd.DataFrame, split: str) -> SplitData:
    """Return ``split`` with its images, from the cache or decoded (then cached).

    Raises:
        ValueError: ``split`` is not one of train/val/test.
        UserError: an image is missing, unreadable, not 8-bit grayscale or not square.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset_dir = Path(dataset_dir)
    rows = manifest[manifest["split"] == split]
    paths = tuple(rows["path"])
    images = _cached_images(dataset_dir, split, paths)
    return SplitData(
        name=split,
        paths=paths,
        patient_ids=tuple(rows["patient_id"]),
        labels=rows["label"].to_numpy(dtype=np.int8),
        images=images,
    )


def _cache_key(dataset_dir: Path, split: str, paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256(manifest_digest(dataset_dir).encode())
    digest.update(split.encode())
    for relative in paths:
        try:
            stat = (dataset_dir / relative).stat()
        except OSError as error:
            message = f"image {dataset_dir / relative} listed in manifest.csv is missing."
            raise UserError(message) from error
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cached_images(dataset_dir: Path, split: str, paths: tuple[str, ...]) -> np.ndarray:
    cache_dir = dataset_dir / CACHE_FOLDER
    cache_path = cache_dir / f"{split}-{_cache_key(dataset_dir, split, paths)}.npy"
    if cache_path.is_file():
        images = np.load(cache_path, mmap_mode="r")
        if images.shape[0] == len(paths) and images.dtype == np.uint8:
            LOG.debug("%s split: %d images memory-mapped from %s", split, len(paths), cache_path)
            return images
    images = decode_images(dataset_dir, paths, desc=f"decoding {split} images")
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


def decode_images(dataset_dir: Path, paths: tuple[str, ...], desc: str = "decoding") -> np.ndarray:
    """Decode 8-bit grayscale square PNGs of one size into uint8 ``(N, S, S, 1)``.

    Raises:
        UserError: an image is unreadable, not single-channel 8-bit, not square, or its size
            differs from the first image's.
    """
    images: np.ndarray | None = None
    for index, relative in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        image = _read_gray_png(Path(dataset_dir) / relative)
        if images is None:
            images = np.empty((len(paths), *image.shape, 1), dtype=np.uint8)
        elif image.shape != images.shape[1:3]:
            raise UserError(
                f"image {relative} is {image.shape[1]}x{image.shape[0]} px but earlier images "
                f"are {images.shape[2]}x{images.shape[1]} px; all images must share one size."
            )
        images[index, :, :, 0] = image
    if images is None:
        raise UserError(f"no images to decode in {dataset_dir}.")
    return images


def _read_gray_png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"image {path} is missing or not a readable image file.")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise UserError(
            f"image {path} is not 8-bit grayscale (shape {image.shape}, {image.dtype})."
        )
    if image.shape[0] != image.shape[1]:
        raise UserError(f"image {path} is {image.shape[1]}x{image.shape[0]} px, not square.")
    return image


def balanced_class_weights(labels: np.ndarray) -> dict[int, float] | None:
    """``n / (2 n_c)`` per class when the classes differ in size, else ``None`` (no weighting).

    Raises:
        ValueError: a class is absent.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if counts.min() == 0:
        raise ValueError(f"both classes are needed for class weights, got counts {counts.tolist()}")
    if counts[0] == counts[1]:
        return None
    return {label: float(counts.sum() / (2.0 * counts[label])) for label in (0, 1)}


def stratified_subset(labels: np.ndarray, max_images: int, seed: int) -> np.ndarray:
    """Sorted indices of ``max_images`` rows keeping the class ratio, drawn with ``seed``.

    Each class present keeps at least one row; all rows are returned when there are no more
    than ``max_images``.

    Raises:
        ValueError: ``max_images`` < 2.
    """
    if max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    labels = np.asarray(labels)
    if len(labels) <= max_images:
        return np.arange(len(labels))
    cancer, non_cancer = np.flatnonzero(labels == 1), np.flatnonzero(labels != 1)
    n_cancer = round(max_images * len(cancer) / len(labels))
    n_cancer = min(
        len(cancer), max(n_cancer, 1 if len(cancer) else 0, max_images - len(non_cancer))
    )
    n_non_cancer = min(len(non_cancer), max_images - n_cancer)
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(cancer, n_cancer, replace=False),
        rng.choice(non_cancer, n_non_cancer, replace=False),
    ]
    return np.sort(np.concatenate(chosen))


class ArrayBatches(keras.utils.PyDataset):
    """Batches ``(x, y, sample_weight)`` from an array (memory map or in memory).

    ``y`` is float32 ``(B, 1)``. Training batches are reshuffled every epoch from ``seed`` and
    the incomplete last batch is dropped (``drop_remainder``), so every step has one shape and
    compiles once. Evaluation batches keep every row, in order, and pad the last batch with
    weight-0 copies of its last row (``pad_final_batch``) for the same reason; weighted metrics
    ignore them and predictions are trimmed by the caller.

    Args:
        x: inputs, first axis = rows.
        labels: ``(N,)`` 0/1.
        batch_size: rows per batch.
        shuffle: reshuffle the order every epoch.
        seed: seed of the shuffle.
        class_weight: per-label sample weight, or ``None`` for 1.
        drop_remainder: drop the incomplete last batch (training).
        pad_final_batch: pad the last batch to ``batch_size`` with weight-0 rows (evaluation).
    """

    def __init__(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        class_weight: dict[int, float] | None = None,
        drop_remainder: bool = False,
        pad_final_batch: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(labels):
            raise ValueError(f"x has {len(x)} rows but labels has {len(labels)}")
        if drop_remainder and len(x) < batch_size:
            raise UserError(
                f"{len(x)} training images are fewer than --batch-size {batch_size}; "
                "lower --batch-size."
            )
        self.x = x
        self.labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.pad_final_batch = pad_final_batch
        weights = class_weight or {0: 1.0, 1: 1.0}
        self.weights = np.where(self.labels[:, 0] > 0.5, weights[1], weights[0]).astype(np.float32)
        self._epoch = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.random.default_rng([self.seed, self._epoch]).permutation(len(self.x))

    def __len__(self) -> int:
        if self.drop_remainder:
            return len(self.x) // self.batch_size
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        weights = self.weights[rows]
        missing = self.batch_size - len(rows)
        if self.pad_final_batch and missing > 0:
            rows = np.concatenate([rows, np.full(missing, rows[-1])])
            weights = np.concatenate([weights, np.zeros(missing, dtype=np.float32)])
        if self.shuffle:
            # Sorted reads keep memory-map access sequential; rows stay paired with weights.
            sort = np.argsort(rows, kind="stable")
            rows, weights = rows[sort], weights[sort]
        return np.asarray(self.x[rows]), self.labels[rows], weights

    def on_epoch_end(self) -> None:
        self._epoch += 1
        self._order = self._epoch_order()
