"""Tests of the manifest checks, lungct.train.image_cache (uint8 cache) and the batches."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lungct import contract
from lungct.errors import UserError
from lungct.sampling import largest_remainder, stratified_draw
from lungct.train import image_cache as data
from lungct.train.batches import ArrayBatches
from lungct.train.phases import _balanced_class_weights


def write_tiny_dataset(
    folder: Path,
    counts: dict[str, int] | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write an output_dataset/-layout folder of learnable random PNGs.

    Cancer images hold a large bright disc, non-cancer ones a small faint disc, both on noise.
    ``counts`` gives images per class in each split (default 12 train, 6 val, 6 test).
    """
    counts = counts or {"train": 12, "val": 6, "test": 6}
    rng = np.random.default_rng(seed)
    rows = []
    yy, xx = np.mgrid[:image_size, :image_size]
    for split, per_class in counts.items():
        for label, class_name in enumerate(contract.CLASS_NAMES):
            (folder / class_name).mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image = rng.normal(70, 20, (image_size, image_size))
                centre = rng.uniform(0.35, 0.65, 2) * image_size
                radius = image_size * (0.25 if label else 0.08)
                disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
                image[disc] += 120 if label else 40
                relative = f"{class_name}/{split}_{index:03d}.png"
                cv2.imwrite(str(folder / relative), np.clip(image, 0, 255).astype(np.uint8))
                rows.append(
                    {
                        "path": relative,
                        "label": label,
                        "class_name": class_name,
                        "split": split,
                        "patient_id": f"P-{split}-{index // 2:03d}",
                        "series_uid": f"1.2.{index}",
                        "slice_z_mm": "0.0",
                        "nodule_id": "",
                        "malignancy": "",
                        "n_readers": "0",
                        "diameter_mm": "",
                        "negative_kind": "" if label else "no_finding",
                        "mm_per_px": "0.7",
                        "mask_path": "",
                        "source_file": "",
                    }
                )
    contract.write_manifest(folder, rows)
    contract.write_dataset_info(folder, {"source": "synthetic", "image_size": image_size})
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_tiny_dataset(tmp_path / "output_dataset")


def test_missing_dataset_folder_is_a_user_error(tmp_path: Path) -> None:
    """A dataset folder that does not exist is refused with advice."""
    with pytest.raises(UserError, match="does not exist; run prepare_lung_dataset.py"):
        contract.read_manifest(tmp_path / "nowhere")


def test_empty_dataset_folder_is_a_user_error(tmp_path: Path) -> None:
    """A folder without manifest.csv is refused."""
    with pytest.raises(UserError, match="has no manifest.csv"):
        contract.read_manifest(tmp_path)


def test_manifest_without_rows_is_a_user_error(tiny_dataset: Path) -> None:
    """A manifest with a header only is an empty dataset."""
    header = (tiny_dataset / "manifest.csv").read_text().splitlines()[0]
    (tiny_dataset / "manifest.csv").write_text(header + "\n")
    with pytest.raises(UserError, match="lists no images"):
        contract.read_manifest(tiny_dataset)


def test_manifest_missing_columns_named(tiny_dataset: Path) -> None:
    """Missing contract columns are named in the message."""
    (tiny_dataset / "manifest.csv").write_text("path,label\ncancer/a.png,1\n")
    with pytest.raises(UserError, match="lacks the columns class_name, split"):
        contract.read_manifest(tiny_dataset)


def test_split_without_a_class_is_refused(tiny_dataset: Path) -> None:
    """A validation split with no cancer images cannot select a model."""
    manifest = contract.read_manifest(tiny_dataset)
    manifest = manifest[~((manifest["split"] == "val") & (manifest["label"] == 1))]
    with pytest.raises(UserError, match="the val split has no cancer images"):
        data.check_split_classes(manifest)


def test_load_split_returns_uint8_images_in_manifest_order(tiny_dataset: Path) -> None:
    """Images come back uint8 (N, S, S, 1) with labels and paths in manifest order."""
    manifest = contract.read_manifest(tiny_dataset)
    split = data.load_split(tiny_dataset, manifest, "val")
    first = cv2.imread(str(tiny_dataset / split.paths[0]), cv2.IMREAD_UNCHANGED)
    assert split.images.dtype == np.uint8
    assert split.images.shape == (12, 32, 32, 1)
    assert np.array_equal(split.images[0, :, :, 0], first)
    assert split.labels.tolist() == [0] * 6 + [1] * 6
    assert split.patient_ids[0] == "P-val-000"


def test_second_load_memory_maps_the_cache(tiny_dataset: Path) -> None:
    """The cache is written once and memory-mapped on the next load."""
    manifest = contract.read_manifest(tiny_dataset)
    first = data.load_split(tiny_dataset, manifest, "train")
    cached = list((tiny_dataset / "cache").glob("train-*.npy"))
    second = data.load_split(tiny_dataset, manifest, "train")
    assert len(cached) == 1
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))


def test_changed_manifest_rebuilds_the_cache(tiny_dataset: Path) -> None:
    """Editing manifest.csv changes the cache key and removes the stale cache file."""
    manifest = contract.read_manifest(tiny_dataset)
    data.load_split(tiny_dataset, manifest, "test")
    before = {path.name for path in (tiny_dataset / "cache").glob("test-*.npy")}
    text = (tiny_dataset / "manifest.csv").read_text()
    (tiny_dataset / "manifest.csv").write_text(text.replace("no_finding", "benign_nodule"))
    data.load_split(tiny_dataset, contract.read_manifest(tiny_dataset), "test")
    after = {path.name for path in (tiny_dataset / "cache").glob("test-*.npy")}
    assert len(after) == 1 and after != before


def test_changed_image_rebuilds_the_cache(tiny_dataset: Path) -> None:
    """Rewriting a PNG (same manifest) is seen through its size and mtime."""
    manifest = contract.read_manifest(tiny_dataset)
    split = data.load_split(tiny_dataset, manifest, "test")
    target = tiny_dataset / split.paths[0]
    cv2.imwrite(str(target), np.full((32, 32), 200, np.uint8))
    os.utime(target, ns=(1, 1))
    reloaded = data.load_split(tiny_dataset, manifest, "test")
    assert int(reloaded.images[0].min()) == 200


def test_image_of_another_size_is_a_user_error(tiny_dataset: Path) -> None:
    """One image of a different size is refused, naming it."""
    manifest = contract.read_manifest(tiny_dataset)
    odd = manifest.loc[manifest["split"] == "val", "path"].iloc[3]
    cv2.imwrite(str(tiny_dataset / odd), np.zeros((16, 16), np.uint8))
    with pytest.raises(UserError, match=f"image {odd} is 16x16 px but earlier images are 32x32"):
        data.load_split(tiny_dataset, manifest, "val")


def test_colour_image_is_a_user_error(tiny_dataset: Path) -> None:
    """A 3-channel PNG is not the 8-bit grayscale the contract promises."""
    manifest = contract.read_manifest(tiny_dataset)
    path = manifest.loc[manifest["split"] == "test", "path"].iloc[0]
    cv2.imwrite(str(tiny_dataset / path), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="is not 8-bit grayscale"):
        data.load_split(tiny_dataset, manifest, "test")


def test_training_batches_reshuffle_each_epoch_reproducibly() -> None:
    """Shuffled batches differ between epochs, repeat with the seed, and drop the remainder."""
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.array([0, 1] * 5)

    def two_epochs() -> list[list[int]]:
        batches = ArrayBatches(x, labels, 4, shuffle=True, seed=3, drop_remainder=True)
        orders = []
        for _ in range(2):
            orders.append(
                sorted(int(v) for i in range(len(batches)) for v in batches[i][0].ravel())
            )
            batches.on_epoch_end()
        return orders

    first, again = two_epochs(), two_epochs()
    assert first == again
    assert len(first[0]) == 8 and first[0] != first[1]


def test_evaluation_batches_pad_with_zero_weight_in_order() -> None:
    """The last evaluation batch is padded to full size with weight-0 rows after the real ones."""
    x = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    batches = ArrayBatches(x, np.array([0, 1, 0, 1, 1]), 4, pad_final_batch=True)
    images, labels, weights = batches[1]
    assert len(batches) == 2
    assert images.ravel().tolist() == [4, 4, 4, 4]
    assert weights.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert labels.shape == (4, 1)


def test_class_weights_are_sklearn_balanced() -> None:
    """Balanced classes get weights 1 and 1; 3:1 gets n / (2 n_c)."""
    assert _balanced_class_weights(np.array([0, 1, 0, 1])) == {0: 1.0, 1: 1.0}
    assert _balanced_class_weights(np.array([0, 0, 0, 1])) == {0: 4 / 6, 1: 2.0}


def test_stratified_draw_keeps_the_class_ratio() -> None:
    """A cap of 10 on 30/10 rows keeps 3:1 (largest remainder), reproducibly."""
    labels = np.array([0] * 30 + [1] * 10)
    chosen = stratified_draw(labels, 10, seed=1)
    assert len(chosen) == 10
    assert int(labels[chosen].sum()) == 3
    assert np.array_equal(chosen, stratified_draw(labels, 10, seed=1))


def test_stratified_draw_keeps_one_of_a_rare_class() -> None:
    """A class that rounds to zero still keeps one row; None keeps every row."""
    labels = np.array([0] * 99 + [1])
    assert int(labels[stratified_draw(labels, 10, seed=0)].sum()) == 1
    assert stratified_draw(labels, None, seed=0).tolist() == list(range(100))


def test_largest_remainder_splits_exactly() -> None:
    """Counts sum to the total; every non-zero share gets one item when there are enough."""
    assert largest_remainder(10, (0.7, 0.15, 0.15)) == [7, 2, 1]
    assert largest_remainder(3, (0.7, 0.15, 0.15)) == [1, 1, 1]
    assert largest_remainder(2, (0.7, 0.15, 0.15)) == [2, 0, 0]
