"""Parsing of LIDC-IDRI XML readings files (``LidcReadMessage``) into marks per reader.

The LIDC-IDRI collection (Armato et al. 2011, Med. Phys. 38:915; TCIA DOI
10.7937/K9/TCIA.2015.LO9QL9SX) ships one XML file of readings per CT series: up to four
radiologists (``readingSession``) each marked nodules >= 3 mm with outlines and nine
characteristic ratings, nodules < 3 mm with one point, and non-nodules with one point.
docs/lidc_format.md describes the elements read.

Readings are matched to CT slices by z position (mm), never by ``imageSOP_UID``: some UIDs in
the XML match no slice. The XML is untrusted input: DTD and entity declarations are refused,
every coordinate must be finite and within :data:`MAX_ABS_XY_PX` / :data:`MAX_ABS_Z_MM`, and
the file's size, element count, marks, rois and points per roi are capped (``MAX_*`` below)
so that parsing and the clustering that follows stay bounded in memory and time. A file
over a cap is refused as a whole (:class:`LidcParseError`, a reason for skipped.csv).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np

__all__ = [
    "RATING_RANGES",
    "MAX_XML_BYTES",
    "MAX_XML_ELEMENTS",
    "MAX_MARKS_PER_FILE",
    "MAX_ROIS_PER_FILE",
    "MAX_ROIS_PER_MARK",
    "MAX_POINTS_PER_ROI",
    "MAX_ABS_XY_PX",
    "MAX_ABS_Z_MM",
    "LidcParseError",
    "Contour",
    "ReaderMark",
    "NonNoduleMark",
    "Readings",
    "parse_readings",
    "is_lidc_readings_file",
]

LOG = logging.getLogger(__name__)
#: The readings file and series being parsed, named by every warning (see _WhereFilter).
_WHERE: ContextVar[str] = ContextVar("lidc_xml_where", default="")


class _WhereFilter(logging.Filter):
    """Prefix this module's warnings with the file and series they concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        where = _WHERE.get()
        if where:
            record.msg = f"{where}: {record.msg}"
        return True


LOG.addFilter(_WhereFilter())

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

# Caps on one readings file. Real LIDC files are at most a few MB, with up to four readers,
# tens of marks each, nodules spanning tens of slices and outlines of a few hundred points;
# the caps sit an order of magnitude above those estimates (not measured on all of LIDC-IDRI).
MAX_XML_BYTES = 64 * 1024 * 1024  # bytes of the file
MAX_XML_ELEMENTS = 1_000_000  # elements; ElementTree holds ~150 bytes each (150 MB at most)
MAX_MARKS_PER_FILE = 1_000  # <unblindedReadNodule> of all readers: the (M, M) distances
MAX_ROIS_PER_FILE = 20_000  # <roi> of all marks
MAX_ROIS_PER_MARK = 1_000  # <roi> of one mark: one outline per slice, more than a series has
MAX_POINTS_PER_ROI = 10_000  # <edgeMap> points of one outline
MAX_ABS_XY_PX = 65_536.0  # px, |xCoord| and |yCoord|: 16 x the widest slice read (4096 px)
MAX_ABS_Z_MM = 10_000.0  # mm, |imageZposition|: as (0020,0032) in lungct.prepare.dicom
_SNIFF_BYTES = 2048
_FEED_BYTES = 1 << 16


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


def _number(element: ET.Element, name: str, where: str, limit: float) -> float:
    """The finite number in child ``name``, with ``|value| <= limit``."""
    text = _child_text(element, name)
    if text is None:
        raise LidcParseError(f"{where}: no {name}")
    try:
        value = float(text)
    except ValueError:
        raise LidcParseError(f"{where}: {name} {text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise LidcParseError(f"{where}: {name} {text[:40]!r} is not finite")
    if abs(value) > limit:
        raise LidcParseError(f"{where}: {name} {text[:40]!r} is outside +-{limit:g}")
    return value


def _xy(element: ET.Element, where: str) -> tuple[float, float]:
    return (_number(element, "xCoord", where, MAX_ABS_XY_PX),
            _number(element, "yCoord", where, MAX_ABS_XY_PX))


def _at_most(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise LidcParseError(f"{what}: more than {limit}")


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
    """The document's root, parsed incrementally so that elements beyond the cap are never
    built."""
    try:
        size = path.stat().st_size
        if size > MAX_XML_BYTES:
            raise LidcParseError(f"file too large for readings ({size} bytes)")
        data = path.read_bytes()
    except OSError as error:
        raise LidcParseError(f"unreadable file: {error.strerror or error}") from None
    if re.search(r"<!(DOCTYPE|ENTITY)", _sniff_text(data), flags=re.IGNORECASE):
        raise LidcParseError("DTD or entity declarations are not allowed in readings XML")
    parser = ET.XMLPullParser(events=("start",))
    root, count = None, 0
    try:
        for start in range(0, len(data), _FEED_BYTES):
            parser.feed(data[start : start + _FEED_BYTES])
            for _, element in parser.read_events():
                root = element if root is None else root
                count += 1
            _at_most(count, MAX_XML_ELEMENTS, "XML elements")
        parser.close()
    except LidcParseError:
        raise
    except (ET.ParseError, LookupError, ValueError) as error:  # LookupError: unknown encoding
        raise LidcParseError(f"unreadable XML: {error}") from None
    if root is None:
        raise LidcParseError("unreadable XML: no element found")
    return root


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
    edges = list(_children(roi, "edgeMap"))
    _at_most(len(edges), MAX_POINTS_PER_ROI, f"{where}: edgeMap points in one roi")
    points = [_xy(edge, where) for edge in edges]
    if not points:
        raise LidcParseError(f"{where}: roi without edgeMap points")
    return Contour(
        z_mm=_number(roi, "imageZposition", where, MAX_ABS_Z_MM),
        sop_uid=_child_text(roi, "imageSOP_UID") or "",
        inclusion=_parse_inclusion(roi, where),
        points_xy=np.asarray(points, dtype=np.float64),
    )


def _parse_mark(element: ET.Element, reader: int) -> ReaderMark | None:
    nodule_id = _child_text(element, "noduleID") or ""
    where = f"reader {reader} nodule {nodule_id[:40]!r}"
    rois = list(_children(element, "roi"))
    _at_most(len(rois), MAX_ROIS_PER_MARK, f"{where}: rois in one mark")
    contours = tuple(_parse_contour(roi, where) for roi in rois)
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
        z_mm=_number(element, "imageZposition", where, MAX_ABS_Z_MM),
        sop_uid=_child_text(element, "imageSOP_UID") or "",
        locus_xy=_xy(locus, where),
    )


def parse_readings(path: Path) -> Readings:
    """Read one LIDC readings XML file (root ``LidcReadMessage``).

    Args:
        path: the XML file.

    Returns:
        The readers' marks and non-nodules; ``reader`` is the ``readingSession`` index.

    Raises:
        LidcParseError: with a short reason, e.g. ``"radiograph readings (IdriReadMessage),
            not CT"``, ``"unreadable XML: ..."``, ``"no SeriesInstanceUid in ResponseHeader"``,
            ``"reader 0 nodule '7': xCoord 'nan' is not finite"``, or a cap exceeded
            (``"<what>: more than <cap>"``).
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
    marks_in_file = [(reader, element) for reader, session in enumerate(sessions)
                     for element in _children(session, "unblindedReadNodule")]
    _at_most(len(marks_in_file), MAX_MARKS_PER_FILE, "nodule marks (unblindedReadNodule)")
    _at_most(sum(1 for _, element in marks_in_file for _ in _children(element, "roi")),
             MAX_ROIS_PER_FILE, "rois in the file")
    where = _WHERE.set(f"{path.name} (series {series_uid})")
    try:
        for reader, session in enumerate(sessions):
            parsed = (_parse_mark(element, reader)
                      for element in _children(session, "unblindedReadNodule"))
            marks.extend(mark for mark in parsed if mark is not None)
            non_nodules.extend(_parse_non_nodule(element, reader)
                               for element in _children(session, "nonNodule"))
    finally:
        _WHERE.reset(where)
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
