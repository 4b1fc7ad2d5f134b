"""Classification metrics with patient-level bootstrap confidence intervals and calibration.

Every metric is computed by one set of vectorised kernels that take a matrix of sample
weights, shape (resamples, units): the point estimate uses a single row of ones, and the
bootstrap uses, for each resample, how many times each unit's patient was drawn. Resampling
patients (stratified by patient label) and never slices keeps the slices of one patient
together, as they are not independent (Efron & Tibshirani 1993, ch. 13, percentile interval).

Definitions (the report repeats them):
    AUC: area under the ROC curve, ties counted as one half (Mann-Whitney U / (P * N)).
    Average precision: sum over thresholds of (R_k - R_(k-1)) * P_k, as scikit-learn computes it.
    At threshold t a unit is predicted positive when its probability is >= t.
    ECE: sum over 10 equal-width probability bins [0, 0.1), ..., [0.9, 1.0] of
    (n_bin / n) * |observed positive rate - mean predicted probability| (Naeini et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PROPORTIONS",
    "THRESHOLD_METRICS",
    "RANKING_METRICS",
    "LevelData",
    "bootstrap_counts",
    "weighted_auc",
    "weighted_average_precision",
    "threshold_replicates",
    "calibration_replicates",
    "calibration_bins",
    "wilson_interval",
    "auc",
    "evaluate_level",
    "summarise",
    "paired_auc_difference",
    "roc_band",
]

Z_95 = 1.959963984540054
N_CALIBRATION_BINS = 10
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
THRESHOLD_METRICS = (*PROPORTIONS, "f1")
RANKING_METRICS = ("auc", "average_precision")
BOOTSTRAP_CHUNK = 256
UNDEFINED_REASONS = {
    "sensitivity": "no positive units",
    "specificity": "no negative units",
    "ppv": "no unit is predicted positive at the threshold",
    "npv": "no unit is predicted negative at the threshold",
    "accuracy": "no units",
    "f1": "no positive units and none predicted positive",
}


@dataclass(frozen=True)
class LevelData:
    """Labels and scores of the units at one level (slices, nodules or patients).

    Attributes:
        name: ``slice_level``, ``nodule_level`` or ``patient_level``.
        y_true: (n,) 0/1 labels, 1 = cancer.
        y_prob: (n,) predicted probability of cancer in [0, 1].
        patient_index: (n,) index of each unit's patient in the bootstrap's patient list.
        negative_kind: (n,) ``benign_nodule`` / ``no_finding`` for negatives, ``""`` otherwise.
    """

    name: str
    y_true: np.ndarray
    y_prob: np.ndarray
    patient_index: np.ndarray
    negative_kind: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.y_true)
        for field in ("y_prob", "patient_index", "negative_kind"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"{field} has {len(getattr(self, field))} entries, y_true {n}")
        if not np.isin(self.y_true, (0, 1)).all():
            raise ValueError(f"y_true must be 0/1, got values {np.unique(self.y_true)}")
        in_range = np.isfinite(self.y_prob) & (self.y_prob >= 0) & (self.y_prob <= 1)
        if n and not in_range.all():
            raise ValueError(f"y_prob must lie in [0, 1], got range "
                             f"[{np.min(self.y_prob)}, {np.max(self.y_prob)}]")

    def subset(self, keep: np.ndarray, name: str | None = None) -> LevelData:
        """Return the units where boolean ``keep`` is true."""
        return LevelData(
            name or self.name, self.y_true[keep], self.y_prob[keep],
            self.patient_index[keep], self.negative_kind[keep],
        )


def bootstrap_counts(patient_labels: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Draw a patient-level bootstrap stratified by patient label.

    Within each label stratum of size m, every resample draws m patients with replacement,
    so each resample keeps the number of cancer and non-cancer patients of the test split.

    Args:
        patient_labels: (n_patients,) 0/1 label of each patient.
        n_resamples: number of resamples B (> 0).
        seed: seed of the NumPy generator.

    Returns:
        (B, n_patients) int32 array: how often each patient appears in each resample.
    """
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, len(patient_labels)), dtype=np.int32)
    for label in np.unique(patient_labels):
        members = np.flatnonzero(patient_labels == label)
        draws = rng.integers(0, len(members), size=(n_resamples, len(members)))
        offsets = draws + np.arange(n_resamples)[:, None] * len(members)
        per_row = np.bincount(offsets.ravel(), minlength=n_resamples * len(members))
        counts[:, members] = per_row.reshape(n_resamples, len(members))
    return counts


def _tie_groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted score vector."""
    if len(sorted_scores) == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def _grouped(weights: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum the columns of ``weights`` (taken in ``order``) within each tie group."""
    return np.add.reduceat(weights[:, order], starts, axis=1)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio; NaN where the denominator is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1),
                        np.nan)


def weighted_auc(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of ``weights`` (Mann-Whitney, ties count one half).

    Returns:
        (rows,) AUC, NaN where a row has no positive or no negative weight.
    """
    if y_true.size == 0:
        return np.full(len(weights), np.nan)
    order = np.argsort(y_prob, kind="stable")
    starts = _tie_groups(y_prob[order])
    pos = _grouped(weights * y_true, order, starts)
    neg = _grouped(weights * (1 - y_true), order, starts)
    neg_below = np.cumsum(neg, axis=1) - neg
    numerator = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
    return _divide(numerator, pos.sum(axis=1) * neg.sum(axis=1))


def weighted_average_precision(
    y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Average precision for each row of ``weights`` (step-wise, as scikit-learn).

    Returns:
        (rows,) AP, NaN where a row has no positive weight.
    """
    if y_true.size == 0:
        return np.full(len(weights), np.nan)
    order = np.argsort(-y_prob, kind="stable")
    starts = _tie_groups(-y_prob[order])
    true_pos = np.cumsum(_grouped(weights * y_true, order, starts), axis=1)
    false_pos = np.cumsum(_grouped(weights * (1 - y_true), order, starts), axis=1)
    positives = true_pos[:, -1:]
    precision = np.nan_to_num(_divide(true_pos, true_pos + false_pos))
    recall = _divide(true_pos, np.broadcast_to(positives, true_pos.shape))
    steps = np.diff(np.nan_to_num(recall), axis=1, prepend=0.0)
    return np.where(positives[:, 0] > 0, np.sum(steps * precision, axis=1), np.nan)


def threshold_replicates(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Confusion counts and the threshold metrics for each row of ``weights``.

    Returns:
        ``tp``, ``fp``, ``fn``, ``tn`` and every name of THRESHOLD_METRICS, each (rows,).
    """
    predicted = (y_prob >= threshold).astype(np.float64)
    actual = y_true.astype(np.float64)
    tp = weights @ (predicted * actual)
    fp = weights @ (predicted * (1 - actual))
    fn = weights @ ((1 - predicted) * actual)
    tn = weights @ ((1 - predicted) * (1 - actual))
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": _divide(tp, tp + fn),
        "specificity": _divide(tn, tn + fp),
        "ppv": _divide(tp, tp + fp),
        "npv": _divide(tn, tn + fn),
        "accuracy": _divide(tp + tn, tp + tn + fp + fn),
        "f1": _divide(2 * tp, 2 * tp + fp + fn),
    }


def _bin_index(y_prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bin of each probability; 1.0 falls in the last bin."""
    return np.minimum((y_prob * n_bins).astype(np.intp), n_bins - 1)


def calibration_replicates(
    y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray, n_bins: int = N_CALIBRATION_BINS
) -> dict[str, np.ndarray]:
    """Brier score and ECE (equal-width bins) for each row of ``weights``.

    ECE = sum_b |sum_{i in b} w_i (y_i - p_i)| / sum_i w_i, which equals
    sum_b (n_b / n) |observed rate_b - mean probability_b|.
    """
    total = weights.sum(axis=1)
    brier = _divide(weights @ (y_prob - y_true) ** 2, total)
    one_hot = np.eye(n_bins)[_bin_index(y_prob, n_bins)]
    gap_per_bin = weights @ ((y_true - y_prob)[:, None] * one_hot)
    ece = _divide(np.abs(gap_per_bin).sum(axis=1), total)
    return {"brier": brier, "ece": ece}


def calibration_bins(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = N_CALIBRATION_BINS
) -> list[dict[str, float | int | None]]:
    """Reliability-diagram table: per equal-width bin, its count, mean probability and rate."""
    index = _bin_index(y_prob, n_bins)
    rows = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        rows.append({
            "lower": b / n_bins, "upper": (b + 1) / n_bins, "n": count,
            "mean_predicted": float(y_prob[members].mean()) if count else None,
            "observed_rate": float(y_true[members].mean()) if count else None,
        })
    return rows


def wilson_interval(successes: float, total: float, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (Wilson 1927); None when total is 0."""
    if successes < 0 or successes > total:
        raise ValueError(f"successes must lie in [0, total={total}], got {successes}")
    if total == 0:
        return None
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def auc(y_true: np.ndarray, y_prob: np.ndarray) -> float | None:
    """ROC AUC of one set of scores (the kernel of :func:`weighted_auc`); None if undefined."""
    y_true = np.asarray(y_true, dtype=np.float64)
    value = weighted_auc(y_true, np.asarray(y_prob, dtype=np.float64),
                         np.ones((1, len(y_true))))[0]
    return float(value) if np.isfinite(value) else None


def _class_reason(level: LevelData) -> str:
    """Why a ranking metric is undefined at ``level`` (one class present or none)."""
    n = len(level.y_true)
    if n == 0:
        return f"no units at {level.name}"
    present = "cancer" if level.y_true.max() == 1 else "non_cancer"
    return f"only class {present} is present among the {n} units; the metric needs both classes"




def summarise(point: float, replicates: np.ndarray | None, reason: str) -> dict:
    """JSON block ``{value, ci_low, ci_high}``; ``null`` values and ``reason`` when undefined.

    The interval is the 2.5th and 97.5th percentile of the finite bootstrap replicates;
    ``resamples_undefined`` counts resamples where the metric was undefined.
    """
    if not np.isfinite(point):
        return {"value": None, "ci_low": None, "ci_high": None, "reason": reason}
    block: dict = {"value": float(point), "ci_low": None, "ci_high": None}
    if replicates is None:
        return block
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        block["reason"] = f"undefined in every bootstrap resample ({reason})"
        return block
    block["ci_low"], block["ci_high"] = (float(v) for v in np.percentile(finite, [2.5, 97.5]))
    if finite.size < replicates.size:
        block["resamples_undefined"] = int(replicates.size - finite.size)
    return block


def _replicates(level: LevelData, threshold: float | None, counts: np.ndarray) -> dict:
    """All metrics of ``level`` for every resample in ``counts``, in chunks of rows."""
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(counts), BOOTSTRAP_CHUNK):
        weights = counts[start:start + BOOTSTRAP_CHUNK][:, level.patient_index].astype(np.float64)
        parts.append(_all_metrics(level, threshold, weights))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _all_metrics(level: LevelData, threshold: float | None, weights: np.ndarray) -> dict:
    """Ranking, threshold, calibration and per-negative-kind metrics for rows of weights."""
    y_true, y_prob = level.y_true, level.y_prob
    out = {
        "auc": weighted_auc(y_true, y_prob, weights),
        "average_precision": weighted_average_precision(y_true, y_prob, weights),
        **calibration_replicates(y_true, y_prob, weights),
    }
    if threshold is not None:
        out.update(threshold_replicates(y_true, y_prob, threshold, weights))
        for kind in _negative_kinds(level):
            keep = level.negative_kind == kind
            kind_counts = threshold_replicates(
                y_true[keep], y_prob[keep], threshold, weights[:, keep])
            out[f"specificity:{kind}"] = kind_counts["specificity"]
    return out


def _negative_kinds(level: LevelData) -> list[str]:
    """Negative kinds present at ``level`` (sorted, empty strings dropped)."""
    return sorted(k for k in set(level.negative_kind[level.y_true == 0].tolist()) if k)


def evaluate_level(
    level: LevelData, threshold: float | None, counts: np.ndarray | None,
    wilson: bool = False, calibration: bool = False,
) -> dict:
    """Every metric of one level as the report.json block.

    Args:
        level: the units of the level.
        threshold: operating threshold (chosen on validation) or None.
        counts: (B, n_patients) bootstrap counts, or None for point estimates only.
        wilson: add Wilson intervals to the proportions (patient level only, where units are
            independent).
        calibration: add ``brier`` and ``ece`` (meaningful where scores are probabilities).

    Returns:
        Dict with one ``{value, ci_low, ci_high}`` block per metric, ``threshold``,
        ``confusion_matrix``, ``n`` and ``specificity_by_negative_kind``.
    """
    point = _all_metrics(level, threshold, np.ones((1, len(level.y_true))))
    reps = _replicates(level, threshold, counts) if counts is not None and len(level.y_true) else {}
    block: dict = {
        metric: summarise(point[metric][0], reps.get(metric), _class_reason(level))
        for metric in RANKING_METRICS
    }
    if calibration:
        for metric in ("brier", "ece"):
            block[metric] = summarise(point[metric][0], reps.get(metric), "no units")
    block["threshold"] = threshold
    block["n"] = {
        "total": int(len(level.y_true)), "positive": int(level.y_true.sum()),
        "negative": int(len(level.y_true) - level.y_true.sum()),
        "patients": int(len(np.unique(level.patient_index))),
    }
    if threshold is None:
        for metric in THRESHOLD_METRICS:
            block[metric] = summarise(np.nan, None, "no threshold was chosen on validation")
        return block
    for metric in THRESHOLD_METRICS:
        block[metric] = summarise(point[metric][0], reps.get(metric), UNDEFINED_REASONS[metric])
    cm = {key: int(round(point[key][0])) for key in ("tn", "fp", "fn", "tp")}
    block["confusion_matrix"] = {**cm, "rows": "true class", "columns": "predicted class",
                                 "matrix": [[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]]}
    if wilson:
        _add_wilson(block, cm)
    block["specificity_by_negative_kind"] = {
        kind: {**summarise(point[f"specificity:{kind}"][0], reps.get(f"specificity:{kind}"),
                           f"no {kind} negatives"),
               "n": int(np.sum(level.negative_kind == kind))}
        for kind in _negative_kinds(level)
    }
    return block


def _add_wilson(block: dict, cm: dict[str, int]) -> None:
    """Add ``wilson_low``/``wilson_high`` to the proportion blocks from confusion counts."""
    tp, fp, fn, tn = cm["tp"], cm["fp"], cm["fn"], cm["tn"]
    fractions = {
        "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn), "accuracy": (tp + tn, tp + tn + fp + fn),
    }
    for metric, (successes, total) in fractions.items():
        interval = wilson_interval(successes, total)
        block[metric]["wilson_low"] = interval[0] if interval else None
        block[metric]["wilson_high"] = interval[1] if interval else None


def paired_auc_difference(
    y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray,
    patient_index: np.ndarray, counts: np.ndarray | None, reason: str = "",
) -> dict:
    """AUC(a) - AUC(b) on the same units with a paired bootstrap (the same resamples).

    Returns:
        ``{value, ci_low, ci_high}`` (``null`` and ``reason`` when either AUC is undefined).
    """
    if not (len(y_true) == len(prob_a) == len(prob_b) == len(patient_index)):
        raise ValueError(f"lengths differ: {len(y_true)}, {len(prob_a)}, {len(prob_b)}, "
                         f"{len(patient_index)}")
    ones = np.ones((1, len(y_true)))
    point = weighted_auc(y_true, prob_a, ones)[0] - weighted_auc(y_true, prob_b, ones)[0]
    replicates = None
    if counts is not None and len(y_true):
        chunks = []
        for start in range(0, len(counts), BOOTSTRAP_CHUNK):
            weights = counts[start:start + BOOTSTRAP_CHUNK][:, patient_index].astype(np.float64)
            chunks.append(weighted_auc(y_true, prob_a, weights)
                          - weighted_auc(y_true, prob_b, weights))
        replicates = np.concatenate(chunks)
    return summarise(point, replicates, reason or "AUC undefined: both classes are needed")


def roc_band(
    level: LevelData, counts: np.ndarray, fpr_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise 2.5/97.5 percentile band of bootstrap ROC curves (TPR at each FPR of the grid).

    Returns:
        (tpr_low, tpr_high), or None when no resample has both classes.
    """
    order = np.argsort(-level.y_prob, kind="stable")
    starts = _tie_groups(-level.y_prob[order])
    curves = []
    for start in range(0, len(counts), BOOTSTRAP_CHUNK):
        weights = counts[start:start + BOOTSTRAP_CHUNK][:, level.patient_index].astype(np.float64)
        tp = np.cumsum(_grouped(weights * level.y_true, order, starts), axis=1)
        fp = np.cumsum(_grouped(weights * (1 - level.y_true), order, starts), axis=1)
        for tp_row, fp_row in zip(tp, fp, strict=True):
            if tp_row[-1] > 0 and fp_row[-1] > 0:
                fpr = np.r_[0.0, fp_row / fp_row[-1]]
                tpr = np.r_[0.0, tp_row / tp_row[-1]]
                curves.append(np.interp(fpr_grid, fpr, tpr))
    if not curves:
        return None
    low, high = np.percentile(np.asarray(curves), [2.5, 97.5], axis=0)
    return low, high
