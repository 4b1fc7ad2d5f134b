"""Does the model look at the nodule? Localisation scores and the randomisation sanity check.

Pointing game (Zhang et al. 2018, "Top-down neural attention by excitation backprop"): a hit
when the map's maximum lies inside the ROI mask dilated by max(2 px, 2% of the image side,
rounded); its chance rate is the mean area fraction of the dilated masks. Where the maximum is
a plateau, its location is the centroid of the pixels within 1e-6 of the maximum. An all-zero
map points nowhere and counts as a miss.

Energy inside the ROI: sum of the map inside the (undilated) mask over the map's sum, beside
the mask's area fraction (what a uniform map would score). Undefined for an all-zero map.

Model-randomisation check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps"): maps of
the trained model against maps after re-initialising the head (``logit``) and the top block
(the last convolution at or before the explained layer and the weighted layers between them),
compared by Spearman rank correlation per image.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import cv2
import keras
import numpy as np
from keras.initializers import Initializer
from scipy.stats import rankdata

from lungct.gradcam import CONV_TYPES, TargetLayer
from lungct.modelio import LOGIT_LAYER

__all__ = [
    "PLATEAU_TOLERANCE",
    "dilation_radius_px",
    "dilate_masks",
    "pointing_game",
    "energy_in_masks",
    "summarise_localisation",
    "top_block_layers",
    "randomised_weights",
    "rank_correlations",
]

LOG = logging.getLogger(__name__)

PLATEAU_TOLERANCE = 1e-6
DILATION_FRACTION = 0.02
MIN_DILATION_PX = 2


def dilation_radius_px(image_side_px: int) -> int:
    """Tolerance of the pointing game: max(2 px, 2% of the image side), rounded."""
    if image_side_px <= 0:
        raise ValueError(f"image_side_px must be positive, got {image_side_px}")
    return max(MIN_DILATION_PX, int(round(DILATION_FRACTION * image_side_px)))


def dilate_masks(masks: np.ndarray, radius_px: int) -> np.ndarray:
    """Dilate boolean (N, H, W) masks by a disc of ``radius_px``."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1,) * 2)
    if len(masks) == 0:
        return masks.astype(bool)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in masks])


def _peak_location(cam: np.ndarray) -> tuple[int, int] | None:
    """Row, column of the map's maximum (centroid of a plateau); None for an all-zero map."""
    peak = cam.max()
    if peak <= 0:
        return None
    rows, cols = np.nonzero(cam >= peak - PLATEAU_TOLERANCE)
    return int(round(rows.mean())), int(round(cols.mean()))


def pointing_game(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image hit (bool) and the dilated mask's area fraction (chance of a random point).

    Args:
        maps: (N, H, W) maps in [0, 1].
        masks: (N, H, W) boolean ROI masks of the same size.
    """
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    if len(maps) == 0:
        return np.zeros(0, bool), np.zeros(0)
    dilated = dilate_masks(masks, dilation_radius_px(max(maps.shape[1:])))
    hits = np.zeros(len(maps), dtype=bool)
    for i, cam in enumerate(maps):
        location = _peak_location(cam)
        hits[i] = location is not None and bool(dilated[i][location])
    return hits, dilated.reshape(len(maps), -1).mean(axis=1)


def energy_in_masks(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image share of the map's sum inside the mask (NaN for an all-zero map), area share."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    if len(maps) == 0:
        return np.zeros(0), np.zeros(0)
    flat_maps = maps.reshape(len(maps), -1).astype(np.float64)
    flat_masks = masks.reshape(len(masks), -1)
    total = flat_maps.sum(axis=1)
    inside = (flat_maps * flat_masks).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)
    return share, flat_masks.mean(axis=1)


def summarise_localisation(maps: np.ndarray, masks: np.ndarray) -> dict:
    """Pointing game and energy-in-ROI of a group of images as a report.json block."""
    hits, chance = pointing_game(maps, masks)
    share, area = energy_in_masks(maps, masks)
    defined = np.isfinite(share)
    total = int(len(maps))
    return {
        "pointing_game": {
            "hits": int(hits.sum()), "total": total,
            "rate": float(hits.mean()) if total else None,
            "chance_rate": float(chance.mean()) if total else None,
        },
        "energy_in_roi": {
            "mean": float(share[defined].mean()) if defined.any() else None,
            "median": float(np.median(share[defined])) if defined.any() else None,
            "mask_area_fraction_mean": float(area.mean()) if total else None,
            "n_defined": int(defined.sum()),
        },
        "all_zero_maps": int(sum(cam.max() <= 0 for cam in maps)),
    }


def top_block_layers(model: keras.Model, target: TargetLayer) -> list[keras.layers.Layer]:
    """Layers the randomisation check re-initialises: the head and the top block.

    The top block runs from the last convolution at or before the explained layer (in the
    owning graph's layer order) to the explained layer; only layers with weights are kept.
    """
    owner = target.backbone or model
    ordered = owner.layers
    end = next(i for i, layer in enumerate(ordered) if layer is target.layer)
    convs = [i for i in range(end + 1) if isinstance(ordered[i], CONV_TYPES)]
    start = convs[-1] if convs else end
    block = [layer for layer in ordered[start:end + 1] if layer.weights]
    return [*block, model.get_layer(LOGIT_LAYER)]


def _seeded(initializer: Initializer, seed: int) -> Initializer:
    """A copy of ``initializer`` with ``seed`` when it takes one (random ones do)."""
    config = initializer.get_config()
    if "seed" not in config:
        return initializer
    return initializer.__class__.from_config({**config, "seed": seed})


def _reinitialise(layer: keras.layers.Layer, seed: int) -> None:
    """Redraw every variable of ``layer`` from the layer's own initializer for it."""
    for offset, variable in enumerate(layer.weights):
        attribute = f"{variable.name}_initializer"
        initializer = getattr(layer, attribute, None)
        if initializer is None:
            raise ValueError(f"layer {layer.name!r} has no {attribute} to re-initialise "
                             f"{variable.name!r} with")
        initializer = _seeded(keras.initializers.get(initializer), seed + offset)
        variable.assign(initializer(variable.shape, dtype=variable.dtype))


@contextlib.contextmanager
def randomised_weights(chosen: list[keras.layers.Layer], seed: int) -> Iterator[list[str]]:
    """Re-initialise ``chosen`` layers inside the block; restore the trained weights after.

    Yields:
        The names of the re-initialised layers.
    """
    saved = [[np.array(keras.ops.convert_to_numpy(v.value)) for v in layer.weights]
             for layer in chosen]
    try:
        for index, layer in enumerate(chosen):
            _reinitialise(layer, seed + 1000 * index)
        yield [layer.name for layer in chosen]
    finally:
        for layer, values in zip(chosen, saved, strict=True):
            for variable, value in zip(layer.weights, values, strict=True):
                variable.assign(value)


def rank_correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each pair of maps; NaN where a map is constant."""
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"map shapes differ: {maps_a.shape} vs {maps_b.shape}")
    ranks_a = rankdata(maps_a.reshape(len(maps_a), -1), axis=1)
    ranks_b = rankdata(maps_b.reshape(len(maps_b), -1), axis=1)
    ranks_a -= ranks_a.mean(axis=1, keepdims=True)
    ranks_b -= ranks_b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((ranks_a ** 2).sum(axis=1) * (ranks_b ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ranks_a * ranks_b).sum(axis=1) /
                        np.where(denominator > 0, denominator, 1), np.nan)
