"""The saved classifier's head: fold ensembles and the temperature.

A cross-validation ensemble (``--folds K`` > 1) is one functional Keras model of built-in
layers: ``Input(uint8, "image")`` -> K nested functional models ``fold0`` ... ``fold{K-1}``
(each a fold model cloned up to its ``logit`` layer, renamed: Keras refuses two sub-models of
one name; their inner layers keep their names, e.g. ``last_conv`` or the nested ``vgg16``) ->
``Average("mean_logit")`` -> ``Rescaling(1/T, "temperature")`` -> ``Activation("sigmoid",
"probability")``. Averaging logits rather than probabilities keeps one pre-sigmoid output for
temperature scaling and Grad-CAM. It loads with ``keras.models.load_model(..., safe_mode=True)``
from ``.h5`` and ``.keras`` without lungct. The layer names are those of
:mod:`lungct.modelio`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import layers

from lungct.modelio import (
    MEAN_LOGIT_LAYER,
    PROBABILITY_LAYER,
    TEMPERATURE_LAYER,
    logit_model,
    member_name,
)

__all__ = ["build_ensemble", "with_temperature"]


def _temperature_head(logit, temperature: float):
    """``logit`` -> Rescaling(1/T, "temperature") -> sigmoid "probability" (float32)."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    scaled = layers.Rescaling(1.0 / temperature, name=TEMPERATURE_LAYER, dtype="float32")(logit)
    return layers.Activation("sigmoid", name=PROBABILITY_LAYER, dtype="float32")(scaled)


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` (single or ensemble) with its temperature replaced by ``temperature``.

    The result shares the model's layers up to the logit and gets a new temperature and
    sigmoid; it keeps the model's name.

    Raises:
        ValueError: T not positive and finite, or a model without a temperature layer.
    """
    logit = logit_model(model).output
    return keras.Model(model.inputs[0], _temperature_head(logit, temperature), name=model.name)


def _member(model: keras.Model, fold: int) -> keras.Model:
    """A copy of ``model`` from its input to its logit, named ``fold<fold>``."""
    truncated = logit_model(model)
    member = keras.models.clone_model(truncated)
    member.set_weights(truncated.get_weights())
    member.name = member_name(fold)
    return member


def build_ensemble(fold_models: Sequence[keras.Model], name: str,
                   temperature: float = 1.0) -> keras.Model:
    """The ensemble of ``fold_models`` (fold order), their logits averaged, scaled by 1/T.

    Args:
        fold_models: K >= 2 single classifiers with one input shape (the fold models).
        name: the ensemble's name (the architecture, e.g. ``"baseline"``).
        temperature: T of the temperature layer (1 = uncalibrated).

    Raises:
        ValueError: fewer than two models, models with different inputs, or a bad T.
    """
    if len(fold_models) < 2:
        raise ValueError(f"an ensemble needs at least 2 fold models, got {len(fold_models)}")
    shapes = {(tuple(m.inputs[0].shape), str(m.inputs[0].dtype)) for m in fold_models}
    if len(shapes) != 1:
        raise ValueError(f"fold models take different inputs: {sorted(shapes)}")
    (shape, dtype), = shapes
    image = keras.Input(shape=shape[1:], dtype=dtype, name="image")
    logits = [_member(model, fold)(image) for fold, model in enumerate(fold_models)]
    mean_logit = layers.Average(name=MEAN_LOGIT_LAYER, dtype="float32")(logits)
    return keras.Model(image, _temperature_head(mean_logit, temperature), name=name)
