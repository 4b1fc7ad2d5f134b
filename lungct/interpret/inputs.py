"""Where the interpretation stage's inputs are and how they join.

The dataset folder (``--dataset`` or the one training recorded), the selected model's test
predictions joined with the manifest rows of the same images, the images and ROI masks as the
model takes them, and the selected model's file. The shared files themselves are read and
checked by :mod:`lungct.contract`; every mismatch between them is one ``UserError`` sentence.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lungct import contract
from lungct.errors import UserError

__all__ = [
    "resolve_dataset_dir",
    "test_frame",
    "prediction_frame",
    "load_images",
    "load_masks",
    "selected_model_path",
]

LOG = logging.getLogger(__name__)


def resolve_dataset_dir(override: Path | None, results: dict, results_path: Path) -> Path:
    """The dataset folder: ``--dataset``, else config.dataset_dir (cwd, then beside results)."""
    if override is not None:
        return contract.require_dataset_dir(override)
    recorded = results["config"].get("dataset_dir")
    if not recorded:
        raise UserError("training_results.json records no config.dataset_dir: pass --dataset")
    for candidate in (Path(recorded), results_path.parent / recorded):
        if (candidate / contract.MANIFEST_FILE).is_file():
            return candidate
    raise UserError(f"dataset folder {recorded} recorded in {results_path} has no manifest.csv "
                    "here (moved or deleted?): pass --dataset DIR")


def prediction_frame(block: dict, manifest: pd.DataFrame, where: str) -> pd.DataFrame:
    """Join one {paths, y_true, y_prob} block with the manifest rows of the same paths.

    A calibrated block's ``y_prob_uncalibrated`` (before temperature scaling) becomes a column
    of that name.

    Raises:
        UserError: paths absent from the manifest, or labels that disagree with it (the
            dataset is not the one the model was scored on).
    """
    frame = pd.DataFrame({"path": block["paths"], "y_true": np.asarray(block["y_true"], int),
                          "y_prob": np.asarray(block["y_prob"], np.float64)})
    if contract.UNCALIBRATED_KEY in block:
        frame[contract.UNCALIBRATED_KEY] = np.asarray(block[contract.UNCALIBRATED_KEY],
                                                      np.float64)
    merged = frame.merge(manifest, on="path", how="left", indicator=True, validate="one_to_one")
    absent = merged["path"][merged["_merge"] == "left_only"]
    if len(absent):
        raise UserError(f"{len(absent)} images of {where} are not in the dataset's manifest.csv "
                        f"(e.g. {absent.iloc[0]}): pass the --dataset the models were trained on")
    disagree = merged["y_true"].to_numpy() != merged["label"].to_numpy()
    if disagree.any():
        raise UserError(f"{int(disagree.sum())} labels of {where} disagree with manifest.csv "
                        f"(e.g. {merged['path'][disagree].iloc[0]}): the dataset changed since "
                        "training")
    return merged.drop(columns="_merge")


def test_frame(results: dict, manifest: pd.DataFrame) -> pd.DataFrame:
    """The selected model's test predictions joined with the manifest."""
    frame = prediction_frame(results["test"], manifest, "training_results.json test")
    wrong_split = frame["split"] != "test"
    if wrong_split.any():
        raise UserError(f"{int(wrong_split.sum())} test images of training_results.json are not "
                        "in the test split of manifest.csv: the dataset was re-split since "
                        "training")
    return frame


def load_images(dataset_dir: Path, paths: list[str], size_px: int,
                channels: int = 1) -> np.ndarray:
    """uint8 (N, size, size, channels) images as the saved model takes them."""
    images = [contract.read_png(dataset_dir / p, "image", size_px, channels) for p in paths]
    if not images:
        return np.zeros((0, size_px, size_px, channels), np.uint8)
    return np.stack(images).reshape(len(images), size_px, size_px, channels)


def load_masks(dataset_dir: Path, mask_paths: list[str], size_px: int) -> np.ndarray:
    """Boolean (N, size, size) ROI masks; all-false where a sample has no mask."""
    masks = np.zeros((len(mask_paths), size_px, size_px), dtype=bool)
    for i, mask_path in enumerate(mask_paths):
        if mask_path:
            masks[i] = contract.read_png(dataset_dir / mask_path, "mask", size_px) > 127
    return masks


def selected_model_path(results: dict, results_path: Path) -> Path:
    """Path of the selected model: models[best].model_path, else model_files.keras."""
    base = results_path.parent
    candidates = []
    recorded = results["models"][results["best_model"]].get("model_path")
    if recorded:
        candidates.append(base / recorded)
    keras_file = results.get("model_files", {}).get("keras")
    if keras_file:
        candidates.append(base / keras_file)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    shown = ", ".join(str(c) for c in candidates) or "no model_path recorded"
    raise UserError(f"the selected model {results['best_model']!r} was not found ({shown}): "
                    "re-run training_lung_cnn.py")
