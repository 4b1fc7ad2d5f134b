"""A baseline that uses no pixels: logistic regression on the annotated nodule diameter.

Fitted on the training split's nodule-bearing samples, thresholded on the validation split
(Youden's J) and scored on the test samples that contain a nodule, where a diameter exists and
"there is a nodule" alone does not separate the classes. It shows how much the images add over
size, the strongest single clinical predictor of malignancy (McWilliams et al. 2013, NEJM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from lungct.threshold import THRESHOLD_RULE, youden_threshold

__all__ = ["DiameterBaseline", "fit_diameter_baseline"]


@dataclass(frozen=True)
class DiameterBaseline:
    """p(cancer) = sigmoid(coefficient_per_mm * diameter_mm + intercept).

    Attributes:
        coefficient_per_mm: log-odds change per millimetre of diameter.
        intercept: log-odds at 0 mm.
        threshold: probability threshold chosen on validation, None when validation lacks a
            class.
        n_train: training samples used.
        n_validation: validation samples used.
    """

    coefficient_per_mm: float
    intercept: float
    threshold: float | None
    n_train: int
    n_validation: int

    def predict(self, diameter_mm: np.ndarray) -> np.ndarray:
        """Probability of cancer for each diameter in millimetres."""
        diameter_mm = np.asarray(diameter_mm, dtype=np.float64)
        if not np.isfinite(diameter_mm).all():
            raise ValueError("diameter_mm must be finite for every sample")
        return 1.0 / (1.0 + np.exp(-(self.coefficient_per_mm * diameter_mm + self.intercept)))

    def to_json(self) -> dict:
        """The fitted parameters for report.json."""
        return {
            "model": "logistic regression on diameter_mm",
            "coefficient_per_mm": self.coefficient_per_mm, "intercept": self.intercept,
            "threshold": self.threshold, "threshold_rule": THRESHOLD_RULE,
            "n_train": self.n_train, "n_validation": self.n_validation,
        }


def fit_diameter_baseline(
    train_diameter_mm: np.ndarray, train_labels: np.ndarray,
    validation_diameter_mm: np.ndarray, validation_labels: np.ndarray,
) -> DiameterBaseline:
    """Fit the diameter model on train and choose its threshold on validation.

    The diameter is standardised for fitting (L2 penalty C=1, scikit-learn's default) and the
    coefficients are mapped back to millimetres.

    Raises:
        ValueError: the training samples do not contain both classes.
    """
    train_diameter_mm = np.asarray(train_diameter_mm, dtype=np.float64)
    train_labels = np.asarray(train_labels)
    if len(np.unique(train_labels)) < 2:
        raise ValueError(f"the training split's {len(train_labels)} nodule samples hold only "
                         "one class; the diameter baseline needs both")
    mean = float(train_diameter_mm.mean())
    scale = float(train_diameter_mm.std()) or 1.0
    fitted = LogisticRegression().fit(((train_diameter_mm - mean) / scale)[:, None], train_labels)
    coefficient = float(fitted.coef_[0, 0]) / scale
    intercept = float(fitted.intercept_[0]) - coefficient * mean
    partial = DiameterBaseline(coefficient, intercept, None, len(train_labels),
                               len(validation_labels))
    chosen = (youden_threshold(np.asarray(validation_labels),
                               partial.predict(validation_diameter_mm))
              if len(validation_labels) else None)
    threshold = chosen["value"] if chosen else None
    if threshold is not None and not math.isfinite(threshold):
        threshold = None
    return DiameterBaseline(coefficient, intercept, threshold, len(train_labels),
                            len(validation_labels))
