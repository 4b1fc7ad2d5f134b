"""Parsing of LIDC-IDRI XML readings files (``LidcReadMessage``) into marks per reader.

The LIDC-IDRI collection (Armato et al. 2011, Med. Phys. 38:915; TCIA DOI
10.7937/K9/TCIA.2015.LO9QL9SX) ships one XML file of readings per CT series: up to four
radiologists (``readingSession``) each marked nodules >= 3 mm with outlines and nine
characteristic ratings, nodules < 3 mm with one point, and non-nodules with one point.
docs/lidc_format.md describes the elements read.

Readings are matched to CT slices by z position (mm), never by ``imageSOP_UID``: some UIDs in
the XML match no slice. The XML is untrusted input: DTD and entity declarations are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

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
