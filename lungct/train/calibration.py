"""Temperature scaling: one scalar T fitted on validation logits (Guo et al. 2017).

Guo, Pleiss, Sun & Weinberger 2017, "On Calibration of Modern Neural Networks", section 4.2:
the calibrated probability is sigmoid(z / T) for the logit z, with T > 0 chosen to minimise
the negative log likelihood (binary log loss) on the validation set. T does not change the
ranking of the images, so AUC and selection are unaffected; it changes the probabilities and
therefore the threshold, which is chosen afterwards on the calibrated validation
probabilities. The logits come from the model's ``logit`` layer (``lungct.modelio.logit_model``),
never from log(p / (1 - p)) of float32 probabilities, which saturate at 0 and 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

__all__ = [
    "METHOD",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "TemperatureFit",
    "binary_log_loss",
    "calibration_record",
    "fit_temperature",
    "sigmoid",
]

METHOD = "temperature scaling (Guo et al. 2017)"
#: The search range of T (bounded, on log T): a tenfold sharper to a twentyfold flatter model.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
#: Tolerance of the bounded search on log T (Brent's method): T to about 1e-6 relative.
LOG_TEMPERATURE_TOLERANCE = 1e-6

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TemperatureFit:
    """The fitted temperature and the validation log loss before (T = 1) and after."""

    temperature: float
    log_loss_before: float
    log_loss_after: float
    n: int


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """sigmoid(logits / temperature) in float64, without overflow for large logits."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(-np.logaddexp(0.0, -scaled))


def binary_log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) against 0/1 ``labels``, in nats.

    Computed from the logits as log(1 + exp(z)) - y z, which is exact where the probability
    rounds to 0 or 1.

    Raises:
        ValueError: the arrays differ in length, are empty, or T is not positive and finite.
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if logits.shape != labels.shape or logits.size == 0:
        raise ValueError(f"need as many labels as logits (at least one), got {labels.size} "
                         f"and {logits.size}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    scaled = logits / temperature
    return float(np.mean(np.logaddexp(0.0, scaled) - labels * scaled))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> TemperatureFit:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises the validation log loss.

    The search is over log T (Brent's bounded method, ``scipy.optimize.minimize_scalar``), so
    halving and doubling T are equally easy to reach. T = 1 is kept when the search does not
    improve on it (the fit never makes the validation log loss worse).

    Args:
        logits: pre-sigmoid outputs ``(N,)`` (or ``(N, 1)``) of the validation images.
        labels: their 0/1 labels.

    Raises:
        ValueError: the arrays differ in length, are empty, hold non-finite logits or labels
            other than 0/1, or a single class (the log loss then falls forever with T).
    """
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not np.all(np.isfinite(logits)):
        raise ValueError("validation logits must be finite")
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise ValueError("temperature scaling needs 0/1 labels of both classes")
    before = binary_log_loss(logits, labels)
    search = minimize_scalar(
        lambda log_t: binary_log_loss(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
        options={"xatol": LOG_TEMPERATURE_TOLERANCE},
    )
    temperature = float(math.exp(search.x))
    after = binary_log_loss(logits, labels, temperature)
    if not after < before:
        temperature, after = 1.0, before
    if not MIN_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE / 1.01:
        LOG.warning("temperature %.3g is at the end of its search range [%g, %g]: the "
                    "validation logits barely separate the classes (or separate them "
                    "perfectly)", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
    return TemperatureFit(temperature, before, after, int(logits.size))


def calibration_record(fit: TemperatureFit, fitted_on: str) -> dict:
    """The ``calibration`` block of training_results.json (docs/formats.md)."""
    return {
        "method": METHOD,
        "temperature": fit.temperature,
        "fitted_on": fitted_on,
        "val_log_loss_before": fit.log_loss_before,
        "val_log_loss_after": fit.log_loss_after,
        "n": fit.n,
    }
