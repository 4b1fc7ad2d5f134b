"""training_results.json content: prediction blocks, per-model entries, calibration and
cross-validation (docs/formats.md, "training_results.json").

Every model contributes a :class:`ModelOutcome`: its logits (before the temperature) on the
validation images (with folds: pooled out-of-fold) and the test images, the run record and the
model files. Probabilities are sigmoid(logit / T) (lungct.train.calibration.sigmoid), stored as
float32 values like the model's own float32 output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungct import contract
from lungct.metrics import auc
from lungct.train.calibration import TemperatureFit, calibration_record, sigmoid
from lungct.train.image_cache import SplitData

__all__ = [
    "ModelOutcome",
    "calibration_block",
    "cross_validation_block",
    "log_summary",
    "model_entry",
    "prediction_block",
]

LOG = logging.getLogger(__name__)

#: Record fields copied from the run record (lungct.train.phases) into models.<name>.
RECORD_FIELDS = ("history", "params", "weights_source", "train_seconds", "images_per_second",
                 "n_train_images", "class_weight", "fine_tuned_layers")
#: With folds, these differ per fold and become lists of K in fold order.
PER_FOLD_FIELDS = ("history", "n_train_images", "class_weight")


@dataclass(frozen=True)
class ModelOutcome:
    """One architecture's trained model(s) and logits.

    Attributes:
        name: ``baseline``, ``vgg16`` or ``resnet50``.
        records: the run record of the model, or of each fold model in fold order.
        val: the images ``val_logits`` belong to (validation split, or pooled train+val).
        val_logits: logits before the temperature, float32 ``(len(val),)``; with folds each
            image's from the fold model that did not train on it (out-of-fold).
        test_logits: test logits; with folds the mean of the fold models' (the ensemble's).
        model_file: the uncalibrated classifier, relative to the output folder:
            ``runs/<name>/model.keras`` or the fold ensemble ``runs/<name>/ensemble.keras``.
        files: every model file of this architecture, relative to the output folder.
        params: parameters of the model at ``model_file``.
        grad_cam_layer: lungct.train.models.grad_cam_layer of that model.
        fold_val_auc: with folds, each fold model's AUC on its own validation fold.
    """

    name: str
    records: tuple[dict, ...]
    val: SplitData
    val_logits: np.ndarray
    test_logits: np.ndarray
    model_file: str
    files: tuple[str, ...]
    params: int
    grad_cam_layer: str | list[str]
    fold_val_auc: tuple[float | None, ...] = ()

    @property
    def val_auc(self) -> float:
        """Validation (out-of-fold) AUC: the selection metric."""
        value = auc(self.val.labels, sigmoid(self.val_logits))
        if value is None:
            raise ValueError(f"{self.name}: the validation images hold one class only")
        return value


def prediction_block(split: SplitData, logits: np.ndarray, temperature: float | None) -> dict:
    """A prediction block; with ``temperature``, ``y_prob`` is calibrated and
    ``y_prob_uncalibrated`` holds sigmoid(logit) beside it."""
    uncalibrated = sigmoid(logits).astype(np.float32)
    block = {
        "paths": list(split.paths),
        "patient_ids": list(split.patient_ids),
        "y_true": [int(label) for label in split.labels],
    }
    if temperature is None:
        return {**block, "y_prob": [float(p) for p in uncalibrated]}
    calibrated = sigmoid(logits, temperature).astype(np.float32)
    return {**block, "y_prob": [float(p) for p in calibrated],
            contract.UNCALIBRATED_KEY: [float(p) for p in uncalibrated]}


def _record_fields(records: tuple[dict, ...]) -> dict:
    if len(records) == 1:
        return {field: records[0][field] for field in RECORD_FIELDS}
    seconds = sum(record["train_seconds"] for record in records)
    images = sum(record["images_per_second"] * record["train_seconds"] for record in records)
    return {
        **{field: [record[field] for record in records] for field in PER_FOLD_FIELDS},
        "weights_source": records[0]["weights_source"],
        "fine_tuned_layers": records[0]["fine_tuned_layers"],
        "train_seconds": round(seconds, 2),
        "images_per_second": round(images / seconds, 2) if seconds > 0 else 0.0,
    }


def model_entry(outcome: ModelOutcome, test: SplitData, *, fit: TemperatureFit | None = None,
                model_path: str | None = None,
                grad_cam_layer: str | list[str] | None = None) -> dict:
    """``models.<name>``: the run record's fields, AUCs, Grad-CAM layer, file, blocks.

    For the selected model pass the temperature ``fit`` (its blocks are then calibrated),
    the selected-model file as ``model_path`` and that model's ``grad_cam_layer``.
    """
    temperature = fit.temperature if fit else None
    test_auc = auc(test.labels, sigmoid(outcome.test_logits))
    return {
        **_record_fields(outcome.records),
        "params": outcome.params,
        "val_auc": outcome.val_auc,
        "test_auc": test_auc,
        "grad_cam_layer": outcome.grad_cam_layer if grad_cam_layer is None else grad_cam_layer,
        "model_path": model_path or outcome.model_file,
        "validation": prediction_block(outcome.val, outcome.val_logits, temperature),
        "test": prediction_block(test, outcome.test_logits, temperature),
    }


def calibration_block(fit: TemperatureFit, folds: int) -> dict:
    """The ``calibration`` block: the fit and what it was fitted on."""
    fitted_on = "validation logits" if folds == 1 else "pooled out-of-fold validation logits"
    return calibration_record(fit, fitted_on)


def cross_validation_block(outcomes: dict[str, ModelOutcome], fold_of_patient: dict[str, int],
                           best: str) -> dict:
    """The ``cross_validation`` block (``--folds`` > 1): folds, patients, AUCs per fold."""
    folds = len(outcomes[best].fold_val_auc)
    per_model = {}
    for name, outcome in outcomes.items():
        defined = [value for value in outcome.fold_val_auc if value is not None]
        per_model[name] = {
            "fold_val_auc": list(outcome.fold_val_auc),
            "mean": float(np.mean(defined)) if defined else None,
            "std": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
            "oof_val_auc": outcome.val_auc,
        }
    return {
        "folds": folds,
        "stratified_by": "patient label",
        "fold_of_patient": dict(sorted(fold_of_patient.items())),
        "models": per_model,
        "selected": best,
    }


def log_summary(results: dict, out_dir: Path) -> None:
    """One line per model, then the threshold, temperature and files written."""
    for name, outcome in results["models"].items():
        test_auc = outcome["test_auc"]
        LOG.info(
            "%-9s val AUC %.3f  test AUC %s  %6.1f s  %s%s",
            name,
            outcome["val_auc"],
            "  n/a" if test_auc is None else f"{test_auc:.3f}",
            outcome["train_seconds"],
            outcome["weights_source"],
            "  <- selected" if name == results["best_model"] else "",
        )
    calibration = results["calibration"]
    LOG.info(
        "temperature %.3f (validation log loss %.4f -> %.4f); threshold %.4f (Youden's J on "
        "calibrated validation); wrote %s, %s and %s in %s",
        calibration["temperature"],
        calibration["val_log_loss_before"],
        calibration["val_log_loss_after"],
        results["threshold"]["value"],
        contract.MODEL_FILES["h5"],
        contract.MODEL_FILES["keras"],
        contract.RESULTS_FILE,
        out_dir.resolve(),
    )
