"""Turn one candidate into the PNG image (and ROI mask) the dataset stores.

Order: decode -> HU (padding to air) -> crop (patch view) or pad to square (slice view) in
HU -> area resize in HU -> window to uint8 -> invert for MONOCHROME1. Resizing before
windowing averages Hounsfield units, not clipped grey levels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

from lungct.prepare.candidates import IMAGE_SUFFIXES, Candidate
from lungct.prepare.dicom import AIR_HU, UnusableFileError, apply_window, read_hu, square_and_resize

__all__ = ["RenderSettings", "Rendered", "render", "encode_png", "lung_tissue_centre"]

PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fastest zlib level; files ~10% larger
_LUNG_MAX_HU = -500.0
_BODY_MIN_HU = -500.0


@dataclass(frozen=True)
class RenderSettings:
    """How every sample is drawn."""

    image_size_px: int
    window_center_hu: float
    window_width_hu: float
    view: str  # "slice" | "patch"
    patch_mm: float


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 (S, S)
    mask: np.ndarray | None  # uint8 0/255 (S, S)
    mm_per_px: float | None


def encode_png(image: np.ndarray) -> bytes:
    """Deterministic 8-bit grayscale PNG bytes."""
    ok, buffer = cv2.imencode(".png", image, PNG_PARAMS)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def _resize_mask(mask: np.ndarray, size_px: int) -> np.ndarray:
    """Area-resize a boolean mask and keep pixels at least half covered (0/255)."""
    coverage = cv2.resize(mask.astype(np.float32), (size_px, size_px),
                          interpolation=cv2.INTER_AREA if mask.shape[0] >= size_px
                          else cv2.INTER_LINEAR)
    result = (coverage >= 0.5).astype(np.uint8) * 255
    if mask.any() and not result.any():  # a nodule smaller than one output pixel
        row, col = np.unravel_index(int(np.argmax(coverage)), coverage.shape)
        result[row, col] = 255
    return result


def lung_tissue_centre(hu: np.ndarray, patch_px: int, seed_text: str) -> tuple[float, float]:
    """A reproducible patch centre inside lung parenchyma for a ``no_finding`` patch.

    Lung = pixels below -500 HU inside the body (the largest component above -500 HU with its
    holes filled); the centre is drawn, seeded by ``seed_text``, among lung pixels whose
    surrounding patch is mostly lung or body. Falls back to the image centre.
    """
    body = (hu > _BODY_MIN_HU).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=4)
    rows, cols = hu.shape
    if count > 1:
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        body = (components == largest).astype(np.uint8)
        contours, _ = cv2.findContours(body, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        filled = np.zeros_like(body)
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
        lung = (filled > 0) & (hu < _LUNG_MAX_HU)
        half = patch_px // 2
        inner = np.zeros_like(lung)
        inner[half : rows - half, half : cols - half] = True
        ys, xs = np.nonzero(lung & inner if (lung & inner).any() else lung)
        if len(ys):
            seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
            pick = int(np.random.default_rng(seed).integers(len(ys)))
            return float(xs[pick]), float(ys[pick])
    return (cols - 1) / 2, (rows - 1) / 2


def _crop(image: np.ndarray, centre_xy: tuple[float, float], side_px: int,
          fill: float) -> np.ndarray:
    """A ``side_px`` square of ``image`` centred on ``centre_xy``, padded with ``fill``."""
    left = int(round(centre_xy[0] - side_px / 2))
    top = int(round(centre_xy[1] - side_px / 2))
    out = np.full((side_px, side_px), fill, dtype=image.dtype)
    rows, cols = image.shape
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + side_px, rows), min(left + side_px, cols)
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
            src_top:src_bottom, src_left:src_right
        ]
    return out


def render(candidate: Candidate, settings: RenderSettings) -> Rendered:
    """Draw one candidate.

    Raises:
        lungct.prepare.dicom.UnusableFileError: its pixels cannot be read.
    """
    if candidate.source_path.suffix.lower() in IMAGE_SUFFIXES:
        return _render_image_file(candidate, settings)
    hu, monochrome1 = read_hu(candidate.source_path)
    mask = candidate.mask.full(hu.shape) if candidate.mask is not None else None
    spacing_mm = candidate.pixel_spacing_mm
    if settings.view == "patch" and spacing_mm:
        side_px = max(2, int(round(settings.patch_mm / spacing_mm)))
        centre = candidate.centre_xy_px or lung_tissue_centre(
            hu, side_px, f"{candidate.series_uid}:{candidate.slice_z_mm}"
        )
        hu = _crop(hu, centre, side_px, AIR_HU)
        mask = _crop(mask, centre, side_px, False) if mask is not None else None
    resized, scale = square_and_resize(hu, settings.image_size_px, AIR_HU)
    image = apply_window(resized, settings.window_center_hu, settings.window_width_hu)
    if monochrome1:
        image = 255 - image
    if mask is not None:
        side = max(mask.shape)
        square = np.zeros((side, side), dtype=bool)
        top, left = (side - mask.shape[0]) // 2, (side - mask.shape[1]) // 2
        square[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
        mask = _resize_mask(square, settings.image_size_px)
    mm_per_px = spacing_mm * scale if spacing_mm else None
    return Rendered(image, mask, mm_per_px)


def _render_image_file(candidate: Candidate, settings: RenderSettings) -> Rendered:
    """An already-windowed image file: grayscale, padded to square with black, resized."""
    data = np.fromfile(candidate.source_path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if image is None:
        raise UnusableFileError("image file could not be decoded")
    resized, _ = square_and_resize(image, settings.image_size_px, 0)
    return Rendered(resized, None, None)
