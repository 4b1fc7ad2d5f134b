"""Prepare configuration: every setting of stage 1, validated on construction."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lungct.prepare import dicom, lidc, sources
from lungct.prepare.executors import EXECUTORS
from lungct.prepare.split import split_patients

__all__ = ["MAX_CONTEXT_MM", "MAX_MARGIN_MM", "MAX_PATCH_MM", "MAX_WINDOW_HU", "PrepareConfig"]

MAX_PATCH_MM = 500.0  # wider than any chest field of view
MAX_MARGIN_MM = 1000.0  # longer than any CT series
MAX_WINDOW_HU = 10000.0  # beyond the 16-bit HU range a CT can store
MAX_CONTEXT_MM = 50.0  # 2.5D context: planes further away show other anatomy than the sample's


@dataclass(frozen=True)
class PrepareConfig:
    """Every setting of the prepare stage; validated on construction."""

    source: str = "auto"
    input_path: Path | None = None
    kaggle_dataset: str = sources.DEFAULT_KAGGLE_DATASET
    max_patients: int | None = None
    labels_csv: Path | None = None
    patient_regex: str = r"LIDC-IDRI-\d{4}"
    output_dir: Path = Path("output_dataset")
    work_dir: Path = Path(".")
    image_size_px: int = 224
    window: str = "lung"
    view: str = "slice"
    patch_mm: float = 64.0
    context_mm: float = 0.0  # 2.5D context D (mm): 0 = one plane, else z - D, z, z + D
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    target_count: int = 3000
    max_per_patient: int = 20
    negative_margin_mm: float = 10.0
    label_rule: lidc.LabelRule = field(default_factory=lidc.LabelRule)
    seed: int = 42
    synthetic_patients: int = 0  # 0 = the synthetic module's default
    synthetic_size_px: int = 0  # 0 = the synthetic module's default
    pseudonymise: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    executor: str = "local"  # where tasks run (lungct.prepare.executors); never in the hash
    dask_scheduler: str | None = None  # a running Dask scheduler; None = a LocalCluster
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.source not in sources.SOURCES:
            raise ValueError(f"source must be one of {sources.SOURCES}, got {self.source!r}")
        if self.view not in ("slice", "patch"):
            raise ValueError(f"view must be slice or patch, got {self.view!r}")
        if not 8 <= self.image_size_px <= 2048:
            raise ValueError(f"image size must be 8-2048 px, got {self.image_size_px}")
        if not (math.isfinite(self.patch_mm) and 1.0 <= self.patch_mm <= MAX_PATCH_MM):
            raise ValueError(f"patch size must be 1-{MAX_PATCH_MM:g} mm, got {self.patch_mm:g}")
        if not (isinstance(self.context_mm, (int, float)) and math.isfinite(self.context_mm)
                and 0 <= self.context_mm <= MAX_CONTEXT_MM):
            raise ValueError(f"--context-mm must be a number from 0 to {MAX_CONTEXT_MM:g} mm, "
                             f"got {self.context_mm!r}")
        if not (math.isfinite(self.negative_margin_mm)
                and 0 <= self.negative_margin_mm <= MAX_MARGIN_MM):
            raise ValueError(f"negative margin must be 0-{MAX_MARGIN_MM:g} mm, got "
                             f"{self.negative_margin_mm:g}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got "
                             f"{self.executor!r}")
        if self.dask_scheduler is not None:
            if self.executor != "dask":
                raise ValueError("--dask-scheduler needs --executor dask")
            if not self.dask_scheduler.strip() or any(c.isspace() for c in self.dask_scheduler):
                raise ValueError(f"--dask-scheduler must be an address such as "
                                 f"tcp://host:8786, got {self.dask_scheduler!r}")
        if self.max_patients is not None and self.max_patients < 1:
            raise ValueError(f"max patients must be >= 1, got {self.max_patients}")
        center_hu, width_hu = dicom.parse_window(self.window)
        if not (math.isfinite(center_hu) and math.isfinite(width_hu)
                and abs(center_hu) <= MAX_WINDOW_HU and width_hu <= 2 * MAX_WINDOW_HU):
            raise ValueError(f"window must be finite, |centre| and width/2 <= {MAX_WINDOW_HU:g} "
                             f"HU, got {self.window!r}")
        try:
            re.compile(self.patient_regex)
        except re.error as error:
            raise ValueError(f"--patient-regex {self.patient_regex!r} is not a regular "
                             f"expression ({error})") from None
        split_patients({}, self.split_fractions, 0)
        if self.target_count < 2 or self.max_per_patient < 1:
            raise ValueError(
                f"target count must be >= 2 and max per patient >= 1, got "
                f"{self.target_count} and {self.max_per_patient}"
            )

    def hashed_settings(self) -> dict:
        """The settings that decide the output (not paths, workers, executor or overwrite)."""
        settings = asdict(self)
        for key in ("input_path", "output_dir", "work_dir", "workers", "executor",
                    "dask_scheduler", "overwrite", "labels_csv"):
            settings.pop(key)
        settings["label_rule"] = self.label_rule.to_dict()
        return settings
