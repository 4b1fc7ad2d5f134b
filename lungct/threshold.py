"""The decision threshold, chosen on validation: Youden's J.

Training applies it to the selected model, interpretation to every other model and to the
diameter baseline, so the rule has one implementation.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

__all__ = ["THRESHOLD_RULE", "youden_threshold"]

THRESHOLD_RULE = "youden_j_on_validation"


def youden_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> dict | None:
    """The cut-off that maximises Youden's J = sensitivity + specificity - 1 (Youden 1950).

    Candidates are the observed probabilities; a unit is called cancer when its probability
    is ``>=`` the threshold; ties in J go to the highest threshold. Computed from
    scikit-learn's ROC curve with every distinct score kept.

    Returns:
        ``{value, rule, comparison, youden_j, sensitivity, specificity}``, or None when a
        class is missing.

    Raises:
        ValueError: the arrays differ in length.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} differ")
    if len(np.unique(y_true)) < 2:
        return None
    false_positive_rate, true_positive_rate, thresholds = roc_curve(
        y_true, y_prob, drop_intermediate=False)
    j = np.where(np.isfinite(thresholds), true_positive_rate - false_positive_rate, -np.inf)
    best = int(np.argmax(j))
    return {
        "value": float(thresholds[best]),
        "rule": THRESHOLD_RULE,
        "comparison": ">=",
        "youden_j": float(j[best]),
        "sensitivity": float(true_positive_rate[best]),
        "specificity": float(1.0 - false_positive_rate[best]),
    }
