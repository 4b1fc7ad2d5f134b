"""The model, loaded once: probabilities in full batches, Grad-CAM for the top images only.

Importing this module imports Keras; the stage imports it after the worker pool has started
(forking a process that has initialised a framework can deadlock). The model's output is the
probability the training results describe (a calibration temperature is already folded into a
saved model, and a fold ensemble is one Keras model): it is scored as it is.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from lungct.errors import UserError
from lungct.gradcam import GradCam
from lungct.modelio import TEMPERATURE_LAYER, load_classifier
from lungct.predict.recipe import Recipe

__all__ = ["Scorer", "check_temperature"]

LOG = logging.getLogger(__name__)


def check_temperature(model: object, temperature: float, where: str) -> None:
    """Check that ``model`` applies the results' calibration temperature T (its
    ``temperature`` layer scales the logit by 1/T; no such layer: 1), within 1e-6 relative:
    the threshold was chosen on probabilities calibrated with T.

    Raises:
        UserError: the model applies another temperature (e.g. an uncalibrated model file).
    """
    names = {layer.name for layer in model.layers}
    scale = float(model.get_layer(TEMPERATURE_LAYER).scale) if TEMPERATURE_LAYER in names \
        else 1.0
    if not math.isclose(scale, 1.0 / temperature, rel_tol=1e-6):
        applied = 1.0 / scale if scale else math.inf
        raise UserError(f"--model {where} applies temperature {applied:.6g}, but the "
                        f"training results' threshold was chosen at calibration temperature "
                        f"{temperature:.6g}: pass the calibrated model these results name")


class Scorer:
    """One loaded model, its compiled predict step and (on first use) its Grad-CAM.

    Args:
        recipe: the model file and the input it was trained on.
        batch_size: images per model call; every call has this shape (the last batch padded),
            so the predict step compiles once.
    """

    def __init__(self, recipe: Recipe, batch_size: int) -> None:
        size = recipe.settings.image_size_px
        self.model = load_classifier(recipe.model_path, size, "the training results",
                                     recipe.channels)
        if recipe.temperature is not None:
            check_temperature(self.model, recipe.temperature, str(recipe.model_path))
        self.batch_size = batch_size
        self.image_shape = (size, size, recipe.channels)
        self._gradcam: GradCam | None = None
        self.predict(np.zeros((1, *self.image_shape), np.uint8))  # compile before timing

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probability of cancer (float64, one per image) for uint8 (N, S, S, C) images."""
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be (N, *{self.image_shape}), got {images.shape}")
        probabilities = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            padded = batch
            if len(batch) < self.batch_size:
                padded = np.zeros((self.batch_size, *self.image_shape), np.uint8)
                padded[: len(batch)] = batch
            output = np.asarray(self.model.predict_on_batch(padded), np.float64)
            probabilities.append(output.reshape(-1)[: len(batch)])
        return np.concatenate(probabilities) if probabilities else np.zeros(0)

    def gradcam(self, images: np.ndarray) -> np.ndarray:
        """Grad-CAM maps in [0, 1], float32 (N, S, S), of the project's batched Grad-CAM on
        the pre-sigmoid logit (lungct.gradcam)."""
        if self._gradcam is None:
            self._gradcam = GradCam(self.model)
            LOG.info("Grad-CAM layer: %s", self._gradcam.layer_name)
        return self._gradcam.explain(images, batch_size=self.batch_size).maps
