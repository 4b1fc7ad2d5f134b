"""Calibration of the selected model on the test slices, before and after temperature scaling.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", sec. 4.2)
divides the logit by one positive T fitted on validation; training records T and both sets of
test probabilities (``y_prob`` after, ``y_prob_uncalibrated`` before). For each set this
module gives Brier score, log loss and ECE with patient-bootstrap 95% CIs: Brier and ECE by
``lungct.metrics.calibration_replicates`` (the one implementation, 10 equal-width bins), log
loss by the same weighting, ``sum_i w_i * -[y_i log p_i + (1 - y_i) log(1 - p_i)] / sum_i w_i``
with p clipped to [1e-7, 1 - 1e-7] (Keras' epsilon, as the training loss).

ECE is biased upward at a finite sample: a perfectly calibrated model still shows a gap in
every bin. The reference ECE is that of a perfectly calibrated model with these very
probabilities: labels drawn as y ~ Bernoulli(p) for the model's own test probabilities,
``ECE_REFERENCE_SIMULATIONS`` times with the report's seed (consistency resampling, Broecker &
Smith 2007); its mean and 95th percentile stand beside the observed ECE.
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Any

import numpy as np

from lungct.errors import UserError
from lungct.interpret.html_parts import ci_text, html_table
from lungct.metrics import (
    N_CALIBRATION_BINS,
    LevelData,
    calibration_bins,
    calibration_replicates,
    summarise,
)

__all__ = [
    "ECE_REFERENCE_SIMULATIONS",
    "LOG_LOSS_EPSILON",
    "log_loss_replicates",
    "calibration_metrics",
    "ece_reference",
    "calibration_block",
    "calibration_html",
]

LOG_LOSS_EPSILON = 1e-7
ECE_REFERENCE_SIMULATIONS = 2000
METRICS = ("brier", "log_loss", "ece")
METRIC_NAMES = {"brier": "Brier score", "log_loss": "log loss", "ece": "ECE (10 bins)"}


def log_loss_replicates(y_true: np.ndarray, y_prob: np.ndarray,
                        weights: np.ndarray) -> np.ndarray:
    """Weighted mean binary cross-entropy for each row of ``weights``; NaN for a zero row."""
    clipped = np.clip(np.asarray(y_prob, np.float64), LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
    per_unit = -(y_true * np.log(clipped) + (1 - y_true) * np.log(1 - clipped))
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights @ per_unit / np.where(total > 0, total, 1), np.nan)


def calibration_metrics(level: LevelData, counts: np.ndarray | None) -> dict[str, dict]:
    """Brier, log loss and ECE of ``level`` as metric blocks with patient-bootstrap CIs.

    Args:
        level: the units (test slices) with their labels, probabilities and patients.
        counts: (B, n_patients) bootstrap counts, or None for point estimates only.
    """
    if len(level.y_true) == 0:
        return {metric: summarise(np.nan, None, "no units") for metric in METRICS}
    y_true = level.y_true.astype(np.float64)

    def all_three(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {**calibration_replicates(y_true, level.y_prob, weights),
                "log_loss": log_loss_replicates(y_true, level.y_prob, weights)}

    point = all_three(np.ones((1, len(y_true))))
    replicates = (all_three(counts[:, level.patient_index].astype(np.float64))
                  if counts is not None else {})
    return {metric: summarise(point[metric][0], replicates.get(metric), "no units")
            for metric in METRICS}


def ece_reference(y_prob: np.ndarray, seed: int,
                  simulations: int = ECE_REFERENCE_SIMULATIONS) -> dict[str, Any]:
    """ECE of a perfectly calibrated model with probabilities ``y_prob`` (y ~ Bernoulli(p)).

    Returns:
        ``mean`` and ``p95`` of the simulated ECEs (None without units), ``simulations``,
        ``seed``, ``n`` and ``n_bins``.
    """
    if simulations < 1:
        raise ValueError(f"simulations must be >= 1, got {simulations}")
    y_prob = np.asarray(y_prob, np.float64)
    block: dict[str, Any] = {"mean": None, "p95": None, "simulations": simulations,
                             "seed": seed, "n": int(len(y_prob)), "n_bins": N_CALIBRATION_BINS}
    if len(y_prob) == 0:
        return block
    rng = np.random.default_rng(seed)
    ones = np.ones((1, len(y_prob)))
    draws = (rng.random((simulations, len(y_prob))) < y_prob).astype(np.float64)
    eces = np.array([calibration_replicates(y, y_prob, ones)["ece"][0] for y in draws])
    block["mean"], block["p95"] = float(eces.mean()), float(np.percentile(eces, 95))
    return block


def _recorded(results: dict) -> dict | None:
    """training_results.json ``calibration``, checked; None when the run was not calibrated."""
    record = results.get("calibration")
    if record is None:
        return None
    for key in ("val_log_loss_before", "val_log_loss_after"):
        value = record.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)
                                  or not math.isfinite(value) or value < 0):
            raise UserError(f"training_results.json calibration.{key} must be a finite number "
                            f">= 0, got {value!r}; re-run training_lung_cnn.py.")
    return record


def _phase(level: LevelData, counts: np.ndarray | None, seed: int) -> dict:
    return {**calibration_metrics(level, counts),
            "ece_reference": ece_reference(level.y_prob, seed),
            "bins": calibration_bins(level.y_true, level.y_prob)}


def calibration_block(slice_level: LevelData, uncalibrated: np.ndarray | None, results: dict,
                      counts: np.ndarray | None, seed: int) -> dict:
    """The report.json ``calibration`` block of the selected model's test slices.

    Args:
        slice_level: test slices with the model's probabilities (after scaling, when scaled).
        uncalibrated: the same slices' ``y_prob_uncalibrated``, or None.
        results: training_results.json (its ``calibration`` record, when present).
        counts: patient-bootstrap counts.
        seed: seed of the ECE reference simulation.

    Raises:
        UserError: a temperature is recorded but the test block lacks the probabilities before
            scaling, or a recorded validation log loss is not a finite number >= 0.
    """
    record = _recorded(results)
    after = _phase(slice_level, counts, seed)
    block = {"level": "slice_level", "n_bins": N_CALIBRATION_BINS, **after,
             "temperature": None}
    if record is None:
        return block
    if uncalibrated is None:
        raise UserError("training_results.json records a calibration temperature but its test "
                        "block lacks y_prob_uncalibrated; re-run training_lung_cnn.py.")
    before = _phase(dataclasses.replace(slice_level, y_prob=np.asarray(uncalibrated)), counts,
                    seed)
    return {**block, "temperature": float(record["temperature"]),
            "method": record.get("method"), "fitted_on": record.get("fitted_on"),
            "n_fit": record.get("n"), "val_log_loss_before": record.get("val_log_loss_before"),
            "val_log_loss_after": record.get("val_log_loss_after"),
            "before": before, "after": {k: v for k, v in after.items() if k != "bins"}}


def _reference_text(reference: dict) -> str:
    if reference["mean"] is None:
        return "-"
    return f"{reference['mean']:.3f} (95th percentile {reference['p95']:.3f})"


def calibration_html(block: dict) -> str:
    """The calibration section: one row of metrics, or before and after temperature scaling."""
    header = ["probabilities", *(f"{METRIC_NAMES[m]} [95% CI]" for m in METRICS),
              "ECE of a perfectly calibrated model"]

    def row(name: str, phase: dict) -> list[str]:
        return [name, *(ci_text(phase[m]) for m in METRICS),
                _reference_text(phase["ece_reference"])]

    reference = block["ece_reference"]
    note = (f"<p>The reference ECE is the mean (and 95th percentile) over "
            f"{reference['simulations']} simulations (seed {reference['seed']}) of the ECE of "
            f"labels drawn as Bernoulli(p) from the model's own {reference['n']} test "
            "probabilities: an observed ECE near it is what a perfectly calibrated model shows "
            "at this sample size.</p>")
    if block["temperature"] is None:
        return ("<h2>Calibration (slice level)</h2>" + html_table(header, [row("as scored",
                                                                               block)]) + note)
    fit = (f"<p>Temperature T = {block['temperature']:.3f} "
           f"({html.escape(str(block['method']))}), fitted on "
           f"{html.escape(str(block['fitted_on']))} "
           f"({html.escape(str(block['n_fit']))} samples); validation log loss "
           f"{_number(block['val_log_loss_before'])} before, "
           f"{_number(block['val_log_loss_after'])} after.</p>")
    return ("<h2>Calibration (slice level, test split)</h2>" + fit
            + html_table(header, [row("before temperature scaling", block["before"]),
                                  row("after temperature scaling", block["after"])]) + note)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "not recorded"
