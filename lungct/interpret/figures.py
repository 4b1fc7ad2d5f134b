"""Figures of the report (matplotlib, Agg backend: files only, never a window).

Each function draws one PNG from computed numbers and writes it atomically. Images with
2.5D context (3 channels: planes z-D, z, z+D) are shown by their centre plane, in grey.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from lungct.contract import CENTRE_CHANNEL  # noqa: E402
from lungct.fileio import atomic_path  # noqa: E402
from lungct.interpret.weakness import OUTCOMES  # noqa: E402
from lungct.metrics import LevelData  # noqa: E402

__all__ = [
    "LEVEL_TITLES",
    "plot_confusion_matrices",
    "plot_roc_curves",
    "plot_pr_curves",
    "plot_calibration",
    "plot_gallery",
    "centre_plane",
    "overlay_image",
    "write_overlay",
]

LEVEL_TITLES = {"slice_level": "slice", "nodule_level": "nodule", "patient_level": "patient"}
DPI = 110
CONTOUR_BGR = (0, 255, 0)
OVERLAY_MIN_SIDE_PX = 256


def _save(figure: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    plt.close(figure)
    return path


def _undefined(axis: plt.Axes, title: str, reason: str) -> None:
    axis.set_title(title)
    axis.text(0.5, 0.5, "undefined:\n" + textwrap.fill(reason, 36), ha="center", va="center",
              fontsize=8, transform=axis.transAxes)
    axis.set_xticks([])
    axis.set_yticks([])


def plot_confusion_matrices(evaluation: dict[str, dict], path: Path) -> Path:
    """Confusion matrix per level at the threshold: counts and row percentages."""
    figure, axes = plt.subplots(1, len(evaluation), figsize=(4.2 * len(evaluation), 3.8))
    for axis, (level, block) in zip(np.atleast_1d(axes), evaluation.items(), strict=True):
        title = f"{LEVEL_TITLES[level]} level"
        if "confusion_matrix" not in block or block["n"]["total"] == 0:
            _undefined(axis, title, "no threshold or no units")
            continue
        matrix = np.asarray(block["confusion_matrix"]["matrix"], dtype=float)
        totals = matrix.sum(axis=1, keepdims=True)
        shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (row, col), count in np.ndenumerate(matrix):
            share = f"{shares[row, col]:.0%}" if totals[row, 0] else "-"
            axis.text(col, row, f"{int(count)}\n{share} of row", ha="center", va="center",
                      color="white" if shares[row, col] > 0.6 else "black", fontsize=10)
        axis.set_xticks([0, 1], ["non_cancer", "cancer"])
        axis.set_yticks([0, 1], ["non_cancer", "cancer"])
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{title} (threshold {block['threshold']:.3f})")
    figure.tight_layout()
    return _save(figure, path)


def _ci_text(block: dict) -> str:
    if block["value"] is None:
        return "undefined"
    if block["ci_low"] is None:
        return f"{block['value']:.3f}"
    return f"{block['value']:.3f} [{block['ci_low']:.3f}, {block['ci_high']:.3f}]"


def plot_roc_curves(levels: dict[str, LevelData], evaluation: dict[str, dict],
                    bands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None],
                    path: Path) -> Path:
    """ROC per level with the bootstrap 95% band and the operating point."""
    figure, axes = plt.subplots(1, len(levels), figsize=(4.3 * len(levels), 4.3))
    for axis, (name, level) in zip(np.atleast_1d(axes), levels.items(), strict=True):
        title = f"{LEVEL_TITLES[name]} level"
        block = evaluation[name]
        if block["auc"]["value"] is None:
            _undefined(axis, title, block["auc"]["reason"])
            continue
        fpr, tpr, _ = roc_curve(level.y_true, level.y_prob)
        if bands.get(name) is not None:
            grid, low, high = bands[name]
            axis.fill_between(grid, low, high, color="tab:blue", alpha=0.2,
                              label="95% bootstrap band")
        axis.plot(fpr, tpr, color="tab:blue", label=f"AUC {_ci_text(block['auc'])}")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        sensitivity, specificity = block["sensitivity"]["value"], block["specificity"]["value"]
        if sensitivity is not None and specificity is not None:
            axis.plot(1 - specificity, sensitivity, "o", color="tab:red",
                      label=f"threshold {block['threshold']:.3f}")
        axis.set_xlabel("1 - specificity (false-positive rate)")
        axis.set_ylabel("sensitivity (true-positive rate)")
        axis.set_title(f"{title}, n={block['n']['total']}")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def plot_pr_curves(levels: dict[str, LevelData], evaluation: dict[str, dict],
                   path: Path) -> Path:
    """Precision-recall per level with the prevalence (a chance classifier's precision)."""
    figure, axes = plt.subplots(1, len(levels), figsize=(4.3 * len(levels), 4.3))
    for axis, (name, level) in zip(np.atleast_1d(axes), levels.items(), strict=True):
        title = f"{LEVEL_TITLES[name]} level"
        block = evaluation[name]
        if block["average_precision"]["value"] is None:
            _undefined(axis, title, block["average_precision"]["reason"])
            continue
        precision, recall, _ = precision_recall_curve(level.y_true, level.y_prob)
        axis.step(recall, precision, where="post", color="tab:blue",
                  label=f"AP {_ci_text(block['average_precision'])}")
        prevalence = float(level.y_true.mean())
        axis.axhline(prevalence, color="grey", linestyle=":",
                     label=f"prevalence {prevalence:.2f}")
        sensitivity, ppv = block["sensitivity"]["value"], block["ppv"]["value"]
        if sensitivity is not None and ppv is not None:
            axis.plot(sensitivity, ppv, "o", color="tab:red",
                      label=f"threshold {block['threshold']:.3f}")
        axis.set_xlabel("recall (sensitivity)")
        axis.set_ylabel("precision (PPV)")
        axis.set_title(f"{title}, n={block['n']['total']}")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.legend(loc="lower left", fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def plot_calibration(level: LevelData, bins: list[dict], calibration: dict, path: Path) -> Path:
    """Reliability diagram (10 equal-width bins; before and after temperature scaling when the
    model was scaled) above a histogram of the probabilities."""
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = [b for b in bins if b["n"]]
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    scaled = calibration.get("temperature") is not None
    top.plot([b["mean_predicted"] for b in filled], [b["observed_rate"] for b in filled], "o-",
             color="tab:blue", label="observed cancer rate per bin"
             + (f" (after temperature scaling, T={calibration['temperature']:.2f})"
                if scaled else ""))
    if scaled:
        before = [b for b in calibration["before"]["bins"] if b["n"]]
        top.plot([b["mean_predicted"] for b in before], [b["observed_rate"] for b in before],
                 "s--", color="tab:orange", alpha=0.8, label="before temperature scaling")
    top.set_ylabel("observed cancer rate")
    top.set_ylim(-0.02, 1.02)
    top.set_title(f"slice level: Brier {_ci_text(calibration['brier'])}\n"
                  f"ECE (10 bins) {_ci_text(calibration['ece'])}", fontsize=9)
    top.legend(loc="best", fontsize=8)
    edges = np.linspace(0, 1, len(bins) + 1)
    for label, colour in ((0, "tab:green"), (1, "tab:red")):
        bottom.hist(level.y_prob[level.y_true == label], bins=edges, alpha=0.6, color=colour,
                    label=["non_cancer", "cancer"][label])
    bottom.set_xlabel("predicted probability of cancer")
    bottom.set_ylabel("slices per bin")
    bottom.set_xlim(0, 1)
    bottom.legend(fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def centre_plane(image: np.ndarray) -> np.ndarray:
    """The (H, W) uint8 plane at the sample's z: the image itself when 2-D, else the channel
    ``contract.CENTRE_CHANNEL`` names for its channel count (G of a z-D, z, z+D image)."""
    if image.ndim == 2:
        return image.astype(np.uint8)
    channels = image.shape[-1]
    if image.ndim != 3 or channels not in CENTRE_CHANNEL:
        raise ValueError(f"an image is (H, W) or (H, W, C) with C in {sorted(CENTRE_CHANNEL)}, "
                         f"got shape {image.shape}")
    return image[..., CENTRE_CHANNEL[channels]].astype(np.uint8)


def _display_scale(side_px: int) -> int:
    """Integer enlargement that brings an image side to at least 256 px."""
    return max(1, int(np.ceil(OVERLAY_MIN_SIDE_PX / side_px)))


def overlay_image(image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None,
                  side_px: int | None = None) -> np.ndarray:
    """RGB uint8: the map (jet, 40%) over the image's centre plane in grey, the ROI outlined
    in green.

    Image and map are enlarged (nearest neighbour, so pixels stay visible) to ``side_px``,
    by default an integer factor reaching at least 256 px, before the 1-px outline is
    drawn, which keeps the outline from hiding a small nodule.
    """
    side_px = side_px or image.shape[0] * _display_scale(image.shape[0])

    def enlarge(array: np.ndarray) -> np.ndarray:
        return cv2.resize(array, (side_px, side_px), interpolation=cv2.INTER_NEAREST)

    gray = cv2.cvtColor(enlarge(centre_plane(image)), cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap(enlarge(np.round(cam * 255).astype(np.uint8)), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(gray, 0.6, heat, 0.4, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(enlarge(mask.astype(np.uint8)), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(blended, contours, -1, CONTOUR_BGR, 1)
    return cv2.cvtColor(blended, cv2.COLOR_BGR2RGB)


def write_overlay(path: Path, image: np.ndarray, cam: np.ndarray,
                  mask: np.ndarray | None) -> Path:
    """Write centre plane | overlay side by side, enlarged to >= 256 px high."""
    scale = _display_scale(image.shape[0])
    gray = cv2.resize(centre_plane(image), None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_NEAREST)
    pair = np.concatenate([cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB),
                           overlay_image(image, cam, mask)], axis=1)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode the overlay for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return path


def _tile(example: dict | None, side_px: int) -> np.ndarray:
    """image | overlay for one example, each ``side_px`` square; white when absent."""
    if example is None:
        return np.full((side_px, 2 * side_px, 3), 255, np.uint8)
    gray = cv2.cvtColor(centre_plane(example["image"]), cv2.COLOR_GRAY2RGB)
    pair = [cv2.resize(gray, (side_px, side_px), interpolation=cv2.INTER_NEAREST),
            overlay_image(example["image"], example["map"], example["mask"], side_px)]
    return np.concatenate(pair, axis=1)


def plot_gallery(entries: dict[str, list[dict]], layer: str, path: Path,
                 tile_px: int = 160) -> Path:
    """Grad-CAM gallery: a row per outcome, image | overlay (ROI in green) per example.

    The tiles are composed into one mosaic (one axes), which draws far faster than a grid of
    axes.

    Args:
        entries: per OUTCOMES name, dicts with ``image``, ``map``, ``mask``
            (or None), ``y_prob`` and ``path``.
        layer: explained layer, for the title.
        path: output PNG.
        tile_px: side of each image in the mosaic.
    """
    per_row = max([len(v) for v in entries.values()] + [1])
    gap_px, label_px = 8, 22
    rows = []
    for category in OUTCOMES:
        examples = entries.get(category, [])
        tiles = [_tile(examples[i] if i < len(examples) else None, tile_px)
                 for i in range(per_row)]
        spacer = np.full((tile_px, gap_px, 3), 255, np.uint8)
        row = np.concatenate([part for tile in tiles for part in (tile, spacer)][:-1], axis=1)
        rows.append(np.concatenate([np.full((label_px, row.shape[1], 3), 255, np.uint8), row]))
    mosaic = np.concatenate(rows, axis=0)
    height, width = mosaic.shape[:2]
    figure, axis = plt.subplots(figsize=(width / DPI, (height + 30) / DPI))
    axis.imshow(mosaic)
    axis.set_axis_off()
    row_height = tile_px + label_px
    for r, category in enumerate(OUTCOMES):
        examples = entries.get(category, [])
        if not examples:
            axis.text(4, r * row_height + label_px - 6, f"{category.replace('_', ' ')}: none "
                      "in the test split", fontsize=8)
        for c, example in enumerate(examples):
            notes = ("" if example["mask"] is not None else ", no ROI") + (
                "" if example["map"].max() > 0 else ", map all 0")
            axis.text(c * (2 * tile_px + gap_px) + 2, r * row_height + label_px - 6,
                      f"{category.replace('_', ' ')}: p(cancer)={example['y_prob']:.3f}{notes}",
                      fontsize=7)
    axis.set_title(f"Grad-CAM at {layer}: image | map over image, ROI outlined in green",
                   fontsize=9)
    figure.subplots_adjust(left=0, right=1, bottom=0, top=1 - 30 / (height + 30))
    return _save(figure, path)
