"""Stage 3: evaluation and Grad-CAM report of the models trained by stage 2.

Reads training_results.json, the selected model (a single classifier or a fold ensemble) and
output_dataset/, and writes reports/: the figures, per-image Grad-CAM overlays, report.html
(self-contained), model_card.json and report.json (keys in docs/formats.md). Steps, in order:
load and check the inputs; score every model at slice, nodule and patient level with a
patient-level bootstrap; calibration before and after temperature scaling; the
cross-validation summary; fit the no-pixel diameter baseline; explain the selected model with
Grad-CAM and check the maps; analyse its errors; draw and write.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungct import contract
from lungct.backend import environment
from lungct.errors import UserError
from lungct.faults import kill_point
from lungct.fileio import fresh_staging, swap_into_place
from lungct.fingerprint import fingerprint, verify_file_set
from lungct.interpret import inputs
from lungct.interpret.calibration_report import calibration_block
from lungct.interpret.cross_validation import cross_validation_block
from lungct.interpret.evaluation import (
    build_levels,
    compare_models,
    evaluate_levels,
    metadata_baseline,
    provenance,
)
from lungct.interpret.gradcam_report import CamSettings, explain_test_set
from lungct.interpret.model_card import training_block
from lungct.interpret.report import OUTPUT_FILES, FigureInputs, write_report
from lungct.interpret.weakness import analyse_weaknesses
from lungct.locking import output_lock, shared_lock
from lungct.metrics import bootstrap_counts, roc_band
from lungct.modelio import load_classifier

__all__ = ["InterpretConfig", "run"]

LOG = logging.getLogger(__name__)

ROC_GRID = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class InterpretConfig:
    """Settings of the interpretation stage (validated on construction).

    Attributes:
        results_path: training_results.json written by stage 2.
        dataset_dir: dataset folder; None uses the results' config.dataset_dir.
        out_dir: report folder.
        bootstrap_resamples: patient-level bootstrap resamples for the 95% CIs.
        seed: seed of the bootstrap and the Grad-CAM draw; None uses the training seed.
        cam_method: ``gradcam`` or ``gradcam++``.
        gradcam_max: cap on the masked test images explained: an int, ``"all"``, or None
            for the cap training recorded (``config.gradcam_max_images``; None = all).
        gradcam_layer: explained layer; None for the last convolutional block's output.
        batch_size: images per Grad-CAM call.
        overwrite: recompute even when report.json is up to date.
    """

    results_path: Path = Path("training_results.json")
    dataset_dir: Path | None = None
    out_dir: Path = Path("reports")
    bootstrap_resamples: int = 2000
    seed: int | None = None
    cam_method: str = "gradcam"
    gradcam_max: int | str | None = None
    gradcam_layer: str | None = None
    batch_size: int = 32
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        if self.cam_method not in contract.CAM_METHODS:
            raise ValueError(f"cam_method must be one of {tuple(contract.CAM_METHODS)}, got "
                             f"{self.cam_method!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        valid_max = self.gradcam_max in (None, "all") or (
            isinstance(self.gradcam_max, int) and self.gradcam_max >= 1)
        if not valid_max:
            raise ValueError(f"gradcam_max must be a positive integer or 'all', "
                             f"got {self.gradcam_max!r}")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON-ready values (paths as text)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _up_to_date(out_dir: Path, inputs_sha256: str) -> bool:
    """report.json matches the inputs and every other output file is the one it recorded."""
    report = out_dir / "report.json"
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        written = json.loads(report.read_text(encoding="utf-8"))
        verify_file_set(written.get("files_sha256"), out_dir, str(report), "interpretation.py")
    except (OSError, json.JSONDecodeError, UserError):
        return False
    return written.get("inputs_sha256") == inputs_sha256


def gradcam_max(config: InterpretConfig, results: dict) -> int | None:
    """Masked test images to explain: the flag, else the cap training recorded (None = all)."""
    if config.gradcam_max == "all":
        return None
    if config.gradcam_max is None:
        recorded = results["config"].get("gradcam_max_images")
        return recorded if isinstance(recorded, int) and recorded >= 1 else None
    return int(config.gradcam_max)


def run(config: InterpretConfig) -> dict:
    """Run stage 3 and return the report (also written to ``config.out_dir``).

    Holds the report folder's lock and shared locks on the training results and the dataset;
    builds the report in ``<out>.partial/`` and swaps it into place, so the folder always
    holds one complete report.
    """
    with (output_lock(config.out_dir, "interpret"),
          shared_lock(config.results_path, "interpret")):
        results = contract.read_training_results(config.results_path)
        verify_file_set(results.get("files_sha256"), config.results_path.parent,
                                 str(config.results_path), "training_lung_cnn.py")
        dataset_dir = inputs.resolve_dataset_dir(config.dataset_dir, results,
                                                 config.results_path)
        with shared_lock(dataset_dir, "interpret"):
            return _run_locked(config, results, dataset_dir)


def _run_locked(config: InterpretConfig, results: dict, dataset_dir: Path) -> dict:
    started = time.perf_counter()
    manifest = contract.read_manifest(dataset_dir)
    dataset_info = contract.read_dataset_info(dataset_dir, required=False)
    model_path = inputs.selected_model_path(results, config.results_path)
    recorded_seed = results["config"].get("seed")
    seed = config.seed if config.seed is not None else (
        recorded_seed if isinstance(recorded_seed, int) else 0)
    settings = {**config.to_json(), "overwrite": None, "seed": seed}
    inputs_sha256 = fingerprint(settings, contents=(
        config.results_path, dataset_dir / contract.MANIFEST_FILE, model_path))
    if not config.overwrite and _up_to_date(config.out_dir, inputs_sha256):
        LOG.info("%s is up to date with its inputs; use --overwrite to recompute",
                 config.out_dir / "report.json")
        return json.loads((config.out_dir / "report.json").read_text(encoding="utf-8"))
    staging = fresh_staging(config.out_dir)
    report, figure_inputs = _compute(config, results, dataset_dir, manifest, dataset_info,
                                     model_path, seed, staging)
    report.update(schema_version=contract.SCHEMA_VERSION, inputs_sha256=inputs_sha256,
                  config={**config.to_json(), "seed": seed},
                  environment=environment())
    written = write_report(report, figure_inputs, staging, started)
    kill_point("interpret", "written")
    swap_into_place(staging, config.out_dir)
    LOG.info("report written to %s in %.1f s", config.out_dir / "report.html",
             time.perf_counter() - started)
    return written


def _compute(config: InterpretConfig, results: dict, dataset_dir: Path,
             manifest: pd.DataFrame, dataset_info: dict, model_path: Path, seed: int,
             out_dir: Path) -> tuple[dict, FigureInputs]:
    """Every number of the report, and what the figures need beyond them."""
    timing = {}
    clock = time.perf_counter()
    frame = inputs.test_frame(results, manifest)
    threshold = float(results["threshold"]["value"])
    frame["y_pred"] = frame["y_prob"] >= threshold
    per_patient = frame.groupby("patient_id", sort=True)["y_true"].max()
    patients = per_patient.index.to_numpy()
    counts = bootstrap_counts(per_patient.to_numpy(), config.bootstrap_resamples, seed)
    levels = build_levels(frame, patients)
    evaluation = evaluate_levels(levels, threshold, counts)
    uncalibrated = (frame[contract.UNCALIBRATED_KEY].to_numpy()
                    if contract.UNCALIBRATED_KEY in frame else None)
    calibration = calibration_block(levels["slice_level"], uncalibrated, results, counts, seed)
    bands = {name: roc_band(level, counts, ROC_GRID) for name, level in levels.items()}
    timing["metrics"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    image_size = int(results["config"]["image_size"])
    channels = contract.dataset_channels(dataset_info)
    model = load_classifier(model_path, image_size, str(config.results_path), channels)
    cam_settings = CamSettings(config.cam_method, config.gradcam_layer,
                               gradcam_max(config, results), config.batch_size, seed)
    gradcam, gallery = explain_test_set(model, frame, dataset_dir, out_dir, image_size,
                                        cam_settings, channels)
    timing["gradcam"] = round(time.perf_counter() - clock, 2)
    report = {
        **evaluation,
        "threshold": {**results["threshold"], "applied_as": "cancer when probability >= value"},
        "selected_model": results["best_model"], "model_path": str(model_path),
        "models": compare_models(results, frame, patients, counts, levels),
        "calibration": calibration, "cross_validation": cross_validation_block(results),
        "training": training_block(results), "gradcam": gradcam,
        "metadata_baseline": metadata_baseline(manifest, frame, patients, counts),
        "weaknesses": analyse_weaknesses(frame, threshold),
        "data": provenance(dataset_info, manifest, results, dataset_dir),
        "bootstrap": {"resamples": config.bootstrap_resamples, "seed": seed,
                      "unit": "patient", "stratified_by": "patient label",
                      "interval": "2.5th-97.5th percentile"},
        "timing_seconds": timing,
    }
    bands_on_grid = {k: (ROC_GRID, *v) if v else None for k, v in bands.items()}
    return report, FigureInputs(levels, bands_on_grid, gallery)
