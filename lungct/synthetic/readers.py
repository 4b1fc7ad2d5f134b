"""Simulated radiologists: who marks which lesion, their outlines and ratings, and the
LIDC XML readings file they produce (part of :mod:`lungct.synthetic`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import cv2
import numpy as np

from lungct.synthetic.files import SeriesIds
from lungct.synthetic.lesions import Footprint, Lesion
from lungct.synthetic.scan import Geometry

__all__ = [
    "Mark",
    "READERS_PER_SERIES",
    "read_series",
    "readings_xml",
    "sample_readers",
]

READERS_PER_SERIES = 4
_LIDC_NAMESPACE = "http://www.nih.gov"
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
#: The nine LIDC characteristics in XML order, with their rating ranges.
_RATING_RANGES = {"subtlety": (1, 5), "internalStructure": (1, 4), "calcification": (1, 6),
                  "sphericity": (1, 5), "margin": (1, 5), "lobulation": (1, 5),
                  "spiculation": (1, 5), "texture": (1, 5), "malignancy": (1, 5)}
_CHARACTERISTICS = tuple(_RATING_RANGES)
_ID_STYLES = ("Nodule {:03d}", "IL057_{:06d}", "{:d}", "MI014_{:05d}", "CH{:04d}")


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
class Mark:
    """What one reader recorded about one lesion."""

    reader: int
    lesion: int
    characteristics: dict[str, int] | None  # None: marked as a nodule < 3 mm (or non-nodule)
    rois: tuple[_Roi, ...]
    mark_id: str = ""


def sample_readers(rng: np.random.Generator) -> list[_Reader]:
    styles = rng.permutation(len(_ID_STYLES))
    return [_Reader(radiologist_id=str(rng.integers(10 ** 8, 10 ** 9)),
                    id_style=_ID_STYLES[styles[r]], first_id=int(rng.integers(1, 5000)),
                    bias={name: rng.normal(0.0, 0.25) for name in _CHARACTERISTICS},
                    threshold=rng.uniform(0.35, 0.65), outlines_holes=rng.random() < 0.75)
            for r in range(READERS_PER_SERIES)]


def _true_characteristics(lesion: Lesion) -> dict[str, float]:
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


def _rate(lesion: Lesion, reader: _Reader, rng: np.random.Generator) -> dict[str, int]:
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


def _outline(footprint: Footprint, lesion: Lesion, reader: _Reader, geometry: Geometry,
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


def _point_roi(lesion: Lesion, geometry: Geometry, rng: np.random.Generator) -> _Roi:
    """One point near the centre of ``lesion`` (small nodules, non-nodules)."""
    x, y, z = lesion.centre_mm
    k = int(np.clip(geometry.slice_of(z) + (rng.integers(-1, 2) if rng.random() < 0.2 else 0),
                    0, len(geometry.z_mm) - 1))
    col, row = (int(np.clip(round(geometry.to_px(v)) + rng.integers(-1, 2), 0,
                            geometry.image_size_px - 1)) for v in (x, y))
    return _Roi(k, True, np.array([[col, row]], dtype=np.int32))


def _read_lesion(reader: _Reader, lesion: Lesion, footprint: Footprint,
                 geometry: Geometry, rng: np.random.Generator
                 ) -> tuple[dict[str, int] | None, tuple[_Roi, ...]]:
    """(characteristics, rois) of one reader's mark of ``lesion``, or (None, ()) if unmarked."""
    if lesion.kind != "nodule":
        return (None, (_point_roi(lesion, geometry, rng),)) if rng.random() < 0.5 else (None, ())
    if rng.random() > min(0.97, 0.55 + 0.42 * (lesion.diameter_mm - 3.0) / 5.0):
        return None, ()
    if lesion.diameter_mm < 4.5 and rng.random() < 0.3:  # judged < 3 mm by this reader
        return None, (_point_roi(lesion, geometry, rng),)
    return _rate(lesion, reader, rng), _outline(footprint, lesion, reader, geometry, rng)


def read_series(lesions: list[Lesion], footprints: list[Footprint], readers: list[_Reader],
                 geometry: Geometry, rng: np.random.Generator) -> list[Mark]:
    """Every reader's marks, each reader's ids numbered in that reader's own order."""
    marks = []
    for r, reader in enumerate(readers):
        own = []
        for index, (lesion, footprint) in enumerate(zip(lesions, footprints, strict=True)):
            characteristics, rois = _read_lesion(reader, lesion, footprint, geometry, rng)
            if rois:
                own.append(Mark(r, index, characteristics, rois))
        for number, j in enumerate(rng.permutation(len(own))):
            marks.append(dataclasses.replace(
                own[j], mark_id=reader.id_style.format(reader.first_id + number)))
    return marks


def _leaf(depth: int, tag: str, text: object) -> str:
    return f"{'  ' * depth}<{tag}>{escape(str(text))}</{tag}>"


def readings_xml(geometry: Geometry, ids: SeriesIds, readers: list[_Reader],
                  marks: list[Mark], lesions: list[Lesion]) -> bytes:
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


def _nodule_lines(mark: Mark, geometry: Geometry, ids: SeriesIds) -> list[str]:
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


def _non_nodule_lines(mark: Mark, geometry: Geometry, ids: SeriesIds) -> list[str]:
    """``nonNodule``: nonNoduleID, imageZposition, imageSOP_UID and one locus point."""
    (roi,) = mark.rois
    col, row = roi.points_xy[0].tolist()
    return ["    <nonNodule>", _leaf(3, "nonNoduleID", mark.mark_id),
            _leaf(3, "imageZposition", f"{geometry.z_mm[roi.slice_index]:.6f}"),
            _leaf(3, "imageSOP_UID", ids.sop_uids[roi.slice_index]),
            "      <locus>", _leaf(4, "xCoord", col), _leaf(4, "yCoord", row),
            "      </locus>", "    </nonNodule>"]
