"""Tests of lungct.metrics and lungct.interpret.baseline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from lungct.interpret.baseline import fit_diameter_baseline
from lungct.metrics import (
    LevelData,
    bootstrap_counts,
    calibration_bins,
    calibration_replicates,
    evaluate_level,
    paired_auc_difference,
    roc_band,
    threshold_replicates,
    weighted_auc,
    weighted_average_precision,
    wilson_interval,
)
from lungct.threshold import youden_threshold


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    """Labels and tied, rounded scores with a real signal."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80)
    p = np.clip(np.round(0.3 * y + rng.random(80) * 0.7, 1), 0, 1)
    return y, p


def level_of(y: np.ndarray, p: np.ndarray, patients: np.ndarray | None = None,
             kinds: np.ndarray | None = None, name: str = "slice_level") -> LevelData:
    patients = np.arange(len(y)) if patients is None else patients
    kinds = np.where(y == 0, "no_finding", "") if kinds is None else kinds
    return LevelData(name, np.asarray(y), np.asarray(p, float), patients, kinds)


def test_auc_matches_sklearn_with_ties_and_weights(scored):
    """Weighted Mann-Whitney AUC equals scikit-learn's, ties included."""
    y, p = scored
    weights = np.random.default_rng(0).integers(0, 4, (5, len(y))).astype(float)
    expected = [roc_auc_score(y, p, sample_weight=w) for w in weights]
    np.testing.assert_allclose(weighted_auc(y, p, weights), expected, atol=1e-12)


def test_average_precision_matches_sklearn(scored):
    """Weighted average precision equals scikit-learn's step-wise definition."""
    y, p = scored
    weights = np.random.default_rng(1).integers(0, 4, (5, len(y))).astype(float)
    expected = [average_precision_score(y, p, sample_weight=w) for w in weights]
    np.testing.assert_allclose(weighted_average_precision(y, p, weights), expected,
                               atol=1e-12)


def test_threshold_metrics_match_sklearn(scored):
    """Sensitivity, PPV, F1 and accuracy at a threshold equal scikit-learn's."""
    y, p = scored
    predicted = (p >= 0.5).astype(int)
    got = threshold_replicates(y, p, 0.5, np.ones((1, len(y))))
    assert got["sensitivity"][0] == pytest.approx(recall_score(y, predicted))
    assert got["specificity"][0] == pytest.approx(recall_score(1 - y, 1 - predicted))
    assert got["ppv"][0] == pytest.approx(precision_score(y, predicted))
    assert got["f1"][0] == pytest.approx(f1_score(y, predicted))
    assert got["accuracy"][0] == pytest.approx(np.mean(predicted == y))


def test_brier_matches_sklearn(scored):
    """The Brier score equals scikit-learn's brier_score_loss."""
    y, p = scored
    brier = calibration_replicates(y, p, np.ones((1, len(y))))["brier"][0]
    assert brier == pytest.approx(brier_score_loss(y, p))


def test_ece_hand_computed():
    """ECE of a hand-computed case: (0.05 + 0.85 + 0.15 + 0.95) / 4 = 0.5."""
    y = np.array([0, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.85, 0.95])
    assert calibration_replicates(y, p, np.ones((1, 4)))["ece"][0] == pytest.approx(0.5)


def test_ece_pools_a_bin_and_puts_one_in_the_last_bin():
    """Two samples in bin [0.2, 0.3) pool their gap; p = 1.0 falls in the last bin."""
    y = np.array([1, 0, 1])
    p = np.array([0.2, 0.25, 1.0])
    assert calibration_replicates(y, p, np.ones((1, 3)))["ece"][0] == pytest.approx(0.55 / 3)
    assert calibration_bins(y, p)[9]["n"] == 1


def test_empty_calibration_bins_are_null():
    """Bins without samples report n = 0 and null rates instead of failing."""
    bins = calibration_bins(np.array([0, 1]), np.array([0.05, 0.95]))
    assert [b["n"] for b in bins] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins[4]["mean_predicted"] is None and bins[4]["observed_rate"] is None


def test_bootstrap_is_stratified_and_seeded():
    """Every resample keeps each label stratum's patient count; equal seeds repeat."""
    labels = np.array([0, 0, 0, 1, 1])
    counts = bootstrap_counts(labels, 300, seed=7)
    assert counts.shape == (300, 5)
    assert (counts[:, :3].sum(axis=1) == 3).all() and (counts[:, 3:].sum(axis=1) == 2).all()
    np.testing.assert_array_equal(counts, bootstrap_counts(labels, 300, seed=7))


def test_bootstrap_resamples_patients_not_slices():
    """Slices of one patient move together: the CI is wider than a slice bootstrap's."""
    rng = np.random.default_rng(0)
    patient_labels = np.array([0, 0, 0, 1, 1, 1])
    patient_scores = rng.random(6) * 0.5 + 0.3 * patient_labels
    patients = np.repeat(np.arange(6), 40)
    y = patient_labels[patients]
    p = np.clip(patient_scores[patients] + rng.normal(0, 0.01, len(patients)), 0, 1)
    by_patient = evaluate_level(level_of(y, p, patients), 0.5,
                                bootstrap_counts(patient_labels, 400, 1))["auc"]
    by_slice = evaluate_level(level_of(y, p), 0.5, bootstrap_counts(y, 400, 1))["auc"]
    width = by_patient["ci_high"] - by_patient["ci_low"]
    assert width > 3 * (by_slice["ci_high"] - by_slice["ci_low"])


def test_ci_holds_point_estimate_on_well_behaved_case():
    """On 60 independent patients with a clear signal the CI brackets the estimate."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 30)
    p = np.clip(0.35 + 0.3 * y + rng.normal(0, 0.15, 60), 0, 1)
    block = evaluate_level(level_of(y, p), 0.5, bootstrap_counts(y, 500, 0))
    for metric in ("auc", "sensitivity", "specificity", "f1"):
        assert block[metric]["ci_low"] <= block[metric]["value"] <= block[metric]["ci_high"]
    assert block["auc"]["ci_high"] - block["auc"]["ci_low"] < 0.3


def test_one_class_split_reports_undefined_auc():
    """With negatives only, AUC is null with the reason; specificity stays defined."""
    y = np.zeros(6, int)
    p = np.linspace(0.1, 0.6, 6)
    block = evaluate_level(level_of(y, p), 0.5, bootstrap_counts(y, 50, 0))
    assert block["auc"]["value"] is None and block["auc"]["ci_low"] is None
    assert "only class non_cancer" in block["auc"]["reason"]
    assert block["sensitivity"] == {"value": None, "ci_low": None, "ci_high": None,
                                    "reason": "no positive units"}
    assert block["specificity"]["value"] == pytest.approx(4 / 6)


def test_tiny_split_computes_without_crash():
    """Two patients, one per class: every metric is a number or null, nothing raises."""
    y = np.array([0, 1])
    block = evaluate_level(level_of(y, np.array([0.4, 0.6])), 0.5, bootstrap_counts(y, 20, 0),
                           wilson=True, calibration=True)
    assert block["auc"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert block["sensitivity"]["wilson_low"] == pytest.approx(0.2065, abs=1e-4)
    assert block["ece"]["value"] == pytest.approx(0.4)


def test_specificity_per_negative_kind():
    """Specificity is split by negative kind, each with its own count."""
    y = np.array([1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.1, 0.2])
    kinds = np.array(["", "benign_nodule", "benign_nodule", "no_finding", "no_finding"])
    block = evaluate_level(level_of(y, p, kinds=kinds), 0.5, None)
    assert block["specificity_by_negative_kind"]["benign_nodule"]["value"] == 0.0
    assert block["specificity_by_negative_kind"]["no_finding"]["value"] == 1.0
    assert block["specificity_by_negative_kind"]["no_finding"]["n"] == 2


def test_wilson_interval_known_value():
    """Wilson 95% interval of 8/10 is (0.490, 0.943); no trials gives None."""
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_wilson_rejects_impossible_counts():
    """More successes than trials is a ValueError naming the value."""
    with pytest.raises(ValueError, match="successes must lie in"):
        wilson_interval(11, 10)


def test_youden_threshold_picks_best_cut():
    """The cut between the classes maximises J; one class gives None."""
    y = np.array([0, 0, 1, 1])
    assert youden_threshold(y, np.array([0.1, 0.3, 0.6, 0.8]))["value"] == 0.6
    assert youden_threshold(np.zeros(3, int), np.array([0.1, 0.2, 0.3])) is None


def test_paired_difference_is_zero_for_identical_models(scored):
    """AUC(a) - AUC(a) is 0 in every paired resample."""
    y, p = scored
    block = paired_auc_difference(y, p, p, np.arange(len(y)), bootstrap_counts(y, 100, 0))
    assert block == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_paired_difference_favours_the_better_model():
    """A model with the labels' signal beats a random one with a CI above 0."""
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    good = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1, 80), 0, 1)
    block = paired_auc_difference(y, good, rng.random(80), np.arange(80),
                                  bootstrap_counts(y, 300, 0))
    assert block["value"] > 0.3 and block["ci_low"] > 0


def test_roc_band_is_ordered():
    """The bootstrap ROC band has low <= high, both between 0 and 1."""
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], 20)
    p = np.clip(0.3 + 0.3 * y + rng.normal(0, 0.2, 40), 0, 1)
    low, high = roc_band(level_of(y, p), bootstrap_counts(y, 200, 0), np.linspace(0, 1, 11))
    assert (low <= high).all() and low.min() >= 0 and high.max() <= 1
    assert high[-1] == 1.0


def test_level_data_rejects_bad_probabilities():
    """Probabilities outside [0, 1] are rejected with the range received."""
    with pytest.raises(ValueError, match=r"y_prob must lie in \[0, 1\]"):
        level_of(np.array([0, 1]), np.array([0.2, 1.5]))


def test_diameter_baseline_orders_by_size():
    """Larger nodules get a higher probability; the threshold comes from validation."""
    train_mm = np.array([3.0, 4, 5, 6, 12, 15, 18, 22])
    train_y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    baseline = fit_diameter_baseline(train_mm, train_y, np.array([4.0, 16]), np.array([0, 1]))
    assert baseline.coefficient_per_mm > 0
    assert baseline.predict(np.array([20.0]))[0] > baseline.predict(np.array([4.0]))[0]
    assert baseline.threshold == pytest.approx(baseline.predict(np.array([16.0]))[0])


def test_diameter_baseline_needs_both_classes():
    """A training split with one class is a ValueError saying so."""
    with pytest.raises(ValueError, match="only one class"):
        fit_diameter_baseline(np.array([3.0, 4]), np.array([0, 0]), np.array([5.0]),
                              np.array([1]))
