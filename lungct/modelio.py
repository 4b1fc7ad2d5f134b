"""Loading a saved classifier safely, and checking that it fits the dataset it is used on.

Model files are untrusted input: they load in Keras safe mode (no lambda layers, no pickles)
and must follow the model contract of docs/formats.md: uint8 ``(None, S, S, channels)`` in,
one probability per image ``(None, 1)`` out. Used by training (reuse and the selected-model
copy) and interpretation.
"""

from __future__ import annotations

from pathlib import Path

import keras

from lungct.errors import UserError

__all__ = ["load_classifier"]


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
            ``(None, image_size_px, image_size_px, channels)`` or its output not
            ``(None, 1)``.
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
    return model
