"""The files of ``--out``: per series slices.csv, series.json and Grad-CAM overlays; for the
run summary.csv, studies.csv, errors.csv and skipped.csv. Every write is atomic
(:mod:`lungct.fileio`); series.json is written last in its folder and marks it complete.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lungct import contract
from lungct.fileio import atomic_write_bytes, atomic_write_json, spreadsheet_safe

__all__ = [
    "ERRORS_COLUMNS", "RESEARCH_NOTICE", "SERIES_FILE", "SLICES_COLUMNS",
    "STUDIES_COLUMNS", "SUMMARY_COLUMNS", "overlay_image", "read_csv_rows",
    "study_rows", "write_csv", "write_series_json",
]

RESEARCH_NOTICE = ("RESEARCH USE ONLY: not a medical device, not validated for diagnosis; the "
                   "probabilities come from a model trained on the dataset named here.")
SERIES_FILE = "series.json"
SLICES_COLUMNS = ("z_mm", "instance_number", "sop_instance_uid", "probability",
                  "above_threshold", "patch_centre_x_mm", "patch_centre_y_mm", "place",
                  "source_file")
SUMMARY_COLUMNS = ("patient_id", "study_uid", "series_uid", "places", "n_scored",
                   "max_probability", "max_probability_z_mm", "called_cancer", "threshold",
                   "status")
STUDIES_COLUMNS = ("patient_id", "study_uid", "n_series", "max_probability", "from_series_uid",
                   "called_cancer")
ERRORS_COLUMNS = ("patient_id", "study_uid", "series_uid", "reason")
_OVERLAY_MIN_PX = 256
_CAM_ALPHA = 0.4


def write_csv(path: Path, columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` (only ``columns``, in that order) as a UTF-8 CSV, atomically; every
    text cell passes through :func:`lungct.fileio.spreadsheet_safe`."""
    buffer = io.StringIO()
    fields = list(columns)
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: spreadsheet_safe(row.get(k, "")) for k in fields} for row in rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV this stage wrote (for reused series)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_series_json(folder: Path, record: Mapping[str, Any]) -> None:
    """Write ``<series>/series.json`` with the schema version (last: marks completion)."""
    atomic_write_json(folder / SERIES_FILE, {"schema_version": contract.SCHEMA_VERSION,
                                             **record})


def overlay_image(image: np.ndarray, cam: np.ndarray, probability: float,
                  threshold: float) -> np.ndarray:
    """RGB uint8 overlay: the image (centre channel), the map in jet at 40 %, enlarged to at
    least 256 px, with the probability and the call written on it (burned in)."""
    channels = image.shape[-1] if image.ndim == 3 else 1
    grey = image[..., contract.CENTRE_CHANNEL[channels]] if image.ndim == 3 else image
    scale = max(1, math.ceil(_OVERLAY_MIN_PX / grey.shape[0]))
    size = (grey.shape[1] * scale, grey.shape[0] * scale)
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_NEAREST)
    heat = cv2.resize(np.clip(cam, 0, 1).astype(np.float32), size,
                      interpolation=cv2.INTER_LINEAR)
    jet = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.rint(heat * 255)), cv2.COLORMAP_JET),
                       cv2.COLOR_BGR2RGB)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    blended = np.uint8(np.clip(np.rint((1 - _CAM_ALPHA) * rgb + _CAM_ALPHA * jet), 0, 255))
    call = "cancer" if probability >= threshold else "no cancer"
    for text, row in ((f"p={probability:.3f} ({call} at >= {threshold:.3f})", 18),
                      ("RESEARCH USE ONLY", size[1] - 8)):
        cv2.putText(blended, text, (6, row), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3,
                    cv2.LINE_AA)
        cv2.putText(blended, text, (6, row), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return blended


def study_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per study: its highest probability and the series it came from."""
    studies: dict[tuple[str, str], dict[str, Any]] = {}
    for row in summary:
        if row["max_probability"] == "":
            continue
        key = (row["patient_id"], row["study_uid"])
        study = studies.setdefault(key, {"patient_id": key[0], "study_uid": key[1],
                                         "n_series": 0, "max_probability": -1.0})
        study["n_series"] += 1
        if float(row["max_probability"]) > float(study["max_probability"]):
            study.update(max_probability=row["max_probability"],
                         from_series_uid=row["series_uid"], called_cancer=row["called_cancer"])
    return [studies[key] for key in sorted(studies)]
