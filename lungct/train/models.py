"""The classifiers: a baseline CNN from scratch and VGG16 / ResNet50 transfer models.

Every model follows the contract shared with the interpretation stage: a functional Keras 3
model ``Input(uint8, (S, S, C), name="image")`` -> built-in preprocessing layers -> features ->
``GlobalAveragePooling2D("pooling")`` -> ``Dropout("dropout")`` -> ``Dense(1, "logit",
float32)`` -> ``Rescaling(1/T, "temperature", float32)`` -> ``Activation("sigmoid",
"probability", float32)``, with T = 1 when built (temperature scaling sets T on the selected
model, lungct.train.calibration). Built-in layers only, so ``keras.models.load_model`` loads a
saved model in safe mode without lungct. C is the dataset's channel count
(``contract.CHANNEL_ORDERS``): 1, or 3 for 2.5D context, the planes z - D, z, z + D in that
order (the PNGs' R, G, B).

Transfer backbones come from ``keras.applications`` (Simonyan & Zisserman 2015, VGG16; He et
al. 2016, ResNet50) and are nested as one layer named ``"vgg16"`` / ``"resnet50"``; both expect
"caffe" preprocessing: BGR channels minus the ImageNet BGR mean (a ``Normalization`` layer).
A one-channel image is copied to the three channels (``Concatenate("to_rgb")``). A
three-channel image goes in as it is, so the backbone's B, G, R input channels receive the
planes z - D, z, z + D, minus the means 103.939, 116.779 and 123.68: the centre plane is the
backbone's green channel and the two context planes, symmetric about it, its blue and red
ones. No reversal is needed because neither context plane has a colour meaning.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from lungct.errors import UserError
from lungct.modelio import (
    LOGIT_LAYER,
    PROBABILITY_LAYER,
    TEMPERATURE_LAYER,
    ensemble_members,
    is_ensemble,
)

__all__ = [
    "BACKBONES",
    "MODEL_NAMES",
    "BackboneSpec",
    "ResolvedWeights",
    "backbone_of",
    "build_model",
    "freeze_backbone",
    "grad_cam_layer",
    "keras_cache_dir",
    "parse_weights_option",
    "resolve_weights",
    "split_below_top_layers",
    "unfreeze_top_layers",
]

LOG = logging.getLogger(__name__)

MODEL_NAMES = ("baseline", "vgg16", "resnet50")
#: ImageNet channel means in the backbones' BGR order ("caffe" mode of keras.applications).
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
BASELINE_FILTERS = (32, 64, 128, 256)
#: Keras' default 0.99 leaves the moving statistics far from the data after the few hundred
#: steps of a small dataset, so validation (inference mode) lags training; 0.9 converges.
BATCH_NORM_MOMENTUM = 0.9
#: keras.applications refuses inputs smaller than 32 px for VGG16 and ResNet50.
MIN_TRANSFER_SIZE_PX = 32
DOWNLOAD_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackboneSpec:
    """A keras.applications backbone, its ImageNet weight file and its Grad-CAM layer."""

    constructor: Callable[..., keras.Model]
    cache_file: str
    url: str
    grad_cam_layer: str


_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications"
BACKBONES: dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec(
        constructor=keras.applications.VGG16,
        cache_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        url=f"{_WEIGHTS_URL}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        grad_cam_layer="block5_conv3",
    ),
    "resnet50": BackboneSpec(
        constructor=keras.applications.ResNet50,
        cache_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        url=f"{_WEIGHTS_URL}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        grad_cam_layer="conv5_block3_out",
    ),
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Initial weights of one backbone.

    Attributes:
        argument: what to pass to the keras.applications constructor: ``"imagenet"``, a file
            path, or ``None`` (random initialisation).
        source: what was used, for the results file and the report, e.g.
            ``"imagenet: /root/.keras/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"``.
    """

    argument: str | None
    source: str


def keras_cache_dir() -> Path:
    """The folder keras.applications caches weights in: ``$KERAS_HOME/models`` (~/.keras)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser() / "models"


def parse_weights_option(text: str) -> dict[str, str]:
    """Parse ``--weights``: ``auto|imagenet|none|DIR`` or ``vgg16=PATH,resnet50=PATH``.

    Returns a mapping backbone name -> ``"auto"``, ``"imagenet"``, ``"none"``, ``"dir:DIR"``
    or ``"file:PATH"``; backbones not named in the per-model form get ``"auto"``.

    Raises:
        UserError: unknown backbone name or empty value.
    """
    text = text.strip()
    if not text:
        raise UserError("--weights is empty; use auto, imagenet, none, a folder or vgg16=PATH.")
    if text in ("auto", "imagenet", "none"):
        return dict.fromkeys(BACKBONES, text)
    if "=" not in text:
        return dict.fromkeys(BACKBONES, f"dir:{text}")
    choice = dict.fromkeys(BACKBONES, "auto")
    for item in text.split(","):
        name, _, path = item.partition("=")
        name = name.strip()
        if name not in BACKBONES or not path.strip():
            raise UserError(
                f"--weights item {item!r} is not NAME=PATH with NAME one of {', '.join(BACKBONES)}."
            )
        choice[name] = f"file:{path.strip()}"
    return choice


def _imagenet_reachable(url: str) -> bool:
    """Whether the weight file's server answers within a few seconds (no retries)."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_PROBE_TIMEOUT_S):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_weights(name: str, choice: str) -> ResolvedWeights:
    """Decide the initial weights of backbone ``name`` from a :func:`parse_weights_option` value.

    ``auto`` uses the Keras cache, then a download, then random initialisation with a warning
    naming the file to place; ``imagenet`` is the same without the fallback.

    Raises:
        ValueError: unknown backbone or choice.
        UserError: ``imagenet`` unavailable, or a weights file/folder entry that does not exist.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {tuple(BACKBONES)}, got {name!r}")
    spec = BACKBONES[name]
    if choice == "none":
        return ResolvedWeights(None, "random: --weights none")
    if choice.startswith(("dir:", "file:")):
        kind, _, location = choice.partition(":")
        path = Path(location) / spec.cache_file if kind == "dir" else Path(location)
        if not path.is_file():
            raise UserError(f"weights file {path} for {name} does not exist.")
        return ResolvedWeights(str(path), f"file: {path}")
    if choice not in ("auto", "imagenet"):
        raise ValueError(
            f"weights choice must be auto, imagenet, none, dir:… or file:…, got {choice!r}"
        )
    cached = keras_cache_dir() / spec.cache_file
    if cached.is_file():
        return ResolvedWeights("imagenet", f"imagenet: {cached}")
    if _imagenet_reachable(spec.url):
        return ResolvedWeights("imagenet", f"imagenet: downloaded from {spec.url}")
    message = (
        f"ImageNet weights for {name} are neither cached nor downloadable: place "
        f"{spec.cache_file} in {cached.parent} (from {spec.url})"
    )
    if choice == "imagenet":
        raise UserError(f"{message}, or use --weights auto.")
    LOG.warning("%s; %s starts from random weights.", message, name)
    return ResolvedWeights(
        None,
        f"random: ImageNet weights unavailable ({spec.cache_file} not in "
        f"{cached.parent}, no download)",
    )


def build_model(
    name: str,
    image_size: int,
    train_size: int,
    weights: ResolvedWeights | None = None,
    dropout_rate: float = 0.5,
    channels: int = 1,
) -> keras.Model:
    """Build classifier ``name`` for uint8 ``image_size`` px images, computing at ``train_size``.

    Args:
        name: one of :data:`MODEL_NAMES`.
        image_size: side of the input images (the PNGs), px.
        train_size: side the model computes at; a ``Resizing`` layer inside the model converts
            when it differs from ``image_size``.
        weights: initial backbone weights (transfer models; ``None`` = random).
        dropout_rate: dropout before the logit.
        channels: channels of the images: 1, or 3 (planes z - D, z, z + D).

    Raises:
        ValueError: bad name, dropout rate or channel count.
        UserError: a weights file that does not match the backbone.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    image = keras.Input(shape=(image_size, image_size, channels), dtype="uint8", name="image")
    scale = 1.0 / 255.0 if name == "baseline" else 1.0
    x = layers.Rescaling(scale, name="to_float")(image)
    if train_size != image_size:
        x = layers.Resizing(train_size, train_size, interpolation="bilinear", name="resize")(x)
    if name == "baseline":
        features = _baseline_features(x)
    else:
        features = _transfer_features(name, x, train_size, weights)
    x = layers.GlobalAveragePooling2D(name="pooling")(features)
    x = layers.Dropout(dropout_rate, name="dropout")(x)
    logit = layers.Dense(1, name=LOGIT_LAYER, dtype="float32")(x)
    scaled = layers.Rescaling(1.0, name=TEMPERATURE_LAYER, dtype="float32")(logit)
    probability = layers.Activation("sigmoid", name=PROBABILITY_LAYER, dtype="float32")(scaled)
    return keras.Model(image, probability, name=name)


def _baseline_features(x):
    """Four conv blocks (3x3 conv, BatchNorm, ReLU; 2x2 max-pool between blocks).

    The last block's ReLU is the layer ``"last_conv"`` (the Grad-CAM target).
    """
    for block, filters in enumerate(BASELINE_FILTERS, start=1):
        last = block == len(BASELINE_FILTERS)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"block{block}_bn")(x)
        x = layers.Activation("relu", name="last_conv" if last else f"block{block}_relu")(x)
        if not last:
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return x


def _transfer_features(name: str, x, train_size: int, weights: ResolvedWeights | None):
    if train_size < MIN_TRANSFER_SIZE_PX:
        raise ValueError(
            f"{name} needs a train size of at least {MIN_TRANSFER_SIZE_PX} px, got {train_size}"
        )
    if x.shape[-1] == 1:
        x = layers.Concatenate(name="to_rgb")([x, x, x])
    x = layers.Normalization(
        mean=list(IMAGENET_BGR_MEAN), variance=[1.0, 1.0, 1.0], name="imagenet_normalization"
    )(x)
    backbone = _build_backbone(name, train_size, weights or ResolvedWeights(None, "random"))
    backbone.trainable = False
    # training=False keeps BatchNorm in inference mode in every phase (keras-io transfer guide).
    return backbone(x, training=False)


def _build_backbone(name: str, train_size: int, weights: ResolvedWeights) -> keras.Model:
    spec = BACKBONES[name]
    shape = (train_size, train_size, 3)
    if weights.argument in (None, "imagenet"):
        return spec.constructor(
            include_top=False, weights=weights.argument, input_shape=shape, name=name
        )
    backbone = spec.constructor(include_top=False, weights=None, input_shape=shape, name=name)
    try:
        backbone.load_weights(weights.argument)
    except (ValueError, OSError, KeyError, TypeError) as error:
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise UserError(
            f"weights file {weights.argument} does not match the {name} backbone ({first_line})."
        ) from error
    return backbone


def backbone_of(model: keras.Model) -> keras.Model | None:
    """Return the nested keras.applications backbone of a transfer model, ``None`` for baseline.

    Raises:
        ValueError: ``model`` is an ensemble: each member has its own backbone (call this on
            each of ``lungct.modelio.ensemble_members(model)``).
    """
    if is_ensemble(model):
        raise ValueError(f"model {model.name!r} is an ensemble of "
                         f"{len(ensemble_members(model))} members, each with its own backbone")
    for name in BACKBONES:
        if any(layer.name == name for layer in model.layers):
            return model.get_layer(name)
    return None


def freeze_backbone(model: keras.Model) -> None:
    """Freeze the whole backbone of a transfer model (phase 2, first part)."""
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"model {model.name!r} has no backbone to freeze")
    backbone.trainable = False


def unfreeze_top_layers(model: keras.Model, n_layers: int) -> list[str]:
    """Make the top ``n_layers`` layers of the backbone trainable, BatchNorm layers excepted.

    BatchNorm stays frozen (and, called with ``training=False``, in inference mode) so that
    fine-tuning does not destroy its statistics (keras-io transfer-learning guide). Recompile
    the model afterwards. Returns the names of the layers that hold trainable weights now.

    Raises:
        ValueError: no backbone, or ``n_layers`` < 1.
    """
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"model {model.name!r} has no backbone to fine-tune")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    backbone.trainable = True
    top = backbone.layers[-n_layers:]
    for layer in backbone.layers:
        layer.trainable = layer in top and not isinstance(layer, layers.BatchNormalization)
    return [layer.name for layer in backbone.layers if layer.trainable and layer.weights]


def grad_cam_layer(model: keras.Model) -> str | list[str]:
    """The Grad-CAM target of ``model``.

    A single model: ``"last_conv"`` or ``"<backbone>/<layer>"`` (e.g. ``"vgg16/block5_conv3"``).
    An ensemble: one entry per member in fold order, ``"<member>/<the member's target>"``, e.g.
    ``["fold0/last_conv", "fold1/last_conv"]`` or ``["fold0/vgg16/block5_conv3", ...]``: the
    text before the first ``/`` names the member (``ensemble_members(model)[k].name``), the
    rest is the layer in that member as for a single model.
    """
    if is_ensemble(model):
        return [f"{member.name}/{grad_cam_layer(member)}" for member in ensemble_members(model)]
    backbone = backbone_of(model)
    if backbone is None:
        return "last_conv"
    return f"{backbone.name}/{BACKBONES[backbone.name].grad_cam_layer}"


def split_below_top_layers(
    model: keras.Model, n_layers: int
) -> tuple[keras.Model, keras.Model] | None:
    """Split a transfer model below the top ``n_layers`` backbone layers.

    Returns ``lower`` (uint8 images -> the activations feeding those layers) and ``upper``
    (activations -> probability: the top layers, pooling and head). Both share the model's
    layers, so training ``upper`` trains the model. With everything below the cut frozen
    (BatchNorm in inference mode), ``lower`` is a fixed function: its activations can be
    computed once and both the frozen phase and fine-tuning can train on them (keras-io
    feature-extraction recipe, extended to the fine-tuned block). Returns ``None`` when the
    cut is not a clean one (e.g. inside a residual block: other tensors bypass it).

    Raises:
        ValueError: no backbone, or ``n_layers`` out of range.
    """
    backbone = backbone_of(model)
    if backbone is None:
        raise ValueError(f"model {model.name!r} has no backbone to split")
    if not 1 <= n_layers < len(backbone.layers) - 1:
        raise ValueError(
            f"n_layers must be in [1, {len(backbone.layers) - 2}] for {backbone.name}, "
            f"got {n_layers}"
        )
    cut = backbone.layers[-n_layers - 1].output
    try:
        upper_backbone = keras.Model(cut, backbone.output)
    except ValueError:
        return None
    prefix_layer = model.layers[model.layers.index(backbone) - 1]
    prefix = keras.Model(model.inputs[0], prefix_layer.output)
    bottom = keras.Model(backbone.input, cut)
    suffix = keras.Model(model.get_layer("pooling").input, model.output)
    image = keras.Input(shape=tuple(model.inputs[0].shape[1:]), dtype="uint8", name="image")
    lower = keras.Model(image, bottom(prefix(image), training=False), name=f"{model.name}_lower")
    activations = keras.Input(shape=tuple(cut.shape[1:]), dtype=cut.dtype, name="activations")
    upper = keras.Model(
        activations,
        suffix(upper_backbone(activations, training=False)),
        name=f"{model.name}_upper",
    )
    return lower, upper
