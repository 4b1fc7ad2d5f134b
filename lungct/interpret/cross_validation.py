"""The cross-validation section: per fold and per model the validation AUC, their mean and
standard deviation, the out-of-fold AUC, and which model the ensemble is.

Training with ``--folds K`` splits the training patients into K folds stratified by patient
label, trains each model K times (each fold once held out) and ships the K members of the
selected model as one ensemble whose logit is the members' mean. The test split is never in a
fold, so the report's test metrics (slice, nodule and patient level, patient-bootstrap CIs)
are the ensemble's. Everything here is read from training_results.json ``cross_validation``
and checked; nothing is recomputed.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from typing import Any

from lungct.errors import UserError
from lungct.interpret.html_parts import ci_text, html_table

__all__ = ["cross_validation_block", "cross_validation_html"]

WHERE = "training_results.json cross_validation"


def _auc_or_none(value: Any, what: str) -> float | None:
    """An AUC (finite, in [0, 1]) or None (undefined on a fold with one class)."""
    if value is None:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or not 0 <= value <= 1):
        raise UserError(f"{WHERE} {what} must be an AUC in [0, 1] or null, got {value!r}; "
                        "re-run training_lung_cnn.py.")
    return float(value)


def _model_entry(name: str, entry: Any, folds: int) -> dict:
    if not isinstance(entry, dict) or not isinstance(entry.get("fold_val_auc"), list) or len(
            entry["fold_val_auc"]) != folds:
        raise UserError(f"{WHERE}.models.{name} must hold fold_val_auc with one AUC per fold "
                        f"({folds}); re-run training_lung_cnn.py.")
    std = entry.get("std")
    if std is not None and (not isinstance(std, int | float) or isinstance(std, bool)
                            or not math.isfinite(std) or std < 0):
        raise UserError(f"{WHERE}.models.{name}.std must be a finite number >= 0 or null, got "
                        f"{std!r}; re-run training_lung_cnn.py.")
    return {
        "fold_val_auc": [_auc_or_none(v, f"models.{name}.fold_val_auc[{k}]")
                         for k, v in enumerate(entry["fold_val_auc"])],
        "mean": _auc_or_none(entry.get("mean"), f"models.{name}.mean"),
        "std": None if std is None else float(std),
        "oof_val_auc": _auc_or_none(entry.get("oof_val_auc"), f"models.{name}.oof_val_auc"),
    }


def cross_validation_block(results: dict) -> dict | None:
    """The report.json ``cross_validation`` block; None for a run without folds.

    Raises:
        UserError: a fold count that is not an integer >= 2, a model without one AUC per
            fold, an AUC outside [0, 1], or a selected model that is not among the results'.
    """
    record = results.get("cross_validation")
    if record is None:
        return None
    folds = record.get("folds") if isinstance(record, dict) else None
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise UserError(f"{WHERE}.folds must be an integer >= 2, got {folds!r}; re-run "
                        "training_lung_cnn.py.")
    models = record.get("models")
    if not isinstance(models, dict) or not models:
        raise UserError(f"{WHERE}.models must map each model to its fold AUCs; re-run "
                        "training_lung_cnn.py.")
    selected = record.get("selected", results["best_model"])
    if selected != results["best_model"]:
        raise UserError(f"{WHERE}.selected {selected!r} is not best_model "
                        f"{results['best_model']!r}; re-run training_lung_cnn.py.")
    assignment = record.get("fold_of_patient") or {}
    per_fold = Counter(assignment.values()) if isinstance(assignment, dict) else Counter()
    return {
        "folds": folds, "stratified_by": record.get("stratified_by"), "selected": selected,
        "patients_per_fold": [int(per_fold.get(k, 0)) for k in range(folds)],
        "models": {str(name): _model_entry(str(name), entry, folds)
                   for name, entry in models.items()},
        "test_metrics": (f"The test metrics of this report (slice, nodule and patient level) "
                         f"are those of the {folds}-member {selected} ensemble (mean of the "
                         "members' logits, then the temperature)."),
    }


def _auc(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def cross_validation_html(block: dict | None, report: dict) -> str:
    """The cross-validation section: fold AUCs per model, then the ensemble's test metrics."""
    if block is None:
        return ""
    folds = block["folds"]
    header = ["model", *(f"fold {k} val AUC" for k in range(folds)), "mean", "SD",
              "out-of-fold val AUC"]
    rows = [[name + (" (selected)" if name == block["selected"] else ""),
             *(_auc(v) for v in entry["fold_val_auc"]), _auc(entry["mean"]),
             _auc(entry["std"]), _auc(entry["oof_val_auc"])]
            for name, entry in block["models"].items()]
    test_rows = [[level.replace("_level", ""), ci_text(report[level]["auc"]),
                  ci_text(report[level]["sensitivity"]), ci_text(report[level]["specificity"])]
                 for level in ("slice_level", "nodule_level", "patient_level")]
    return (f"<h2>Cross-validation ({folds} folds, stratified by "
            f"{html.escape(str(block['stratified_by']))})</h2>"
            f"<p>Patients per fold: {', '.join(map(str, block['patients_per_fold']))}. The "
            "validation predictions of a cross-validated run are out of fold: they include "
            "images of the training split. Each fold model kept the weights of its best epoch "
            "on its own validation fold, so these AUCs are slightly optimistic; the test "
            "split, untouched by every fold, is the unbiased estimate. The temperature and the "
            "threshold were fitted on the fold models' pooled logits and are applied to the "
            "ensemble's mean logit, which is less extreme than a member's: the ensemble may be "
            "somewhat under-confident (see the calibration section).</p>"
            + html_table(header, rows)
            + f"<p>{html.escape(block['test_metrics'])}</p>"
            + html_table(["level", "AUC [95% CI]", "sensitivity [95% CI]",
                          "specificity [95% CI]"], test_rows))
