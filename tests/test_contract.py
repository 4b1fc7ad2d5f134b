"""Tests of lungct.contract: the one reader, checker and writer of each shared file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lungct import contract
from lungct.errors import UserError


def _row(index: int, label: int, split: str, **changes: object) -> dict:
    class_name = contract.CLASS_NAMES[label]
    row = {column: "" for column in contract.MANIFEST_COLUMNS}
    row.update(path=f"{class_name}/{index}.png", label=label, class_name=class_name,
               split=split, patient_id=f"P{index}", series_uid=f"1.2.{index}",
               slice_z_mm="1.25", diameter_mm="7.5" if label else "", mm_per_px="0.7")
    row.update(changes)
    return row


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A written manifest of four rows with their 8x8 PNGs, and a dataset.json."""
    folder = tmp_path / "ds"
    rows = [_row(i, i % 2, contract.SPLITS[min(i, 2)]) for i in range(4)]
    for row in rows:
        (folder / row["class_name"]).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / row["path"]), np.full((8, 8), 100, np.uint8))
    contract.write_manifest(folder, rows)
    contract.write_dataset_info(folder, {"source": "synthetic", "image_size": 8, "view": "slice"})
    return folder


def _rewrite_manifest(folder: Path, change) -> None:
    manifest = pd.read_csv(folder / contract.MANIFEST_FILE, dtype=str, keep_default_na=False)
    change(manifest)
    manifest.to_csv(folder / contract.MANIFEST_FILE, index=False)


def test_manifest_round_trip_types(dataset: Path) -> None:
    """Written rows read back with int labels, float numbers and NaN for empty numbers."""
    manifest = contract.read_manifest(dataset)
    assert tuple(manifest.columns) == contract.MANIFEST_COLUMNS
    assert manifest["label"].tolist() == [0, 1, 0, 1]
    assert manifest["slice_z_mm"].tolist() == [1.25] * 4
    assert np.isnan(manifest["diameter_mm"].iloc[0]) and manifest["diameter_mm"].iloc[1] == 7.5
    assert (manifest["schema_version"] == str(contract.SCHEMA_VERSION)).all()


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.__setitem__("schema_version", "1"),
     "has schema_version 1 but this lungct reads version 2: re-run prepare_lung_dataset.py"),
    (lambda m: m.__setitem__("label", ["0", "1", "0", "yes"]), r"has labels \['yes'\]"),
    (lambda m: m.__setitem__("split", ["train", "val", "test", "holdout"]),
     r"has splits \['holdout'\]"),
    (lambda m: m.__setitem__("class_name", ["cancer", "cancer", "non_cancer", "cancer"]),
     "has label 0 but class_name 'cancer'"),
    (lambda m: m.__setitem__("patient_id", ["P0", "P0", "P2", "P3"]),
     r"patient P0 is in the splits \['train', 'val'\]; a patient must be in one split only"),
    (lambda m: m.__setitem__("path", ["a.png", "a.png", "b.png", "c.png"]),
     "lists some paths twice, e.g. a.png"),
    (lambda m: m.__setitem__("path", ["a.png", "../../etc/passwd", "b.png", "c.png"]),
     "path '../../etc/passwd' is not a relative path inside the dataset folder"),
    (lambda m: m.__setitem__("mask_path", ["", "/abs/mask.png", "", ""]),
     "mask_path '/abs/mask.png' is not a relative path"),
    (lambda m: m.__setitem__("diameter_mm", ["", "nan", "", ""]),
     "diameter_mm 'nan' is not a finite number"),
    (lambda m: m.__setitem__("mm_per_px", ["0.7", "0.7", "inf", "abc"]),
     "mm_per_px 'inf' is not a finite number"),
])
def test_bad_manifest_is_one_sentence(dataset: Path, change, message: str) -> None:
    """Each broken rule of manifest.csv is refused with its own message naming the file."""
    _rewrite_manifest(dataset, change)
    with pytest.raises(UserError, match=message):
        contract.read_manifest(dataset)


def test_missing_dataset_folder_and_manifest(tmp_path: Path) -> None:
    """A missing folder and a folder without manifest.csv say what to run."""
    with pytest.raises(UserError, match="does not exist; run prepare_lung_dataset.py first"):
        contract.read_manifest(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has no manifest.csv; run prepare_lung_dataset.py"):
        contract.read_manifest(tmp_path)


@pytest.mark.parametrize(("info", "message"), [
    ({"schema_version": 2, "image_size": "224"}, "image_size must be int, got '224'"),
    ({"schema_version": 2, "image_size": True}, "image_size must be int, got True"),
    ({"schema_version": 2, "image_size": 0}, "image_size must be a positive integer, got 0"),
    ({"schema_version": 2, "synthetic": "yes"}, "synthetic must be bool, got 'yes'"),
    ({"image_size": 32}, "has schema_version none but this lungct reads version 2"),
    ({"schema_version": 2, "channels": 2, "channel_order": ["z"]},
     r"channels must be one of \[1, 3\], got 2"),
    ({"schema_version": 2, "channels": 3, "channel_order": ["z"]},
     r"channel_order \['z'\] does not match 3 channel\(s\)"),
    ({"schema_version": 2, "channels": "3"}, "channels must be int, got '3'"),
    ({"schema_version": 2, "context_mm": -1.0}, "context_mm must be a finite number >= 0"),
])
def test_bad_dataset_json_is_one_sentence(tmp_path: Path, info: dict, message: str) -> None:
    """dataset.json with a wrong type, range or version is refused with the field named."""
    (tmp_path / contract.DATASET_FILE).write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        contract.read_dataset_info(tmp_path)


def test_dataset_json_optional_when_asked(tmp_path: Path) -> None:
    """A hand-made dataset without dataset.json reads as {} when it is not required."""
    assert contract.read_dataset_info(tmp_path, required=False) == {}
    with pytest.raises(UserError, match="dataset.json not found: run prepare_lung_dataset.py"):
        contract.read_dataset_info(tmp_path)


def test_read_png_checks_size_and_depth(dataset: Path, tmp_path: Path) -> None:
    """PNGs must be 8-bit, single-channel, square and of the model's size."""
    assert contract.read_png(dataset / "non_cancer/0.png", size_px=8).shape == (8, 8)
    with pytest.raises(UserError, match="is 8x8 px; the model takes 16x16"):
        contract.read_png(dataset / "non_cancer/0.png", size_px=16)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 10  # R
    rgb[..., 2] = 30  # B
    (tmp_path / "rgb.png").write_bytes(contract.encode_png(rgb))
    read = contract.read_png(tmp_path / "rgb.png", channels=3)
    assert read.shape == (8, 8, 3) and read[0, 0].tolist() == [10, 0, 30]
    assert cv2.imread(str(tmp_path / "rgb.png"))[0, 0].tolist() == [30, 0, 10]  # stored BGR
    with pytest.raises(UserError, match="is not 8-bit grayscale"):
        contract.read_png(tmp_path / "rgb.png")
    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((8, 10), np.uint8))
    with pytest.raises(UserError, match="is 10x8 px, not square"):
        contract.read_png(tmp_path / "wide.png")
    with pytest.raises(UserError, match="listed in manifest.csv is missing"):
        contract.read_png(tmp_path / "gone.png")


def _results(**changes: object) -> dict:
    block = {"paths": ["a.png", "b.png"], "patient_ids": ["P1", "P2"], "y_true": [0, 1],
             "y_prob": [0.2, 0.9]}
    results = {"class_names": list(contract.CLASS_NAMES), "best_model": "baseline",
               "threshold": {"value": 0.5}, "models": {"baseline": {}},
               "validation": block, "test": block, "config": {"image_size": 32}}
    results.update(changes)
    return results


def test_training_results_round_trip(tmp_path: Path) -> None:
    """Written results read back with the schema version added."""
    path = contract.write_training_results(tmp_path, _results())
    assert contract.read_training_results(path)["schema_version"] == contract.SCHEMA_VERSION


@pytest.mark.parametrize(("changes", "message"), [
    ({"best_model": "vgg16"}, r"best_model 'vgg16' is not among the models \['baseline'\]"),
    ({"threshold": {"value": float("nan")}}, "threshold.value must be a probability, got nan"),
    ({"threshold": {"value": 1.5}}, "threshold.value must be a probability, got 1.5"),
    ({"config": {"image_size": 32.0}}, "config.image_size must be a positive integer, got 32.0"),
    ({"models": ["baseline"]}, "models must map each model name to a JSON object"),
    ({"class_names": ["cancer", "non_cancer"]}, "expected \\['non_cancer', 'cancer'\\]"),
    ({"test": {"paths": ["a.png"], "patient_ids": ["P1"], "y_true": [2], "y_prob": [0.1]}},
     "test has y_true values other than 0/1"),
    ({"test": {"paths": ["a.png"], "patient_ids": ["P1"], "y_true": [1],
               "y_prob": [float("inf")]}}, "test has y_prob values that are not probabilities"),
    ({"validation": {"paths": ["a.png"], "patient_ids": [], "y_true": [1], "y_prob": [0.1]}},
     "validation has lists of different lengths"),
    ({"test": {"paths": ["a.png"], "patient_ids": ["P1"], "y_true": [1], "y_prob": [0.1],
               "y_prob_uncalibrated": [0.1, 0.2]}},
     "test has y_prob_uncalibrated values that are not probabilities"),
    ({"calibration": {"temperature": 0.0}}, "calibration.temperature must be a positive number"),
    ({"calibration": {"temperature": float("nan")}},
     "calibration.temperature must be a positive number, got nan"),
])
def test_bad_training_results_are_one_sentence(tmp_path: Path, changes: dict,
                                               message: str) -> None:
    """Wrong types, ranges and shapes in training_results.json are refused, field named."""
    path = tmp_path / contract.RESULTS_FILE  # written by hand: the writer refuses NaN itself
    path.write_text(json.dumps({"schema_version": 2, **_results(**changes)}), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        contract.read_training_results(path)


def test_training_results_not_json(tmp_path: Path) -> None:
    """A results file that is not a JSON object is one sentence."""
    path = tmp_path / contract.RESULTS_FILE
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="must hold a JSON object, not list"):
        contract.read_training_results(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(UserError, match="is not readable JSON"):
        contract.read_training_results(path)


def test_skipped_csv_cells_never_become_spreadsheet_formulas(tmp_path: Path) -> None:
    """A hostile input file name is escaped in skipped.csv; plain names stay as they are."""
    contract.write_skipped(tmp_path, {"=HYPERLINK(\"http://x\")/a.dcm": "not DICOM",
                                      "b/c.dcm": "not a CT image ((0008,0060) Modality MR)"})
    assert (tmp_path / contract.SKIPPED_FILE).read_text(encoding="utf-8").splitlines() == [
        "file,reason",
        '"\'=HYPERLINK(""http://x"")/a.dcm",not DICOM',
        'b/c.dcm,"not a CT image ((0008,0060) Modality MR)"',
    ]
