"""The simulated CT scanner: acquisition constants, the pixel grid of a series, quantum
noise and the stored pixel values (part of :mod:`lungct.synthetic`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FIELD_OF_VIEW_MM",
    "Geometry",
    "PIXEL_PADDING_STORED",
    "RESCALE_INTERCEPT_HU",
    "SLICES_PER_PATIENT",
    "SLICE_THICKNESS_MM",
    "add_noise",
    "make_geometry",
    "stored_values",
]

FIELD_OF_VIEW_MM = 350.0  # reconstruction diameter; pixel spacing = FOV / image size
SLICE_THICKNESS_MM = 2.5  # = slice spacing; LUNA16 keeps LIDC scans of <= 2.5 mm
SLICES_PER_PATIENT = 52  # a 130 mm slab of the mid chest

RESCALE_INTERCEPT_HU = -1024
PIXEL_PADDING_STORED = -2000  # about -3024 HU, as in LIDC-IDRI
_MAX_HU = 3071


@dataclass(frozen=True)
class Geometry:
    """Pixel grid of one series: square slices, z decreasing with InstanceNumber."""

    image_size_px: int
    pixel_spacing_mm: float  # (0028,0030) Pixel Spacing, rows = columns
    origin_mm: float  # x and y of the centre of the top-left pixel, (0020,0032)
    z_mm: tuple[float, ...]  # (0020,0032) third value, slice k has InstanceNumber k + 1

    @functools.cached_property
    def axis_mm(self) -> np.ndarray:
        """Patient x of each column (= y of each row), float32."""
        return (self.origin_mm + self.pixel_spacing_mm * np.arange(self.image_size_px)
                ).astype(np.float32)

    def to_px(self, position_mm: float) -> float:
        """Column (from x) or row (from y) of a position, fractional."""
        return (position_mm - self.origin_mm) / self.pixel_spacing_mm

    def slice_of(self, z_mm: float) -> int:
        """Index of the slice nearest to ``z_mm``."""
        return int(np.argmin(np.abs(np.asarray(self.z_mm) - z_mm)))


def make_geometry(image_size_px: int, rng: np.random.Generator) -> Geometry:
    spacing_mm = round(FIELD_OF_VIEW_MM / image_size_px, 6)
    origin_mm = round(-(image_size_px - 1) / 2 * spacing_mm, 4)
    top_z_mm = -60.0 - 0.5 * int(rng.integers(0, 160))
    z_mm = tuple(top_z_mm - SLICE_THICKNESS_MM * k for k in range(SLICES_PER_PATIENT))
    return Geometry(image_size_px, spacing_mm, origin_mm, z_mm)


def add_noise(hu: np.ndarray, rng: np.random.Generator, sd_hu: float = 12.0) -> None:
    """Add quantum noise (sd 12 HU): every slice gets a randomly shifted crop of one of eight
    white-noise slices, ten times cheaper than fresh noise per voxel."""
    slices, rows, cols = hu.shape
    bank = rng.standard_normal((8, rows + 16, cols + 16), dtype=np.float32) * np.float32(sd_hu)
    picks, shifts = rng.integers(0, 8, slices), rng.integers(0, 16, (slices, 2))
    for k in range(slices):
        (dy, dx) = shifts[k]
        hu[k] += bank[picks[k], dy:dy + rows, dx:dx + cols]


def stored_values(hu: np.ndarray) -> np.ndarray:
    """Stored int16 values: HU - (0028,1052) Rescale Intercept, padding outside the scan circle.

    Consumes ``hu`` (rounded in place).
    """
    np.clip(hu, RESCALE_INTERCEPT_HU, _MAX_HU, out=hu)
    hu -= RESCALE_INTERCEPT_HU - 0.5  # non-negative now: truncation rounds half up
    stored = hu.astype("<i2")
    size = hu.shape[-1]
    axis = np.arange(size) - (size - 1) / 2
    stored[:, axis[:, None] ** 2 + axis[None, :] ** 2 > (size / 2) ** 2] = PIXEL_PADDING_STORED
    return stored
