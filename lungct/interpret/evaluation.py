"""Scores of the interpretation stage: every model at slice, nodule and patient level.

Units per level (a nodule's and a patient's score is the maximum of their slices'), the
selected model's metrics with patient-level bootstrap CIs, every model's
test AUC and its paired difference with the selected one, the no-pixel diameter baseline
scored on the same samples, and the provenance of the numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungct.contract import CHANNEL_ORDERS, check_prediction_block, dataset_channels
from lungct.errors import UserError
from lungct.interpret.baseline import fit_diameter_baseline
from lungct.metrics import (
    LevelData,
    evaluate_level,
    paired_auc_difference,
    summarise,
)
from lungct.threshold import youden_threshold

__all__ = ["LEVEL_DEFINITIONS", "build_levels", "evaluate_levels", "compare_models",
           "metadata_baseline", "provenance"]

LOG = logging.getLogger(__name__)

LEVEL_DEFINITIONS = {
    "slice_level": "one unit per test slice",
    "nodule_level": ("one unit per annotated nodule (cancer or benign), score = maximum over "
                     "its test slices; slices without a nodule are not nodules and are left out"),
    "patient_level": ("one unit per test patient, score = maximum of its slices' "
                      "probabilities, label = maximum of its slices' labels"),
}



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


def evaluate_levels(levels: dict[str, LevelData], threshold: float | None,
                    counts: np.ndarray) -> dict[str, dict]:
    """The selected model's level blocks (Wilson intervals at patient level)."""
    return {name: {**evaluate_level(level, threshold, counts, wilson=name == "patient_level"),
                   "definition": LEVEL_DEFINITIONS[name]}
            for name, level in levels.items()}


def _aligned_probabilities(block: Any, paths: pd.Series) -> np.ndarray | None:
    """A model's test probabilities in the order of ``paths``; None if the paths differ."""
    try:
        check_prediction_block(block, "model test block")
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
        check_prediction_block(block, "model validation block")
    except UserError:
        return None
    chosen = youden_threshold(np.asarray(block["y_true"]), np.asarray(block["y_prob"]))
    return chosen["value"] if chosen else None


def metadata_baseline(manifest: pd.DataFrame, frame: pd.DataFrame, patients: np.ndarray,
                      counts: np.ndarray) -> dict:
    """The diameter-only baseline scored like the CNN on the nodule-bearing test slices."""
    description = ("logistic regression on the annotated nodule diameter (manifest "
                   "diameter_mm), fitted on train, thresholded on validation, scored on the "
                   "test slices that contain an annotated nodule")
    usable = manifest[(manifest["nodule_id"] != "") & manifest["diameter_mm"].notna()]
    train, val = (usable[usable["split"] == s] for s in ("train", "val"))
    test = frame[(frame["nodule_id"] != "") & frame["diameter_mm"].notna()]
    try:
        fit = fit_diameter_baseline(train["diameter_mm"], train["label"],
                                    val["diameter_mm"], val["label"])
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
    recorded = results.get("dataset") if isinstance(results.get("dataset"), dict) else {}
    source = str(dataset_info.get("source") or recorded.get("source") or "unknown")
    if recorded.get("source") not in (None, source):
        LOG.warning("training_results.json was trained on source %s but %s holds %s",
                    recorded.get("source"), dataset_dir, source)
    splits = {}
    for split, rows in manifest.groupby("split"):
        labels = rows["label"]
        splits[str(split)] = {"patients": int(rows["patient_id"].nunique()),
                              "images": int(len(rows)), "cancer": int((labels == 1).sum()),
                              "non_cancer": int((labels == 0).sum())}
    channels = dataset_channels(dataset_info)
    return {
        "source": source, "synthetic": source.startswith("synthetic"),
        "dataset_dir": str(dataset_dir), "label_source": dataset_info.get("label_source"),
        "channels": channels, "channel_order": list(CHANNEL_ORDERS[channels]),
        "context_mm": dataset_info.get("context_mm"),
        "label_rule": dataset_info.get("label_rule"), "view": dataset_info.get("view"),
        "series": dataset_info.get("series"),
        "image_size": results["config"].get("image_size"), "splits": splits,
        "split_level": "patient",
        "weights": {name: info.get("weights_source")
                    for name, info in results["models"].items()},
        "preset": results["config"].get("preset"),
    }
