"""The Grad-CAM part of the interpretation stage: which images, their maps, checks, overlays.

Localisation uses the test images that carry an ROI mask, all of them or a seeded draw
stratified by class; the gallery adds the most confident true/false positives/negatives of
the whole test split. Both sets go through one batched, compiled Grad-CAM pass, then a second
pass with the head and top block re-initialised for the randomisation check. A fold ensemble's
map is the mean of its members' (``lungct.gradcam``); its randomisation check runs per member
(that member's head and top block re-initialised, its own maps compared) and pools the
members' correlations. Overlays show the image's centre plane (``contract.CENTRE_CHANNEL``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lungct.contract import CAM_METHODS
from lungct.errors import UserError
from lungct.gradcam import CamResult, GradCam, probability_of_logits
from lungct.interpret.cam_checks import (
    randomised_weights,
    rank_correlations,
    summarise_localisation,
    top_block_layers,
)
from lungct.interpret.figures import write_overlay
from lungct.interpret.inputs import load_images, load_masks
from lungct.interpret.weakness import OUTCOMES, confident_examples
from lungct.sampling import stratified_draw

__all__ = [
    "MIN_RESOLUTION_PX",
    "RANDOMISATION_LIMIT",
    "CamSettings",
    "explain_test_set",
]

LOG = logging.getLogger(__name__)

MIN_RESOLUTION_PX = 7
RANDOMISATION_LIMIT = 0.5
PROBABILITY_TOLERANCE = 0.02


@dataclass(frozen=True)
class CamSettings:
    """How to explain: method, layer (None = default), image cap (None = all), batch, seed."""

    method: str
    layer: str | None
    max_images: int | None
    batch_size: int
    seed: int


def _overlay_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", Path(path).with_suffix("").as_posix()) + ".png"


def _localisation(maps: np.ndarray, masks: np.ndarray, frame: pd.DataFrame) -> dict:
    """Pointing game and energy for all positives and for true positives."""
    positive = (frame["y_true"] == 1).to_numpy()
    true_positive = positive & frame["y_pred"].to_numpy()
    return {"all_positives": summarise_localisation(maps[positive], masks[positive]),
            "true_positives": summarise_localisation(maps[true_positive],
                                                     masks[true_positive])}


def _statement(median: float | None, names: list[str]) -> str:
    if median is None:
        return ("undefined: every map of the trained or the re-initialised model is constant")
    if median >= RANDOMISATION_LIMIT:
        return (f"The maps barely depend on the learned weights: after re-initialising "
                f"{', '.join(names)}, the median Spearman rank correlation with the trained "
                f"model's maps is {median:.2f} (>= {RANDOMISATION_LIMIT}).")
    return (f"After re-initialising {', '.join(names)}, the median Spearman rank correlation "
            f"with the trained model's maps is {median:.2f} (< {RANDOMISATION_LIMIT}): the "
            "maps change when the learned weights are removed.")


def _summary(rho: np.ndarray, names: list[str]) -> dict:
    """The check's block from per-image correlations and the re-initialised layers."""
    defined = rho[np.isfinite(rho)]
    median = float(np.median(defined)) if defined.size else None
    return {"reinitialised_layers": names, "n_images": int(len(rho)),
            "n_defined": int(defined.size), "threshold": RANDOMISATION_LIMIT,
            "median_spearman": median, "statement": _statement(median, names),
            "maps_barely_depend_on_weights": None if median is None
            else median >= RANDOMISATION_LIMIT}


def _member_correlations(cam: GradCam, images: np.ndarray, maps: np.ndarray,
                         settings: CamSettings) -> tuple[np.ndarray, list[str]]:
    """Spearman rho of trained vs re-initialised maps of one single model, and the layers."""
    chosen = top_block_layers(cam.model, cam.target)
    with randomised_weights(chosen, settings.seed) as names:
        random_maps = cam.explain(images, batch_size=settings.batch_size).maps
    return rank_correlations(maps, random_maps), names


def _randomisation(cam: GradCam, images: np.ndarray, result: CamResult,
                   settings: CamSettings) -> dict:
    """Median Spearman correlation of trained vs re-initialised maps (Adebayo et al. 2018);
    for an ensemble per member (``members``) and pooled over the members' images."""
    if not cam.members:
        return _summary(*_member_correlations(cam, images, result.maps, settings))
    members, pooled, pooled_names = {}, [], []
    for member, member_maps in zip(cam.members, result.member_maps, strict=True):
        rho, names = _member_correlations(member, images, member_maps, settings)
        members[member.model.name] = _summary(rho, names)
        pooled.append(rho)
        pooled_names += [f"{member.model.name}/{name}" for name in names]
    return {**_summary(np.concatenate(pooled), pooled_names), "pooled_over": "members",
            "members": members}


def _resolution_block(cam: GradCam) -> dict:
    height, width = cam.feature_hw
    warning = None
    if min(height, width) < MIN_RESOLUTION_PX:
        warning = (f"The explained layer's map is {height}x{width} cells, below "
                   f"{MIN_RESOLUTION_PX}x{MIN_RESOLUTION_PX}: each cell covers "
                   f"{cam.image_shape[0] / height:.0f} px of the image, too coarse for "
                   "localisation; read the pointing game and energy scores with that in mind.")
    return {"feature_map_resolution": [height, width], "resolution_warning": warning}


def explain_test_set(model: object, frame: pd.DataFrame, dataset_dir: Path, out_dir: Path,
                     image_size_px: int, settings: CamSettings, channels: int = 1
                     ) -> tuple[dict, dict[str, list[dict]]]:
    """Grad-CAM on the masked test images (and the gallery), with every check.

    Args:
        model: the loaded selected model.
        frame: test rows (``path``, ``y_true``, ``y_prob``, ``y_pred``, ``mask_path``).
        dataset_dir: folder the manifest's paths are relative to.
        out_dir: report folder; per-image overlays go to ``out_dir/gradcam``.
        image_size_px: model input side.
        settings: method, layer, image cap, batch size, seed.
        channels: channels of the dataset's images (1, or 3 with 2.5D context).

    Returns:
        The report.json ``gradcam`` block and the gallery entries per outcome.
    """
    started = time.perf_counter()
    try:
        cam = GradCam(model, settings.layer, settings.method)
    except ValueError as error:
        raise UserError(f"Grad-CAM cannot explain this model: {error}") from error
    masked = np.flatnonzero((frame["mask_path"] != "").to_numpy())
    localisation_rows = masked[stratified_draw(frame["y_true"].to_numpy()[masked],
                                               settings.max_images, settings.seed)]
    gallery = confident_examples(frame)
    rows = np.unique(np.concatenate([localisation_rows,
                                     np.asarray(sum(gallery.values(), []), dtype=int)]))
    subset = frame.iloc[rows].reset_index(drop=True)
    LOG.info("Grad-CAM (%s) at %s on %d test images", settings.method, cam.layer_name, len(rows))
    images = load_images(dataset_dir, subset["path"].tolist(), image_size_px, channels)
    masks = load_masks(dataset_dir, subset["mask_path"].tolist(), image_size_px)
    result = cam.explain(images, batch_size=settings.batch_size, progress=True)
    in_localisation = np.isin(rows, localisation_rows)
    block = {
        "method": settings.method, "method_name": CAM_METHODS[settings.method],
        "target": "positive (the cancer logit, before the sigmoid)",
        "layer": cam.layer_name, "ensemble_members": [m.model.name for m in cam.members],
        **_resolution_block(cam),
        "n_images": int(in_localisation.sum()), "n_masked_test_images": int(len(masked)),
        "max_images": settings.max_images, "n_explained_with_gallery": int(len(rows)),
        **_model_agreement(probability_of_logits(cam.model, result.logits),
                           subset["y_prob"].to_numpy()),
    }
    groups = _localisation(result.maps[in_localisation], masks[in_localisation],
                           subset[in_localisation])
    block["by_group"] = groups
    block["pointing_game"] = groups["all_positives"]["pointing_game"]
    block["energy_in_roi"] = groups["all_positives"]["energy_in_roi"]
    block["randomization_check"] = _randomisation(cam, images, result, settings)
    for i, path in enumerate(subset["path"]):
        write_overlay(out_dir / "gradcam" / _overlay_name(path), images[i], result.maps[i],
                      masks[i] if subset["mask_path"].iloc[i] else None)
    block["overlays"] = "gradcam/"
    block["seconds"] = round(time.perf_counter() - started, 2)
    position = {row: i for i, row in enumerate(rows)}
    entries = {category: [{"path": frame["path"].iloc[r], "y_prob": float(frame["y_prob"].iloc[r]),
                           "image": images[position[r]], "map": result.maps[position[r]],
                           "mask": masks[position[r]] if frame["mask_path"].iloc[r] else None}
                          for r in gallery[category]]
               for category in OUTCOMES}
    return block, entries


def _model_agreement(probabilities: np.ndarray, recorded_prob: np.ndarray) -> dict:
    """Largest |probability of the Grad-CAM pass - recorded test probability|; a warning
    above 0.02."""
    if len(probabilities) == 0:
        return {"probability_max_abs_difference": None}
    difference = float(np.max(np.abs(probabilities - recorded_prob)))
    if difference > PROBABILITY_TOLERANCE:
        LOG.warning("the loaded model's probabilities differ from training_results.json by up "
                    "to %.3f: the model file may not be the one that was scored", difference)
    return {"probability_max_abs_difference": difference}
