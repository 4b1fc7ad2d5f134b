"""Stage 3: evaluation and Grad-CAM report of the models trained by stage 2.

Reads training_results.json, the selected model and output_dataset/, and writes reports/:
the figures, per-image Grad-CAM overlays, report.html (self-contained) and report.json
(keys in DESIGN.md section 2). Steps, in order: load and check the inputs; score every model at
slice, nodule and patient level with a patient-level bootstrap; fit the no-pixel diameter
baseline; explain the selected model with Grad-CAM and check the maps; analyse its errors;
draw and write.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungct.interpret import inputs
from lungct.backend import environment
from lungct.errors import UserError
from lungct.interpret.gradcam_report import CamSettings, explain_test_set
from lungct.interpret.baseline import fit_diameter_baseline
from lungct.metrics import (
    LevelData,
    bootstrap_counts,
    calibration_bins,
    evaluate_level,
    paired_auc_difference,
    roc_band,
    summarise,
    youden_threshold,
)
from lungct.interpret.report import OUTPUT_FILES, FigureInputs, write_report
from lungct.interpret.weakness import analyse_weaknesses

__all__ = ["METHODS", "QUICK_GRADCAM_MAX", "InterpretConfig", "build_levels", "run"]

LOG = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++")
QUICK_GRADCAM_MAX = 64
ROC_GRID = np.linspace(0.0, 1.0, 101)
LEVEL_DEFINITIONS = {
    "slice_level": "one unit per test slice",
    "nodule_level": ("one unit per annotated nodule (cancer or benign), score = maximum over "
                     "its test slices; slices without a nodule are not nodules and are left out"),
    "patient_level": ("one unit per test patient, score = maximum of its slices' "
                      "probabilities, label = maximum of its slices' labels"),
}


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
            for the preset's default (all; 64 for the quick preset).
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
        if self.cam_method not in METHODS:
            raise ValueError(f"cam_method must be one of {METHODS}, got {self.cam_method!r}")
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


def build_levels(frame: pd.DataFrame, patients: np.ndarray) -> dict[str, LevelData]:
    """Slice, nodule and patient units of a scored test frame.

    Args:
        frame: rows with ``y_true``, ``y_prob``, ``patient_id``, ``nodule_id``,
            ``negative_kind``.
        patients: the bootstrap's patient list (every patient_id of ``frame``).
    """
    index = pd.Index(patients)
    nodules = (frame[frame["nodule_id"] != ""]
               .groupby(["patient_id", "nodule_id"], sort=True)
               .agg(y_true=("y_true", "max"), y_prob=("y_prob", "max"),
                    negative_kind=("negative_kind", "max"))
               .reset_index())
    per_patient = (frame.groupby("patient_id", sort=True)
                   .agg(y_true=("y_true", "max"), y_prob=("y_prob", "max")).reset_index())
    return {
        "slice_level": _level("slice_level", frame, index),
        "nodule_level": _level("nodule_level", nodules, index),
        "patient_level": _level("patient_level", per_patient.assign(negative_kind=""), index),
    }


def _level(name: str, table: pd.DataFrame, patients: pd.Index) -> LevelData:
    kind = table["negative_kind"].where(table["y_true"] == 0, "").to_numpy(dtype=str)
    return LevelData(name, table["y_true"].to_numpy(dtype=int),
                     table["y_prob"].to_numpy(dtype=np.float64),
                     patients.get_indexer(table["patient_id"]), kind)


def _evaluate(levels: dict[str, LevelData], threshold: float | None,
              counts: np.ndarray) -> dict[str, dict]:
    return {name: {**evaluate_level(level, threshold, counts, wilson=name == "patient_level",
                                    calibration=name == "slice_level"),
                   "definition": LEVEL_DEFINITIONS[name]}
            for name, level in levels.items()}


def _calibration(slice_block: dict, slice_level: LevelData) -> dict:
    """Move Brier and ECE out of the slice-level block into the calibration block."""
    return {**{k: slice_block.pop(k) for k in ("brier", "ece")}, "level": "slice_level",
            "n_bins": 10, "bins": calibration_bins(slice_level.y_true, slice_level.y_prob)}


def _aligned_probabilities(block: Any, paths: pd.Series) -> np.ndarray | None:
    """A model's test probabilities in the order of ``paths``; None if the paths differ."""
    try:
        inputs.check_prediction_block(block, "model test block")
    except UserError:
        return None
    lookup = dict(zip(block["paths"], block["y_prob"], strict=True))
    if set(lookup) != set(paths):
        return None
    return np.asarray([lookup[p] for p in paths], dtype=np.float64)


def compare_models(results: dict, frame: pd.DataFrame, patients: np.ndarray,
                   counts: np.ndarray, selected_levels: dict[str, LevelData]) -> dict:
    """Every model's test AUC (and sensitivity/specificity at its own validation threshold)
    with CIs, and the paired bootstrap AUC difference selected - model."""
    best = results["best_model"]
    table = {}
    for name, info in results["models"].items():
        entry = {"selected": name == best, "weights_source": info.get("weights_source"),
                 "val_auc": info.get("val_auc"), "params": info.get("params")}
        probs = (frame["y_prob"].to_numpy() if name == best
                 else _aligned_probabilities(info.get("test"), frame["path"]))
        if probs is None:
            entry["reason"] = "no test predictions on the selected model's test images recorded"
            table[name] = entry
            continue
        threshold = results["threshold"]["value"] if name == best else _validation_threshold(info)
        entry["threshold"] = threshold
        levels = build_levels(frame.assign(y_prob=probs), patients)
        for level_name, level in levels.items():
            scored = evaluate_level(level, threshold, counts)
            entry[level_name] = {k: scored[k] for k in ("auc", "sensitivity", "specificity")}
        if name != best:
            entry["auc_difference_vs_selected"] = {
                level_name: {**paired_auc_difference(
                    level.y_true, selected_levels[level_name].y_prob, level.y_prob,
                    level.patient_index, counts), "definition": f"AUC({best}) - AUC({name})"}
                for level_name, level in levels.items()}
        table[name] = entry
    return table


def _validation_threshold(info: dict) -> float | None:
    """Youden's J threshold on a model's own validation predictions, when recorded."""
    block = info.get("validation")
    try:
        inputs.check_prediction_block(block, "model validation block")
    except UserError:
        return None
    return youden_threshold(np.asarray(block["y_true"]), np.asarray(block["y_prob"]))


def metadata_baseline(manifest: pd.DataFrame, frame: pd.DataFrame, patients: np.ndarray,
                      counts: np.ndarray) -> dict:
    """The diameter-only baseline scored like the CNN on the nodule-bearing test slices."""
    description = ("logistic regression on the annotated nodule diameter (manifest "
                   "diameter_mm), fitted on train, thresholded on validation, scored on the "
                   "test slices that contain an annotated nodule")
    missing = [c for c in ("diameter_mm", "nodule_id") if c not in manifest]
    if missing:
        reason = f"manifest.csv has no {' or '.join(missing)} column"
        return {"description": description, "reason": reason,
                "auc": summarise(np.nan, None, reason)}
    diameters = pd.to_numeric(manifest["diameter_mm"], errors="coerce")
    usable = manifest.assign(diameter=diameters)[(manifest["nodule_id"] != "") & diameters.notna()]
    train, val = (usable[usable["split"] == s] for s in ("train", "val"))
    test = frame[(frame["nodule_id"] != "") & frame["diameter_mm"].notna()]
    try:
        fit = fit_diameter_baseline(train["diameter"], pd.to_numeric(train["label"]),
                                    val["diameter"], pd.to_numeric(val["label"]))
    except ValueError as error:
        return {"description": description, "reason": str(error),
                "auc": summarise(np.nan, None, str(error))}
    baseline = build_levels(test.assign(y_prob=fit.predict(test["diameter_mm"])), patients)
    cnn = build_levels(test, patients)
    block: dict = {"description": description, "fit": fit.to_json(), "n_test_slices": len(test)}
    for name in ("slice_level", "nodule_level"):
        block[name] = evaluate_level(baseline[name], fit.threshold, counts)
        block[f"cnn_auc_same_samples_{name}"] = evaluate_level(cnn[name], None, counts)["auc"]
        block[f"auc_difference_cnn_minus_baseline_{name}"] = paired_auc_difference(
            cnn[name].y_true, cnn[name].y_prob, baseline[name].y_prob,
            cnn[name].patient_index, counts)
    block["auc"] = block["slice_level"]["auc"]
    return block


def provenance(dataset_info: dict, manifest: pd.DataFrame, results: dict,
               dataset_dir: Path) -> dict:
    """What the numbers describe: source, label rule, splits, weights (report ``data``)."""
    source = str(dataset_info.get("source") or results.get("dataset", {}).get("source")
                 or "unknown")
    recorded = results.get("dataset", {})
    if isinstance(recorded, dict) and recorded.get("source") not in (None, source):
        LOG.warning("training_results.json was trained on source %s but %s holds %s",
                    recorded.get("source"), dataset_dir, source)
    splits = {}
    for split, rows in manifest.groupby("split"):
        labels = pd.to_numeric(rows["label"])
        splits[str(split)] = {"patients": int(rows["patient_id"].nunique()),
                              "images": int(len(rows)), "cancer": int((labels == 1).sum()),
                              "non_cancer": int((labels == 0).sum())}
    patient_splits = manifest.groupby("patient_id")["split"].nunique()
    return {
        "source": source, "synthetic": source.startswith("synthetic"),
        "dataset_dir": str(dataset_dir),
        "label_rule": dataset_info.get("label_rule"), "view": dataset_info.get("view"),
        "image_size": results["config"].get("image_size"), "splits": splits,
        "split_level": "patient",
        "patients_in_more_than_one_split": int((patient_splits > 1).sum()),
        "weights": {name: info.get("weights_source")
                    for name, info in results["models"].items()},
        "preset": results["config"].get("preset"),
    }


def _sha256(*paths: Path, extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode("utf-8"))
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _up_to_date(out_dir: Path, inputs_sha256: str) -> bool:
    report = out_dir / "report.json"
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        return json.loads(report.read_text(encoding="utf-8")).get("inputs_sha256") == inputs_sha256
    except (OSError, json.JSONDecodeError):
        return False


def _gradcam_max(config: InterpretConfig, results: dict) -> int | None:
    if config.gradcam_max == "all":
        return None
    if config.gradcam_max is None:
        return QUICK_GRADCAM_MAX if results["config"].get("preset") == "quick" else None
    return int(config.gradcam_max)


def run(config: InterpretConfig) -> dict:
    """Run stage 3 and return the report (also written to ``config.out_dir``)."""
    started = time.perf_counter()
    results = inputs.load_results(config.results_path)
    dataset_dir = inputs.resolve_dataset_dir(config.dataset_dir, results, config.results_path)
    manifest = inputs.load_manifest(dataset_dir)
    dataset_info = inputs.load_dataset_info(dataset_dir)
    model_path = inputs.selected_model_path(results, config.results_path)
    recorded_seed = results["config"].get("seed")
    seed = config.seed if config.seed is not None else (
        recorded_seed if isinstance(recorded_seed, int) else 0)
    settings = {**config.to_json(), "overwrite": None, "seed": seed}
    inputs_sha256 = _sha256(config.results_path, dataset_dir / "manifest.csv", model_path,
                            extra=json.dumps(settings, sort_keys=True))
    if not config.overwrite and _up_to_date(config.out_dir, inputs_sha256):
        LOG.info("%s is up to date with its inputs; use --overwrite to recompute",
                 config.out_dir / "report.json")
        return json.loads((config.out_dir / "report.json").read_text(encoding="utf-8"))
    report, figure_inputs = _compute(config, results, dataset_dir, manifest, dataset_info,
                                     model_path, seed)
    report.update(inputs_sha256=inputs_sha256, config={**config.to_json(), "seed": seed},
                  environment={**environment(), "platform": platform.platform()})
    written = write_report(report, figure_inputs, config.out_dir, started)
    LOG.info("report written to %s in %.1f s", config.out_dir / "report.html",
             time.perf_counter() - started)
    return written


def _compute(config: InterpretConfig, results: dict, dataset_dir: Path,
             manifest: pd.DataFrame, dataset_info: dict, model_path: Path, seed: int
             ) -> tuple[dict, FigureInputs]:
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
    evaluation = _evaluate(levels, threshold, counts)
    calibration = _calibration(evaluation["slice_level"], levels["slice_level"])
    bands = {name: roc_band(level, counts, ROC_GRID) for name, level in levels.items()}
    timing["metrics"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    image_size = int(results["config"]["image_size"])
    model = inputs.load_model(model_path, image_size)
    cam_settings = CamSettings(config.cam_method, config.gradcam_layer,
                               _gradcam_max(config, results), config.batch_size, seed)
    gradcam, gallery = explain_test_set(model, frame, dataset_dir, config.out_dir, image_size,
                                        cam_settings)
    timing["gradcam"] = round(time.perf_counter() - clock, 2)
    report = {
        **evaluation,
        "threshold": {**results["threshold"], "applied_as": "cancer when probability >= value"},
        "selected_model": results["best_model"], "model_path": str(model_path),
        "models": compare_models(results, frame, patients, counts, levels),
        "calibration": calibration, "gradcam": gradcam,
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
