"""Inputs of the interpretation stage, checked: training results, dataset, images, model.

Every problem a user can fix (a missing or mismatched file, a dataset that moved) becomes one
``UserError`` sentence; nothing here trusts the files it reads (JSON is validated, models load
in Keras safe mode, images are checked for size and type).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from lungct.errors import UserError

__all__ = [
    "CLASS_NAMES",
    "load_results",
    "resolve_dataset_dir",
    "load_manifest",
    "load_dataset_info",
    "test_frame",
    "prediction_frame",
    "load_images",
    "load_masks",
    "selected_model_path",
    "load_model",
]

LOG = logging.getLogger(__name__)

CLASS_NAMES = ["non_cancer", "cancer"]
MANIFEST_COLUMNS = ("path", "label", "split", "patient_id")
PREDICTION_KEYS = ("paths", "patient_ids", "y_true", "y_prob")


def load_results(path: Path) -> dict[str, Any]:
    """Read and check training_results.json (the contract with the training stage)."""
    if not path.is_file():
        raise UserError(f"{path} not found: run training_lung_cnn.py first or pass --results")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error})") from error
    if not isinstance(results, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(results).__name__}")
    missing = [k for k in ("class_names", "best_model", "threshold", "models", "test", "config")
               if k not in results]
    if missing:
        raise UserError(f"{path} lacks the keys {', '.join(missing)}; re-run training")
    if results["class_names"] != CLASS_NAMES:
        raise UserError(f"{path} has class_names {results['class_names']}, expected "
                        f"{CLASS_NAMES} (index = label)")
    if results["best_model"] not in results["models"]:
        raise UserError(f"{path}: best_model {results['best_model']!r} is not among the models "
                        f"{sorted(results['models'])}")
    _check_threshold(path, results["threshold"])
    if not isinstance(results["config"], dict):
        raise UserError(f"{path}: config must be a JSON object")
    image_size = results["config"].get("image_size")
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"{path}: config.image_size must be a positive integer, got "
                        f"{image_size!r}")
    check_prediction_block(results["test"], f"{path} test")
    return results


def _check_threshold(path: Path, threshold: Any) -> None:
    value = threshold.get("value") if isinstance(threshold, dict) else None
    if not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UserError(f"{path}: threshold.value must be a probability, got {value!r}")


def check_prediction_block(block: Any, where: str) -> None:
    """Check a {paths, patient_ids, y_true, y_prob} block: equal lengths, valid values."""
    if not isinstance(block, dict) or any(k not in block for k in PREDICTION_KEYS):
        raise UserError(f"{where} must hold {', '.join(PREDICTION_KEYS)}")
    lengths = {k: len(block[k]) for k in PREDICTION_KEYS}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{where} has lists of different lengths {lengths}")
    probs = np.asarray(block["y_prob"], dtype=np.float64)
    if probs.size and not ((probs >= 0) & (probs <= 1)).all():
        raise UserError(f"{where} has y_prob outside [0, 1]")
    if not set(np.unique(block["y_true"]).tolist()) <= {0, 1}:
        raise UserError(f"{where} has y_true values other than 0/1")


def resolve_dataset_dir(override: Path | None, results: dict, results_path: Path) -> Path:
    """The dataset folder: ``--dataset``, else config.dataset_dir (cwd, then beside results)."""
    if override is not None:
        if not (override / "manifest.csv").is_file():
            raise UserError(f"dataset folder {override} has no manifest.csv (--dataset)")
        return override
    recorded = results["config"].get("dataset_dir")
    if not recorded:
        raise UserError("training_results.json records no config.dataset_dir: pass --dataset")
    for candidate in (Path(recorded), results_path.parent / recorded):
        if (candidate / "manifest.csv").is_file():
            return candidate
    raise UserError(f"dataset folder {recorded} recorded in {results_path} has no manifest.csv "
                    "here (moved or deleted?): pass --dataset DIR")


def load_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Read manifest.csv with every column as text (empty cells stay empty strings)."""
    path = dataset_dir / "manifest.csv"
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path} ({error})") from error
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}")
    if manifest["path"].duplicated().any():
        raise UserError(f"{path} lists some paths twice, e.g. "
                        f"{manifest['path'][manifest['path'].duplicated()].iloc[0]}")
    return manifest


def load_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    """dataset.json (provenance), or an empty dict with a warning when absent."""
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        LOG.warning("%s not found: the report's provenance box will be incomplete", path)
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error})") from error
    return info if isinstance(info, dict) else {}


def _numeric(column: pd.Series) -> np.ndarray:
    """Manifest text column as float, NaN where empty or not a number."""
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)


def prediction_frame(block: dict, manifest: pd.DataFrame, where: str) -> pd.DataFrame:
    """Join one {paths, y_true, y_prob} block with the manifest rows of the same paths.

    Raises:
        UserError: paths absent from the manifest, or labels that disagree with it (the
            dataset is not the one the model was scored on).
    """
    frame = pd.DataFrame({"path": block["paths"], "y_true": np.asarray(block["y_true"], int),
                          "y_prob": np.asarray(block["y_prob"], np.float64)})
    merged = frame.merge(manifest, on="path", how="left", indicator=True, validate="one_to_one")
    absent = merged["path"][merged["_merge"] == "left_only"]
    if len(absent):
        raise UserError(f"{len(absent)} images of {where} are not in the dataset's manifest.csv "
                        f"(e.g. {absent.iloc[0]}): pass the --dataset the models were trained on")
    disagree = merged["y_true"].to_numpy() != pd.to_numeric(merged["label"]).to_numpy()
    if disagree.any():
        raise UserError(f"{int(disagree.sum())} labels of {where} disagree with manifest.csv "
                        f"(e.g. {merged['path'][disagree].iloc[0]}): the dataset changed since "
                        "training")
    merged = merged.drop(columns="_merge")
    for column in ("diameter_mm", "malignancy", "n_readers"):
        merged[column] = _numeric(merged[column]) if column in merged else np.nan
    for column in ("nodule_id", "negative_kind", "mask_path"):
        if column not in merged:
            merged[column] = ""
    return merged


def test_frame(results: dict, manifest: pd.DataFrame) -> pd.DataFrame:
    """The selected model's test predictions joined with the manifest."""
    frame = prediction_frame(results["test"], manifest, "training_results.json test")
    wrong_split = frame["split"] != "test"
    if wrong_split.any():
        raise UserError(f"{int(wrong_split.sum())} test images of training_results.json are not "
                        "in the test split of manifest.csv: the dataset was re-split since "
                        "training")
    return frame


def _read_gray(path: Path, size_px: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{what} {path} listed in manifest.csv is missing")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.dtype != np.uint8 or image.ndim != 2:
        raise UserError(f"{what} {path} is not an 8-bit grayscale PNG")
    if image.shape != (size_px, size_px):
        raise UserError(f"{what} {path} is {image.shape[1]}x{image.shape[0]} px; the model "
                        f"takes {size_px}x{size_px}")
    return image


def load_images(dataset_dir: Path, paths: list[str], size_px: int) -> np.ndarray:
    """uint8 (N, size, size, 1) images as the saved model takes them."""
    if not paths:
        return np.zeros((0, size_px, size_px, 1), np.uint8)
    return np.stack([_read_gray(dataset_dir / p, size_px, "image") for p in paths])[..., None]


def load_masks(dataset_dir: Path, mask_paths: list[str], size_px: int) -> np.ndarray:
    """Boolean (N, size, size) ROI masks; all-false where a sample has no mask."""
    masks = np.zeros((len(mask_paths), size_px, size_px), dtype=bool)
    for i, mask_path in enumerate(mask_paths):
        if mask_path:
            masks[i] = _read_gray(dataset_dir / mask_path, size_px, "mask") > 127
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


def load_model(path: Path, image_size_px: int) -> Any:
    """Load a saved model in Keras safe mode and check it matches the results.

    Raises:
        UserError: unreadable file, or input/output shapes other than the contract's.
    """
    import keras

    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the user's file
        raise UserError(f"cannot load model {path} ({type(error).__name__}: {error})") from error
    expected = (None, image_size_px, image_size_px, 1)
    if tuple(model.input.shape) != expected or str(model.input.dtype) != "uint8":
        raise UserError(f"model {path} takes {model.input.dtype} {tuple(model.input.shape)} but "
                        f"training_results.json records uint8 {expected}: the model does not "
                        "match the results")
    if tuple(model.output.shape) != (None, 1):
        raise UserError(f"model {path} outputs shape {tuple(model.output.shape)}, not one "
                        "probability per image (None, 1): it does not match class_names")
    return model
