"""Tests of lungct.train.calibration: temperature scaling (Guo et al. 2017) on logits."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from lungct.train import calibration


def _overconfident_logits(n: int, true_temperature: float, seed: int = 0):
    """Labels drawn as y ~ Bernoulli(sigmoid(z)); the model reports logits T * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    return true_temperature * z, labels


def test_fitted_temperature_recovers_the_known_answer() -> None:
    """Logits three times too large give T near 3 and a lower log loss."""
    logits, labels = _overconfident_logits(20000, 3.0)
    fit = calibration.fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(3.0, rel=0.05)
    assert fit.log_loss_after <= fit.log_loss_before
    assert fit.log_loss_after == pytest.approx(
        calibration.binary_log_loss(logits, labels, fit.temperature))
    assert fit.n == 20000


def test_underconfident_logits_get_a_temperature_below_one() -> None:
    """Logits half as large as they should be give T near 0.5."""
    logits, labels = _overconfident_logits(20000, 0.5, seed=1)
    assert calibration.fit_temperature(logits, labels).temperature == pytest.approx(0.5, rel=0.05)


def test_temperature_stays_in_its_range_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Logits unrelated to the labels push T to the upper end of the range, with a warning."""
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(0, 5, 400), rng.integers(0, 2, 400)
    with caplog.at_level(logging.WARNING, "lungct.train.calibration"):
        fit = calibration.fit_temperature(logits, labels)
    assert fit.temperature == pytest.approx(calibration.MAX_TEMPERATURE, rel=1e-3)
    assert "end of its search range" in caplog.text


def test_log_loss_is_exact_for_saturated_logits() -> None:
    """A logit of 800 with label 0 costs 800 nats, not infinity; sigmoid does not overflow."""
    assert calibration.binary_log_loss(np.array([800.0]), np.array([0])) == pytest.approx(800.0)
    assert calibration.binary_log_loss(np.array([0.0]), np.array([1])) == pytest.approx(
        math.log(2))
    assert calibration.sigmoid(np.array([-800.0, 0.0, 800.0])).tolist() == [0.0, 0.5, 1.0]
    assert calibration.sigmoid(np.array([2.0]), 2.0)[0] == pytest.approx(1 / (1 + math.exp(-1)))


def test_one_class_or_non_finite_logits_are_refused() -> None:
    """The log loss of one class falls forever with T; NaN logits cannot be fitted."""
    with pytest.raises(ValueError, match="both classes"):
        calibration.fit_temperature(np.array([1.0, 2.0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="finite"):
        calibration.fit_temperature(np.array([1.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError, match="temperature must be positive"):
        calibration.binary_log_loss(np.array([1.0]), np.array([1]), 0.0)


def test_calibration_record_names_method_and_data() -> None:
    """The results block holds the method, T, what it was fitted on and both log losses."""
    fit = calibration.TemperatureFit(2.5, 0.7, 0.6, 40)
    assert calibration.calibration_record(fit, "validation logits") == {
        "method": "temperature scaling (Guo et al. 2017)", "temperature": 2.5,
        "fitted_on": "validation logits", "val_log_loss_before": 0.7,
        "val_log_loss_after": 0.6, "n": 40}
