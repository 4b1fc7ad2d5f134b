"""Lesions of the synthetic cohort: nodule shapes, textures, calcification and cavities,
their latent malignancy, placement inside the lungs and 3D rendering (part of
:mod:`lungct.synthetic`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from lungct.synthetic.anatomy import LUNG_BASE_HU, Anatomy, blend, soft_edge, span
from lungct.synthetic.scan import Geometry

__all__ = [
    "BENIGN_MAX_SHAPE_SCORE",
    "CANCER_FREE_FRACTION",
    "Footprint",
    "Lesion",
    "place_lesions",
    "render_lesion",
]

LOG = logging.getLogger(__name__)

_LOBE_AMPLITUDE = 0.6  # radius change per unit of lobulation at a lobe's apex
#: Share of patients drawn cancer-free: all their nodules get benign-end shapes.
CANCER_FREE_FRACTION = 0.35
#: Highest shape score (latent malignancy less its nodule-level term, sd 0.5) of a benign-end
#: nodule: 3 sd below the rating 3, so readers' medians stay <= 3 (simulated: > 3 for about
#: 1 nodule in 5,000, >= 4 for fewer).
BENIGN_MAX_SHAPE_SCORE = 1.5


@dataclass(frozen=True, eq=False)
class Lesion:
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


def _shape_score(diameter_mm: float, spiculation: float, lobulation: float, calcified: bool,
                 texture: str) -> float:
    """The part of the latent malignancy that shape and size decide (1-5 scale).

    Spiculation, lobulation and part-solid texture raise it and calcification lowers it, as in
    the Fleischner / Brock risk factors (McWilliams et al. 2013, N Engl J Med 369:910); size
    counts less than shape.
    """
    return (3.5 + 0.55 * (diameter_mm - 12.0) / 6.0 + 5.0 * (spiculation - 0.3)
            + 3.2 * (lobulation - 0.3) - 2.2 * calcified + 0.8 * (texture == "part_solid")
            - 0.3 * (texture == "ground_glass"))


def _latent_malignancy(diameter_mm: float, spiculation: float, lobulation: float,
                       calcified: bool, texture: str, rng: np.random.Generator) -> float:
    """Radiologists' underlying suspicion on the 1-5 scale: the shape score plus a
    nodule-level term (sd 0.5) that stands for what no parameter holds."""
    return (_shape_score(diameter_mm, spiculation, lobulation, calcified, texture)
            + rng.normal(0.0, 0.5))


def _draw_shape(rng: np.random.Generator, benign: bool) -> tuple[str, bool, float, float]:
    """Texture, calcified, spiculation and lobulation of one nodule.

    A benign draw comes from the benign end of the same parameters: no part-solid texture,
    calcification more often, spiculation and lobulation near 0 (smooth outlines).
    """
    texture = str(rng.choice(["solid", "part_solid", "ground_glass"],
                             p=[0.8, 0.0, 0.2] if benign else [0.7, 0.15, 0.15]))
    calcified = texture == "solid" and rng.random() < (0.3 if benign else 0.18)
    spiculation, lobulation = rng.beta(0.9, 2.2), rng.beta(0.9, 2.2)
    if benign:
        spiculation, lobulation = 0.5 * spiculation, 0.6 * lobulation
    if calcified:
        spiculation, lobulation = 0.3 * spiculation, 0.5 * lobulation
    if texture == "ground_glass":
        spiculation *= 0.3
    return texture, bool(calcified), float(spiculation), float(lobulation)


def _benign_shape(diameter_mm: float, rng: np.random.Generator
                  ) -> tuple[str, bool, float, float]:
    """A benign-end shape whose shape score is at most ``BENIGN_MAX_SHAPE_SCORE``.

    Shapes are drawn again until the score fits: large benign nodules come out calcified or
    very smooth. Terminates: a calcified smooth 30 mm nodule scores 0.5.
    """
    while True:
        shape = _draw_shape(rng, benign=True)
        if _shape_score(diameter_mm, shape[2], shape[3], shape[1], shape[0]) \
                <= BENIGN_MAX_SHAPE_SCORE:
            return shape


def _sample_nodule(centre_mm: tuple[float, float, float], diameter_mm: float,
                   rng: np.random.Generator, benign: bool = False) -> Lesion:
    """Shape, texture and latent malignancy of a nodule >= 3 mm (a benign-end shape if
    ``benign``: the nodules of a cancer-free patient)."""
    texture, calcified, spiculation, lobulation = (
        _benign_shape(diameter_mm, rng) if benign else _draw_shape(rng, benign=False))
    radius = diameter_mm / 2
    spikes = int(round(20 * spiculation))
    calcification = ("central" if rng.random() < 0.6 else "solid") if calcified else "absent"
    cavitated = texture == "solid" and not calcified and diameter_mm >= 12 and rng.random() < 0.12
    return Lesion(
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
                  rng: np.random.Generator) -> Lesion:
    """A nodule < 3 mm (a round dot) or a non-nodule (a flat scar of -150..-20 HU)."""
    if kind == "small_nodule":
        return Lesion(kind, centre_mm, diameter_mm, (1.0, 1.0, 1.0), np.eye(3),
                       tissue_hu=rng.uniform(20, 60))
    flat = rng.uniform(0.12, 0.2)
    return Lesion(kind, centre_mm, diameter_mm, (1 / math.sqrt(flat), 1.0, math.sqrt(flat)),
                   _random_rotation(rng), tissue_hu=rng.uniform(-150, -20))


@dataclass(frozen=True, eq=False)
class Footprint:
    """Where a rendered lesion lies: a box of the volume and its occupancy (0..1) in it."""

    start: tuple[int, int, int]  # first slice, row, column of the box
    occupancy: np.ndarray  # (slices, rows, cols) of the whole lesion
    cavity: np.ndarray | None  # occupancy of the air cavity, if any


def render_lesion(hu: np.ndarray, geometry: Geometry, lesion: Lesion) -> Footprint:
    """Render ``lesion`` into ``hu`` in 3D with partial-volume edges; return its footprint."""
    spacing = geometry.pixel_spacing_mm
    reach = lesion.extent_mm + 2 * spacing
    cx, cy, cz = lesion.centre_mm
    z = np.asarray(geometry.z_mm, dtype=np.float32)
    ks = np.nonzero(np.abs(z - cz) <= reach)[0]
    if ks.size == 0:
        ks = np.array([geometry.slice_of(cz)])
    rows, cols = span(geometry, cy - reach, cy + reach), span(geometry, cx - reach, cx + reach)
    axis = geometry.axis_mm
    offsets = (np.broadcast_to(axis[None, None, cols] - cx, (ks.size, rows.stop - rows.start,
                                                            cols.stop - cols.start)),
               (axis[None, rows, None] - cy), (z[ks][:, None, None] - cz))
    occupancy, distance, shape_radius = _lesion_occupancy(lesion, offsets, spacing)
    region = hu[ks[0]:ks[-1] + 1, rows, cols]
    _fill_lesion(region, lesion, occupancy, distance, shape_radius, spacing)
    cavity = None
    if lesion.cavity_radius_mm > 0:
        cavity = soft_edge(distance - lesion.cavity_radius_mm, spacing)
        blend(region, cavity, -960.0)
    return Footprint((int(ks[0]), rows.start, cols.start), occupancy, cavity)


def _lesion_occupancy(lesion: Lesion, offsets: tuple[np.ndarray, ...], spacing_mm: float
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
    occupancy = soft_edge(distance - radius, edge)
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
            np.maximum(occupancy, soft_edge(across - half_width, spacing_mm), out=occupancy)
    return occupancy.astype(np.float32), distance, radius


def _fill_lesion(region: np.ndarray, lesion: Lesion, occupancy: np.ndarray,
                 distance: np.ndarray, radius: np.ndarray, spacing_mm: float) -> None:
    """Mix the lesion's tissues into the HU ``region``: halo, solid core, calcium."""
    if lesion.texture in ("ground_glass", "part_solid"):
        # Ground glass keeps part of the lung texture underneath (hazy, -600..-300 HU).
        target = lesion.tissue_hu + 0.6 * np.clip(region - LUNG_BASE_HU, -80.0, 80.0)
    else:
        target = np.float32(lesion.tissue_hu)
    region += occupancy * np.maximum(target - region, 0.0)
    if lesion.texture == "part_solid":
        core = soft_edge(distance - lesion.solid_fraction * radius, spacing_mm)
        region += core * np.maximum(lesion.core_hu - region, 0.0)
    if lesion.calcium_fraction > 0:
        calcium = soft_edge(distance - lesion.calcium_fraction * radius, spacing_mm) * occupancy
        blend(region, calcium, lesion.calcium_hu)


def _free_spot(lesion: Lesion, placed: list[Lesion], geometry: Geometry,
               anatomy: Anatomy, rng: np.random.Generator) -> tuple[float, float, float] | None:
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


def place_lesions(geometry: Geometry, anatomy: Anatomy, rng: np.random.Generator,
                   cancer_free: bool) -> list[Lesion]:
    """5-8 nodules >= 3 mm (benign-end shapes if ``cancer_free``), 0-2 nodules < 3 mm and 0-1
    non-nodule inside the lungs."""
    drafts = [_sample_nodule((0.0, 0.0, 0.0), 3.0 + 27.0 * rng.beta(1.4, 1.9), rng,
                             benign=cancer_free)
              for _ in range(int(rng.integers(5, 9)))]
    drafts += [_sample_minor("small_nodule", (0.0, 0.0, 0.0), rng.uniform(1.5, 2.9), rng)
               for _ in range(int(rng.integers(0, 3)))]
    drafts += [_sample_minor("non_nodule", (0.0, 0.0, 0.0), rng.uniform(6.0, 12.0), rng)
               for _ in range(int(rng.integers(0, 2)))]
    placed: list[Lesion] = []
    for draft in drafts:
        spot = _free_spot(draft, placed, geometry, anatomy, rng)
        if spot is None:
            LOG.debug("no room for a %.1f mm %s; skipped", draft.diameter_mm, draft.kind)
            continue
        placed.append(dataclasses.replace(draft, centre_mm=spot))
    return placed
