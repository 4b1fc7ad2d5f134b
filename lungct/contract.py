"""The files the stages share, and the one reader, checker and writer of each.

Stage 1 (prepare) writes ``output_dataset/``: the PNG images and masks, ``manifest.csv`` and
``dataset.json``. Stage 2 (train) reads them and writes ``training_results.json`` and the model
files. Stage 3 (interpret) reads all of these. docs/formats.md describes every field; this
module is where the names, the columns, the schema versions and the rules for a valid file
live, so a format change is made once and every stage sees it. No Keras import here.

Every problem a user can fix becomes one :class:`~lungct.errors.UserError` sentence naming the
file; readers refuse a ``schema_version`` they do not know.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from lungct.errors import UserError
from lungct.fileio import atomic_write_bytes, atomic_write_json, spreadsheet_safe, unsafe_relative
from lungct.fingerprint import file_sha256, fingerprint

__all__ = [
    "CAM_METHODS", "CENTRE_CHANNEL", "CHANNEL_ORDERS", "CLASS_NAMES", "DATASET_FILE",
    "MANIFEST_COLUMNS", "MANIFEST_FILE", "MODEL_FILES", "PREDICTION_KEYS", "RESULTS_FILE",
    "SCHEMA_VERSION", "SKIPPED_FILE", "SPLITS", "check_prediction_block", "dataset_channels",
    "dataset_files_sha256", "encode_png", "manifest_sha256", "read_dataset_info",
    "read_manifest", "read_png", "read_training_results", "require_dataset_dir",
    "write_dataset_info", "write_manifest", "write_skipped", "write_training_results",
]

LOG = logging.getLogger(__name__)

#: Version of every shared file's layout; a reader refuses any other. Version 2: channels
#: (2.5D context), patch centres in the manifest, calibrated and cross-validated results.
SCHEMA_VERSION = 2

MANIFEST_FILE = "manifest.csv"
DATASET_FILE = "dataset.json"
SKIPPED_FILE = "skipped.csv"
RESULTS_FILE = "training_results.json"
MODEL_FILES = {"h5": "lung_cancer_cnn_enhanced.h5", "keras": "lung_cancer_cnn_enhanced.keras"}

#: Class names; the index is the label (0 non-cancer, 1 cancer) and the class folder name.
CLASS_NAMES = ("non_cancer", "cancer")
SPLITS = ("train", "val", "test")
#: What each channel of a dataset image (and model input) shows, by channel count: the plane
#: at the sample's z, or with 2.5D context (prepare ``--context-mm D``) the HU planes at
#: z - D, z and z + D as R, G, B (PNGs store B, G, R: :func:`encode_png` and :func:`read_png`
#: convert, nothing else touches the order).
CHANNEL_ORDERS = {1: ("z",), 3: ("z-D", "z", "z+D")}
#: Index of the plane at the sample's own z (Grad-CAM overlays and masks show this one).
CENTRE_CHANNEL = {1: 0, 3: 1}
MANIFEST_COLUMNS = (
    "path", "label", "class_name", "split", "patient_id", "series_uid", "slice_z_mm",
    "nodule_id", "malignancy", "n_readers", "diameter_mm", "negative_kind", "mm_per_px",
    "mask_path", "source_file", "manufacturer", "convolution_kernel", "slice_thickness_mm",
    "lossy", "patch_centre_x_mm", "patch_centre_y_mm", "schema_version",
)
NUMERIC_COLUMNS = ("slice_z_mm", "malignancy", "n_readers", "diameter_mm", "mm_per_px",
                   "slice_thickness_mm", "patch_centre_x_mm", "patch_centre_y_mm")
#: Grad-CAM methods (report.json ``gradcam.method``) and how the report names them.
CAM_METHODS = {
    "gradcam": "Grad-CAM (Selvaraju et al. 2017)",
    "gradcam++": "Grad-CAM++ (Chattopadhay et al. 2018, eq. 19)",
}
#: Keys of a block of predictions (training_results.json ``validation``/``test``, per model);
#: a calibrated block also holds ``y_prob_uncalibrated`` (before temperature scaling).
PREDICTION_KEYS = ("paths", "patient_ids", "y_true", "y_prob")
UNCALIBRATED_KEY = "y_prob_uncalibrated"
RESULTS_KEYS = ("class_names", "best_model", "threshold", "models", "validation", "test",
                "config")


# ----------------------------------------------------------------------------- schema
def _check_schema_version(value: Any, where: str, producer: str) -> None:
    if value != SCHEMA_VERSION:
        shown = "none" if value is None else repr(value)
        raise UserError(
            f"{where} has schema_version {shown} but this lungct reads version "
            f"{SCHEMA_VERSION}: re-run {producer} with this version."
        )


def _read_json_object(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} not found: {hint}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error}).") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(value).__name__}.")
    return value


# ----------------------------------------------------------------------------- manifest.csv
def require_dataset_dir(dataset_dir: Path, flag: str = "--dataset") -> Path:
    """Return ``dataset_dir`` if it holds a manifest, else raise the one sentence that says so."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} does not exist; run "
                        f"prepare_lung_dataset.py first or pass {flag}.")
    if not (dataset_dir / MANIFEST_FILE).is_file():
        raise UserError(f"dataset folder {dataset_dir} has no {MANIFEST_FILE}; run "
                        f"prepare_lung_dataset.py first or pass {flag}.")
    return dataset_dir


def _csv_bytes(columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_manifest(dataset_dir: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``manifest.csv`` (atomically); rows hold every column but ``schema_version``."""
    rows = [{**row, "schema_version": SCHEMA_VERSION} for row in rows]
    atomic_write_bytes(Path(dataset_dir) / MANIFEST_FILE, _csv_bytes(MANIFEST_COLUMNS, rows))


def write_skipped(dataset_dir: Path, reasons: Mapping[str, str]) -> None:
    """Write ``skipped.csv``: ``file,reason`` for every input file that was not used, each
    cell spreadsheet-safe (manifest.csv is not: the stages read it back as written)."""
    rows = ({"file": spreadsheet_safe(name), "reason": spreadsheet_safe(reason)}
            for name, reason in sorted(reasons.items()))
    atomic_write_bytes(Path(dataset_dir) / SKIPPED_FILE, _csv_bytes(("file", "reason"), rows))


def _check_manifest(manifest: pd.DataFrame, where: Path) -> None:
    missing = [column for column in MANIFEST_COLUMNS if column not in manifest.columns]
    if missing:
        raise UserError(f"{where} lacks the columns {', '.join(missing)}; re-run "
                        "prepare_lung_dataset.py.")
    if manifest.empty:
        raise UserError(f"{where} lists no images; the dataset is empty.")
    versions = set(manifest["schema_version"])
    if len(versions) != 1:
        raise UserError(f"{where} mixes schema versions {sorted(versions)}.")
    version = versions.pop()
    _check_schema_version(int(version) if version.isdigit() else version, str(where),
                          "prepare_lung_dataset.py")
    bad_labels = sorted(set(manifest["label"]) - {"0", "1"})
    if bad_labels:
        raise UserError(f"{where} has labels {bad_labels}; only 0 and 1 are allowed.")
    bad_lossy = sorted(set(manifest["lossy"]) - {"", "0", "1"})
    if bad_lossy:
        raise UserError(f"{where} has lossy values {bad_lossy[:3]}; only 0, 1 or empty.")
    bad_splits = sorted(set(manifest["split"]) - set(SPLITS))
    if bad_splits:
        raise UserError(f"{where} has splits {bad_splits}; only {list(SPLITS)} are allowed.")
    class_names = manifest["label"].astype(int).map(dict(enumerate(CLASS_NAMES)))
    if (class_names != manifest["class_name"]).any():
        row = manifest[class_names != manifest["class_name"]].iloc[0]
        raise UserError(f"{where}: {row['path']} has label {row['label']} but class_name "
                        f"{row['class_name']!r}; expected {list(CLASS_NAMES)} by label.")
    splits_per_patient = manifest.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient[splits_per_patient > 1]
    if len(leaking):
        patient = leaking.index[0]
        found = sorted(set(manifest.loc[manifest["patient_id"] == patient, "split"]))
        raise UserError(f"{where}: patient {patient} is in the splits {found}; a patient must "
                        f"be in one split only ({len(leaking)} such patients).")
    duplicated = manifest["path"][manifest["path"].duplicated()]
    if len(duplicated):
        raise UserError(f"{where} lists some paths twice, e.g. {duplicated.iloc[0]}.")
    for column in ("path", "mask_path"):
        listed = manifest[column][manifest[column] != ""] if column == "mask_path" \
            else manifest[column]
        unsafe = [p for p in listed if unsafe_relative(p)]
        if unsafe:
            raise UserError(f"{where}: {column} {unsafe[0]!r} is not a relative path inside "
                            "the dataset folder.")
    for column in NUMERIC_COLUMNS:
        given = manifest[column][manifest[column] != ""]
        values = pd.to_numeric(given, errors="coerce")
        if values.isna().any() or not np.isfinite(values.to_numpy(dtype=float)).all():
            bad = given[values.isna() | ~np.isfinite(values.fillna(0).to_numpy(dtype=float))]
            raise UserError(f"{where}: {column} {bad.iloc[0]!r} is not a finite number.")


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """Read and check ``manifest.csv`` of a dataset folder.

    Every column is text (empty cells stay empty strings) except ``label`` (int) and the
    numeric columns ``slice_z_mm``, ``malignancy``, ``n_readers``, ``diameter_mm`` and
    ``mm_per_px`` (float, NaN where empty).

    Raises:
        UserError: missing folder or file, unreadable CSV, a missing column, an unknown schema
            version, no rows, labels other than 0/1, unknown splits, a class name that
            disagrees with its label, a patient in two splits, a path listed twice or leaving
            the folder, a number that is not finite.
    """
    path = require_dataset_dir(dataset_dir) / MANIFEST_FILE
    try:
        manifest = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable CSV file ({error}).") from error
    _check_manifest(manifest, path)
    manifest["label"] = manifest["label"].astype(int)
    for column in NUMERIC_COLUMNS:
        manifest[column] = pd.to_numeric(manifest[column], errors="coerce").astype(np.float64)
    return manifest


def dataset_files_sha256(dataset_dir: Path) -> str:
    """Fingerprint of a dataset's files: manifest.csv, skipped.csv and every listed image and mask.

    dataset.json records it, so reuse can tell a complete dataset from one whose files were
    removed or changed afterwards.

    Raises:
        UserError: the manifest is invalid, or a listed file is missing or unreadable.
    """
    dataset_dir = Path(dataset_dir)
    manifest = read_manifest(dataset_dir)
    listed = [*manifest["path"], *(p for p in manifest["mask_path"] if p)]
    return fingerprint({"schema_version": SCHEMA_VERSION}, contents=[
        dataset_dir / MANIFEST_FILE, dataset_dir / SKIPPED_FILE,
        *(dataset_dir / relative for relative in listed)])


def manifest_sha256(dataset_dir: Path) -> str:
    """SHA-256 of ``manifest.csv``: identifies the dataset a run was trained on."""
    return file_sha256(Path(dataset_dir) / MANIFEST_FILE)


# ----------------------------------------------------------------------------- dataset.json
DATASET_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,), "synthetic": (bool,), "label_source": (str,), "image_size": (int,),
    "view": (str,), "seed": (int,), "n_images": (int,), "window": (dict,), "counts": (dict,),
    "input_hash": (str,), "channels": (int,), "channel_order": (list,),
    "context_mm": (float, int),
}


def write_dataset_info(dataset_dir: Path, info: Mapping[str, Any]) -> None:
    """Write ``dataset.json`` (atomically) with the current ``schema_version``."""
    atomic_write_json(Path(dataset_dir) / DATASET_FILE, {"schema_version": SCHEMA_VERSION, **info})


def read_dataset_info(dataset_dir: Path, *, required: bool = True) -> dict[str, Any]:
    """Read and check ``dataset.json`` (the prepare stage's provenance).

    Args:
        dataset_dir: the dataset folder.
        required: when False, a missing file gives ``{}`` and a warning (datasets made by hand).

    Raises:
        UserError: unreadable JSON, an unknown schema version, or a field of the wrong type.
    """
    path = Path(dataset_dir) / DATASET_FILE
    if not path.is_file() and not required:
        LOG.warning("%s is missing: the results will not record how the dataset was made", path)
        return {}
    info = _read_json_object(path, "run prepare_lung_dataset.py first.")
    _check_schema_version(info.get("schema_version"), str(path), "prepare_lung_dataset.py")
    for key, types in DATASET_TYPES.items():
        value = info.get(key)
        wrong_bool = isinstance(value, bool) and bool not in types
        if value is not None and (not isinstance(value, types) or wrong_bool):
            raise UserError(f"{path}: {key} must be {types[0].__name__}, got {value!r}.")
    if isinstance(info.get("image_size"), int) and info["image_size"] < 1:
        raise UserError(f"{path}: image_size must be a positive integer, got "
                        f"{info['image_size']}.")
    dataset_channels(info, str(path))
    context = info.get("context_mm")
    if context is not None and (not math.isfinite(context) or context < 0):
        raise UserError(f"{path}: context_mm must be a finite number >= 0, got {context!r}.")
    return info


def dataset_channels(info: Mapping[str, Any], where: str = DATASET_FILE) -> int:
    """Channels of a dataset's images from its ``dataset.json`` (1 when it does not say).

    Raises:
        UserError: ``channels`` is not one of :data:`CHANNEL_ORDERS`' keys (an int), or
            ``channel_order`` does not match it.
    """
    channels = info.get("channels", 1)
    if (isinstance(channels, bool) or channels not in CHANNEL_ORDERS
            or not isinstance(channels, int)):
        raise UserError(f"{where}: channels must be one of {sorted(CHANNEL_ORDERS)}, got "
                        f"{channels!r}.")
    order = info.get("channel_order")
    if order is not None and list(order) != list(CHANNEL_ORDERS[channels]):
        raise UserError(f"{where}: channel_order {order!r} does not match {channels} "
                        f"channel(s) {list(CHANNEL_ORDERS[channels])}.")
    return channels


# ----------------------------------------------------------------------------- images
#: Deterministic PNG bytes: fixed zlib level, no time stamp (OpenCV writes none).
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fastest zlib level; files ~10% larger


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image: ``(S, S)`` grayscale or ``(S, S, 3)`` in RGB order.

    Raises:
        ValueError: not uint8 with 1 or 3 channels, or the encoder failed.
    """
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.shape[2:] == (3,)):
        raise ValueError(f"a dataset PNG is uint8 (S, S) or (S, S, 3), got {image.dtype} "
                         f"{image.shape}")
    bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", bgr, PNG_PARAMS)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def read_png(path: Path, what: str = "image", size_px: int | None = None,
             channels: int = 1) -> np.ndarray:
    """Read one dataset PNG: uint8 ``(S, S)`` (grayscale, masks) or ``(S, S, 3)`` RGB.

    Raises:
        UserError: the file is missing or unreadable, not 8-bit with ``channels`` channels,
            not square, or not ``size_px`` wide when given.
    """
    if not Path(path).is_file():
        problem = "is not a regular file" if Path(path).exists() else "is missing"
        raise UserError(f"{what} {path} listed in {MANIFEST_FILE} {problem}.")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"{what} {path} is not a readable image file.")
    expected_ndim, kind = (2, "grayscale") if channels == 1 else (3, f"{channels}-channel")
    if (image.ndim != expected_ndim or image.dtype != np.uint8
            or (channels > 1 and image.shape[2] != channels)):
        raise UserError(f"{what} {path} is not 8-bit {kind} (shape {image.shape}, "
                        f"{image.dtype}).")
    if image.shape[0] != image.shape[1]:
        raise UserError(f"{what} {path} is {image.shape[1]}x{image.shape[0]} px, not square.")
    if size_px is not None and image.shape[0] != size_px:
        raise UserError(f"{what} {path} is {image.shape[1]}x{image.shape[0]} px; the model "
                        f"takes {size_px}x{size_px}.")
    return image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# ----------------------------------------------------------------------------- training results
def check_prediction_block(block: Any, where: str) -> None:
    """Check a ``{paths, patient_ids, y_true, y_prob}`` block.

    Raises:
        UserError: a key is missing, the lists differ in length, ``y_true`` is not 0/1 or
            ``y_prob`` is not a finite probability.
    """
    if not isinstance(block, dict) or any(
            not isinstance(block.get(k), list) for k in PREDICTION_KEYS):
        raise UserError(f"{where} must hold the lists {', '.join(PREDICTION_KEYS)}.")
    lengths = {k: len(block[k]) for k in PREDICTION_KEYS}
    if len(set(lengths.values())) != 1:
        raise UserError(f"{where} has lists of different lengths {lengths}.")
    if not all(isinstance(p, str) for p in block["paths"] + block["patient_ids"]):
        raise UserError(f"{where}: paths and patient_ids must be text.")
    if any(isinstance(y, bool) or y not in (0, 1) for y in block["y_true"]):
        raise UserError(f"{where} has y_true values other than 0/1.")
    for key in ("y_prob", UNCALIBRATED_KEY) if UNCALIBRATED_KEY in block else ("y_prob",):
        values = block[key]
        if not isinstance(values, list) or len(values) != lengths["y_prob"] or not all(
                isinstance(p, int | float) and not isinstance(p, bool) and math.isfinite(p)
                and 0.0 <= p <= 1.0 for p in values):
            raise UserError(f"{where} has {key} values that are not probabilities in [0, 1].")


def _check_threshold(path: Path, threshold: Any) -> None:
    value = threshold.get("value") if isinstance(threshold, dict) else None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or not 0 <= value <= 1):
        raise UserError(f"{path}: threshold.value must be a probability, got {value!r}.")


def write_training_results(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write ``training_results.json`` (atomically) with the current ``schema_version``."""
    path = Path(out_dir) / RESULTS_FILE
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, **results})
    return path


def read_training_results(path: Path) -> dict[str, Any]:
    """Read and check ``training_results.json``.

    Raises:
        UserError: missing or unreadable file, unknown schema version, a missing key, class
            names other than the contract's, a best model that is not among the models, a
            threshold that is not a probability, a non-integer image size, or a malformed
            prediction block.
    """
    path = Path(path)
    results = _read_json_object(path, "run training_lung_cnn.py first or pass --results.")
    _check_schema_version(results.get("schema_version"), str(path), "training_lung_cnn.py")
    missing = [key for key in RESULTS_KEYS if key not in results]
    if missing:
        raise UserError(f"{path} lacks the keys {', '.join(missing)}; re-run training.")
    if results["class_names"] != list(CLASS_NAMES):
        raise UserError(f"{path} has class_names {results['class_names']}, expected "
                        f"{list(CLASS_NAMES)} (index = label).")
    if not isinstance(results["models"], dict) or not all(
            isinstance(info, dict) for info in results["models"].values()):
        raise UserError(f"{path}: models must map each model name to a JSON object.")
    if not isinstance(results["best_model"], str) or results["best_model"] not in results[
            "models"]:
        raise UserError(f"{path}: best_model {results['best_model']!r} is not among the models "
                        f"{sorted(results['models'])}.")
    _check_threshold(path, results["threshold"])
    temperature = results.get("calibration", {}).get("temperature", 1.0) if isinstance(
        results.get("calibration", {}), dict) else None
    if (not isinstance(temperature, int | float) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature <= 0):
        raise UserError(f"{path}: calibration.temperature must be a positive number, got "
                        f"{temperature!r}.")
    for name, info in results["models"].items():
        model_path = info.get("model_path")
        if model_path is not None and (not isinstance(model_path, str)
                                       or unsafe_relative(model_path)):
            raise UserError(f"{path}: models.{name}.model_path {model_path!r} is not a relative "
                            "path inside the results folder.")
    if not isinstance(results["config"], dict):
        raise UserError(f"{path}: config must be a JSON object.")
    image_size = results["config"].get("image_size")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"{path}: config.image_size must be a positive integer, got "
                        f"{image_size!r}.")
    for key in ("validation", "test"):
        check_prediction_block(results[key], f"{path} {key}")
    return results
