"""LIDC reader marks -> nodules: one lesion's marks by different readers, grouped.

Each reader's nodule ids are local to that reader (the XML holds the unblinded reads, each
made independently after seeing the others' anonymised marks), so the marks of one lesion are
grouped here by geometry (after pylidc's ``Scan.cluster_annotations``, Hancock &
Magnan 2016); each group becomes a :class:`Nodule` with its consensus malignancy, diameter
and centre.

Work and memory stay bounded for outlines of any length (:mod:`lungct.prepare.lidc_xml` caps
their number and size): point-to-point distances are computed in chunks of at most
``_CHUNK_PAIRS`` pairs, and marks too large for all pairs go through a k-d tree.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import math
import statistics
from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np

from lungct.prepare.lidc_xml import Contour, ReaderMark, Readings

__all__ = ["CLUSTERING_RULE", "Nodule", "cluster_nodules"]

LOG = logging.getLogger(__name__)

#: The grouping rule as implemented, recorded in dataset.json's label rule.
CLUSTERING_RULE = (
    "marks of different readers linked when their contour points (x, y, z in mm) come within "
    "max(slice spacing, pixel spacing) or a roi centre lies inside the other's outline within "
    "that distance in z; nodules = connected components with at most one mark per reader and "
    "at most 4 marks; an over-full component alone is re-clustered at 0.9x the tolerance down "
    "to 0.1 mm, then split nearest pair first. Adapted from pylidc cluster_annotations, which "
    "measures in voxel index units and tightens the tolerance for the whole scan."
)
_MAX_MARKS_PER_NODULE = 4  # LIDC: four readers per series (pylidc's re-clustering bound)
_SHRINK_FACTOR = 0.9  # pylidc's `factor`
_MIN_TOLERANCE_MM = 0.1  # pylidc's `min_tol`
_CHUNK_PAIRS = 250_000  # point pairs held at once (4 MB of float64 x, y differences)
# Two marks are compared pair by pair (slice by slice, exactly as pylidc) up to these sizes;
# beyond them, by a k-d tree over their 3D points: O(n log n) instead of O(n m).
_EXACT_POINT_PAIRS = 1 << 22
_EXACT_PLANE_PAIRS = 4096


@dataclasses.dataclass(frozen=True, eq=False)
class Nodule:
    """One lesion: the clustered marks of different readers.

    Attributes:
        nodule_id: "N01", "N02"... ordered by (z, y, x) of the centre, stable within a series.
        marks: at most one per reader, ordered by reader.
        n_readers: readers who marked it.
        n_rated: readers who gave characteristics (nodule >= 3 mm).
        malignancy: median of the rated readers' malignancy ratings, None if none rated.
        diameter_mm: median over rated readers of their longest in-plane chord, in mm.
        centre_xy_px: (column, row) of the centre in pixels.
        centre_z_mm: z of the centre.
        z_range_mm: lowest and highest z of any roi of any of its marks.
    """

    nodule_id: str
    marks: tuple[ReaderMark, ...]
    n_readers: int
    n_rated: int
    malignancy: float | None
    diameter_mm: float | None
    centre_xy_px: tuple[float, float]
    centre_z_mm: float
    z_range_mm: tuple[float, float]

    def ratings(self, name: str) -> list[int]:
        """The ratings ``name`` given by the readers of this nodule, in reader order."""
        return [mark.characteristics[name] for mark in self.marks
                if mark.characteristics is not None and name in mark.characteristics]


@dataclasses.dataclass(frozen=True)
class _MarkGeometry:
    """A mark in mm, for distances: boundary points per slice and roi centres."""

    planes: dict[float, np.ndarray]  # z mm -> (K, 2) contour points x, y in mm on that slice
    points_mm: np.ndarray  # (N, 3) every contour point: x, y, z in mm
    box_low_mm: np.ndarray  # (3,) x, y, z lower corner of all points
    box_high_mm: np.ndarray  # (3,) upper corner
    anchors: tuple[tuple[float, float, float], ...]  # (x px, y px, z mm) centre of each roi
    polygons: tuple[tuple[float, np.ndarray], ...]  # (z mm, (K, 2) float32 px) inclusion outlines
    polygon_z_mm: tuple[float, ...]  # z of each polygon, for a bisect; polygons sorted by z


def _geometry(mark: ReaderMark, pixel_spacing_mm: float) -> _MarkGeometry:
    by_z: dict[float, list[np.ndarray]] = {}
    for contour in mark.contours:
        by_z.setdefault(contour.z_mm, []).append(contour.points_xy * pixel_spacing_mm)
    planes = {z_mm: np.concatenate(points) for z_mm, points in by_z.items()}
    every_point = np.concatenate([
        np.column_stack([points, np.full(len(points), z_mm)]) for z_mm, points in planes.items()])
    anchors = tuple((*(float(v) for v in contour.points_xy.mean(axis=0)), contour.z_mm)
                    for contour in mark.contours if contour.inclusion)
    polygons = tuple(sorted(((contour.z_mm, contour.points_xy.astype(np.float32))
                             for contour in mark.contours
                             if contour.inclusion and len(contour.points_xy) >= 3),
                            key=lambda polygon: polygon[0]))
    return _MarkGeometry(planes, every_point, every_point.min(axis=0), every_point.max(axis=0),
                         anchors, polygons, tuple(z_mm for z_mm, _ in polygons))


def _box_gap_mm(a: _MarkGeometry, b: _MarkGeometry) -> float:
    gap = np.maximum(0.0, np.maximum(a.box_low_mm - b.box_high_mm, b.box_low_mm - a.box_high_mm))
    return float(np.linalg.norm(gap))


def _min_xy_distance_mm(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest distance between a point of ``a`` (N, 2) and one of ``b`` (M, 2)."""
    best = math.inf
    chunk = max(1, _CHUNK_PAIRS // len(b))
    for start in range(0, len(a), chunk):
        squared = ((a[start:start + chunk, None, :] - b[None, :, :]) ** 2).sum(axis=-1)
        best = min(best, float(np.sqrt(squared.min())))
    return best


def _min_point_distance_mm(a: _MarkGeometry, b: _MarkGeometry, cutoff_mm: float) -> float:
    """Smallest 3D distance between contour points of ``a`` and ``b``; inf beyond ``cutoff_mm``.

    Slice pairs are visited by increasing z gap and skipped once the gap alone exceeds the
    best distance found, which is exact and avoids most of the all-pairs work. Marks with
    more than ``_EXACT_POINT_PAIRS`` point pairs or ``_EXACT_PLANE_PAIRS`` slice pairs are
    measured with a k-d tree instead (the same distance up to float rounding).
    """
    if (len(a.points_mm) * len(b.points_mm) > _EXACT_POINT_PAIRS
            or len(a.planes) * len(b.planes) > _EXACT_PLANE_PAIRS):
        return _tree_distance_mm(a.points_mm, b.points_mm, cutoff_mm)
    slice_pairs = sorted((abs(z_a - z_b), z_a, z_b) for z_a in a.planes for z_b in b.planes
                         if abs(z_a - z_b) <= cutoff_mm)
    best = math.inf
    for z_gap, z_a, z_b in slice_pairs:
        if z_gap >= best:
            break
        best = min(best, math.hypot(z_gap, _min_xy_distance_mm(a.planes[z_a], b.planes[z_b])))
    return best


def _tree_distance_mm(a: np.ndarray, b: np.ndarray, cutoff_mm: float) -> float:
    """Smallest distance between a point of ``a`` (N, 3) and one of ``b``; inf beyond cutoff."""
    from scipy.spatial import cKDTree  # imported here: only unusually large marks need it

    a, b = np.unique(a, axis=0), np.unique(b, axis=0)  # repeated points only cost time
    distances, _ = cKDTree(b).query(a, k=1, distance_upper_bound=cutoff_mm)
    return float(distances.min())


def _containment_distance_mm(inner: _MarkGeometry, outer: _MarkGeometry, cutoff_mm: float
                             ) -> float:
    """Smallest z gap between a roi centre of ``inner`` lying inside an outline of ``outer``.

    Catches a reader's point (nodule < 3 mm) or small outline inside another reader's larger
    outline, whose boundaries can be further apart than the tolerance.
    """
    best = math.inf
    for x_px, y_px, z_mm in inner.anchors:
        low = bisect.bisect_left(outer.polygon_z_mm, z_mm - cutoff_mm)
        high = bisect.bisect_right(outer.polygon_z_mm, z_mm + cutoff_mm)
        for polygon_z_mm, polygon in outer.polygons[low:high]:
            gap = abs(z_mm - polygon_z_mm)
            if gap <= min(best, cutoff_mm) and cv2.pointPolygonTest(
                    polygon, (x_px, y_px), False) >= 0:
                best = gap
    return best


def _mark_distances_mm(marks: Sequence[ReaderMark], pixel_spacing_mm: float,
                       cutoff_mm: float) -> np.ndarray:
    """Symmetric (M, M) distances between marks of different readers (inf for one reader)."""
    geometries = [_geometry(mark, pixel_spacing_mm) for mark in marks]
    distances = np.full((len(marks), len(marks)), math.inf)
    for i, j in itertools.combinations(range(len(marks)), 2):
        a, b = geometries[i], geometries[j]
        if marks[i].reader == marks[j].reader or _box_gap_mm(a, b) > cutoff_mm:
            continue
        distances[i, j] = distances[j, i] = min(
            _min_point_distance_mm(a, b, cutoff_mm),
            _containment_distance_mm(a, b, cutoff_mm),
            _containment_distance_mm(b, a, cutoff_mm),
        )
    return distances


def _union_components(members: Sequence[int], edges: Iterable[tuple[int, int]],
                      accept: Callable[[list[int]], bool]) -> list[list[int]]:
    """Groups of ``members`` joined along ``edges`` in order, a join kept when ``accept`` is."""
    group_of = {member: [member] for member in members}
    for i, j in edges:
        if group_of[i] is group_of[j] or not accept(group_of[i] + group_of[j]):
            continue
        merged = sorted(group_of[i] + group_of[j])
        for member in merged:
            group_of[member] = merged
    groups = {id(group): group for group in group_of.values()}
    return sorted(groups.values())


def _cluster(members: list[int], distances: np.ndarray, readers: Sequence[int],
             tolerance_mm: float, where: str) -> list[list[int]]:
    """Connected components at ``tolerance_mm``; invalid ones re-clustered at 0.9 x."""

    def valid(group: list[int]) -> bool:
        group_readers = [readers[m] for m in group]
        return len(group) <= _MAX_MARKS_PER_NODULE and len(set(group_readers)) == len(group)

    edges = [(i, j) for i in members for j in members
             if i < j and distances[i, j] <= tolerance_mm]
    result: list[list[int]] = []
    for group in _union_components(members, edges, lambda _: True):
        if valid(group):
            result.append(group)
        elif tolerance_mm * _SHRINK_FACTOR >= _MIN_TOLERANCE_MM:
            result.extend(_cluster(group, distances, readers, tolerance_mm * _SHRINK_FACTOR,
                                   where))
        else:
            # Marks touching at (near) zero distance: join nearest pairs first, keeping groups
            # valid, so that no reader appears twice in a nodule.
            LOG.warning("%s: marks %s stay linked at %.2f mm; splitting nearest-first", where,
                        group, tolerance_mm)
            in_group = set(group)
            nearest = sorted((pair for pair in edges if pair[0] in in_group
                              and pair[1] in in_group), key=lambda pair: (distances[pair], pair))
            result.extend(_union_components(group, nearest, valid))
    return result


def _contour_centre(contour: Contour) -> tuple[float, float, float]:
    x_px, y_px = contour.points_xy.mean(axis=0)
    return float(x_px), float(y_px), contour.z_mm


def _mark_centre(mark: ReaderMark) -> np.ndarray:
    contours = [contour for contour in mark.contours if contour.inclusion] or mark.contours
    return np.mean([_contour_centre(contour) for contour in contours], axis=0)


def _longest_chord_px(mark: ReaderMark) -> float:
    """Longest distance between two points of one inclusion outline (LIDC's diameter).

    The longest chord joins two convex-hull vertices; their pairs are measured in chunks of
    ``_CHUNK_PAIRS``, so memory stays linear in the outline's length.
    """
    longest = 0.0
    for contour in mark.contours:
        if not contour.inclusion:
            continue
        hull = cv2.convexHull(contour.points_xy.astype(np.float32)).reshape(-1, 2)
        hull = hull.astype(np.float64)
        chunk = max(1, _CHUNK_PAIRS // len(hull))
        for start in range(0, len(hull), chunk):
            squared = ((hull[start:start + chunk, None, :] - hull[None, :, :]) ** 2).sum(-1)
            longest = max(longest, float(np.sqrt(squared.max())))
    return longest


def _build_nodule(marks: list[ReaderMark], pixel_spacing_mm: float) -> Nodule:
    marks = sorted(marks, key=lambda mark: mark.reader)
    rated = [mark for mark in marks if not mark.is_small]
    outlined = rated or marks
    centre = np.mean([_mark_centre(mark) for mark in outlined], axis=0)
    z_values = [contour.z_mm for mark in marks for contour in mark.contours]
    malignancy = [mark.characteristics["malignancy"] for mark in rated
                  if "malignancy" in (mark.characteristics or {})]
    return Nodule(
        nodule_id="",
        marks=tuple(marks),
        n_readers=len(marks),
        n_rated=len(rated),
        malignancy=float(statistics.median(malignancy)) if malignancy else None,
        diameter_mm=float(statistics.median(
            _longest_chord_px(mark) * pixel_spacing_mm for mark in rated)) if rated else None,
        centre_xy_px=(float(centre[0]), float(centre[1])),
        centre_z_mm=float(centre[2]),
        z_range_mm=(min(z_values), max(z_values)),
    )


def cluster_nodules(readings: Readings, pixel_spacing_mm: float,
                    slice_thickness_mm: float, where: str = "") -> list[Nodule]:
    """Group the marks of different readers that belong to one lesion.

    Adapted from pylidc ``Scan.cluster_annotations`` (it differs: see CLUSTERING_RULE): two
    marks of different readers are linked when
    their contour points (x, y, z in mm) come within ``max(slice_thickness_mm,
    pixel_spacing_mm)``, or when the centre of one's roi lies inside the other's outline
    within that distance in z; nodules are the connected components. A component with more
    than 4 marks or two marks of one reader is re-clustered with the tolerance shrunk by 0.9,
    down to 0.1 mm, then split by joining nearest pairs first. Deterministic.

    Args:
        readings: from :func:`parse_readings`.
        pixel_spacing_mm: in-plane pixel size, (0028,0030) Pixel Spacing.
        slice_thickness_mm: (0018,0050) Slice Thickness (or the slice spacing).
        where: names the patient and series in warnings (default: the readings file and its
            series).

    Returns:
        Nodules of all sizes ordered by centre (z, y, x), ids "N01", "N02"...
    """
    for name, value in (("pixel_spacing_mm", pixel_spacing_mm),
                        ("slice_thickness_mm", slice_thickness_mm)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    marks = readings.marks
    tolerance_mm = max(slice_thickness_mm, pixel_spacing_mm)
    distances = _mark_distances_mm(marks, pixel_spacing_mm, tolerance_mm)
    where = where or f"{readings.path.name} (series {readings.series_uid})"
    groups = _cluster(list(range(len(marks))), distances, [m.reader for m in marks],
                      tolerance_mm, where)
    nodules = [_build_nodule([marks[i] for i in group], pixel_spacing_mm) for group in groups]
    nodules.sort(key=lambda n: (n.centre_z_mm, n.centre_xy_px[1], n.centre_xy_px[0]))
    width = max(2, len(str(len(nodules))))
    return [dataclasses.replace(nodule, nodule_id=f"N{number:0{width}d}")
            for number, nodule in enumerate(nodules, start=1)]
