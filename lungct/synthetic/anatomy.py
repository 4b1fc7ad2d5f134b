"""The synthetic chest without lesions: body outline, chest wall, ribs, spine, heart,
aorta, textured lungs and vessels, in HU (part of :mod:`lungct.synthetic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from lungct.synthetic.scan import SLICE_THICKNESS_MM, Geometry

__all__ = [
    "Anatomy",
    "LUNG_BASE_HU",
    "Vessel",
    "blend",
    "render_anatomy",
    "render_vessels",
    "sample_anatomy",
    "sample_vessels",
    "soft_edge",
    "span",
    "vessel_section",
]

LUNG_BASE_HU = -860.0


@dataclass(frozen=True, eq=False)
class Anatomy:
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


def sample_anatomy(geometry: Geometry, rng: np.random.Generator) -> Anatomy:
    body_cy, body_a, body_b = rng.uniform(-5, 10), rng.uniform(140, 162), rng.uniform(98, 118)
    wall = rng.uniform(17, 24)
    cavity_a, cavity_b = body_a - wall, body_b - wall
    t = np.linspace(0.0, 1.0, len(geometry.z_mm))
    profile = 0.88 + 0.12 * np.sin(np.pi * (0.25 + 0.75 * t))
    sides = np.array([[1.04], [0.98]]) * profile
    vertebra_r = rng.uniform(14, 17)
    return Anatomy(
        body_cy_mm=body_cy, body_a_mm=body_a, body_b_mm=body_b, wall_mm=wall,
        lung_cx_mm=(-0.5 * cavity_a, 0.5 * cavity_a), lung_cy_mm=body_cy + 0.03 * cavity_b,
        lung_a_mm=0.40 * cavity_a * sides, lung_b_mm=0.80 * cavity_b * sides,
        heart_xy_mm=(0.12 * cavity_a, body_cy - 0.2 * cavity_b),
        heart_r_mm=0.30 * cavity_a * (0.45 + 0.55 * t),
        aorta_xy_mm=(0.17 * cavity_a, body_cy + 0.62 * cavity_b), aorta_r_mm=rng.uniform(10, 13),
        vertebra_xy_mm=(0.0, body_cy + cavity_b - 2.0), vertebra_r_mm=vertebra_r)


def soft_edge(signed_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Anti-aliased occupancy from a signed distance (negative inside), 0..1."""
    return np.clip(0.5 - signed_mm / edge_mm, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, a: np.ndarray | float, b: np.ndarray | float,
             edge_mm: float) -> np.ndarray:
    """Soft occupancy of an axis-aligned ellipse (broadcasting, approximate distance)."""
    rho2 = (x / a) ** 2 + (y / b) ** 2
    return np.clip(0.5 + (1.0 - rho2) * (np.minimum(a, b) / (2.0 * edge_mm)), 0.0, 1.0)


def blend(target: np.ndarray, occupancy: np.ndarray, hu: np.ndarray | float) -> None:
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


def span(geometry: Geometry, low_mm: float, high_mm: float) -> slice:
    """Pixel indices whose centres may lie within [low_mm, high_mm], clipped to the image."""
    low = max(int(math.floor(geometry.to_px(low_mm))), 0)
    return slice(low, max(min(int(math.ceil(geometry.to_px(high_mm))) + 1,
                              geometry.image_size_px), low))


def render_anatomy(geometry: Geometry, anatomy: Anatomy,
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
    blend(base, _ellipse(x, yb, a, b, edge), -100.0)  # subcutaneous fat
    blend(base, _ellipse(x, yb, a - 0.45 * wall, b - 0.45 * wall, edge), 45.0)  # muscle
    blend(base, _ellipse(x, yb, a - wall, b - wall, edge), 35.0)  # mediastinum
    _render_spine(base, geometry, anatomy)
    hu = np.repeat(base[None], len(geometry.z_mm), axis=0)
    _render_ribs(hu, geometry, anatomy, rng)
    lung = np.zeros_like(hu)
    for side in (0, 1):
        _render_lung(hu, lung, geometry, anatomy, side, rng)
    return hu, lung


def _render_lung(hu: np.ndarray, lung: np.ndarray, geometry: Geometry, anatomy: Anatomy,
                 side: int, rng: np.random.Generator) -> None:
    """One lung: an ellipse per slice minus heart, aorta and spine, filled with parenchyma
    (-925..-725 HU: textured, denser posteriorly); its soft mask goes into ``lung``."""
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    cx, cy = anatomy.lung_cx_mm[side], anatomy.lung_cy_mm
    a, b = anatomy.lung_a_mm[side], anatomy.lung_b_mm[side]
    reach_x, reach_y = float(a.max()) + 2 * edge, float(b.max()) + 2 * edge
    rows, cols = span(geometry, cy - reach_y, cy + reach_y), span(geometry, cx - reach_x,
                                                                   cx + reach_x)
    x, y = axis[None, cols], axis[rows, None]
    occupancy = _ellipse((x - cx)[None], (y - cy)[None], a[:, None, None], b[:, None, None], edge)
    heart_x, heart_y = anatomy.heart_xy_mm
    occupancy *= 1.0 - soft_edge(np.hypot(x - heart_x, y - heart_y)[None]
                             - anatomy.heart_r_mm[:, None, None], edge)
    for (ox, oy), r in ((anatomy.aorta_xy_mm, anatomy.aorta_r_mm + 2.0),
                        (anatomy.vertebra_xy_mm, anatomy.vertebra_r_mm + 6.0)):
        occupancy *= 1.0 - soft_edge(np.hypot(x - ox, y - oy) - r, edge)
    np.maximum(lung[:, rows, cols], occupancy, out=lung[:, rows, cols])
    texture = _smooth_noise(occupancy.shape, rng)
    parenchyma = np.clip(LUNG_BASE_HU + 40.0 * texture + 0.35 * (y - cy), -925.0, -725.0)
    blend(hu[:, rows, cols], occupancy, parenchyma)


def _render_ribs(hu: np.ndarray, geometry: Geometry, anatomy: Anatomy,
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
    occupancy = soft_edge(np.abs(offset - pitch_mm / 2) - 4.5, SLICE_THICKNESS_MM)
    target = hu[:, rows, cols]
    blend(target, occupancy * band[rows, cols][None], 600.0)
    hu[:, rows, cols] = target


def _render_spine(base: np.ndarray, geometry: Geometry, anatomy: Anatomy) -> None:
    """Vertebral body (cortex 800 HU, cancellous 380 HU), arch, canal and spinous process."""
    edge = geometry.pixel_spacing_mm
    axis = geometry.axis_mm
    vx, vy = anatomy.vertebra_xy_mm
    r = anatomy.vertebra_r_mm
    back_mm = anatomy.body_cy_mm + anatomy.body_b_mm - 0.3 * anatomy.wall_mm
    rows, cols = span(geometry, vy - r - 4, back_mm), span(geometry, vx - r - 4, vx + r + 4)
    x, y = axis[None, cols], axis[rows, None]
    body_dist = np.hypot(x - vx, y - vy)
    canal_y = vy + r + 9.0
    canal_dist = np.hypot(x - vx, y - canal_y)
    layers = (  # (occupancy, HU) drawn in order
        (soft_edge(body_dist - r, edge), 800.0),
        (soft_edge(body_dist - (r - 2.5), edge), 380.0),
        (soft_edge(canal_dist - 12.0, edge), 700.0),
        (soft_edge(np.maximum(np.abs(x - vx) - 3.5, np.abs(y - (canal_y + back_mm) / 2)
                          - (back_mm - canal_y) / 2), edge), 650.0),
        (soft_edge(canal_dist - 7.0, edge), 15.0),
    )
    region = base[rows, cols]
    for occupancy, value in layers:
        blend(region, occupancy, value)


# --------------------------------------------------------------------------- vessels


@dataclass(frozen=True)
class Vessel:
    """A tapering tube from ``start`` to ``end`` (x, y, z in mm), fanning out early."""

    start_mm: tuple[float, float, float]
    end_mm: tuple[float, float, float]
    radius_mm: float  # at the start; 35% of it at the end
    wiggle_mm: float


def sample_vessels(geometry: Geometry, anatomy: Anatomy,
                    rng: np.random.Generator) -> list[Vessel]:
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
            vessels.append(Vessel(start, (*end_xy, end_z),
                                   rng.uniform(2.0, 3.6) if from_hilum else rng.uniform(1.0, 2.2),
                                   rng.uniform(0.0, 3.0)))
    return vessels


def _lung_point(anatomy: Anatomy, side: int, geometry: Geometry, rng: np.random.Generator,
                max_rho: float, z_mm: float | None = None) -> tuple[float, float, float]:
    """A random point inside lung ``side`` (normalised radius <= ``max_rho``)."""
    if z_mm is None:
        z_mm = float(rng.uniform(geometry.z_mm[-1], geometry.z_mm[0]))
    k = geometry.slice_of(z_mm)
    angle, rho = rng.uniform(0, 2 * np.pi), max_rho * math.sqrt(rng.uniform(0.1, 1.0))
    return (anatomy.lung_cx_mm[side] + rho * anatomy.lung_a_mm[side, k] * math.cos(angle),
            anatomy.lung_cy_mm + rho * anatomy.lung_b_mm[side, k] * math.sin(angle), z_mm)


def vessel_section(vessel: Vessel, z_mm: float
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


def render_vessels(hu: np.ndarray, lung: np.ndarray, geometry: Geometry,
                    vessels: list[Vessel]) -> None:
    """Draw each vessel's cross-section (40 HU, inside the lungs) on every slice it crosses."""
    for vessel in vessels:
        for k, z in enumerate(geometry.z_mm):
            section = vessel_section(vessel, z)
            if section is not None:
                _draw_tube(hu[k], lung[k], geometry, *section)


def _draw_tube(hu_slice: np.ndarray, lung_slice: np.ndarray, geometry: Geometry, x_mm: float,
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
    occupancy = soft_edge(distance - radius_mm, geometry.pixel_spacing_mm) * lung_slice[rows, cols]
    window = hu_slice[rows, cols]
    window += occupancy * np.maximum(40.0 - window, 0.0)
