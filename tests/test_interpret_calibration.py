"""Tests of lungct.interpret.calibration_report and lungct.interpret.cross_validation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from lungct.errors import UserError
from lungct.interpret.calibration_report import (
    calibration_block,
    calibration_metrics,
    ece_reference,
    log_loss_replicates,
)
from lungct.interpret.cross_validation import cross_validation_block
from lungct.metrics import LevelData, bootstrap_counts


def slice_level(y_true: list[int], y_prob: list[float], patients: list[int]) -> LevelData:
    return LevelData("slice_level", np.asarray(y_true), np.asarray(y_prob, np.float64),
                     np.asarray(patients), np.asarray([""] * len(y_true)))


@pytest.fixture
def level() -> LevelData:
    """Eight slices of four patients (two with cancer), probabilities spread over bins."""
    return slice_level([1, 1, 1, 0, 0, 0, 1, 0], [0.9, 0.7, 0.35, 0.2, 0.6, 0.05, 0.8, 0.3],
                       [0, 0, 1, 1, 2, 2, 3, 3])


def test_log_loss_is_weighted_cross_entropy():
    """Row of ones: the mean of -log p of the true class; a zero row is NaN."""
    weights = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    values = log_loss_replicates(np.array([1.0, 0.0]), np.array([0.8, 0.4]), weights)
    assert values[0] == pytest.approx((-np.log(0.8) - np.log(0.6)) / 2)
    assert values[1] == pytest.approx(-np.log(0.8))
    assert np.isnan(values[2])


def test_log_loss_of_a_certain_mistake_is_finite():
    """Probabilities 0 and 1 are clipped to [1e-7, 1 - 1e-7], as the training loss."""
    value = log_loss_replicates(np.array([1.0]), np.array([0.0]), np.ones((1, 1)))[0]
    assert value == pytest.approx(-np.log(1e-7))


def test_calibration_metrics_match_scikit_learn(level):
    """Point values equal scikit-learn's Brier and log loss; CIs come from the bootstrap."""
    counts = bootstrap_counts(np.array([1, 0, 0, 1]), 300, seed=0)
    block = calibration_metrics(level, counts)
    assert block["brier"]["value"] == pytest.approx(brier_score_loss(level.y_true, level.y_prob))
    assert block["log_loss"]["value"] == pytest.approx(log_loss(level.y_true, level.y_prob))
    for metric in ("brier", "log_loss", "ece"):
        assert block[metric]["ci_low"] <= block[metric]["value"] <= block[metric]["ci_high"]


def test_ece_reference_matches_the_binomial_expectation():
    """150 slices all at p = 0.5 share one bin: ECE = |mean(y) - 0.5|, whose expectation is
    about sqrt(2 / pi) * sqrt(0.25 / 150) = 0.0326; the draw is seeded."""
    reference = ece_reference(np.full(150, 0.5), seed=3)
    assert reference["mean"] == pytest.approx(np.sqrt(2 / np.pi) * np.sqrt(0.25 / 150), abs=0.002)
    assert reference["p95"] > reference["mean"]
    assert reference == ece_reference(np.full(150, 0.5), seed=3)
    assert {k: reference[k] for k in ("simulations", "seed", "n", "n_bins")} == {
        "simulations": 2000, "seed": 3, "n": 150, "n_bins": 10}


def test_ece_reference_at_150_slices_over_10_bins():
    """Spread over the ten bins, 150 perfectly calibrated slices still show an ECE near
    0.075: ECE alone cannot show a gain there."""
    probabilities = np.random.default_rng(0).uniform(0, 1, 150)
    assert ece_reference(probabilities, seed=0)["mean"] == pytest.approx(0.075, abs=0.01)


def test_ece_reference_without_units():
    """No slices: mean and p95 are None."""
    assert ece_reference(np.zeros(0), seed=0)["mean"] is None


def test_calibration_block_before_and_after(level):
    """A calibrated run gets before/after blocks, the temperature and validation log losses;
    the top-level values are the model's own (after)."""
    results = {"calibration": {"method": "temperature", "temperature": 2.0, "n": 10,
                               "fitted_on": "validation", "val_log_loss_before": 0.9,
                               "val_log_loss_after": 0.7}}
    before = np.clip(level.y_prob * 1.2 - 0.1, 0, 1)
    block = calibration_block(level, before, results, None, seed=0)
    assert block["temperature"] == 2.0 and block["val_log_loss_after"] == 0.7
    assert block["after"]["brier"] == block["brier"]
    assert block["before"]["brier"]["value"] == pytest.approx(
        brier_score_loss(level.y_true, before))
    assert block["before"]["ece_reference"]["n"] == 8


def test_uncalibrated_results_give_one_block(level):
    """Without a temperature: one block, temperature None, no before/after."""
    block = calibration_block(level, None, {}, None, seed=0)
    assert block["temperature"] is None and "before" not in block and "after" not in block
    assert set(block) >= {"brier", "log_loss", "ece", "ece_reference", "bins"}


def test_temperature_without_uncalibrated_probabilities_is_refused(level):
    """A temperature with no y_prob_uncalibrated is one sentence naming the stage to re-run."""
    with pytest.raises(UserError, match="lacks y_prob_uncalibrated; re-run training_lung_cnn"):
        calibration_block(level, None, {"calibration": {"temperature": 1.5}}, None, seed=0)


def test_bad_validation_log_loss_is_refused(level):
    """A recorded validation log loss that is not a finite number >= 0 is refused."""
    results = {"calibration": {"temperature": 1.5, "val_log_loss_before": -1}}
    with pytest.raises(UserError, match=r"calibration.val_log_loss_before must be a finite "):
        calibration_block(level, level.y_prob, results, None, seed=0)


def cv_results(**change) -> dict:
    record = {"folds": 3, "stratified_by": "patient label",
              "fold_of_patient": {"A": 0, "B": 1, "C": 2, "D": 0},
              "models": {"baseline": {"fold_val_auc": [0.7, 0.8, None], "mean": 0.75,
                                      "std": 0.07, "oof_val_auc": 0.74}},
              "selected": "baseline"}
    return {"best_model": "baseline", "cross_validation": {**record, **change}}


def test_cross_validation_block_reads_the_folds():
    """Fold AUCs (null for an undefined fold), patients per fold, the ensemble statement."""
    block = cross_validation_block(cv_results())
    assert block["patients_per_fold"] == [2, 1, 1]
    assert block["models"]["baseline"]["fold_val_auc"] == [0.7, 0.8, None]
    assert "3-member baseline ensemble" in block["test_metrics"]
    assert cross_validation_block({"best_model": "baseline"}) is None


@pytest.mark.parametrize(("change", "message"), [
    ({"folds": 1}, r"cross_validation.folds must be an integer >= 2, got 1"),
    ({"models": {"baseline": {"fold_val_auc": [0.7]}}}, r"one AUC per fold \(3\)"),
    ({"models": {"baseline": {"fold_val_auc": [0.7, 1.2, 0.5]}}},
     r"fold_val_auc\[1\] must be an AUC in \[0, 1\] or null, got 1.2"),
    ({"selected": "vgg16"}, r"selected 'vgg16' is not best_model 'baseline'"),
])
def test_malformed_cross_validation_is_refused(change, message):
    """Each malformed field is one sentence naming it."""
    with pytest.raises(UserError, match=message):
        cross_validation_block(cv_results(**change))
