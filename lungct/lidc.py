"""LIDC-IDRI XML readings -> nodules (readers clustered) -> labels and ROI masks.

The LIDC-IDRI collection (Armato et al. 2011, Med. Phys. 38:915; TCIA DOI
10.7937/K9/TCIA.2015.LO9QL9SX) ships one XML file of readings per CT series: up to four
radiologists (``readingSession``) each marked nodules >= 3 mm with outlines and nine
characteristic ratings, nodules < 3 mm with one point, and non-nodules with one point. Readers
marked blindly and their nodule ids are local to each reader, so the marks of one lesion are
grouped here by geometry (after pylidc's ``Scan.cluster_annotations``, Hancock & Magnan 2016),
turned into a label by a configurable :class:`LabelRule` and into a consensus ROI mask.
/work/shared/LIDC_FORMAT.md describes the elements read.

Readings are matched to CT slices by z position (mm), never by ``imageSOP_UID``: some UIDs in
the XML match no slice. The XML is untrusted input: DTD and entity declarations are refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
import re
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "RATING_RANGES",
    "LidcParseError",
    "Contour",
    "ReaderMark",
    "NonNoduleMark",
    "Readings",
    "parse_readings",
    "is_lidc_readings_file",
    "Nodule",
    "cluster_nodules",
    "LabelRule",
    "consensus_mask",
    "nodule_slices",
    "far_from_marks",
]

LOG = logging.getLogger(__name__)

#: The nine LIDC characteristic ratings and their allowed values (LIDC XML documentation).
RATING_RANGES: dict[str, tuple[int, int]] = {
    "subtlety": (1, 5),
    "internalStructure": (1, 4),
    "calcification": (1, 6),
    "sphericity": (1, 5),
    "margin": (1, 5),
    "lobulation": (1, 5),
    "spiculation": (1, 5),
    "texture": (1, 5),
    "malignancy": (1, 5),
}

_MAX_XML_BYTES = 64 * 1024 * 1024  # real LIDC readings are at most a few MB
_SNIFF_BYTES = 2048
_MAX_MARKS_PER_NODULE = 4  # LIDC: four readers per series (pylidc's re-clustering bound)
_SHRINK_FACTOR = 0.9  # pylidc's `factor`
_MIN_TOLERANCE_MM = 0.1  # pylidc's `min_tol`
_Z_EPS_MM = 1e-6  # z positions equal within float noise
_AGGREGATES: dict[str, Callable[[list[int]], float]] = {
    "median": lambda values: float(statistics.median(values)),
    "mean": lambda values: float(statistics.fmean(values)),
    "max": lambda values: float(max(values)),
}
_OUTCOME_LABELS = {"cancer": 1, "non_cancer": 0}


class LidcParseError(ValueError):
    """A readings file that cannot be used; ``str(error)`` is the short reason to record."""


# --------------------------------------------------------------------------- readings


@dataclasses.dataclass(frozen=True, eq=False)
class Contour:
    """One reader's outline of one nodule on one slice (one ``<roi>``).

    Attributes:
        z_mm: ``imageZposition``, the slice's z (third value of (0020,0032)) in mm.
        sop_uid: ``imageSOP_UID`` as written (may match no slice).
        inclusion: False when the polygon is a hole cut out of the nodule.
        points_xy: (K, 2) float, read-only; ``xCoord`` (column) and ``yCoord`` (row) in
            pixels, origin at the top-left pixel.
    """

    z_mm: float
    sop_uid: str
    inclusion: bool
    points_xy: np.ndarray

    def __post_init__(self) -> None:
        points = np.array(self.points_xy, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
            raise ValueError(f"points_xy must be a non-empty (K, 2) array, got {points.shape}")
        points.setflags(write=False)
        object.__setattr__(self, "points_xy", points)


@dataclasses.dataclass(frozen=True, eq=False)
class ReaderMark:
    """One reader's ``<unblindedReadNodule>``.

    Attributes:
        reader: index of the ``readingSession`` in the file (0-based).
        nodule_id: ``noduleID``, local to that reader.
        characteristics: the valid ratings given (see :data:`RATING_RANGES`), or None without
            ``<characteristics>`` or when all are zero/empty (a nodule < 3 mm).
        contours: one per ``<roi>``, in file order.
    """

    reader: int
    nodule_id: str
    characteristics: dict[str, int] | None
    contours: tuple[Contour, ...]

    @property
    def is_small(self) -> bool:
        """True for a nodule < 3 mm (no characteristics, one point per roi)."""
        return self.characteristics is None


@dataclasses.dataclass(frozen=True)
class NonNoduleMark:
    """One reader's ``<nonNodule>``: a finding judged not a nodule, one ``locus`` point."""

    reader: int
    non_nodule_id: str
    z_mm: float
    sop_uid: str
    locus_xy: tuple[float, float]


@dataclasses.dataclass(frozen=True, eq=False)
class Readings:
    """Everything read from one LIDC readings file."""

    path: Path
    series_uid: str
    study_uid: str | None
    n_readers: int
    marks: tuple[ReaderMark, ...]
    non_nodules: tuple[NonNoduleMark, ...]

    def all_mark_z_mm(self) -> np.ndarray:
        """Sorted z (mm) of every roi of every reader (all nodule sizes) and every nonNodule."""
        z_values = [contour.z_mm for mark in self.marks for contour in mark.contours]
        z_values += [non_nodule.z_mm for non_nodule in self.non_nodules]
        return np.sort(np.asarray(z_values, dtype=np.float64))


def _local_name(tag: object) -> str:
    """Element name without its ``{namespace}`` (files use the http://www.nih.gov default)."""
    return str(tag).rsplit("}", 1)[-1]


def _children(element: ET.Element, name: str) -> Iterator[ET.Element]:
    return (child for child in element if _local_name(child.tag) == name)


def _child_text(element: ET.Element, *names: str) -> str | None:
    """Stripped text of the first child called one of ``names``; None when absent or empty."""
    for child in element:
        if _local_name(child.tag) in names and child.text and child.text.strip():
            return child.text.strip()
    return None


def _number(element: ET.Element, name: str, where: str) -> float:
    text = _child_text(element, name)
    if text is None:
        raise LidcParseError(f"{where}: no {name}")
    try:
        value = float(text)
    except ValueError:
        raise LidcParseError(f"{where}: {name} {text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise LidcParseError(f"{where}: {name} {text[:40]!r} is not finite")
    return value


def _sniff_text(data: bytes) -> str:
    """Text of ``data`` good enough to look for markup, whatever the XML encoding."""
    boms = (
        (b"\xff\xfe\x00\x00", "utf-32-le"),
        (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be"),
        (b"\x00<\x00", "utf-16-be"),
        (b"<\x00", "utf-16-le"),
    )
    for prefix, codec in boms:
        if data.startswith(prefix):
            return data.decode(codec, errors="ignore")
    return data.decode("latin-1")  # ASCII-compatible encodings: UTF-8, ISO-8859-x


def _parse_root(path: Path) -> ET.Element:
    try:
        size = path.stat().st_size
        if size > _MAX_XML_BYTES:
            raise LidcParseError(f"file too large for readings ({size} bytes)")
        data = path.read_bytes()
    except OSError as error:
        raise LidcParseError(f"unreadable file: {error.strerror or error}") from None
    if re.search(r"<!(DOCTYPE|ENTITY)", _sniff_text(data), flags=re.IGNORECASE):
        raise LidcParseError("DTD or entity declarations are not allowed in readings XML")
    try:
        return ET.fromstring(data)
    except ET.ParseError as error:
        raise LidcParseError(f"unreadable XML: {error}") from None


def _parse_characteristics(element: ET.Element | None, where: str) -> dict[str, int] | None:
    """Valid ratings of a ``<characteristics>``; None when absent or nothing valid (small)."""
    if element is None:
        return None
    ratings: dict[str, int] = {}
    for child in element:
        name = _local_name(child.tag)
        text = (child.text or "").strip()
        if name not in RATING_RANGES or not text or text == "0":
            continue  # all-zero / empty characteristics mark a small nodule
        low, high = RATING_RANGES[name]
        if not text.isdigit() or not low <= int(text) <= high:
            LOG.warning("%s: ignoring %s=%r (allowed %d-%d)", where, name, text[:40], low, high)
            continue
        ratings[name] = int(text)
    return ratings or None


def _parse_inclusion(roi: ET.Element, where: str) -> bool:
    text = _child_text(roi, "inclusion")
    if text is None:
        return True
    if text.upper() not in ("TRUE", "FALSE"):
        raise LidcParseError(f"{where}: inclusion {text[:40]!r} is not TRUE or FALSE")
    return text.upper() == "TRUE"


def _parse_contour(roi: ET.Element, where: str) -> Contour:
    points = [
        (_number(edge, "xCoord", where), _number(edge, "yCoord", where))
        for edge in _children(roi, "edgeMap")
    ]
    if not points:
        raise LidcParseError(f"{where}: roi without edgeMap points")
    return Contour(
        z_mm=_number(roi, "imageZposition", where),
        sop_uid=_child_text(roi, "imageSOP_UID") or "",
        inclusion=_parse_inclusion(roi, where),
        points_xy=np.asarray(points, dtype=np.float64),
    )


def _parse_mark(element: ET.Element, reader: int) -> ReaderMark | None:
    nodule_id = _child_text(element, "noduleID") or ""
    where = f"reader {reader} nodule {nodule_id[:40]!r}"
    contours = tuple(_parse_contour(roi, where) for roi in _children(element, "roi"))
    if not contours:
        LOG.warning("%s: no roi, mark ignored", where)
        return None
    characteristics = _parse_characteristics(next(_children(element, "characteristics"), None),
                                             where)
    return ReaderMark(reader, nodule_id, characteristics, contours)


def _parse_non_nodule(element: ET.Element, reader: int) -> NonNoduleMark:
    non_nodule_id = _child_text(element, "nonNoduleID") or ""
    where = f"reader {reader} nonNodule {non_nodule_id[:40]!r}"
    locus = next(_children(element, "locus"), None)
    if locus is None:
        raise LidcParseError(f"{where}: no locus")
    return NonNoduleMark(
        reader=reader,
        non_nodule_id=non_nodule_id,
        z_mm=_number(element, "imageZposition", where),
        sop_uid=_child_text(element, "imageSOP_UID") or "",
        locus_xy=(_number(locus, "xCoord", where), _number(locus, "yCoord", where)),
    )


def parse_readings(path: Path) -> Readings:
    """Read one LIDC readings XML file (root ``LidcReadMessage``).

    Args:
        path: the XML file.

    Returns:
        The readers' marks and non-nodules; ``reader`` is the ``readingSession`` index.

    Raises:
        LidcParseError: with a short reason, e.g. ``"radiograph readings (IdriReadMessage),
            not CT"``, ``"unreadable XML: ..."``, ``"no SeriesInstanceUid in ResponseHeader"``.
    """
    path = Path(path)
    root = _parse_root(path)
    root_name = _local_name(root.tag)
    if root_name == "IdriReadMessage":
        raise LidcParseError("radiograph readings (IdriReadMessage), not CT")
    if root_name != "LidcReadMessage":
        raise LidcParseError(f"not an LIDC readings file (root <{root_name[:40]}>)")
    header = next(_children(root, "ResponseHeader"), None)
    series_uid = None if header is None else _child_text(
        header, "SeriesInstanceUid", "SeriesInstanceUID")
    if series_uid is None:
        raise LidcParseError("no SeriesInstanceUid in ResponseHeader")
    study_uid = _child_text(header, "StudyInstanceUID", "StudyInstanceUid")
    marks: list[ReaderMark] = []
    non_nodules: list[NonNoduleMark] = []
    sessions = list(_children(root, "readingSession"))
    for reader, session in enumerate(sessions):
        parsed = (_parse_mark(element, reader) for element in _children(session,
                                                                          "unblindedReadNodule"))
        marks.extend(mark for mark in parsed if mark is not None)
        non_nodules.extend(_parse_non_nodule(element, reader)
                           for element in _children(session, "nonNodule"))
    return Readings(path, series_uid, study_uid, len(sessions), tuple(marks), tuple(non_nodules))


def is_lidc_readings_file(path: Path) -> bool:
    """True when the first element of ``path`` (sniffing ~2 KB) is ``LidcReadMessage``."""
    try:
        with Path(path).open("rb") as handle:
            head = _sniff_text(handle.read(_SNIFF_BYTES))
    except OSError:
        return False
    # The root is the first '<name' outside declarations, comments and <!DOCTYPE.
    head = re.sub(r"<!--.*?-->|<\?.*?\?>", "", head, flags=re.DOTALL)
    match = re.search(r"<([A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)", head)
    return match is not None and match.group(2) == "LidcReadMessage"


# --------------------------------------------------------------------------- nodules


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
    box_low_mm: np.ndarray  # (3,) x, y, z lower corner of all points
    box_high_mm: np.ndarray  # (3,) upper corner
    anchors: tuple[tuple[float, float, float], ...]  # (x px, y px, z mm) centre of each roi
    polygons: tuple[tuple[float, np.ndarray], ...]  # (z mm, (K, 2) float32 px) inclusion outlines


def _geometry(mark: ReaderMark, pixel_spacing_mm: float) -> _MarkGeometry:
    by_z: dict[float, list[np.ndarray]] = {}
    for contour in mark.contours:
        by_z.setdefault(contour.z_mm, []).append(contour.points_xy * pixel_spacing_mm)
    planes = {z_mm: np.concatenate(points) for z_mm, points in by_z.items()}
    every_point = np.concatenate([
        np.column_stack([points, np.full(len(points), z_mm)]) for z_mm, points in planes.items()])
    anchors = tuple((*(float(v) for v in contour.points_xy.mean(axis=0)), contour.z_mm)
                    for contour in mark.contours if contour.inclusion)
    polygons = tuple((contour.z_mm, contour.points_xy.astype(np.float32))
                     for contour in mark.contours
                     if contour.inclusion and len(contour.points_xy) >= 3)
    return _MarkGeometry(planes, every_point.min(axis=0), every_point.max(axis=0), anchors,
                         polygons)


def _box_gap_mm(a: _MarkGeometry, b: _MarkGeometry) -> float:
    gap = np.maximum(0.0, np.maximum(a.box_low_mm - b.box_high_mm, b.box_low_mm - a.box_high_mm))
    return float(np.linalg.norm(gap))


def _min_xy_distance_mm(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest distance between a point of ``a`` (N, 2) and one of ``b`` (M, 2)."""
    best = math.inf
    chunk = max(1, 250_000 // len(b))
    for start in range(0, len(a), chunk):
        squared = ((a[start:start + chunk, None, :] - b[None, :, :]) ** 2).sum(axis=-1)
        best = min(best, float(np.sqrt(squared.min())))
    return best


def _min_point_distance_mm(a: _MarkGeometry, b: _MarkGeometry, cutoff_mm: float) -> float:
    """Smallest 3D distance between contour points of ``a`` and ``b``; inf beyond ``cutoff_mm``.

    Slice pairs are visited by increasing z gap and skipped once the gap alone exceeds the
    best distance found, which is exact and avoids most of the all-pairs work.
    """
    slice_pairs = sorted((abs(z_a - z_b), z_a, z_b) for z_a in a.planes for z_b in b.planes
                         if abs(z_a - z_b) <= cutoff_mm)
    best = math.inf
    for z_gap, z_a, z_b in slice_pairs:
        if z_gap >= best:
            break
        best = min(best, math.hypot(z_gap, _min_xy_distance_mm(a.planes[z_a], b.planes[z_b])))
    return best


def _containment_distance_mm(inner: _MarkGeometry, outer: _MarkGeometry, cutoff_mm: float
                             ) -> float:
    """Smallest z gap between a roi centre of ``inner`` lying inside an outline of ``outer``.

    Catches a reader's point (nodule < 3 mm) or small outline inside another reader's larger
    outline, whose boundaries can be further apart than the tolerance.
    """
    best = math.inf
    for x_px, y_px, z_mm in inner.anchors:
        for polygon_z_mm, polygon in outer.polygons:
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
             tolerance_mm: float) -> list[list[int]]:
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
            result.extend(_cluster(group, distances, readers, tolerance_mm * _SHRINK_FACTOR))
        else:
            # Marks touching at (near) zero distance: join nearest pairs first, keeping groups
            # valid, so that no reader appears twice in a nodule.
            LOG.warning("marks %s stay linked at %.2f mm; splitting nearest-first", group,
                        tolerance_mm)
            nearest = sorted((pair for pair in edges if pair[0] in group and pair[1] in group),
                             key=lambda pair: (distances[pair], pair))
            result.extend(_union_components(group, nearest, valid))
    return result


def _contour_centre(contour: Contour) -> tuple[float, float, float]:
    x_px, y_px = contour.points_xy.mean(axis=0)
    return float(x_px), float(y_px), contour.z_mm


def _mark_centre(mark: ReaderMark) -> np.ndarray:
    contours = [contour for contour in mark.contours if contour.inclusion] or mark.contours
    return np.mean([_contour_centre(contour) for contour in contours], axis=0)


def _longest_chord_px(mark: ReaderMark) -> float:
    """Longest distance between two points of one inclusion outline (LIDC's diameter)."""
    longest = 0.0
    for contour in mark.contours:
        if not contour.inclusion:
            continue
        hull = cv2.convexHull(contour.points_xy.astype(np.float32)).reshape(-1, 2)
        hull = hull.astype(np.float64)
        longest = max(longest, float(np.sqrt(
            ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1).max())))
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
                    slice_thickness_mm: float) -> list[Nodule]:
    """Group the marks of different readers that belong to one lesion.

    After pylidc ``Scan.cluster_annotations``: two marks of different readers are linked when
    their contour points (x, y, z in mm) come within ``max(slice_thickness_mm,
    pixel_spacing_mm)``, or when the centre of one's roi lies inside the other's outline
    within that distance in z; nodules are the connected components. A component with more
    than 4 marks or two marks of one reader is re-clustered with the tolerance shrunk by 0.9,
    down to 0.1 mm, then split by joining nearest pairs first. Deterministic.

    Args:
        readings: from :func:`parse_readings`.
        pixel_spacing_mm: in-plane pixel size, (0028,0030) Pixel Spacing.
        slice_thickness_mm: (0018,0050) Slice Thickness (or the slice spacing).

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
    groups = _cluster(list(range(len(marks))), distances, [m.reader for m in marks], tolerance_mm)
    nodules = [_build_nodule([marks[i] for i in group], pixel_spacing_mm) for group in groups]
    nodules.sort(key=lambda n: (n.centre_z_mm, n.centre_xy_px[1], n.centre_xy_px[0]))
    width = max(2, len(str(len(nodules))))
    return [dataclasses.replace(nodule, nodule_id=f"N{number:0{width}d}")
            for number, nodule in enumerate(nodules, start=1)]


# --------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """From the readers' ratings of a nodule to cancer (1) / non-cancer (0) / excluded.

    The default is the common LIDC rule: median malignancy of the readers who gave
    characteristics, >= 4 cancer, <= 2 non-cancer, in between (2.5-3.5) excluded.

    Attributes:
        rating: one of :data:`RATING_RANGES`.
        aggregate: "median", "mean" or "max" over the readers who gave that rating.
        cancer_at_least: aggregate >= this is cancer.
        non_cancer_at_most: aggregate <= this is non-cancer (< cancer_at_least).
        min_readers: fewer ratings than this excludes the nodule.
    """

    rating: str = "malignancy"
    aggregate: str = "median"
    cancer_at_least: float = 4.0
    non_cancer_at_most: float = 2.0
    min_readers: int = 1

    def __post_init__(self) -> None:
        if self.rating not in RATING_RANGES:
            raise ValueError(f"rating must be one of {sorted(RATING_RANGES)}, got {self.rating!r}")
        if self.aggregate not in _AGGREGATES:
            raise ValueError(
                f"aggregate must be one of {sorted(_AGGREGATES)}, got {self.aggregate!r}")
        low, high = RATING_RANGES[self.rating]
        for name in ("cancer_at_least", "non_cancer_at_most"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a number within {low}..{high} for "
                                 f"{self.rating}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.non_cancer_at_most < self.cancer_at_least:
            raise ValueError(f"non_cancer_at_most ({self.non_cancer_at_most}) must be below "
                             f"cancer_at_least ({self.cancer_at_least})")
        if isinstance(self.min_readers, bool) \
                or not isinstance(self.min_readers, numbers.Integral) \
                or self.min_readers < 1:
            raise ValueError(f"min_readers must be an integer >= 1, got {self.min_readers!r}")
        object.__setattr__(self, "min_readers", int(self.min_readers))

    def outcome(self, nodule: Nodule) -> str:
        """The nodule's outcome under this rule.

        One of "cancer", "non_cancer", "excluded_indeterminate", "excluded_min_readers" or
        "excluded_unrated" (no reader gave the rating).

        ``min_readers`` counts the readers who gave the rating (``n_rated`` when every reader
        with characteristics rated it).
        """
        values = nodule.ratings(self.rating)
        if not values:
            return "excluded_unrated"
        if len(values) < self.min_readers:
            return "excluded_min_readers"
        score = _AGGREGATES[self.aggregate](values)
        if score >= self.cancer_at_least:
            return "cancer"
        if score <= self.non_cancer_at_most:
            return "non_cancer"
        return "excluded_indeterminate"

    def label(self, nodule: Nodule) -> int | None:
        """1 for cancer, 0 for non-cancer, None when the nodule is excluded."""
        return _OUTCOME_LABELS.get(self.outcome(nodule))

    def to_dict(self) -> dict:
        """The rule as JSON-ready values (recorded in dataset.json)."""
        return {"rating": self.rating, "aggregate": self.aggregate,
                "cancer_at_least": self.cancer_at_least,
                "non_cancer_at_most": self.non_cancer_at_most,
                "min_readers": self.min_readers}

    @classmethod
    def parse(cls, text: str) -> LabelRule:
        """The CLI form ``"cancer_at_least=4,non_cancer_at_most=2,min_readers=2"``.

        Keys left out keep their defaults; an empty string is the default rule.

        Raises:
            ValueError: naming the unknown key, the repeated key or the bad value.
        """
        converters: dict[str, Callable[[str], object]] = {
            "rating": str, "aggregate": str, "cancer_at_least": float,
            "non_cancer_at_most": float, "min_readers": int}
        values: dict[str, object] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, raw = (piece.strip() for piece in item.partition("="))
            if not sep:
                raise ValueError(f"label rule item {item!r} is not key=value")
            if key not in converters:
                raise ValueError(f"unknown label rule key {key!r}; expected one of "
                                 f"{sorted(converters)}")
            if key in values:
                raise ValueError(f"label rule key {key!r} given twice")
            try:
                values[key] = converters[key](raw)
            except ValueError:
                kind = "an integer" if converters[key] is int else "a number"
                raise ValueError(f"{key} must be {kind}, got {raw!r}") from None
            if isinstance(values[key], float) and not math.isfinite(values[key]):
                raise ValueError(f"{key} must be a finite number, got {raw!r}")
        return cls(**values)


# --------------------------------------------------------------------------- masks, slices


def _contours_near(mark: ReaderMark, z_mm: float, z_tolerance_mm: float) -> list[Contour]:
    """The mark's contours on its roi z nearest ``z_mm``, if within ``z_tolerance_mm``."""
    gaps = [abs(contour.z_mm - z_mm) for contour in mark.contours]
    nearest = min(gaps)
    if nearest > z_tolerance_mm + _Z_EPS_MM:
        return []
    return [contour for contour, gap in zip(mark.contours, gaps, strict=True)
            if gap <= nearest + _Z_EPS_MM]


def _pixel_polygon(contour: Contour) -> np.ndarray:
    points = np.clip(np.rint(contour.points_xy), -(1 << 20), 1 << 20)
    return points.astype(np.int32).reshape(-1, 1, 2)


def _reader_mask(contours: list[Contour], shape: tuple[int, int]) -> np.ndarray:
    """Inclusion outlines filled with their boundary pixels, hole interiors cut out.

    LIDC edge maps trace the outer boundary of the region; a hole's boundary pixels belong
    to the nodule, so only the inside of an exclusion outline is removed.
    """
    inside = np.zeros(shape, dtype=np.uint8)
    holes = np.zeros(shape, dtype=np.uint8)
    for contour in contours:
        polygon = _pixel_polygon(contour)
        target = inside if contour.inclusion else holes
        cv2.fillPoly(target, [polygon], 1)
        cv2.polylines(target, [polygon], True, 1 if contour.inclusion else 0)
    return (inside & (1 - holes)).astype(bool)


def consensus_mask(nodule: Nodule, z_mm: float, shape: tuple[int, int], z_tolerance_mm: float,
                   agreement: float = 0.5) -> np.ndarray:
    """Pixels inside the outlines of at least ``agreement`` of the readers outlining this slice.

    Readers count when they outlined the nodule (marks >= 3 mm; a < 3 mm mark is one point
    and makes no mask) with a roi within ``z_tolerance_mm`` of ``z_mm``; each uses its rois at
    its z nearest ``z_mm``. Pixels are (row, column); outline points are rounded to pixel
    centres.

    Args:
        nodule: from :func:`cluster_nodules`.
        z_mm: the slice's z.
        shape: (rows, columns) of the slice.
        z_tolerance_mm: how far a roi's z may be from ``z_mm`` (e.g. half the slice spacing).
        agreement: fraction of those readers, in (0, 1]; 0.5 is the usual LIDC consensus.

    Returns:
        bool (rows, columns); all False when no reader outlined the nodule there.
    """
    if len(shape) != 2 or any(int(size) != size or size < 1 for size in shape):
        raise ValueError(f"shape must be two positive integers (rows, columns), got {shape!r}")
    if not z_tolerance_mm >= 0:
        raise ValueError(f"z_tolerance_mm must be >= 0, got {z_tolerance_mm!r}")
    if not 0 < agreement <= 1:
        raise ValueError(f"agreement must be within (0, 1], got {agreement!r}")
    shape = (int(shape[0]), int(shape[1]))
    reader_masks = []
    for mark in nodule.marks:
        contours = [] if mark.is_small else _contours_near(mark, z_mm, z_tolerance_mm)
        if any(contour.inclusion for contour in contours):
            reader_masks.append(_reader_mask(contours, shape))
    if not reader_masks:
        return np.zeros(shape, dtype=bool)
    votes = np.sum(reader_masks, axis=0)
    return votes >= agreement * len(reader_masks) - 1e-9


def _validated_z(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a 1-D array of finite z values, got shape {array.shape}")
    return array


def nodule_slices(nodule: Nodule, slice_z_mm: np.ndarray, z_tolerance_mm: float) -> list[int]:
    """Indices into ``slice_z_mm`` of the slices on which some reader outlined the nodule.

    Outlines are the inclusion rois of marks >= 3 mm (the ones :func:`consensus_mask` draws),
    so a nodule marked only as < 3 mm has none.
    """
    slice_z = _validated_z(slice_z_mm, "slice_z_mm")
    if not z_tolerance_mm >= 0:
        raise ValueError(f"z_tolerance_mm must be >= 0, got {z_tolerance_mm!r}")
    outline_z = np.asarray([contour.z_mm for mark in nodule.marks if not mark.is_small
                            for contour in mark.contours if contour.inclusion])
    if outline_z.size == 0 or slice_z.size == 0:
        return []
    gaps = np.abs(slice_z[:, None] - outline_z[None, :]).min(axis=1)
    return np.flatnonzero(gaps <= z_tolerance_mm + _Z_EPS_MM).tolist()


def far_from_marks(slice_z_mm: np.ndarray, mark_z_mm: np.ndarray, margin_mm: float
                   ) -> np.ndarray:
    """Per slice, True when it is at least ``margin_mm`` in z from every mark.

    Used to pick ``no_finding`` negatives; pass :meth:`Readings.all_mark_z_mm` so nodules of
    every size and non-nodules of every reader count. All True when there are no marks.
    Distances equal to ``margin_mm`` within 1e-6 mm (float noise) count as far.
    """
    slice_z = _validated_z(slice_z_mm, "slice_z_mm")
    mark_z = _validated_z(mark_z_mm, "mark_z_mm")
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    if mark_z.size == 0:
        return np.ones(slice_z.shape, dtype=bool)
    gaps = np.abs(slice_z[:, None] - mark_z[None, :]).min(axis=1)
    return gaps >= margin_mm - _Z_EPS_MM
