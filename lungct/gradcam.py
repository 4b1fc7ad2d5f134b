"""Grad-CAM and Grad-CAM++ maps on the pre-sigmoid logit, batched, for nested backbones too.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", eq. 1-2): with A the (h, w, C) feature map of the explained
layer and y the logit, the channel weights are the spatial mean of dy/dA and the map is
ReLU(sum_k w_k A^k).

Grad-CAM++ (Chattopadhay et al. 2018, eq. 19): with g = dy/dA,
alpha = g^2 / (2 g^2 + sum_ab A_ab g^3) (0 where the denominator is 0) and
w_k = sum_ij alpha_ij ReLU(g_ij). The paper's exp(y) factor is a positive constant per image,
which the per-image normalisation removes.

Both maps are upsampled to the image size by half-pixel-centred bilinear interpolation
(OpenCV ``INTER_LINEAR``, as ``keras.ops.image.resize``) and divided by their maximum per
image; a map with no positive value is all zero, never NaN. The gradients come from
``lungct.backend.make_logit_and_feature_grads`` (compiled once per model and batch shape).

A fold ensemble (training ``--folds K``: nested member models ``fold0`` .. ``fold{K-1}``, each
a classifier truncated at its ``logit`` layer, feeding the ``Average`` layer ``mean_logit``;
found by ``lungct.modelio.ensemble_members``, the one place that knows that structure) is
explained member by member: each member's map at its own layer with its own logit as the
score, normalised as above, then the mean of the K maps (in [0, 1]; its maximum is below 1
where the members' peaks differ). Normalising before averaging weighs every member equally
(the issue's rule: the mean of the members' maps), so a member with larger gradients does not
dominate; it is not the Grad-CAM of the mean logit, whose layers differ per member anyway.
The temperature of calibration (``Rescaling(1/T)`` named
``temperature``, after the logit) divides the logit by a positive constant and so leaves the
normalised maps unchanged; it only enters the probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import keras
import numpy as np
from keras import layers
from tqdm import tqdm

from lungct.backend import make_logit_and_feature_grads
from lungct.contract import CAM_METHODS
from lungct.modelio import LOGIT_LAYER, TEMPERATURE_LAYER, ensemble_members, is_ensemble

__all__ = [
    "TARGETS",
    "TargetLayer",
    "CamResult",
    "GradCam",
    "class_activation_maps",
    "probability_of_logits",
    "upsample_and_normalise",
    "convolutional_layer_names",
    "resolve_target_layer",
    "split_model",
]

LOG = logging.getLogger(__name__)

TARGETS = {"positive": 1.0, "negative": -1.0}
BASELINE_LAST_BLOCK = "last_conv"
CONV_TYPES = (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D)
NOT_A_BLOCK_OUTPUT = (
    layers.MaxPooling2D, layers.AveragePooling2D, layers.Dropout, layers.SpatialDropout2D,
    layers.InputLayer,
)


@dataclass(frozen=True)
class TargetLayer:
    """The explained layer and, when it sits inside a nested backbone, that backbone."""

    layer: layers.Layer
    backbone: keras.Model | None

    @property
    def name(self) -> str:
        """Qualified name: ``backbone/layer`` for a nested layer, else the layer's name."""
        return f"{self.backbone.name}/{self.layer.name}" if self.backbone else self.layer.name


@dataclass(frozen=True)
class CamResult:
    """Maps (N, H, W) float32 in [0, 1] and the logits (N,) of the same pass (before the
    temperature and the sigmoid; an ensemble's is the mean of its members' logits, and
    ``member_maps`` holds each member's maps, in fold order)."""

    maps: np.ndarray
    logits: np.ndarray
    member_maps: tuple[np.ndarray, ...] = ()


def _nested_models(model: keras.Model) -> list[keras.Model]:
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def probability_of_logits(model: keras.Model, logits: np.ndarray) -> np.ndarray:
    """The model's probabilities from its logits: sigmoid(logit / T) with the scale and
    offset of its ``temperature`` Rescaling layer (T = 1 when it has none)."""
    scale, offset = 1.0, 0.0
    if TEMPERATURE_LAYER in {layer.name for layer in model.layers}:
        temperature = model.get_layer(TEMPERATURE_LAYER)
        if not isinstance(temperature, layers.Rescaling):
            raise ValueError(f"layer {TEMPERATURE_LAYER!r} of model {model.name!r} is a "
                             f"{type(temperature).__name__}, not Rescaling(1/T)")
        scale, offset = float(temperature.scale), float(temperature.offset)
    scaled = np.asarray(logits, np.float64) * scale + offset
    return 1.0 / (1.0 + np.exp(-scaled))


def _is_feature_map(layer: layers.Layer) -> bool:
    """True for a layer whose output is a 4-D (N, h, w, C) map and not a pooling/dropout."""
    if isinstance(layer, NOT_A_BLOCK_OUTPUT):
        return False
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):
        return False


def convolutional_layer_names(model: keras.Model) -> list[str]:
    """Qualified names of every convolution layer, nested models (backbones, fold members)
    included: ``block4_conv``, ``vgg16/block5_conv3``, ``fold0/vgg16/block5_conv3``."""
    names = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            names += [f"{layer.name}/{inner}" for inner in convolutional_layer_names(layer)]
        elif isinstance(layer, CONV_TYPES):
            names.append(layer.name)
    return names


def _default_target(model: keras.Model) -> TargetLayer:
    """The output of the last convolutional block (``last_conv``, else the backbone's)."""
    names = {layer.name for layer in model.layers}
    if BASELINE_LAST_BLOCK in names:
        return TargetLayer(model.get_layer(BASELINE_LAST_BLOCK), None)
    backbones = _nested_models(model)
    owner = backbones[-1] if backbones else model
    candidates = [layer for layer in owner.layers
                  if _is_feature_map(layer) and not isinstance(layer, keras.Model)]
    if not candidates:
        raise ValueError(f"model {model.name!r} has no 4-D feature map to explain")
    return TargetLayer(candidates[-1], owner if backbones else None)


def resolve_target_layer(model: keras.Model, layer_name: str | None) -> TargetLayer:
    """Find the explained layer by name (``block5_conv3`` or ``vgg16/block5_conv3``).

    Args:
        model: the loaded classifier.
        layer_name: a layer name, or None for the output of the last convolutional block
            (baseline: ``last_conv``; VGG16: ``block5_conv3``; ResNet50: ``conv5_block3_out``).

    Raises:
        ValueError: the model is a fold ensemble (resolve the layer in each of
            ``lungct.modelio.ensemble_members``), the name matches no layer (the message lists
            the convolutional layers), or the layer's output is not a 4-D feature map.
    """
    if is_ensemble(model):
        raise ValueError(f"model {model.name!r} is a fold ensemble: its layers are resolved "
                         "in each member")
    if layer_name is None:
        return _default_target(model)
    short = layer_name.split("/")[-1]
    found = [TargetLayer(layer, None) for layer in model.layers if layer.name == short]
    for backbone in _nested_models(model):
        found += [TargetLayer(inner, backbone) for inner in backbone.layers
                  if inner.name == short and layer_name in (short, f"{backbone.name}/{short}")]
    if not found:
        raise ValueError(
            f"layer {layer_name!r} is not in model {model.name!r}; its convolutional layers "
            f"are: {', '.join(convolutional_layer_names(model))}")
    target = found[0]
    if not _is_feature_map(target.layer):
        raise ValueError(f"layer {layer_name!r} outputs shape {tuple(target.layer.output.shape)}; "
                         "Grad-CAM needs a 4-D (N, h, w, C) feature map")
    return target


def _outer_call_tensors(backbone: keras.Model) -> tuple[Any, Any]:
    """The input and output tensors of the backbone's call inside the outer model's graph.

    ``backbone.input``/``.output`` are its own inner graph's; the outer call is its one
    inbound node.
    """
    nodes = backbone._inbound_nodes  # noqa: SLF001 - Keras exposes the call graph only here
    if len(nodes) != 1:
        raise ValueError(f"backbone {backbone.name!r} is called {len(nodes)} times; expected 1")
    return nodes[0].input_tensors[0], nodes[0].output_tensors[0]


def _submodel(inputs: Any, outputs: Any, what: str) -> keras.Model:
    """A functional model between two tensors; a clear error when they are not a cut."""
    try:
        return keras.Model(inputs, outputs)
    except ValueError as error:
        raise ValueError(f"cannot split the model at {what}: the logit also depends on tensors "
                         f"that bypass it; explain a block output instead ({error})") from error


def split_model(model: keras.Model, target: TargetLayer) -> tuple[keras.Model, keras.Model]:
    """Split ``model`` into image -> feature map and feature map -> logit.

    For a layer inside a nested backbone, the outer graph is cut around the backbone's call
    and the backbone's graph around the layer; the pieces share the model's layers and weights.

    Raises:
        ValueError: the model has no ``logit`` layer, or the layer is not a cut of the graph.
    """
    if LOGIT_LAYER not in {layer.name for layer in model.layers}:
        raise ValueError(f"model {model.name!r} has no layer named {LOGIT_LAYER!r} "
                         "(the pre-sigmoid Dense output that Grad-CAM explains)")
    logit = model.get_layer(LOGIT_LAYER).output
    if target.backbone is None:
        feature = _submodel(model.inputs[0], target.layer.output, target.name)
        return feature, _submodel(target.layer.output, logit, target.name)
    outer_in, outer_out = _outer_call_tensors(target.backbone)
    prefix = _submodel(model.inputs[0], outer_in, "the backbone input")
    inner_head = _submodel(target.backbone.input, target.layer.output, target.name)
    suffix = _submodel(outer_out, logit, "the backbone output")
    images = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    feature = keras.Model(images, inner_head(prefix(images)))
    features = keras.Input(batch_shape=target.layer.output.shape,
                           dtype=target.layer.output.dtype)
    if target.layer.output is target.backbone.output:
        return feature, keras.Model(features, suffix(features))
    inner_tail = _submodel(target.layer.output, target.backbone.output, target.name)
    return feature, keras.Model(features, suffix(inner_tail(features)))


def class_activation_maps(features: np.ndarray, gradients: np.ndarray,
                          method: str = "gradcam") -> np.ndarray:
    """ReLU of the gradient-weighted feature maps, (N, h, w), before upsampling.

    Args:
        features: (N, h, w, C) feature maps A of the explained layer.
        gradients: (N, h, w, C) gradients of the explained score with respect to A.
        method: ``gradcam`` (weights = spatial mean of the gradients) or ``gradcam++``
            (eq. 19 of Chattopadhay et al. 2018; alpha = 0 where its denominator is 0).
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {tuple(CAM_METHODS)}, got {method!r}")
    if features.shape != gradients.shape or features.ndim != 4:
        raise ValueError(f"features {features.shape} and gradients {gradients.shape} must be "
                         "equal 4-D shapes")
    features = features.astype(np.float32)
    gradients = gradients.astype(np.float32)
    if method == "gradcam":
        weights = gradients.mean(axis=(1, 2))
    else:
        squared = gradients * gradients
        denominator = 2.0 * squared + features.sum(axis=(1, 2), keepdims=True) * (
            squared * gradients)
        nonzero = denominator != 0
        alpha = np.where(nonzero, squared / np.where(nonzero, denominator, 1.0), 0.0)
        weights = (alpha * np.maximum(gradients, 0.0)).sum(axis=(1, 2))
    return np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0.0)


def upsample_and_normalise(cams: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear, half-pixel-centred upsampling (OpenCV INTER_LINEAR) then division by each
    map's maximum; a map without a positive value stays all zero."""
    height, width = image_hw
    if len(cams) == 0:
        return np.zeros((0, height, width), np.float32)
    maps = np.stack([cv2.resize(cam.astype(np.float32), (width, height),
                                interpolation=cv2.INTER_LINEAR) for cam in cams])
    peak = maps.max(axis=(1, 2), keepdims=True)
    positive = peak > 0
    maps = np.where(positive, maps / np.where(positive, peak, 1.0), 0.0)
    return np.clip(maps, 0.0, 1.0).astype(np.float32)


class GradCam:
    """Grad-CAM / Grad-CAM++ for one model and layer, compiled once, applied in batches.

    For a fold ensemble (``lungct.modelio.ensemble_members``) one GradCam per member, each at
    the member's layer (``layer_name`` resolved in every member, None for each member's
    default) with the member's own logit as the score; :meth:`explain` averages their maps.

    Args:
        model: classifier with a uint8 (H, W, C) input and a ``logit`` layer, or an ensemble.
        layer_name: explained layer (see ``resolve_target_layer``); None for the default.
        method: ``gradcam`` or ``gradcam++``.
    """

    def __init__(self, model: keras.Model, layer_name: str | None = None,
                 method: str = "gradcam") -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"method must be one of {tuple(CAM_METHODS)}, got {method!r}")
        self.model = model
        self.method = method
        self.image_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self.members = ([GradCam(member, layer_name, method)
                         for member in ensemble_members(model)] if is_ensemble(model) else [])
        self.target: TargetLayer | None = None
        if self.members:
            self.feature_hw = min((m.feature_hw for m in self.members),
                                  key=lambda hw: hw[0] * hw[1])
            return
        self.target = resolve_target_layer(model, layer_name)
        feature, head = split_model(model, self.target)
        self.feature_hw = tuple(int(d) for d in feature.output.shape[1:3])
        self._gradients = make_logit_and_feature_grads(feature, head)

    @property
    def layer_name(self) -> str:
        """Qualified name of the explained layer; for an ensemble each member's, joined by
        ``, `` (``fold0/last_conv, fold1/last_conv``)."""
        if self.members:
            return ", ".join(f"{m.model.name}/{m.layer_name}" for m in self.members)
        return self.target.name

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be uint8 of shape (N, *{self.image_shape}), "
                             f"got {images.dtype} {images.shape}")
        return images

    def explain(self, images: np.ndarray, target: str = "positive", batch_size: int = 32,
                progress: bool = False) -> CamResult:
        """Maps and logits for a batch of images, computed ``batch_size`` at a time.

        Args:
            images: uint8 (N, H, W, C), or (N, H, W) for one channel, as the model takes them.
            target: ``positive`` explains the logit, ``negative`` its negation.
            batch_size: images per compiled call.
            progress: show a tqdm bar.
        """
        if target not in TARGETS:
            raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        images = self._check_images(images)
        if self.members:
            results = [m.explain(images, target, batch_size, progress) for m in self.members]
            return CamResult(np.mean([r.maps for r in results], axis=0).astype(np.float32),
                             np.mean([r.logits for r in results], axis=0).astype(np.float32),
                             tuple(r.maps for r in results))
        maps, logits = [], []
        starts = range(0, len(images), batch_size)
        quiet = None if progress else True  # None: a bar on a terminal only
        for start in tqdm(starts, desc="Grad-CAM", unit="batch", disable=quiet):
            batch_logits, features, gradients = self._gradients(images[start:start + batch_size])
            cams = class_activation_maps(features, TARGETS[target] * gradients, self.method)
            maps.append(upsample_and_normalise(cams, self.image_shape[:2]))
            logits.append(batch_logits.reshape(-1))
        height, width = self.image_shape[:2]
        if not maps:
            return CamResult(np.zeros((0, height, width), np.float32), np.zeros(0, np.float32))
        return CamResult(np.concatenate(maps), np.concatenate(logits).astype(np.float32))
