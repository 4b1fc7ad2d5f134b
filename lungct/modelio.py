"""Loading a saved classifier safely, checking that it fits its dataset, and its structure.

Model files are untrusted input: they load in Keras safe mode (no lambda layers, no pickles)
and must follow the model contract of docs/formats.md: uint8 ``(None, S, S, channels)`` in,
one probability per image ``(None, 1)`` out. Used by training (reuse and the selected-model
copy) and interpretation.

Every classifier ends ``... -> logit -> Rescaling(1/T, "temperature") -> Activation("sigmoid",
"probability")``, where T is the temperature of temperature scaling (Guo et al. 2017, "On
Calibration of Modern Neural Networks"; 1 = uncalibrated). A single model's logit is the
``Dense(1)`` layer ``logit``. A cross-validation ensemble holds K nested functional models
``fold0`` ... ``fold{K-1}``, each a fold model up to its ``logit`` layer (its output), whose
logits the ``Average`` layer ``mean_logit`` averages before the temperature. Stages and
Grad-CAM find those parts with :func:`ensemble_members` and :func:`logit_model` here, the one
place that knows the layer names.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras

from lungct.errors import UserError

__all__ = [
    "LOGIT_LAYER",
    "MEAN_LOGIT_LAYER",
    "PROBABILITY_LAYER",
    "TEMPERATURE_LAYER",
    "ensemble_members",
    "is_ensemble",
    "load_classifier",
    "logit_model",
    "member_name",
]

#: The float32 ``Dense(1)`` pre-sigmoid output of a single model (and of each ensemble member).
LOGIT_LAYER = "logit"
#: The ``Average`` of the members' logits in an ensemble.
MEAN_LOGIT_LAYER = "mean_logit"
#: ``Rescaling(1/T)``: the logit divided by the temperature T (1 = uncalibrated).
TEMPERATURE_LAYER = "temperature"
#: The sigmoid: the model's output, the probability of cancer.
PROBABILITY_LAYER = "probability"
_MEMBER_NAME = re.compile(r"fold(\d+)")


def member_name(fold: int) -> str:
    """The name of ensemble member ``fold``: ``fold0``, ``fold1``, ..."""
    if fold < 0:
        raise ValueError(f"fold must be >= 0, got {fold}")
    return f"fold{fold}"


def is_ensemble(model: keras.Model) -> bool:
    """True when ``model`` is a cross-validation ensemble (it has a ``mean_logit`` layer)."""
    return any(layer.name == MEAN_LOGIT_LAYER for layer in model.layers)


def ensemble_members(model: keras.Model) -> list[keras.Model]:
    """The members of an ensemble in fold order, or ``[model]`` for a single model.

    Each member has a layer named ``logit`` whose output is that member's logit: an ensemble
    member ends there, a single model continues to the temperature and the probability.
    Grad-CAM of an ensemble is the mean of its members' maps, each at its own layer.

    Raises:
        ValueError: an ensemble whose nested models are not exactly ``fold0`` ...
            ``fold{K-1}``.
    """
    if not is_ensemble(model):
        return [model]
    members = {int(match.group(1)): layer for layer in model.layers
               if isinstance(layer, keras.Model)
               and (match := _MEMBER_NAME.fullmatch(layer.name))}
    if not members or sorted(members) != list(range(len(members))):
        raise ValueError(f"ensemble {model.name!r} has members {sorted(members)}; expected "
                         "fold0 ... fold{K-1}")
    return [members[fold] for fold in range(len(members))]


def logit_model(model: keras.Model) -> keras.Model:
    """The sub-model from the image to the logit before the temperature, shape ``(None, 1)``.

    For a single model that is the ``logit`` layer, for an ensemble the members' mean logit.
    It shares the model's layers (no copy).

    Raises:
        ValueError: the model has no ``temperature`` layer (it predates the contract).
    """
    if not any(layer.name == TEMPERATURE_LAYER for layer in model.layers):
        raise ValueError(f"model {model.name!r} has no {TEMPERATURE_LAYER!r} layer")
    return keras.Model(model.inputs[0], model.get_layer(TEMPERATURE_LAYER).input,
                       name=f"{model.name}_logit")


def load_classifier(path: Path, image_size_px: int, recorded_in: str,
                    channels: int = 1) -> keras.Model:
    """Load ``path`` in Keras safe mode and check its input and output against the contract.

    Args:
        path: a ``.keras`` or ``.h5`` file.
        image_size_px: side of the dataset's images.
        channels: channels of the dataset's images (1, or 3 with 2.5D context).
        recorded_in: the file that names the model and its image size, for messages.

    Raises:
        UserError: the file cannot be loaded, or its input is not uint8
            ``(None, image_size_px, image_size_px, channels)``, its output not
            ``(None, 1)``, it has no temperature layer or an ensemble's members are not
            ``fold0`` ... ``fold{K-1}``.
    """
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the user's file
        raise UserError(f"cannot load model {path} ({type(error).__name__}: {error})") from error
    expected = (None, image_size_px, image_size_px, channels)
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or tuple(inputs[0].shape) != expected or str(
            inputs[0].dtype) != "uint8":
        shown = [f"{t.dtype} {tuple(t.shape)}" for t in inputs]
        raise UserError(f"model {path} takes {', '.join(shown) or 'no input'} but {recorded_in} "
                        f"records uint8 {expected}: the model does not match the dataset")
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1 or tuple(outputs[0].shape) != (None, 1):
        shown = [str(tuple(t.shape)) for t in outputs]
        raise UserError(f"model {path} outputs {', '.join(shown) or 'nothing'}, not one "
                        "probability per image (None, 1)")
    if not any(layer.name == TEMPERATURE_LAYER for layer in model.layers):
        raise UserError(f"model {path} has no {TEMPERATURE_LAYER!r} layer before its sigmoid "
                        "(made by an older lungct?); re-run training_lung_cnn.py")
    try:
        ensemble_members(model)
    except ValueError as error:
        raise UserError(f"model {path}: {error}") from error
    return model
