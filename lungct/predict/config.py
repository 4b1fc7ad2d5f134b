"""Predict configuration: every setting of stage 4, validated on construction."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MAX_BATCH_SIZE", "MAX_GRADCAM_TOP", "MAX_ID_LENGTH", "PredictConfig"]

MAX_BATCH_SIZE = 4096  # images per model call; far beyond what one CPU or GPU holds at 512 px
MAX_ID_LENGTH = 64  # (0010,0020) Patient ID is LO: at most 64 characters
MAX_GRADCAM_TOP = 1000  # overlays per series; each is a PNG (and a DICOM image with --dicom-out)


@dataclass(frozen=True)
class PredictConfig:
    """Every setting of the predict stage; validated on construction.

    Attributes:
        inputs: ``--input`` folders or archives of DICOM (any nesting).
        results_path: ``--results``: the training_results.json that names the model and how
            it must be fed.
        model_path: ``--model``: a model file that replaces the selected one.
        out_dir: ``--out``: every output, and every extracted archive, goes here.
        gradcam_top: Grad-CAM overlays of this many most suspicious slices per series.
        nodules_csv: ``--nodules``: nodule centres in patient coordinates (patch models).
        dicom_out: also write the overlays as a DICOM Secondary Capture series per series.
        batch_size: images per model call.
        workers: processes indexing and rendering series.
        overwrite: score series again even when their results are up to date.
        pseudonymise: write salted pseudonyms instead of patient ids and UIDs.
        work_dir: the folder holding prepare's ``.lungct_salt`` (``--pseudonymise``).
        patient_regex: prepare's ``--patient-regex`` (masked in texts with --pseudonymise).
        patient_ids: ``--patient-id``: score only the series of these (0010,0020) Patient IDs
            (as the DICOM headers hold them); empty = every series.
    """

    inputs: tuple[Path, ...]
    results_path: Path = Path("training_results.json")
    model_path: Path | None = None
    out_dir: Path = Path("predictions")
    gradcam_top: int = 8
    nodules_csv: Path | None = None
    dicom_out: bool = False
    batch_size: int = 32
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False
    pseudonymise: bool = False
    work_dir: Path = Path(".")
    patient_regex: str = r"LIDC-IDRI-\d{4}"
    patient_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("at least one --input folder or archive is needed")
        if not 0 <= self.gradcam_top <= MAX_GRADCAM_TOP:
            raise ValueError(f"--gradcam-top must be 0-{MAX_GRADCAM_TOP}, got {self.gradcam_top}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"--batch-size must be 1-{MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.dicom_out and self.pseudonymise:
            raise ValueError("--dicom-out cannot be combined with --pseudonymise: results for "
                             "a PACS must carry the real study and patient")
        if any(not isinstance(p, str) or not p.strip() or len(p) > MAX_ID_LENGTH
                   for p in self.patient_ids):
            raise ValueError(f"--patient-id must be a non-empty id of at most {MAX_ID_LENGTH} "
                             f"characters, got {list(self.patient_ids)}")
        try:
            re.compile(self.patient_regex)
        except re.error as error:
            raise ValueError(f"--patient-regex {self.patient_regex!r} is not a regular "
                             f"expression ({error})") from None

    def hashed_settings(self) -> dict:
        """The settings that decide one series' results (not paths, workers or overwrite)."""
        return {"gradcam_top": self.gradcam_top, "dicom_out": self.dicom_out,
                "pseudonymise": self.pseudonymise, "patient_regex": self.patient_regex}
