"""The built-in synthetic LIDC-IDRI-format cohort: CT DICOM series + LIDC XML readings.

The pipeline's offline default and the fixture of the stage tests. It writes real files that
a reader of LIDC-IDRI (Armato et al. 2011, Med. Phys. 38:915) accepts, so synthetic data goes
through exactly the code real data goes through (/work/shared/LIDC_FORMAT.md is the contract):

``out_dir/LIDC-IDRI-9001/<StudyInstanceUID>/<SeriesInstanceUID>/000001.dcm ... + NNN.xml``

Each patient is one CT series of a 3D chest slab (air, body outline, subcutaneous fat, muscle,
ribs, spine, heart, aorta, two textured lungs, vessels that look like nodules on a single axial
slice) with nodules of 3-30 mm rendered in 3D: solid, part-solid or ground glass; smooth,
lobulated (bumps), spiculated (thin radiating spikes) or calcified (a very bright core), some
cavitated. Four simulated radiologists read every series: they miss some small nodules, outline
each nodule with their own threshold, and rate the nine LIDC characteristics around the true
shape with reader bias and noise. The latent malignancy follows shape (spiculation, lobulation,
calcification, solidity) more than size, so a size-only baseline is weak by construction
(``benchmarks/bench_synthetic_acceptance.py`` measures both). ``truth.json`` records the true
parameters of every lesion and every reader's ratings; ``cohort.json`` (written last) marks a
complete cohort, so a second call with the same parameters reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from tqdm import tqdm

from lungct.errors import UserError
from lungct.fileio import atomic_write_bytes, atomic_write_json

__all__ = [
    "COHORT_VERSION",
    "DEFAULT_IMAGE_SIZE_PX",
    "DEFAULT_PATIENTS",
    "FIELD_OF_VIEW_MM",
    "LABEL_RULE",
    "SLICES_PER_PATIENT",
    "SLICE_THICKNESS_MM",
    "generate_cohort",
]

LOG = logging.getLogger(__name__)

COHORT_VERSION = 1
DEFAULT_PATIENTS = 48
DEFAULT_IMAGE_SIZE_PX = 256
FIELD_OF_VIEW_MM = 350.0  # reconstruction diameter; pixel spacing = FOV / image size
SLICE_THICKNESS_MM = 2.5  # = slice spacing; LUNA16 keeps LIDC scans of <= 2.5 mm
SLICES_PER_PATIENT = 52  # a 130 mm slab of the mid chest
READERS_PER_SERIES = 4
#: The default consensus rule, recorded with the labels in truth.json (DESIGN.md section 3).
LABEL_RULE = {"rating": "malignancy", "aggregate": "median", "cancer_at_least": 4,
              "non_cancer_at_most": 2, "min_readers": 1}
NEGATIVE_MARGIN_MM = 10.0  # no-finding slices: at least this far in z from every mark

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_LIDC_NAMESPACE = "http://www.nih.gov"
_RESCALE_INTERCEPT_HU = -1024
_PIXEL_PADDING_STORED = -2000  # about -3024 HU, as in LIDC-IDRI
_MAX_HU = 3071
_LUNG_BASE_HU = -860.0
_LOBE_AMPLITUDE = 0.6  # radius change per unit of lobulation at a lobe's apex
_PATIENT_DIR = re.compile(r"LIDC-IDRI-9\d{3}")
_OWN_FILE = re.compile(r"(\.)?(\d{6}\.dcm|\d{3}\.xml)(\.tmp-.*)?")
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
#: The nine LIDC characteristics in XML order, with their rating ranges.
_RATING_RANGES = {"subtlety": (1, 5), "internalStructure": (1, 4), "calcification": (1, 6),
                  "sphericity": (1, 5), "margin": (1, 5), "lobulation": (1, 5),
                  "spiculation": (1, 5), "texture": (1, 5), "malignancy": (1, 5)}
_CHARACTERISTICS = tuple(_RATING_RANGES)
_ID_STYLES = ("Nodule {:03d}", "IL057_{:06d}", "{:d}", "MI014_{:05d}", "CH{:04d}")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
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


def _geometry(image_size_px: int, rng: np.random.Generator) -> _Geometry:
    spacing_mm = round(FIELD_OF_VIEW_MM / image_size_px, 6)
    origin_mm = round(-(image_size_px - 1) / 2 * spacing_mm, 4)
    top_z_mm = -60.0 - 0.5 * int(rng.integers(0, 160))
    z_mm = tuple(top_z_mm - SLICE_THICKNESS_MM * k for k in range(SLICES_PER_PATIENT))
    return _Geometry(image_size_px, spacing_mm, origin_mm, z_mm)


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True, eq=False)
class _Anatomy:
    """Analytic chest of one patient (mm; x to the patient's left, y posterior)."""

    body_cy_mm: float
    body_a_mm: float  # body outline semi-axes
    body_b_mm: float
    wall_mm: float  # chest wall thickness: fat, muscle and ribs
    lung_cx_mm: tuple[float, float]  # right lung (x < 0), left lung (x > 0)
    lung_cy_mm: float
    lung_a_mm: np.ndarray  # (2, Z) semi-axes per lung and slice
    lung_b_mm: np.ndarray
    heart_xy_mm: tuple[float, float]
    heart_r_mm: np.ndarray  # (Z,) the heart grows towards the base
    aorta_xy_mm: tuple[float, float]
    aorta_r_mm: float
    vertebra_xy_mm: tuple[float, float]
    vertebra_r_mm: float

    def in_lung(self, side: int, k: int, x_mm: float, y_mm: float, margin_mm: float) -> bool:
        """True when (x, y) on slice ``k`` lies at least ``margin_mm`` inside lung ``side``."""
        a, b = self.lung_a_mm[side, k], self.lung_b_mm[side, k]
        rho = math.hypot((x_mm - self.lung_cx_mm[side]) / a, (y_mm - self.lung_cy_mm) / b)
        if rho > 1.0 - margin_mm / min(a, b):
            return False
        return all(math.hypot(x_mm - cx, y_mm - cy) > r + margin_mm for (cx, cy), r in (
            (self.heart_xy_mm, self.heart_r_mm[k]), (self.aorta_xy_mm, self.aorta_r_mm + 3),
            (self.vertebra_xy_mm, self.vertebra_r_mm + 7)))


def _sample_anatomy(geometry: _Geometry, rng: np.random.Generator) -> _Anatomy:
    body_cy, body_a, body_b = rng.uniform(-5, 10), rng.uniform(140, 162), rng.uniform(98, 118)
    wall = rng.uniform(17, 24)
    cavity_a, cavity_b = body_a - wall, body_b - wall
    t = np.linspace(0.0, 1.0, len(geometry.z_mm))
    profile = 0.88 + 0.12 * np.sin(np.pi * (0.25 + 0.75 * t))
    sides = np.array([[1.04], [0.98]]) * profile
    vertebra_r = rng.uniform(14, 17)
    return _Anatomy(
        body_cy_mm=body_cy, body_a_mm=body_a, body_b_mm=body_b, wall_mm=wall,
        lung_cx_mm=(-0.5 * cavity_a, 0.5 * cavity_a), lung_cy_mm=body_cy + 0.03 * cavity_b,
        lung_a_mm=0.40 * cavity_a * sides, lung_b_mm=0.80 * cavity_b * sides,
        heart_xy_mm=(0.12 * cavity_a, body_cy - 0.2 * cavity_b),
        heart_r_mm=0.30 * cavity_a * (0.45 + 0.55 * t),
        aorta_xy_mm=(0.17 * cavity_a, body_cy + 0.62 * cavity_b), aorta_r_mm=rng.uniform(10, 13),
        vertebra_xy_mm=(0.0, body_cy + cavity_b - 2.0), vertebra_r_mm=vertebra_r)


def _soft(signed_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Anti-aliased occupancy from a signed distance (negative inside), 0..1."""
    return np.clip(0.5 - signed_mm / edge_mm, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, a: np.ndarray | float, b: np.ndarray | float,
             edge_mm: float) -> np.ndarray:
    """Soft occupancy of an axis-aligned ellipse (broadcasting, approximate distance)."""
    rho2 = (x / a) ** 2 + (y / b) ** 2
    return np.clip(0.5 + (1.0 - rho2) * (np.minimum(a, b) / (2.0 * edge_mm)), 0.0, 1.0)


def _blend(target: np.ndarray, occupancy: np.ndarray, hu: np.ndarray | float) -> None:
    """Partial-volume mix in place: ``target = (1 - occupancy) * target + occupancy * hu``."""
    target += occupancy * (hu - target)


def _smooth_noise(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise correlated over a few mm, drawn at half resolution in-plane."""
    slices, rows, cols = shape
    coarse = rng.standard_normal((slices, (rows + 1) // 2, (cols + 1) // 2), dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, (0.7, 1.0, 1.0))
    coarse /= max(float(coarse.std()), 1e-6)
    # cv2 resizes every channel at once: channels = slices.
    upsampled = cv2.resize(np.ascontiguousarray(coarse.transpose(1, 2, 0)), (cols, rows),
                           interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(upsampled.reshape(rows, cols, slices).transpose(2, 0, 1))


def _span(geometry: _Geometry, low_mm: float, high_mm: float) -> slice:
    """Pixel indices whose centres may lie within [low_mm, high_mm], clipped to the image."""
    low = max(int(math.floor(geometry.to_px(low_mm))), 0)
    return slice(low, max(min(int(math.ceil(geometry.to_px(high_mm))) + 1,
                              geometry.image_size_px), low))


def _render_anatomy(geometry: _Geometry, anatomy: _Anatomy,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (Z, rows, cols) of the chest without lesions, and the soft lung mask.

    The chest wall, mediastinum and spine do not change along the slab: they are drawn once
    and repeated; ribs and lungs are drawn in 3D.
    """
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    x, yb = axis[None, :], axis[:, None] - anatomy.body_cy_mm
    a, b, wall = anatomy.body_a_mm, anatomy.body_b_mm, anatomy.wall_mm
    base = np.full((geometry.image_size_px,) * 2, -1000.0, dtype=np.float32)
    _blend(base, _ellipse(x, yb, a, b, edge), -100.0)  # subcutaneous fat
    _blend(base, _ellipse(x, yb, a - 0.45 * wall, b - 0.45 * wall, edge), 45.0)  # muscle
    _blend(base, _ellipse(x, yb, a - wall, b - wall, edge), 35.0)  # mediastinum
    _render_spine(base, geometry, anatomy)
    hu = np.repeat(base[None], len(geometry.z_mm), axis=0)
    _render_ribs(hu, geometry, anatomy, rng)
    lung = np.zeros_like(hu)
    for side in (0, 1):
        _render_lung(hu, lung, geometry, anatomy, side, rng)
    return hu, lung


def _render_lung(hu: np.ndarray, lung: np.ndarray, geometry: _Geometry, anatomy: _Anatomy,
                 side: int, rng: np.random.Generator) -> None:
    """One lung: an ellipse per slice minus heart, aorta and spine, filled with parenchyma
    (-925..-725 HU: textured, denser posteriorly); its soft mask goes into ``lung``."""
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    cx, cy = anatomy.lung_cx_mm[side], anatomy.lung_cy_mm
    a, b = anatomy.lung_a_mm[side], anatomy.lung_b_mm[side]
    reach_x, reach_y = float(a.max()) + 2 * edge, float(b.max()) + 2 * edge
    rows, cols = _span(geometry, cy - reach_y, cy + reach_y), _span(geometry, cx - reach_x,
                                                                   cx + reach_x)
    x, y = axis[None, cols], axis[rows, None]
    occupancy = _ellipse((x - cx)[None], (y - cy)[None], a[:, None, None], b[:, None, None], edge)
    heart_x, heart_y = anatomy.heart_xy_mm
    occupancy *= 1.0 - _soft(np.hypot(x - heart_x, y - heart_y)[None]
                             - anatomy.heart_r_mm[:, None, None], edge)
    for (ox, oy), r in ((anatomy.aorta_xy_mm, anatomy.aorta_r_mm + 2.0),
                        (anatomy.vertebra_xy_mm, anatomy.vertebra_r_mm + 6.0)):
        occupancy *= 1.0 - _soft(np.hypot(x - ox, y - oy) - r, edge)
    np.maximum(lung[:, rows, cols], occupancy, out=lung[:, rows, cols])
    texture = _smooth_noise(occupancy.shape, rng)
    parenchyma = np.clip(_LUNG_BASE_HU + 40.0 * texture + 0.35 * (y - cy), -925.0, -725.0)
    _blend(hu[:, rows, cols], occupancy, parenchyma)


def _render_ribs(hu: np.ndarray, geometry: _Geometry, anatomy: _Anatomy,
                 rng: np.random.Generator) -> None:
    """Ribs (600 HU): a band of the chest wall, one rib every 28 mm in z, sloping down
    anteriorly, so that each slice cuts several ribs; none near the spine or the sternum."""
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    x, yb = axis[None, :], axis[:, None] - anatomy.body_cy_mm
    a, b, wall = anatomy.body_a_mm, anatomy.body_b_mm, anatomy.wall_mm
    band = (_ellipse(x, yb, a - 0.5 * wall, b - 0.5 * wall, edge)
            * (1.0 - _ellipse(x, yb, a - 0.85 * wall, b - 0.85 * wall, edge)))
    from_back = np.abs(np.angle(np.exp(1j * (np.arctan2(yb / b, x / a) - np.pi / 2))))
    rows, cols = np.nonzero((band > 0) & (from_back > 0.3) & (from_back < 2.35))
    pitch_mm, drop_mm, phase_mm = 28.0, rng.uniform(40, 60), rng.uniform(0, 28.0)
    z = np.asarray(geometry.z_mm, dtype=np.float32)[:, None]
    offset = (z + drop_mm * from_back[rows, cols][None] / np.pi - phase_mm) % pitch_mm
    occupancy = _soft(np.abs(offset - pitch_mm / 2) - 4.5, SLICE_THICKNESS_MM)
    target = hu[:, rows, cols]
    _blend(target, occupancy * band[rows, cols][None], 600.0)
    hu[:, rows, cols] = target


def _render_spine(base: np.ndarray, geometry: _Geometry, anatomy: _Anatomy) -> None:
    """Vertebral body (cortex 800 HU, cancellous 380 HU), arch, canal and spinous process."""
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    vx, vy = anatomy.vertebra_xy_mm
    r = anatomy.vertebra_r_mm
    back_mm = anatomy.body_cy_mm + anatomy.body_b_mm - 0.3 * anatomy.wall_mm
    rows, cols = _span(geometry, vy - r - 4, back_mm), _span(geometry, vx - r - 4, vx + r + 4)
    x, y = axis[None, cols], axis[rows, None]
    body_dist = np.hypot(x - vx, y - vy)
    canal_y = vy + r + 9.0
    canal_dist = np.hypot(x - vx, y - canal_y)
    layers = (  # (occupancy, HU) drawn in order
        (_soft(body_dist - r, edge), 800.0),
        (_soft(body_dist - (r - 2.5), edge), 380.0),
        (_soft(canal_dist - 12.0, edge), 700.0),
        (_soft(np.maximum(np.abs(x - vx) - 3.5, np.abs(y - (canal_y + back_mm) / 2)
                          - (back_mm - canal_y) / 2), edge), 650.0),
        (_soft(canal_dist - 7.0, edge), 15.0),
    )
    region = base[rows, cols]
    for occupancy, value in layers:
        _blend(region, occupancy, value)


# --------------------------------------------------------------------------- vessels


@dataclass(frozen=True)
class _Vessel:
    """A tapering tube from ``start`` to ``end`` (x, y, z in mm), fanning out early."""

    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    radius_mm: float  # at the start; 35% of it at the end
    wiggle_mm: float


def _sample_vessels(geometry: _Geometry, anatomy: _Anatomy,
                    rng: np.random.Generator) -> list[_Vessel]:
    """12 vessels per lung: most leave the hilum, some branch off inside the lung."""
    z = np.asarray(geometry.z_mm)
    vessels = []
    for side, cx in enumerate(anatomy.lung_cx_mm):
        medial = -math.copysign(1.0, cx)
        mid = len(z) // 2
        hilum = (cx + medial * 0.55 * anatomy.lung_a_mm[side, mid], anatomy.lung_cy_mm,
                 float(z[mid]) + rng.uniform(-15, 15))
        for _ in range(12):
            from_hilum = rng.random() < 0.6
            start = hilum if from_hilum else _lung_point(anatomy, side, geometry, rng, 0.6)
            end_z = start[2] + rng.choice([-1.0, 1.0]) * rng.uniform(40, 110)
            end_xy = _lung_point(anatomy, side, geometry, rng, 0.85, end_z)[:2]
            vessels.append(_Vessel(start, (*end_xy, end_z),
                                   rng.uniform(2.0, 3.6) if from_hilum else rng.uniform(1.0, 2.2),
                                   rng.uniform(0.0, 3.0)))
    return vessels


def _lung_point(anatomy: _Anatomy, side: int, geometry: _Geometry, rng: np.random.Generator,
                max_rho: float, z_mm: float | None = None) -> tuple[float, float, float]:
    """A random point inside lung ``side`` (normalised radius <= ``max_rho``)."""
    if z_mm is None:
        z_mm = float(rng.uniform(geometry.z_mm[-1], geometry.z_mm[0]))
    k = geometry.slice_of(z_mm)
    angle, rho = rng.uniform(0, 2 * np.pi), max_rho * math.sqrt(rng.uniform(0.1, 1.0))
    return (anatomy.lung_cx_mm[side] + rho * anatomy.lung_a_mm[side, k] * math.cos(angle),
            anatomy.lung_cy_mm + rho * anatomy.lung_b_mm[side, k] * math.sin(angle), z_mm)


def _vessel_section(vessel: _Vessel, z_mm: float
                    ) -> tuple[float, float, float, tuple[float, float]] | None:
    """Centre x, y, radius (mm) and in-plane slope of ``vessel`` at ``z_mm``; None if absent."""
    (x0, y0, z0), (x1, y1, z1) = vessel.start_mm, vessel.end_mm
    tau = (z_mm - z0) / (z1 - z0)
    if not 0.0 <= tau <= 1.0:
        return None
    fan = tau ** 0.7
    slope = 0.7 * max(tau, 0.05) ** -0.3 / (z1 - z0)  # d(fan)/dz
    return (x0 + (x1 - x0) * fan + vessel.wiggle_mm * math.sin(2 * math.pi * tau),
            y0 + (y1 - y0) * fan, vessel.radius_mm * (1 - 0.65 * tau),
            ((x1 - x0) * slope, (y1 - y0) * slope))


def _render_vessels(hu: np.ndarray, lung: np.ndarray, geometry: _Geometry,
                    vessels: list[_Vessel]) -> None:
    """Draw each vessel's cross-section (40 HU, inside the lungs) on every slice it crosses."""
    for vessel in vessels:
        for k, z in enumerate(geometry.z_mm):
            section = _vessel_section(vessel, z)
            if section is not None:
                _draw_tube(hu[k], lung[k], geometry, *section)


def _draw_tube(hu_slice: np.ndarray, lung_slice: np.ndarray, geometry: _Geometry, x_mm: float,
               y_mm: float, radius_mm: float, slope: tuple[float, float]) -> None:
    """One oblique tube cut by an axial slice: an ellipse stretched along the in-plane slope."""
    stretch = min(math.sqrt(1.0 + slope[0] ** 2 + slope[1] ** 2), 4.0)
    half_px = int(math.ceil(radius_mm * stretch / geometry.pixel_spacing_mm)) + 2
    col, row = round(geometry.to_px(x_mm)), round(geometry.to_px(y_mm))
    rows = slice(max(row - half_px, 0), max(row + half_px + 1, 0))
    cols = slice(max(col - half_px, 0), max(col + half_px + 1, 0))
    axis = geometry.axis_mm
    dx, dy = axis[None, cols] - x_mm, axis[rows, None] - y_mm
    norm = math.hypot(*slope)
    ux, uy = (slope[0] / norm, slope[1] / norm) if norm > 1e-6 else (1.0, 0.0)
    along, across = dx * ux + dy * uy, dy * ux - dx * uy
    distance = np.sqrt((along / stretch) ** 2 + across ** 2)
    occupancy = _soft(distance - radius_mm, geometry.pixel_spacing_mm) * lung_slice[rows, cols]
    window = hu_slice[rows, cols]
    window += occupancy * np.maximum(40.0 - window, 0.0)


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True, eq=False)
class _Lesion:
    """True parameters of one lesion: a nodule, a nodule < 3 mm or a non-nodule (a scar)."""

    kind: str  # "nodule" (>= 3 mm), "small_nodule" (< 3 mm) or "non_nodule"
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    axes: tuple[float, float, float]  # relative semi-axes (product 1) before rotation
    rotation: np.ndarray  # (3, 3)
    texture: str = "solid"  # "solid", "part_solid" or "ground_glass"
    solid_fraction: float = 1.0  # radius fraction of the solid core (0 for ground glass)
    tissue_hu: float = 40.0  # solid tissue, or the ground glass of (part-)ground-glass nodules
    core_hu: float = 40.0
    lobulation: float = 0.0  # 0..1, amplitude of the bumps
    lobe_dirs: np.ndarray | None = None  # (n, 3) unit vectors
    spiculation: float = 0.0  # 0..1, number and length of the spikes
    spicule_dirs: np.ndarray | None = None  # (m, 3)
    spicule_lengths_mm: np.ndarray | None = None  # (m,)
    calcification: str = "absent"  # "absent", "central" or "solid"
    calcium_fraction: float = 0.0
    calcium_hu: float = 0.0
    cavity_radius_mm: float = 0.0
    latent_malignancy: float = 0.0  # on the 1-5 rating scale

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    @property
    def extent_mm(self) -> float:
        """Radius of a sphere that holds the whole lesion, spikes included."""
        bumps = 1.0 + _LOBE_AMPLITUDE * self.lobulation * 1.5
        spikes = 0.0 if self.spicule_lengths_mm is None or not len(self.spicule_lengths_mm) \
            else float(self.spicule_lengths_mm.max())
        return self.radius_mm * max(self.axes) * bumps + spikes

    @property
    def elongation(self) -> float:
        return min(self.axes) / max(self.axes)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _unit_vectors(count: int, rng: np.random.Generator, max_elevation: float = np.pi / 2
                  ) -> np.ndarray:
    """Random directions (x, y, z) within ``max_elevation`` radians of the axial plane."""
    azimuth = rng.uniform(0.0, 2 * np.pi, count)
    elevation = np.arcsin(rng.uniform(-1.0, 1.0, count) * math.sin(max_elevation))
    return np.column_stack([np.cos(elevation) * np.cos(azimuth),
                            np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])


def _axes(elongation: float) -> tuple[float, float, float]:
    return (elongation ** (-1 / 3), elongation ** (-1 / 3), elongation ** (2 / 3))


def _latent_malignancy(diameter_mm: float, spiculation: float, lobulation: float,
                       calcified: bool, texture: str, rng: np.random.Generator) -> float:
    """Radiologists' underlying suspicion on the 1-5 scale: shape first, size second.

    Spiculation, lobulation and part-solid texture raise it and calcification lowers it, as in
    the Fleischner / Brock risk factors; a nodule-level term stands for what no parameter holds.
    """
    return (3.5 + 0.55 * (diameter_mm - 12.0) / 6.0 + 5.0 * (spiculation - 0.3)
            + 3.2 * (lobulation - 0.3) - 2.2 * calcified + 0.8 * (texture == "part_solid")
            - 0.3 * (texture == "ground_glass") + rng.normal(0.0, 0.5))


def _sample_nodule(centre_mm: tuple[float, float, float], diameter_mm: float,
                   rng: np.random.Generator) -> _Lesion:
    """Shape, texture and latent malignancy of a nodule >= 3 mm."""
    texture = str(rng.choice(["solid", "part_solid", "ground_glass"], p=[0.7, 0.15, 0.15]))
    calcified = texture == "solid" and rng.random() < 0.18
    spiculation, lobulation = rng.beta(0.9, 2.2), rng.beta(0.9, 2.2)
    if calcified:
        spiculation, lobulation = 0.3 * spiculation, 0.5 * lobulation
    if texture == "ground_glass":
        spiculation *= 0.3
    radius = diameter_mm / 2
    spikes = int(round(20 * spiculation))
    calcification = ("central" if rng.random() < 0.6 else "solid") if calcified else "absent"
    cavitated = texture == "solid" and not calcified and diameter_mm >= 12 and rng.random() < 0.12
    return _Lesion(
        kind="nodule", centre_mm=centre_mm, diameter_mm=diameter_mm,
        axes=_axes(rng.uniform(0.6, 1.0)), rotation=_random_rotation(rng), texture=texture,
        solid_fraction={"solid": 1.0, "part_solid": rng.uniform(0.35, 0.65),
                        "ground_glass": 0.0}[texture],
        tissue_hu=rng.uniform(10, 60) if texture == "solid" else rng.uniform(-600, -380),
        core_hu=rng.uniform(10, 50), lobulation=lobulation,
        lobe_dirs=_unit_vectors(4 + int(5 * lobulation), rng), spiculation=spiculation,
        # Spikes mostly near the axial plane, so that a slice shows them as radiating lines.
        spicule_dirs=_unit_vectors(spikes, rng, max_elevation=0.6),
        spicule_lengths_mm=radius * rng.uniform(0.4, 0.9, spikes) + 3.0,
        calcification=calcification,
        calcium_fraction={"absent": 0.0, "central": rng.uniform(0.35, 0.6),
                          "solid": 1.2}[calcification],
        calcium_hu=rng.uniform(600, 1200),
        cavity_radius_mm=radius * rng.uniform(0.25, 0.4) if cavitated else 0.0,
        latent_malignancy=_latent_malignancy(diameter_mm, spiculation, lobulation, calcified,
                                             texture, rng))


def _sample_minor(kind: str, centre_mm: tuple[float, float, float], diameter_mm: float,
                  rng: np.random.Generator) -> _Lesion:
    """A nodule < 3 mm (a round dot) or a non-nodule (a flat scar of -150..-20 HU)."""
    if kind == "small_nodule":
        return _Lesion(kind, centre_mm, diameter_mm, (1.0, 1.0, 1.0), np.eye(3),
                       tissue_hu=rng.uniform(20, 60))
    flat = rng.uniform(0.12, 0.2)
    return _Lesion(kind, centre_mm, diameter_mm, (1 / math.sqrt(flat), 1.0, math.sqrt(flat)),
                   _random_rotation(rng), tissue_hu=rng.uniform(-150, -20))


@dataclass(frozen=True, eq=False)
class _Footprint:
    """Where a rendered lesion lies: a box of the volume and its occupancy (0..1) in it."""

    start: tuple[int, int, int]  # first slice, row, column of the box
    occupancy: np.ndarray  # (slices, rows, cols) of the whole lesion
    cavity: np.ndarray | None  # occupancy of the air cavity, if any


def _render_lesion(hu: np.ndarray, geometry: _Geometry, lesion: _Lesion) -> _Footprint:
    """Render ``lesion`` into ``hu`` in 3D with partial-volume edges; return its footprint."""
    spacing = geometry.pixel_spacing_mm
    reach = lesion.extent_mm + 2 * spacing
    cx, cy, cz = lesion.centre_mm
    z = np.asarray(geometry.z_mm, dtype=np.float32)
    ks = np.nonzero(np.abs(z - cz) <= reach)[0]
    if ks.size == 0:
        ks = np.array([geometry.slice_of(cz)])
    rows, cols = _span(geometry, cy - reach, cy + reach), _span(geometry, cx - reach, cx + reach)
    axis = geometry.axis_mm
    offsets = (np.broadcast_to(axis[None, None, cols] - cx, (ks.size, rows.stop - rows.start,
                                                            cols.stop - cols.start)),
               (axis[None, rows, None] - cy), (z[ks][:, None, None] - cz))
    occupancy, distance, shape_radius = _lesion_occupancy(lesion, offsets, spacing)
    region = hu[ks[0]:ks[-1] + 1, rows, cols]
    _fill_lesion(region, lesion, occupancy, distance, shape_radius, spacing)
    cavity = None
    if lesion.cavity_radius_mm > 0:
        cavity = _soft(distance - lesion.cavity_radius_mm, spacing)
        _blend(region, cavity, -960.0)
    return _Footprint((int(ks[0]), rows.start, cols.start), occupancy, cavity)


def _lesion_occupancy(lesion: _Lesion, offsets: tuple[np.ndarray, ...], spacing_mm: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occupancy, distance from the centre (ellipsoid-normalised mm) and surface radius."""
    rotated = [sum(lesion.rotation[i, j] * offsets[j] for j in range(3)) / lesion.axes[i]
               for i in range(3)]
    distance = np.sqrt(rotated[0] ** 2 + rotated[1] ** 2 + rotated[2] ** 2)
    radius = np.full_like(distance, lesion.radius_mm)
    if lesion.lobe_dirs is not None and lesion.lobulation > 0:
        safe = np.maximum(distance, 1e-3)
        bumps = sum(np.maximum(sum(d[i] * rotated[i] for i in range(3)) / safe, 0.0) ** 4
                    for d in lesion.lobe_dirs)
        # E[max(cos, 0)^4] over the sphere is 1/10: the bumps keep the mean radius.
        radius = radius * (1.0 + _LOBE_AMPLITUDE * lesion.lobulation
                           * (bumps - len(lesion.lobe_dirs) / 10))
    edge = spacing_mm * (2.5 if lesion.texture == "ground_glass" else 1.0)
    occupancy = _soft(distance - radius, edge)
    if lesion.spicule_dirs is not None and len(lesion.spicule_dirs):
        spread2 = offsets[0] ** 2 + offsets[1] ** 2 + offsets[2] ** 2
        for direction, length in zip(lesion.spicule_dirs, lesion.spicule_lengths_mm,
                                     strict=True):
            along = sum(direction[i] * offsets[i] for i in range(3))
            across = np.sqrt(np.maximum(spread2 - along ** 2, 0.0))
            start = 0.6 * lesion.radius_mm
            taper = 1.0 - (along - start) / (lesion.radius_mm + length - start)
            half_width = np.where((along > start) & (taper > 0),
                                  1.2 * np.sqrt(np.maximum(taper, 0.0)), -spacing_mm)
            np.maximum(occupancy, _soft(across - half_width, spacing_mm), out=occupancy)
    return occupancy.astype(np.float32), distance, radius


def _fill_lesion(region: np.ndarray, lesion: _Lesion, occupancy: np.ndarray,
                 distance: np.ndarray, radius: np.ndarray, spacing_mm: float) -> None:
    """Mix the lesion's tissues into the HU ``region``: halo, solid core, calcium."""
    if lesion.texture in ("ground_glass", "part_solid"):
        # Ground glass keeps part of the lung texture underneath (hazy, -600..-300 HU).
        target = lesion.tissue_hu + 0.6 * np.clip(region - _LUNG_BASE_HU, -80.0, 80.0)
    else:
        target = np.float32(lesion.tissue_hu)
    region += occupancy * np.maximum(target - region, 0.0)
    if lesion.texture == "part_solid":
        core = _soft(distance - lesion.solid_fraction * radius, spacing_mm)
        region += core * np.maximum(lesion.core_hu - region, 0.0)
    if lesion.calcium_fraction > 0:
        calcium = _soft(distance - lesion.calcium_fraction * radius, spacing_mm) * occupancy
        _blend(region, calcium, lesion.calcium_hu)


def _free_spot(lesion: _Lesion, placed: list[_Lesion], geometry: _Geometry,
               anatomy: _Anatomy, rng: np.random.Generator) -> tuple[float, float, float] | None:
    """A centre that keeps ``lesion`` inside one lung and apart from ``placed``; None if none."""
    body_mm = lesion.radius_mm * max(lesion.axes) * (1.0 + _LOBE_AMPLITUDE * lesion.lobulation)
    top, bottom = geometry.z_mm[0] - body_mm - 1, geometry.z_mm[-1] + body_mm + 1
    if bottom > top:
        return None
    for _ in range(200):
        side, z = int(rng.integers(2)), float(rng.uniform(bottom, top))
        k = geometry.slice_of(z)
        x = anatomy.lung_cx_mm[side] + anatomy.lung_a_mm[side, k] * rng.uniform(-1, 1)
        y = anatomy.lung_cy_mm + anatomy.lung_b_mm[side, k] * rng.uniform(-1, 1)
        inside = all(anatomy.in_lung(side, geometry.slice_of(z + dz), x, y, body_mm + 2.0)
                     for dz in (-body_mm, 0.0, body_mm))
        # Spikes included, lesions stay apart: one reader's outline never touches another's.
        if inside and all(math.dist((x, y, z), other.centre_mm)
                          > lesion.extent_mm + other.extent_mm + 3.0 for other in placed):
            return (x, y, z)
    return None


def _place_lesions(geometry: _Geometry, anatomy: _Anatomy,
                   rng: np.random.Generator) -> list[_Lesion]:
    """5-8 nodules >= 3 mm, 0-2 nodules < 3 mm and 0-1 non-nodule inside the lungs."""
    drafts = [_sample_nodule((0.0, 0.0, 0.0), 3.0 + 27.0 * rng.beta(1.4, 1.9), rng)
              for _ in range(int(rng.integers(5, 9)))]
    drafts += [_sample_minor("small_nodule", (0.0, 0.0, 0.0), rng.uniform(1.5, 2.9), rng)
               for _ in range(int(rng.integers(0, 3)))]
    drafts += [_sample_minor("non_nodule", (0.0, 0.0, 0.0), rng.uniform(6.0, 12.0), rng)
               for _ in range(int(rng.integers(0, 2)))]
    placed: list[_Lesion] = []
    for draft in drafts:
        spot = _free_spot(draft, placed, geometry, anatomy, rng)
        if spot is None:
            LOG.debug("no room for a %.1f mm %s; skipped", draft.diameter_mm, draft.kind)
            continue
        placed.append(dataclasses.replace(draft, centre_mm=spot))
    return placed


def _add_noise(hu: np.ndarray, rng: np.random.Generator, sd_hu: float = 12.0) -> None:
    """Add quantum noise (sd 12 HU): every slice gets a randomly shifted crop of one of eight
    white-noise slices, ten times cheaper than fresh noise per voxel."""
    slices, rows, cols = hu.shape
    bank = rng.standard_normal((8, rows + 16, cols + 16), dtype=np.float32) * np.float32(sd_hu)
    picks, shifts = rng.integers(0, 8, slices), rng.integers(0, 16, (slices, 2))
    for k in range(slices):
        (dy, dx) = shifts[k]
        hu[k] += bank[picks[k], dy:dy + rows, dx:dx + cols]


def _stored_values(hu: np.ndarray) -> np.ndarray:
    """Stored int16 values: HU - (0028,1052) Rescale Intercept, padding outside the scan circle.

    Consumes ``hu`` (rounded in place).
    """
    np.clip(hu, _RESCALE_INTERCEPT_HU, _MAX_HU, out=hu)
    hu -= _RESCALE_INTERCEPT_HU - 0.5  # non-negative now: truncation rounds half up
    stored = hu.astype("<i2")
    size = hu.shape[-1]
    axis = np.arange(size) - (size - 1) / 2
    stored[:, axis[:, None] ** 2 + axis[None, :] ** 2 > (size / 2) ** 2] = _PIXEL_PADDING_STORED
    return stored


# --------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class _Reader:
    """One simulated radiologist of one series (LIDC reader ids are per file)."""

    radiologist_id: str
    id_style: str  # format of this reader's noduleIDs
    first_id: int
    bias: dict[str, float]  # added to every rating of this reader
    threshold: float  # occupancy at which this reader draws the outline
    outlines_holes: bool


@dataclass(frozen=True)
class _Roi:
    slice_index: int
    inclusion: bool
    points_xy: np.ndarray  # (N, 2) int: xCoord = column, yCoord = row


@dataclass(frozen=True)
class _Mark:
    """What one reader recorded about one lesion."""

    reader: int
    lesion: int
    characteristics: dict[str, int] | None  # None: marked as a nodule < 3 mm (or non-nodule)
    rois: tuple[_Roi, ...]
    mark_id: str = ""


def _sample_readers(rng: np.random.Generator) -> list[_Reader]:
    styles = rng.permutation(len(_ID_STYLES))
    return [_Reader(radiologist_id=str(rng.integers(10 ** 8, 10 ** 9)),
                    id_style=_ID_STYLES[styles[r]], first_id=int(rng.integers(1, 5000)),
                    bias={name: rng.normal(0.0, 0.25) for name in _CHARACTERISTICS},
                    threshold=rng.uniform(0.35, 0.65), outlines_holes=rng.random() < 0.75)
            for r in range(READERS_PER_SERIES)]


def _true_characteristics(lesion: _Lesion) -> dict[str, float]:
    """Noise-free ratings of the continuous LIDC characteristics on their 1-5 scales."""
    ground_glass = lesion.texture == "ground_glass"
    part_solid = lesion.texture == "part_solid"
    return {
        "subtlety": 1.5 + 3.5 * min(max((lesion.diameter_mm - 3) / 12, 0.0), 1.0)
        - 1.2 * ground_glass - 0.5 * part_solid,
        "sphericity": 1.0 + 4.0 * (lesion.elongation - 0.4) / 0.6 - 1.0 * lesion.lobulation,
        "margin": 5.0 - 2.5 * lesion.spiculation - 1.8 * ground_glass - 0.8 * part_solid
        - 0.8 * lesion.lobulation,
        "lobulation": 1.0 + 4.0 * lesion.lobulation,
        "spiculation": 1.0 + 4.0 * lesion.spiculation,
        "texture": {"solid": 5.0, "part_solid": 3.0, "ground_glass": 1.3}[lesion.texture],
        "malignancy": lesion.latent_malignancy,
    }


def _rate(lesion: _Lesion, reader: _Reader, rng: np.random.Generator) -> dict[str, int]:
    """One reader's nine ratings: truth + reader bias + noise, rounded into the LIDC ranges.

    calcification: 6 absent, 5 central, 3 solid (LIDC codes); internalStructure 4 = air.
    """
    true = _true_characteristics(lesion)
    ratings = {}
    for name in _CHARACTERISTICS:
        if name == "calcification":
            code = {"absent": 6, "central": 5, "solid": 3}[lesion.calcification]
            ratings[name] = code if code == 6 or rng.random() < 0.8 else int(
                rng.choice([1, 2, 4]))
        elif name == "internalStructure":
            ratings[name] = 4 if lesion.cavity_radius_mm > 0 and rng.random() < 0.85 else 1
        else:
            low, high = _RATING_RANGES[name]
            value = true[name] + reader.bias[name] + rng.normal(0.0, 0.5)
            ratings[name] = int(np.clip(np.rint(value), low, high))
    return ratings


def _largest_contour(mask: np.ndarray) -> np.ndarray | None:
    """Ordered boundary pixels (x, y) of the largest outer outline in ``mask``, or None."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    best = max(contours, key=lambda contour: (cv2.contourArea(contour), len(contour)))
    return best[:, 0, :].astype(np.int32)


def _outline(footprint: _Footprint, lesion: _Lesion, reader: _Reader, geometry: _Geometry,
             rng: np.random.Generator) -> tuple[_Roi, ...]:
    """A reader's outline on every slice: own threshold, sometimes one pixel wider/narrower."""
    threshold = float(np.clip(reader.threshold + rng.normal(0.0, 0.06), 0.25, 0.75))
    morph = int(rng.choice([-1, 0, 0, 0, 1]))
    k0, r0, c0 = footprint.start
    rois = []
    for dk, occupancy in enumerate(footprint.occupancy):
        mask = (occupancy > threshold).astype(np.uint8)
        if morph > 0:
            mask = cv2.dilate(mask, _CROSS)
        elif morph < 0 and cv2.erode(mask, _CROSS).any():
            mask = cv2.erode(mask, _CROSS)
        points = _largest_contour(mask)
        if points is None:
            continue
        rois.append(_Roi(k0 + dk, True, points + (c0, r0)))
        if footprint.cavity is not None and reader.outlines_holes:
            hole = _largest_contour(((footprint.cavity[dk] > 0.5) & (mask > 0)).astype(np.uint8))
            if hole is not None:
                rois.append(_Roi(k0 + dk, False, hole + (c0, r0)))
    return tuple(rois) or (_point_roi(lesion, geometry, rng),)


def _point_roi(lesion: _Lesion, geometry: _Geometry, rng: np.random.Generator) -> _Roi:
    """One point near the centre of ``lesion`` (small nodules, non-nodules)."""
    x, y, z = lesion.centre_mm
    k = int(np.clip(geometry.slice_of(z) + (rng.integers(-1, 2) if rng.random() < 0.2 else 0),
                    0, len(geometry.z_mm) - 1))
    col, row = (int(np.clip(round(geometry.to_px(v)) + rng.integers(-1, 2), 0,
                            geometry.image_size_px - 1)) for v in (x, y))
    return _Roi(k, True, np.array([[col, row]], dtype=np.int32))


def _read_lesion(reader: _Reader, lesion: _Lesion, footprint: _Footprint,
                 geometry: _Geometry, rng: np.random.Generator
                 ) -> tuple[dict[str, int] | None, tuple[_Roi, ...]]:
    """(characteristics, rois) of one reader's mark of ``lesion``, or (None, ()) if unmarked."""
    if lesion.kind != "nodule":
        return (None, (_point_roi(lesion, geometry, rng),)) if rng.random() < 0.5 else (None, ())
    if rng.random() > min(0.97, 0.55 + 0.42 * (lesion.diameter_mm - 3.0) / 5.0):
        return None, ()
    if lesion.diameter_mm < 4.5 and rng.random() < 0.3:  # judged < 3 mm by this reader
        return None, (_point_roi(lesion, geometry, rng),)
    return _rate(lesion, reader, rng), _outline(footprint, lesion, reader, geometry, rng)


def _read_series(lesions: list[_Lesion], footprints: list[_Footprint], readers: list[_Reader],
                 geometry: _Geometry, rng: np.random.Generator) -> list[_Mark]:
    """Every reader's marks, each reader's ids numbered in that reader's own order."""
    marks = []
    for r, reader in enumerate(readers):
        own = []
        for index, (lesion, footprint) in enumerate(zip(lesions, footprints, strict=True)):
            characteristics, rois = _read_lesion(reader, lesion, footprint, geometry, rng)
            if rois:
                own.append(_Mark(r, index, characteristics, rois))
        for number, j in enumerate(rng.permutation(len(own))):
            marks.append(dataclasses.replace(
                own[j], mark_id=reader.id_style.format(reader.first_id + number)))
    return marks


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class _SeriesIds:
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]
    readings_uid: str  # the uid attribute of LidcReadMessage
    readings_name: str  # "NNN.xml": like LIDC, not the patient id
    message_id: int


def _series_ids(patient_id: str, params: dict, n_slices: int,
                rng: np.random.Generator) -> _SeriesIds:
    """Deterministic DICOM UIDs (pydicom ``generate_uid`` with entropy sources)."""
    key = ["lungct.synthetic", str(params["version"]), str(params["seed"]),
           str(params["image_size_px"]), patient_id]

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[*key, *map(str, parts)])

    return _SeriesIds(patient_id, uid("study"), uid("series"), uid("frame"),
                      tuple(uid("sop", k) for k in range(n_slices)), uid("readings"),
                      f"{int(rng.integers(1, 1000)):03d}.xml", int(rng.integers(-2 ** 31, 2 ** 31)))


def _slice_template(geometry: _Geometry, ids: _SeriesIds) -> Dataset:
    """The attributes shared by every slice of a series (CT Image Storage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _CT_IMAGE_STORAGE
    ds.StudyDate = "20000101"
    ds.Modality = "CT"
    ds.Manufacturer = "lungct synthetic"
    ds.PatientName = ds.PatientID = ids.patient_id
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.KVP = 120
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = ids.frame_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geometry.image_size_px
    ds.PixelSpacing = [geometry.pixel_spacing_mm, geometry.pixel_spacing_mm]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed: the padding value is negative
    ds.PixelPaddingValue = _PIXEL_PADDING_STORED
    ds.WindowCenter, ds.WindowWidth = -600, 1500  # lung window
    ds.RescaleIntercept = _RESCALE_INTERCEPT_HU
    ds.RescaleSlope = 1
    return ds


def _write_series(series_dir: Path, stored: np.ndarray, geometry: _Geometry,
                  ids: _SeriesIds) -> None:
    """One DICOM file per slice, ``000001.dcm`` = InstanceNumber 1 = highest z."""
    ds = _slice_template(geometry, ids)
    for k, z in enumerate(geometry.z_mm):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ids.sop_uids[k]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [geometry.origin_mm, geometry.origin_mm, z]
        ds.SliceLocation = z
        ds.PixelData = stored[k].tobytes()
        buffer = io.BytesIO()
        # The first slice is written and checked as a DICOM file (preamble, DICM, file meta);
        # read back, it keeps preamble and meta, and its shared attributes are raw elements
        # that dcmwrite copies without encoding them again: the same bytes, twice as fast.
        pydicom.dcmwrite(buffer, ds, enforce_file_format=k == 0)
        atomic_write_bytes(series_dir / f"{k + 1:06d}.dcm", buffer.getvalue())
        if k == 0:
            ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _leaf(depth: int, tag: str, text: object) -> str:
    return f"{'  ' * depth}<{tag}>{escape(str(text))}</{tag}>"


def _readings_xml(geometry: _Geometry, ids: _SeriesIds, readers: list[_Reader],
                  marks: list[_Mark], lesions: list[_Lesion]) -> bytes:
    """The series' LIDC XML: ``LidcReadMessage`` with one ``readingSession`` per reader.

    Written as text (ElementTree's serialiser is ~10x slower on thousands of edge points);
    every value passes through ``xml.sax.saxutils`` escaping.
    """
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f"<LidcReadMessage uid={quoteattr(ids.readings_uid)} "
             f"xmlns={quoteattr(_LIDC_NAMESPACE)}>", "  <ResponseHeader>"]
    lines += [_leaf(2, tag, text) for tag, text in (
        ("Version", "1.8.1"), ("MessageId", ids.message_id), ("DateRequest", "2000-01-01"),
        ("TimeRequest", "12:00:00"), ("RequestingSite", "removed"),
        ("ServicingSite", "removed"), ("TaskDescription", "Second unblinded read"),
        ("CtImageFile", "removed"), ("SeriesInstanceUid", ids.series_uid),
        ("DateService", "2000-01-02"), ("TimeService", "12:00:00"),
        ("ResponseDescription", "1 - Reading complete"), ("StudyInstanceUID", ids.study_uid))]
    lines.append("  </ResponseHeader>")
    for r, reader in enumerate(readers):
        lines += ["  <readingSession>", _leaf(2, "annotationVersion", "3.12"),
                  _leaf(2, "servicingRadiologistID", reader.radiologist_id)]
        own = [mark for mark in marks if mark.reader == r]
        for mark in own:
            if lesions[mark.lesion].kind != "non_nodule":
                lines += _nodule_lines(mark, geometry, ids)
        for mark in own:
            if lesions[mark.lesion].kind == "non_nodule":
                lines += _non_nodule_lines(mark, geometry, ids)
        lines.append("  </readingSession>")
    lines.append("</LidcReadMessage>\n")
    return "\n".join(lines).encode("utf-8")


def _nodule_lines(mark: _Mark, geometry: _Geometry, ids: _SeriesIds) -> list[str]:
    """``unblindedReadNodule``: noduleID, characteristics (>= 3 mm only), one roi per slice."""
    lines = ["    <unblindedReadNodule>", _leaf(3, "noduleID", mark.mark_id)]
    if mark.characteristics is not None:
        lines.append("      <characteristics>")
        lines += [_leaf(4, name, mark.characteristics[name]) for name in _CHARACTERISTICS]
        lines.append("      </characteristics>")
    for roi in mark.rois:
        z_mm = geometry.z_mm[roi.slice_index]
        lines += ["      <roi>", _leaf(4, "imageZposition", f"{z_mm:.6f}"),
                  _leaf(4, "imageSOP_UID", ids.sop_uids[roi.slice_index]),
                  _leaf(4, "inclusion", "TRUE" if roi.inclusion else "FALSE")]
        lines += [f"        <edgeMap>\n          <xCoord>{col}</xCoord>\n"
                  f"          <yCoord>{row}</yCoord>\n        </edgeMap>"
                  for col, row in roi.points_xy.tolist()]
        lines.append("      </roi>")
    lines.append("    </unblindedReadNodule>")
    return lines


def _non_nodule_lines(mark: _Mark, geometry: _Geometry, ids: _SeriesIds) -> list[str]:
    """``nonNodule``: nonNoduleID, imageZposition, imageSOP_UID and one locus point."""
    (roi,) = mark.rois
    col, row = roi.points_xy[0].tolist()
    return ["    <nonNodule>", _leaf(3, "nonNoduleID", mark.mark_id),
            _leaf(3, "imageZposition", f"{geometry.z_mm[roi.slice_index]:.6f}"),
            _leaf(3, "imageSOP_UID", ids.sop_uids[roi.slice_index]),
            "      <locus>", _leaf(4, "xCoord", col), _leaf(4, "yCoord", row),
            "      </locus>", "    </nonNodule>"]


# --------------------------------------------------------------------------- truth


def _consensus(lesion_marks: list[_Mark]) -> tuple[float | None, str]:
    """Median malignancy of the readers who rated the nodule, and its label (LABEL_RULE)."""
    ratings = [mark.characteristics["malignancy"] for mark in lesion_marks
               if mark.characteristics is not None]
    if len(ratings) < LABEL_RULE["min_readers"]:
        return None, "unrated"
    median = float(statistics.median(ratings))
    if median >= LABEL_RULE["cancer_at_least"]:
        return median, "cancer"
    return median, "non_cancer" if median <= LABEL_RULE["non_cancer_at_most"] else "excluded"


def _consensus_slices(lesion_marks: list[_Mark]) -> list[int]:
    """Slices outlined by at least half of the readers who outlined the nodule."""
    outliners = [mark for mark in lesion_marks if mark.characteristics is not None]
    counts: dict[int, int] = {}
    for mark in outliners:
        for k in {roi.slice_index for roi in mark.rois if roi.inclusion}:
            counts[k] = counts.get(k, 0) + 1
    return sorted(k for k, count in counts.items() if 2 * count >= len(outliners))


def _lesion_truth(index: int, lesion: _Lesion, lesion_marks: list[_Mark],
                  geometry: _Geometry) -> dict:
    x, y, z = lesion.centre_mm
    entry = {
        "index": index, "kind": lesion.kind, "diameter_mm": round(lesion.diameter_mm, 3),
        "centre_mm": [round(x, 3), round(y, 3), round(z, 3)],
        "centre_px": {"col": round(geometry.to_px(x), 2), "row": round(geometry.to_px(y), 2),
                      "slice_index": geometry.slice_of(z),
                      "instance_number": geometry.slice_of(z) + 1},
        "readings": [{"reader": mark.reader, "mark_id": mark.mark_id,
                      "characteristics": mark.characteristics,
                      "roi_z_mm": sorted({geometry.z_mm[roi.slice_index] for roi in mark.rois}),
                      "n_rois": len(mark.rois)} for mark in lesion_marks],
    }
    if lesion.kind == "nodule":
        median, label = _consensus(lesion_marks)
        entry.update({
            "texture": lesion.texture, "solid_fraction": round(lesion.solid_fraction, 4),
            "spiculation": round(lesion.spiculation, 4), "lobulation": round(lesion.lobulation, 4),
            "calcification": lesion.calcification,
            "calcified": lesion.calcification != "absent",
            "cavitated": lesion.cavity_radius_mm > 0, "elongation": round(lesion.elongation, 4),
            "n_spicules": len(lesion.spicule_dirs), "n_lobes": len(lesion.lobe_dirs),
            "latent_malignancy": round(lesion.latent_malignancy, 4),
            "median_malignancy": median, "label": label,
            "consensus_slice_indices": _consensus_slices(lesion_marks),
        })
    return entry


def _clear_lung_point(geometry: _Geometry, anatomy: _Anatomy, vessels: list[_Vessel],
                      lesions: list[_Lesion], k: int) -> tuple[float, float]:
    """A lung point on slice ``k`` clear of vessels and lesions (reference for lung HU)."""
    z = geometry.z_mm[k]
    sections = [s for s in (_vessel_section(v, z) for v in vessels) if s is not None]
    for rho in (0.5, 0.35, 0.65, 0.2, 0.8):
        for angle in np.linspace(0, 2 * np.pi, 12, endpoint=False):
            for side in (0, 1):
                x = anatomy.lung_cx_mm[side] + rho * anatomy.lung_a_mm[side, k] * math.cos(angle)
                y = anatomy.lung_cy_mm + rho * anatomy.lung_b_mm[side, k] * math.sin(angle)
                if (anatomy.in_lung(side, k, x, y, 8.0)
                        and all(math.hypot(x - sx, y - sy) > 4 * r + 6 for sx, sy, r, _ in sections)
                        and all(math.dist((x, y, z), lesion.centre_mm) > lesion.extent_mm + 8
                                for lesion in lesions)):
                    return x, y
    LOG.debug("no clear lung point on slice %d; using the lung centre", k)
    return anatomy.lung_cx_mm[0], anatomy.lung_cy_mm


def _reference_points(geometry: _Geometry, anatomy: _Anatomy, vessels: list[_Vessel],
                      lesions: list[_Lesion]) -> dict[str, dict[str, int]]:
    """Pixels known to hold air, lung parenchyma, soft tissue (heart) and bone (vertebra)."""
    mid, last = len(geometry.z_mm) // 2, len(geometry.z_mm) - 1
    scan_radius_mm = geometry.image_size_px / 2 * geometry.pixel_spacing_mm
    points = {
        "air": (mid, 0.0, (anatomy.body_cy_mm - anatomy.body_b_mm - scan_radius_mm) / 2),
        "lung": (mid, *_clear_lung_point(geometry, anatomy, vessels, lesions, mid)),
        "soft_tissue": (last, *anatomy.heart_xy_mm),
        "bone": (mid, *anatomy.vertebra_xy_mm),
    }
    return {name: {"slice_index": k, "row": round(geometry.to_px(y)),
                   "col": round(geometry.to_px(x))} for name, (k, x, y) in points.items()}


def _slice_classes(geometry: _Geometry, entries: list[dict], marks: list[_Mark]
                   ) -> dict[str, list[int]]:
    """Slice indices per class under LABEL_RULE: cancer, benign nodule, no finding."""
    def outlined(label: str) -> set[int]:
        return {k for entry in entries if entry.get("label") == label
                for k in entry["consensus_slice_indices"]}

    cancer = outlined("cancer")
    mark_z = np.array([geometry.z_mm[roi.slice_index] for mark in marks for roi in mark.rois])
    no_finding = [k for k, z in enumerate(geometry.z_mm)
                  if mark_z.size == 0 or np.abs(mark_z - z).min() >= NEGATIVE_MARGIN_MM]
    return {"cancer": sorted(cancer), "benign_nodule": sorted(outlined("non_cancer") - cancer),
            "no_finding": no_finding}


def _summary(patients: list[dict], max_per_patient: int = 20) -> dict:
    """Counts of nodules per outcome and of slices per class, also capped per patient (the
    demo's ``--max-per-patient``); negative = benign nodule or no finding."""
    nodules = [lesion for patient in patients for lesion in patient["lesions"]
               if lesion["kind"] == "nodule"]
    summary: dict[str, int] = {"patients": len(patients), "nodules": len(nodules)}
    for outcome in ("cancer", "non_cancer", "excluded", "unrated"):
        summary[f"nodules_{outcome}"] = sum(lesion["label"] == outcome for lesion in nodules)
    for kind in ("small_nodule", "non_nodule"):
        summary[f"{kind}s"] = sum(lesion["kind"] == kind for patient in patients
                                  for lesion in patient["lesions"])
    for name in ("cancer", "benign_nodule", "no_finding", "negative"):
        counts = [len(patient["slices"]["benign_nodule"]) + len(patient["slices"]["no_finding"])
                  if name == "negative" else len(patient["slices"][name])
                  for patient in patients]
        summary[f"slices_{name}"] = sum(counts)
        summary[f"slices_{name}_capped_{max_per_patient}"] = sum(min(count, max_per_patient)
                                                                  for count in counts)
        summary[f"patients_with_{name}_slices"] = sum(count > 0 for count in counts)
    return summary


# --------------------------------------------------------------------------- cohort


def _patient(out_dir: Path, index: int, params: dict) -> dict:
    """Generate, write and describe patient ``index`` (``LIDC-IDRI-9001`` is index 0)."""
    rng = np.random.default_rng([params["seed"], index])
    patient_id = f"LIDC-IDRI-{9001 + index}"
    geometry = _geometry(params["image_size_px"], rng)
    anatomy = _sample_anatomy(geometry, rng)
    hu, lung = _render_anatomy(geometry, anatomy, rng)
    vessels = _sample_vessels(geometry, anatomy, rng)
    _render_vessels(hu, lung, geometry, vessels)
    lesions = _place_lesions(geometry, anatomy, rng)
    footprints = [_render_lesion(hu, geometry, lesion) for lesion in lesions]
    _add_noise(hu, rng)
    readers = _sample_readers(rng)
    marks = _read_series(lesions, footprints, readers, geometry, rng)
    ids = _series_ids(patient_id, params, len(geometry.z_mm), rng)
    series_dir = out_dir / patient_id / ids.study_uid / ids.series_uid
    _write_series(series_dir, _stored_values(hu), geometry, ids)
    atomic_write_bytes(series_dir / ids.readings_name,
                       _readings_xml(geometry, ids, readers, marks, lesions))
    entries = [_lesion_truth(i, lesion, [mark for mark in marks if mark.lesion == i], geometry)
               for i, lesion in enumerate(lesions)]
    return {
        "patient_id": patient_id, "study_instance_uid": ids.study_uid,
        "series_instance_uid": ids.series_uid,
        "series_dir": series_dir.relative_to(out_dir).as_posix(),
        "readings_file": (series_dir / ids.readings_name).relative_to(out_dir).as_posix(),
        "pixel_spacing_mm": geometry.pixel_spacing_mm, "slice_z_mm": list(geometry.z_mm),
        "readers": [{"reader": r, "servicing_radiologist_id": reader.radiologist_id}
                    for r, reader in enumerate(readers)],
        "reference_px": _reference_points(geometry, anatomy, vessels, lesions),
        "lesions": entries, "slices": _slice_classes(geometry, entries, marks),
    }


def _cohort_params(n_patients: int, image_size_px: int, seed: int) -> dict:
    return {"generator": "lungct.synthetic", "version": COHORT_VERSION,
            "n_patients": n_patients, "image_size_px": image_size_px, "seed": seed,
            "field_of_view_mm": FIELD_OF_VIEW_MM, "slice_thickness_mm": SLICE_THICKNESS_MM,
            "slices_per_patient": SLICES_PER_PATIENT, "readers_per_series": READERS_PER_SERIES}


def _is_complete(out_dir: Path, params: dict) -> bool:
    try:
        return json.loads((out_dir / "cohort.json").read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def _remove_previous(out_dir: Path) -> None:
    """Delete what an earlier generation wrote (only this module's file names), marker first."""
    for name in ("cohort.json", "truth.json"):
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob(".*.json.tmp-*"):
        if path.name.startswith((".cohort.json.", ".truth.json.")):
            path.unlink()
    for patient_dir in sorted(out_dir.iterdir()):
        if not (_PATIENT_DIR.fullmatch(patient_dir.name) and patient_dir.is_dir()
                and not patient_dir.is_symlink()):
            continue
        for root, _, files in os.walk(patient_dir, topdown=False):
            for name in files:
                if _OWN_FILE.fullmatch(name):
                    (Path(root) / name).unlink()
            if not os.listdir(root):
                os.rmdir(root)


def _validate(n_patients: int, image_size_px: int, seed: int) -> None:
    if isinstance(n_patients, bool) or not isinstance(n_patients, int) \
            or not 1 <= n_patients <= 999:
        raise ValueError(f"n_patients must be an integer from 1 to 999, got {n_patients!r}")
    if isinstance(image_size_px, bool) or not isinstance(image_size_px, int) \
            or not 48 <= image_size_px <= 1024:
        raise ValueError(f"image_size_px must be an integer from 48 to 1024, got {image_size_px!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def generate_cohort(out_dir: Path, n_patients: int = DEFAULT_PATIENTS,
                    image_size_px: int = DEFAULT_IMAGE_SIZE_PX, seed: int = 0) -> Path:
    """Write (or reuse) a synthetic LIDC-IDRI-format cohort in ``out_dir``.

    Patients ``LIDC-IDRI-9001`` ... each get a CT series (``SLICES_PER_PATIENT`` slices of
    ``SLICE_THICKNESS_MM``, pixel spacing ``FIELD_OF_VIEW_MM / image_size_px``) in the classic
    layout ``<patient>/<StudyInstanceUID>/<SeriesInstanceUID>/000001.dcm`` with the LIDC XML
    readings of four simulated radiologists beside the slices. ``truth.json`` holds the true
    lesion parameters, every reader's ratings and the consensus labels; ``cohort.json``, written
    last, records the parameters. Every file is written atomically and the output is
    byte-identical for equal arguments.

    Args:
        out_dir: folder to write into; created if missing. Only ``LIDC-IDRI-9xxx`` folders,
            ``truth.json`` and ``cohort.json`` are touched.
        n_patients: patients to generate, 1 to 999.
        image_size_px: rows = columns of every slice, 48 to 1024.
        seed: non-negative seed; patient ``i`` depends only on ``seed``, ``i`` and the size.

    Returns:
        ``out_dir``. When ``out_dir/cohort.json`` already records the same parameters the
        cohort is reused as it is; otherwise the files of an earlier generation are removed and
        the cohort is generated again.

    Raises:
        ValueError: an argument is out of range.
        UserError: ``out_dir`` cannot be written.
    """
    _validate(n_patients, image_size_px, seed)
    out_dir = Path(out_dir)
    params = _cohort_params(n_patients, image_size_px, seed)
    if _is_complete(out_dir, params):
        LOG.info("reusing the synthetic cohort in %s (%d patients, %d px)", out_dir, n_patients,
                 image_size_px)
        return out_dir
    LOG.info("generating a synthetic LIDC-format cohort (%d patients, %d px, seed %d) in %s",
             n_patients, image_size_px, seed, out_dir)
    started = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_previous(out_dir)
        patients = [_patient(out_dir, index, params) for index in
                    tqdm(range(n_patients), desc="synthetic patients", unit="patient",
                         disable=None)]
        summary = _summary(patients)
        atomic_write_json(out_dir / "truth.json", {
            "cohort": params, "label_rule": LABEL_RULE,
            "negative_margin_mm": NEGATIVE_MARGIN_MM, "summary": summary, "patients": patients})
        atomic_write_json(out_dir / "cohort.json", params)
    except OSError as error:
        raise UserError(f"cannot write the synthetic cohort to {out_dir}: "
                        f"{error.strerror or error}") from error
    LOG.info("synthetic cohort ready in %.1f s: %d nodules (%d cancer, %d non-cancer, "
             "%d excluded, %d unrated), %d cancer slices", time.perf_counter() - started,
             summary["nodules"], summary["nodules_cancer"], summary["nodules_non_cancer"],
             summary["nodules_excluded"], summary["nodules_unrated"], summary["slices_cancer"])
    return out_dir
