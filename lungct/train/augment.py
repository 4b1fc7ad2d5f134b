"""Training-time augmentation that runs on the accelerator, outside the saved model.

One random affine warp per image (horizontal flip, small rotation, zoom, all about the image
centre, one bilinear interpolation) and a random contrast change, written with ``keras.ops``
and ``keras.random`` only, so the same transforms and ranges run on TensorFlow and JAX (the
random draws differ per backend). The layer is used only in the training wrapper of
:func:`augmented_model`, never in the saved classifier, and holds none of Keras' RandomRotation
or RandomZoom layers, for which Keras turns ``jit_compile`` off (58x slower on an H100,
docs/measured.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
from keras import ops

__all__ = ["AugmentationRanges", "DeviceAugmentation", "augmented_model"]


@dataclass(frozen=True)
class AugmentationRanges:
    """Ranges of the random transforms (uniform draws, one per image).

    Attributes:
        flip_probability: probability of a left-right flip.
        rotation_degrees: rotation drawn from ``[-rotation_degrees, rotation_degrees]``.
        zoom_fraction: scale drawn from ``[1 - zoom_fraction, 1 + zoom_fraction]``
            (> 1 zooms in).
        contrast_fraction: contrast factor from ``[1 - contrast_fraction, 1 + contrast_fraction]``,
            applied about each image's mean intensity.
    """

    flip_probability: float = 0.5
    rotation_degrees: float = 10.0
    zoom_fraction: float = 0.1
    contrast_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if not 0.0 <= self.rotation_degrees <= 180.0:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        if not 0.0 <= self.zoom_fraction < 1.0:
            raise ValueError(f"zoom_fraction must be in [0, 1), got {self.zoom_fraction}")
        if not 0.0 <= self.contrast_fraction < 1.0:
            raise ValueError(f"contrast_fraction must be in [0, 1), got {self.contrast_fraction}")


class DeviceAugmentation(keras.layers.Layer):
    """Random flip + rotation + zoom + contrast on uint8 images ``(N, H, W, C)``.

    In training mode the output is uint8 again (rounded and clipped to 0..255), so the
    classifier sees the same input type as at inference; otherwise the input passes unchanged.
    Computed in float32 whatever the global dtype policy.
    """

    def __init__(
        self, ranges: AugmentationRanges | None = None, seed: int | None = None, **kwargs
    ) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.ranges = ranges or AugmentationRanges()
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training: bool = False):
        if not training:
            return images
        floats = ops.cast(images, "float32")
        warped = ops.image.affine_transform(
            floats,
            self._random_transforms(ops.shape(floats)),
            interpolation="bilinear",
            fill_mode="reflect",
        )
        contrasted = self._random_contrast(warped)
        return ops.cast(ops.round(ops.clip(contrasted, 0.0, 255.0)), "uint8")

    def _uniform(self, batch_size, low: float, high: float):
        return keras.random.uniform(
            (batch_size,), minval=low, maxval=high, seed=self.seed_generator
        )

    def _random_transforms(self, shape):
        """Per-image 8-vectors mapping output (x, y) to input coordinates (affine_transform).

        input = centre + (1 / zoom) * R(angle) * diag(flip, 1) * (output - centre), with the
        centre at ((W - 1) / 2, (H - 1) / 2) so that a flip alone maps pixels onto pixels.
        """
        batch_size, height, width = shape[0], shape[1], shape[2]
        ranges = self.ranges
        angle = self._uniform(batch_size, -1.0, 1.0) * (ranges.rotation_degrees * math.pi / 180)
        zoom = self._uniform(batch_size, 1.0 - ranges.zoom_fraction, 1.0 + ranges.zoom_fraction)
        flip_draw = self._uniform(batch_size, 0.0, 1.0)
        flip = ops.where(flip_draw < ranges.flip_probability, -1.0, 1.0)
        cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom
        a0, a1, b0, b1 = cos * flip, -sin, sin * flip, cos
        centre_x = (ops.cast(width, "float32") - 1.0) / 2.0
        centre_y = (ops.cast(height, "float32") - 1.0) / 2.0
        a2 = centre_x - a0 * centre_x - a1 * centre_y
        b2 = centre_y - b0 * centre_x - b1 * centre_y
        zeros = ops.zeros_like(a0)
        return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)

    def _random_contrast(self, images):
        factor = self._uniform(
            ops.shape(images)[0],
            1.0 - self.ranges.contrast_fraction,
            1.0 + self.ranges.contrast_fraction,
        )
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        return (images - mean) * ops.reshape(factor, (-1, 1, 1, 1)) + mean

    def compute_output_shape(self, input_shape):
        return input_shape


def augmented_model(
    classifier: keras.Model, ranges: AugmentationRanges | None, seed: int | None
) -> keras.Model:
    """Wrap ``classifier`` for training: uint8 images -> augmentation -> classifier.

    The wrapper shares the classifier's layers (training it trains the classifier) and is never
    saved; ``ranges=None`` returns ``classifier`` itself (no augmentation).
    """
    if ranges is None:
        return classifier
    image = classifier.inputs[0]
    inputs = keras.Input(shape=tuple(image.shape[1:]), dtype=image.dtype, name="image")
    augmented = DeviceAugmentation(ranges, seed=seed, name="augmentation")(inputs)
    return keras.Model(inputs, classifier(augmented), name=f"{classifier.name}_training")
