"""Tests for lungct.prepare.lidc: LIDC XML readings, reader clustering, label rule, ROI masks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lungct.prepare.lidc import LabelRule, consensus_mask, far_from_marks, nodule_slices
from lungct.prepare.lidc_xml import (
    Contour,
    LidcParseError,
    ReaderMark,
    Readings,
    is_lidc_readings_file,
    parse_readings,
)
from lungct.prepare.nodules import Nodule, cluster_nodules

NIH = "http://www.nih.gov"
PIXEL_SPACING_MM = 0.7
SLICE_THICKNESS_MM = 2.5
ALL_THREES = {"subtlety": 3, "internalStructure": 1, "calcification": 6, "sphericity": 3,
              "margin": 3, "lobulation": 3, "spiculation": 3, "texture": 3, "malignancy": 3}


# ----------------------------------------------------------------------------- XML helpers


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    """Outline points (x, y) of an axis-aligned square, corners included, clockwise."""
    top = [(x, y0) for x in range(int(x0), int(x1) + 1)]
    right = [(x1, y) for y in range(int(y0) + 1, int(y1) + 1)]
    bottom = [(x, y1) for x in range(int(x1) - 1, int(x0) - 1, -1)]
    left = [(x0, y) for y in range(int(y1) - 1, int(y0), -1)]
    return top + right + bottom + left


def circle(cx: float, cy: float, radius: float, n_points: int = 360) -> list[tuple[float, float]]:
    """``n_points`` points (x, y) evenly spaced on a circle."""
    angles = np.arange(n_points) * 2 * math.pi / n_points
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]


def roi_xml(z_mm: float, points: list[tuple[float, float]], inclusion: bool = True,
            sop_uid: str = "1.2.840.1") -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    for x, y in points)
    return (f"<roi><imageZposition>{z_mm}</imageZposition><imageSOP_UID>{sop_uid}"
            f"</imageSOP_UID><inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>"
            f"{edges}</roi>")


def nodule_xml(nodule_id: str, rois: list[str], characteristics: dict | None = None) -> str:
    chars = "" if characteristics is None else "<characteristics>" + "".join(
        f"<{name}>{value}</{name}>" for name, value in characteristics.items()
    ) + "</characteristics>"
    return (f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{chars}"
            f"{''.join(rois)}</unblindedReadNodule>")


def non_nodule_xml(non_nodule_id: str, z_mm: float, x: float, y: float,
                   sop_uid: str = "1.2.840.9") -> str:
    return (f"<nonNodule><nonNoduleID>{non_nodule_id}</nonNoduleID><imageZposition>{z_mm}"
            f"</imageZposition><imageSOP_UID>{sop_uid}</imageSOP_UID><locus><xCoord>{x}"
            f"</xCoord><yCoord>{y}</yCoord></locus></nonNodule>")


def document(*sessions: list[str], root: str = "LidcReadMessage", namespace: str | None = NIH,
             series_tag: str = "SeriesInstanceUid", series_uid: str = "1.3.6.1.7",
             study_uid: str | None = "1.3.6.1.5", prolog: str = "") -> str:
    xmlns = f' xmlns="{namespace}"' if namespace else ""
    study = f"<StudyInstanceUID>{study_uid}</StudyInstanceUID>" if study_uid else ""
    series = f"<{series_tag}>{series_uid}</{series_tag}>" if series_tag else ""
    body = "".join(
        f"<readingSession><annotationVersion>3.12</annotationVersion>{''.join(items)}"
        "</readingSession>" for items in sessions)
    return (f'<?xml version="1.0" encoding="UTF-8"?>{prolog}<{root}{xmlns}><ResponseHeader>'
            f"<Version>1.8.1</Version>{study}{series}</ResponseHeader>{body}</{root}>")


def write(tmp_path: Path, text: str, name: str = "069.xml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rated(malignancy: int, **others: int) -> dict:
    return {**ALL_THREES, "malignancy": malignancy, **others}


def mark(reader: int, ratings: dict | None, contours: list[Contour]) -> ReaderMark:
    return ReaderMark(reader, f"n{reader}", ratings, tuple(contours))


def square_contour(x0: int, y0: int, x1: int, y1: int, z_mm: float = 0.0,
                   inclusion: bool = True) -> Contour:
    return Contour(z_mm, "", inclusion, np.asarray(square(x0, y0, x1, y1), dtype=float))


def nodule_of(marks: list[ReaderMark]) -> Nodule:
    """A nodule built by clustering ``marks`` that all overlap (one lesion)."""
    readings = Readings(Path("x.xml"), "1.2", None, 4, tuple(marks), ())
    (nodule,) = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    return nodule


def rated_nodule(malignancies: list[int]) -> Nodule:
    return nodule_of([mark(reader, {"malignancy": value}, [square_contour(10, 10, 20, 20)])
                      for reader, value in enumerate(malignancies)])


@pytest.fixture
def full_readings(tmp_path: Path) -> Readings:
    """Two readers: rated nodule with a hole, a small nodule, an all-zero one, a non-nodule."""
    reader0 = [
        nodule_xml("IL057_127364", [
            roi_xml(-125.0, square(10, 10, 20, 20), sop_uid="1.2.840.11"),
            roi_xml(-125.0, square(13, 13, 16, 16), inclusion=False, sop_uid="1.2.840.11"),
            roi_xml(-122.5, square(11, 11, 19, 19), sop_uid="1.2.840.12"),
        ], rated(5, spiculation=4)),
        nodule_xml("Nodule 001", [roi_xml(-200.0, [(300, 310)])]),
        non_nodule_xml("IL057_nn1", -150.5, 100, 200),
    ]
    reader1 = [
        nodule_xml("4", [roi_xml(-125.0, square(11, 10, 21, 20))],
                   {name: 0 for name in ALL_THREES}),
        nodule_xml("5", [roi_xml(-90.0, [(50, 60)])], {}),
    ]
    return parse_readings(write(tmp_path, document(reader0, reader1)))


# ----------------------------------------------------------------------------- parsing


def test_parse_reads_header_and_sessions(full_readings: Readings) -> None:
    """Series and study UIDs come from ResponseHeader; one reader per readingSession."""
    assert full_readings.series_uid == "1.3.6.1.7"
    assert full_readings.study_uid == "1.3.6.1.5"
    assert full_readings.n_readers == 2
    assert [(m.reader, m.nodule_id) for m in full_readings.marks] == [
        (0, "IL057_127364"), (0, "Nodule 001"), (1, "4"), (1, "5")]


def test_parse_accepts_series_instance_uid_capitalised(tmp_path: Path) -> None:
    """ResponseHeader may spell the tag SeriesInstanceUID."""
    path = write(tmp_path, document([], series_tag="SeriesInstanceUID", series_uid="9.8.7"))
    assert parse_readings(path).series_uid == "9.8.7"


def test_parse_without_namespace_or_study(tmp_path: Path) -> None:
    """Files without the nih.gov namespace or StudyInstanceUID are read too."""
    readings = parse_readings(write(tmp_path, document([], namespace=None, study_uid=None)))
    assert readings.series_uid == "1.3.6.1.7"
    assert readings.study_uid is None
    assert readings.n_readers == 1


def test_parse_characteristics_of_large_nodule(full_readings: Readings) -> None:
    """A nodule with characteristics keeps its nine integer ratings and is not small."""
    large = full_readings.marks[0]
    assert large.characteristics == rated(5, spiculation=4)
    assert not large.is_small


def test_parse_nodule_without_characteristics_is_small(full_readings: Readings) -> None:
    """No <characteristics>: a < 3 mm nodule with one edgeMap point."""
    small = full_readings.marks[1]
    assert small.characteristics is None and small.is_small
    assert small.contours[0].points_xy.tolist() == [[300.0, 310.0]]


def test_parse_all_zero_characteristics_is_small(full_readings: Readings) -> None:
    """All-zero characteristics are treated as a small nodule."""
    assert full_readings.marks[2].is_small


def test_parse_empty_characteristics_is_small(full_readings: Readings) -> None:
    """An empty <characteristics/> is treated as a small nodule."""
    assert full_readings.marks[3].is_small


def test_parse_out_of_range_rating_dropped(tmp_path: Path) -> None:
    """A rating outside its allowed range is ignored, the valid ones kept."""
    path = write(tmp_path, document([nodule_xml("1", [roi_xml(0, square(1, 1, 5, 5))],
                                                {"malignancy": 9, "texture": 4})]))
    assert parse_readings(path).marks[0].characteristics == {"texture": 4}


def test_parse_roi_fields(full_readings: Readings) -> None:
    """roi: imageZposition, imageSOP_UID, inclusion and edgeMap xCoord (column) / yCoord (row)."""
    outline, hole, upper = full_readings.marks[0].contours
    assert (outline.z_mm, outline.sop_uid, outline.inclusion) == (-125.0, "1.2.840.11", True)
    assert (hole.inclusion, upper.z_mm, upper.sop_uid) == (False, -122.5, "1.2.840.12")
    assert outline.points_xy.shape == (40, 2)
    assert outline.points_xy[:2].tolist() == [[10.0, 10.0], [11.0, 10.0]]
    assert not outline.points_xy.flags.writeable


def test_parse_non_nodule_locus(full_readings: Readings) -> None:
    """nonNodule: nonNoduleID, imageZposition, imageSOP_UID and its locus point."""
    (non_nodule,) = full_readings.non_nodules
    assert (non_nodule.reader, non_nodule.non_nodule_id) == (0, "IL057_nn1")
    assert (non_nodule.z_mm, non_nodule.sop_uid) == (-150.5, "1.2.840.9")
    assert non_nodule.locus_xy == (100.0, 200.0)


def test_all_mark_z_includes_every_size_and_non_nodules(full_readings: Readings) -> None:
    """all_mark_z_mm lists every roi z (small ones too) and every nonNodule z."""
    assert full_readings.all_mark_z_mm().tolist() == [
        -200.0, -150.5, -125.0, -125.0, -125.0, -122.5, -90.0]


def test_parse_refuses_radiograph_readings(tmp_path: Path) -> None:
    """IdriReadMessage (chest radiograph readings) is refused with the pinned reason."""
    path = write(tmp_path, document([], root="IdriReadMessage", namespace=f"{NIH}/idri"))
    with pytest.raises(LidcParseError, match=r"^radiograph readings \(IdriReadMessage\), not CT$"):
        parse_readings(path)


def test_parse_refuses_other_root(tmp_path: Path) -> None:
    """Any other root element is refused, naming it."""
    path = write(tmp_path, "<project><a/></project>")
    with pytest.raises(LidcParseError, match=r"^not an LIDC readings file \(root <project>\)$"):
        parse_readings(path)


def test_parse_refuses_malformed_xml(tmp_path: Path) -> None:
    """Truncated XML is refused as unreadable."""
    path = write(tmp_path, document([])[:-10])
    with pytest.raises(LidcParseError, match=r"^unreadable XML: "):
        parse_readings(path)


@pytest.mark.parametrize("prolog", [
    '<!DOCTYPE LidcReadMessage [<!ENTITY a "aaaa">]>',
    '<!DOCTYPE LidcReadMessage SYSTEM "file:///etc/passwd">',
])
def test_parse_refuses_dtd(tmp_path: Path, prolog: str) -> None:
    """DOCTYPE / ENTITY declarations are refused before parsing (untrusted input)."""
    path = write(tmp_path, document([], prolog=prolog))
    with pytest.raises(LidcParseError, match="DTD or entity declarations are not allowed"):
        parse_readings(path)


def test_parse_refuses_dtd_in_utf16(tmp_path: Path) -> None:
    """The DTD check also sees through a UTF-16 encoding."""
    text = document([], prolog='<!DOCTYPE x [<!ENTITY a "b">]>').replace("UTF-8", "UTF-16")
    path = tmp_path / "utf16.xml"
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(LidcParseError, match="DTD or entity"):
        parse_readings(path)


def test_parse_refuses_missing_series_uid(tmp_path: Path) -> None:
    """A ResponseHeader without a series UID is refused."""
    path = write(tmp_path, document([], series_tag=""))
    with pytest.raises(LidcParseError, match=r"^no SeriesInstanceUid in ResponseHeader$"):
        parse_readings(path)


def test_parse_refuses_non_numeric_coordinate(tmp_path: Path) -> None:
    """A non-numeric xCoord is refused, naming the reader and nodule."""
    text = document([nodule_xml("7", [roi_xml(1.0, [("abc", 2)])])])
    with pytest.raises(LidcParseError, match=r"reader 0 nodule '7': xCoord 'abc' is not a number"):
        parse_readings(write(tmp_path, text))


@pytest.mark.parametrize(("x", "z", "message"), [
    ("nan", 1.0, r"xCoord 'nan' is not finite"),
    ("-inf", 1.0, r"xCoord '-inf' is not finite"),
    ("1e300", 1.0, r"xCoord '1e300' is outside \+-65536"),
    (70000, 1.0, r"xCoord '70000' is outside \+-65536"),
    (5, "inf", r"imageZposition 'inf' is not finite"),
    (5, 20000, r"imageZposition '20000' is outside \+-10000"),
])
def test_parse_refuses_non_finite_or_absurd_coordinates(tmp_path: Path, x, z, message) -> None:
    """Coordinates must be finite and within MAX_ABS_XY_PX / MAX_ABS_Z_MM."""
    text = document([nodule_xml("7", [roi_xml(z, [(x, 2)])])])
    with pytest.raises(LidcParseError, match=rf"^reader 0 nodule '7': {message}$"):
        parse_readings(write(tmp_path, text))


def test_parse_refuses_absurd_non_nodule_locus(tmp_path: Path) -> None:
    """nonNodule loci are held to the same bounds."""
    text = document([non_nodule_xml("9", 1.0, 5, "1e9")])
    with pytest.raises(LidcParseError, match=r"yCoord '1e9' is outside \+-65536"):
        parse_readings(write(tmp_path, text))


@pytest.mark.parametrize(("cap", "value", "message"), [
    ("MAX_POINTS_PER_ROI", 3, r"^reader 0 nodule 'n0': edgeMap points in one roi: more than 3$"),
    ("MAX_ROIS_PER_MARK", 1, r"^reader 0 nodule 'n0': rois in one mark: more than 1$"),
    ("MAX_MARKS_PER_FILE", 2, r"^nodule marks \(unblindedReadNodule\): more than 2$"),
    ("MAX_ROIS_PER_FILE", 5, r"^rois in the file: more than 5$"),
    ("MAX_XML_ELEMENTS", 50, r"^XML elements: more than 50$"),
])
def test_parse_refuses_files_over_a_cap(tmp_path: Path, monkeypatch, cap, value, message) -> None:
    """Each cap refuses the whole file with a reason naming what was counted and the cap."""
    import lungct.prepare.lidc_xml as lidc_xml

    monkeypatch.setattr(lidc_xml, cap, value)
    marks = [nodule_xml(f"n{i}", [roi_xml(z, square(0, 0, 2, 2)) for z in (0.0, 2.5)])
             for i in range(3)]
    with pytest.raises(LidcParseError, match=message):
        parse_readings(write(tmp_path, document(marks)))


def test_far_from_marks_and_nodule_slices_match_all_pairs() -> None:
    """The sorted-neighbour search equals the all-pairs minimum it replaced, exactly."""
    rng = np.random.default_rng(3)
    slice_z = np.round(rng.uniform(-200, 200, 300), 2)
    mark_z = np.round(rng.uniform(-150, 150, 700), 1)
    gaps = np.abs(slice_z[:, None] - mark_z[None, :]).min(axis=1)
    assert far_from_marks(slice_z, mark_z, 1.5).tolist() == (gaps >= 1.5 - 1e-6).tolist()
    nodule = nodule_of([mark(0, {"malignancy": 4}, [square_contour(1, 1, 4, 4, z_mm=float(z))
                                                    for z in mark_z[:40]])])
    assert nodule_slices(nodule, slice_z, 0.7) == np.flatnonzero(
        np.abs(slice_z[:, None] - mark_z[None, :40]).min(axis=1) <= 0.7 + 1e-6).tolist()


def test_parse_refuses_bad_inclusion(tmp_path: Path) -> None:
    """inclusion must be TRUE or FALSE."""
    text = document([nodule_xml("7", [roi_xml(1.0, [(1, 2)])])]).replace("TRUE", "maybe")
    with pytest.raises(LidcParseError, match="inclusion 'maybe' is not TRUE or FALSE"):
        parse_readings(write(tmp_path, text))


def test_parse_refuses_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is a parse error, not an OSError."""
    with pytest.raises(LidcParseError, match="^unreadable file: "):
        parse_readings(tmp_path / "absent.xml")


def test_is_lidc_readings_file(tmp_path: Path) -> None:
    """The sniff accepts LidcReadMessage only, after comments, and never raises."""
    ct = write(tmp_path, document([]).replace("?>", "?><!-- <IdriReadMessage> -->"), "a.xml")
    cxr = write(tmp_path, document([], root="IdriReadMessage"), "b.xml")
    other = write(tmp_path, "not xml at all", "c.xml")
    assert is_lidc_readings_file(ct)
    assert not is_lidc_readings_file(cxr)
    assert not is_lidc_readings_file(other)
    assert not is_lidc_readings_file(tmp_path / "absent.xml")


# ----------------------------------------------------------------------------- clustering


def lesion_marks(reader: int, nodule_id: str, centre: tuple[int, int], z_values: list[float],
                 malignancy: int | None, half_px: int = 5) -> str:
    cx, cy = centre
    rois = [roi_xml(z, square(cx - half_px, cy - half_px, cx + half_px, cy + half_px))
            for z in z_values]
    return nodule_xml(nodule_id, rois, None if malignancy is None else rated(malignancy))


def test_cluster_two_lesions_four_readers(tmp_path: Path) -> None:
    """Four readers with their own ids marking two lesions give two 4-reader nodules."""
    sessions = [
        [lesion_marks(r, f"r{r}-a", (100 + r, 100), [-50.0, -47.5], 2 + r % 2),
         lesion_marks(r, f"r{r}-b", (300, 250 - r), [-20.0, -17.5, -15.0], 4 + r % 2)]
        for r in range(4)
    ]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    first, second = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert (first.nodule_id, second.nodule_id) == ("N01", "N02")
    assert [m.nodule_id for m in first.marks] == ["r0-a", "r1-a", "r2-a", "r3-a"]
    assert [m.nodule_id for m in second.marks] == ["r0-b", "r1-b", "r2-b", "r3-b"]
    assert (first.n_readers, first.n_rated, first.malignancy) == (4, 4, 2.5)
    assert (second.malignancy, second.z_range_mm) == (4.5, (-20.0, -15.0))


def test_cluster_keeps_one_readers_nearby_lesions_apart(tmp_path: Path) -> None:
    """Two lesions 1.4 mm apart, marked by two readers, stay two nodules of one mark each."""
    sessions = [
        [lesion_marks(r, f"r{r}-left", (100, 100), [0.0], 4),
         lesion_marks(r, f"r{r}-right", (112, 100), [0.0], 2)]
        for r in range(2)
    ]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    nodules = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert [[m.nodule_id for m in n.marks] for n in nodules] == [
        ["r0-left", "r1-left"], ["r0-right", "r1-right"]]


def test_cluster_outline_touching_two_lesions_splits_by_reader(tmp_path: Path) -> None:
    """An outline overlapping both lesions of another reader joins only one of them."""
    sessions = [
        [lesion_marks(0, "left", (100, 100), [0.0], 4),
         lesion_marks(0, "right", (112, 100), [0.0], 2)],
        [nodule_xml("wide", [roi_xml(0.0, square(98, 95, 114, 105))], rated(3))],
    ]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    nodules = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert len(nodules) == 2
    assert all(len({m.reader for m in n.marks}) == n.n_readers for n in nodules)
    assert sorted(n.n_readers for n in nodules) == [1, 2]


def test_cluster_never_more_than_four_marks(tmp_path: Path) -> None:
    """Five readers outlining one lesion identically give groups of at most four."""
    sessions = [[lesion_marks(r, f"r{r}", (200, 200), [0.0], 3)] for r in range(5)]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    nodules = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert sorted(n.n_readers for n in nodules) == [1, 4]


def test_cluster_small_point_inside_outline_joins(tmp_path: Path) -> None:
    """A < 3 mm point at the centre of another reader's 7 mm outline joins that nodule."""
    sessions = [
        [lesion_marks(0, "big", (200, 200), [10.0, 12.5], 4)],
        [nodule_xml("tiny", [roi_xml(12.5, [(200, 200)])])],
    ]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    (nodule,) = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert (nodule.n_readers, nodule.n_rated, nodule.malignancy) == (2, 1, 4.0)


def test_cluster_centre_and_z_range(tmp_path: Path) -> None:
    """The centre averages the outlining readers' roi centres; z range spans all rois."""
    sessions = [
        [lesion_marks(0, "a", (100, 50), [0.0, 2.5], 4)],
        [lesion_marks(1, "b", (102, 54), [2.5, 5.0], 4)],
    ]
    readings = parse_readings(write(tmp_path, document(*sessions)))
    (nodule,) = cluster_nodules(readings, PIXEL_SPACING_MM, SLICE_THICKNESS_MM)
    assert nodule.centre_xy_px == pytest.approx((101.0, 52.0))
    assert nodule.centre_z_mm == pytest.approx(2.5)
    assert nodule.z_range_mm == (0.0, 5.0)


def test_diameter_of_circle_contour_in_mm(tmp_path: Path) -> None:
    """A circle of radius 10 px at 0.7 mm/px has a 14 mm longest chord."""
    text = document([nodule_xml("c", [roi_xml(0.0, circle(200, 200, 10.0))], rated(3))])
    (nodule,) = cluster_nodules(parse_readings(write(tmp_path, text)), 0.7, 1.0)
    assert nodule.diameter_mm == pytest.approx(14.0, abs=1e-3)


def test_diameter_is_median_of_rated_readers() -> None:
    """Diameter is the median over rated readers; small marks do not count."""
    nodule = nodule_of([
        mark(0, {"malignancy": 3}, [square_contour(10, 10, 20, 20)]),  # chord 10*sqrt(2) px
        mark(1, {"malignancy": 3}, [square_contour(10, 10, 16, 16)]),  # 6*sqrt(2) px
        mark(2, None, [Contour(0.0, "", True, np.array([[15.0, 15.0]]))]),
    ])
    assert nodule.diameter_mm == pytest.approx(8 * math.sqrt(2) * PIXEL_SPACING_MM)
    assert (nodule.n_readers, nodule.n_rated) == (3, 2)


def test_cluster_without_marks_is_empty() -> None:
    """A file with no nodule marks gives no nodules."""
    assert cluster_nodules(Readings(Path("x.xml"), "1.2", None, 4, (), ()), 0.7, 1.0) == []


def test_rated_single_point_mark_has_zero_diameter() -> None:
    """A rated mark outlined by one point has a 0 mm chord rather than failing."""
    nodule = nodule_of([mark(0, {"malignancy": 2}, [Contour(0.0, "", True, np.ones((1, 2)))])])
    assert nodule.diameter_mm == 0.0
    assert nodule.n_rated == 1


def test_cluster_rejects_bad_spacing(full_readings: Readings) -> None:
    """Non-positive spacings are refused, naming the argument."""
    with pytest.raises(ValueError, match=r"pixel_spacing_mm must be a positive number, got 0"):
        cluster_nodules(full_readings, 0, 1.0)


# ----------------------------------------------------------------------------- label rule


@pytest.mark.parametrize(("ratings", "expected"), [
    ([1, 1, 1], "non_cancer"),           # median 1
    ([1, 2], "non_cancer"),              # 1.5
    ([2, 2, 2, 3], "non_cancer"),        # 2
    ([2, 3], "excluded_indeterminate"),  # 2.5
    ([3, 3, 3], "excluded_indeterminate"),  # 3
    ([3, 4], "excluded_indeterminate"),  # 3.5
    ([4, 4, 5, 1], "cancer"),            # 4
    ([4, 5], "cancer"),                  # 4.5
    ([5, 5, 5, 5], "cancer"),            # 5
])
def test_default_rule_at_every_median(ratings: list[int], expected: str) -> None:
    """Default rule: median >= 4 cancer, <= 2 non-cancer, 2.5-3.5 excluded."""
    nodule = rated_nodule(ratings)
    assert nodule.malignancy == float(np.median(ratings))
    assert LabelRule().outcome(nodule) == expected
    assert LabelRule().label(nodule) == {"cancer": 1, "non_cancer": 0}.get(expected)


def test_rule_min_readers() -> None:
    """Fewer rated readers than min_readers excludes the nodule."""
    nodule = rated_nodule([5, 5])
    assert LabelRule(min_readers=3).outcome(nodule) == "excluded_min_readers"
    assert LabelRule(min_readers=2).outcome(nodule) == "cancer"


def test_rule_unrated_nodule() -> None:
    """A nodule marked only as < 3 mm is excluded as unrated, label None."""
    nodule = nodule_of([mark(0, None, [Contour(0.0, "", True, np.array([[5.0, 5.0]]))])])
    assert nodule.malignancy is None and nodule.diameter_mm is None
    assert LabelRule().outcome(nodule) == "excluded_unrated"
    assert LabelRule().label(nodule) is None


def test_rule_aggregates_and_other_rating() -> None:
    """mean and max aggregates, and a rating other than malignancy."""
    nodule = nodule_of([
        mark(r, {"malignancy": value, "spiculation": 5 - r}, [square_contour(10, 10, 20, 20)])
        for r, value in enumerate([2, 2, 5])])
    assert LabelRule().outcome(nodule) == "non_cancer"  # median 2
    assert LabelRule(aggregate="mean").outcome(nodule) == "excluded_indeterminate"  # 3
    assert LabelRule(aggregate="max").outcome(nodule) == "cancer"
    assert LabelRule(rating="spiculation").outcome(nodule) == "cancer"  # median 4


def test_rule_threshold_three_counts_as_cancer() -> None:
    """cancer_at_least=3 turns a median of 3 into cancer."""
    rule = LabelRule(cancer_at_least=3, non_cancer_at_most=2)
    assert rule.outcome(rated_nodule([3, 3])) == "cancer"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rating": "size"}, r"rating must be one of .* got 'size'"),
    ({"aggregate": "mode"}, r"aggregate must be one of .* got 'mode'"),
    ({"cancer_at_least": 6}, r"cancer_at_least must be a number within 1..5 .* got 6"),
    ({"non_cancer_at_most": 0}, r"non_cancer_at_most must be .* got 0"),
    ({"non_cancer_at_most": 4}, r"non_cancer_at_most \(4.0\) must be below cancer_at_least"),
    ({"min_readers": 0}, r"min_readers must be an integer >= 1, got 0"),
    ({"min_readers": 1.5}, r"min_readers must be an integer >= 1, got 1.5"),
])
def test_rule_validation(kwargs: dict, message: str) -> None:
    """Invalid rules raise ValueError naming the bad value."""
    with pytest.raises(ValueError, match=message):
        LabelRule(**kwargs)


def test_rule_parse_and_to_dict() -> None:
    """The CLI form parses into the rule and to_dict records every field."""
    rule = LabelRule.parse(" cancer_at_least=4.5, non_cancer_at_most=2,min_readers=2,"
                           "aggregate=mean")
    assert rule.to_dict() == {"rating": "malignancy", "aggregate": "mean",
                              "cancer_at_least": 4.5, "non_cancer_at_most": 2.0,
                              "min_readers": 2}
    assert LabelRule.parse("") == LabelRule()
    assert LabelRule(**rule.to_dict()) == rule


@pytest.mark.parametrize(("text", "message"), [
    ("cancer_at_least=4,colour=red", r"unknown label rule key 'colour'"),
    ("min_readers=two", r"min_readers must be an integer, got 'two'"),
    ("cancer_at_least=high", r"cancer_at_least must be a number, got 'high'"),
    ("cancer_at_least=nan", r"cancer_at_least must be a finite number, got 'nan'"),
    ("min_readers", r"label rule item 'min_readers' is not key=value"),
    ("min_readers=1,min_readers=2", r"label rule key 'min_readers' given twice"),
    ("rating=volume", r"rating must be one of .* got 'volume'"),
])
def test_rule_parse_errors(text: str, message: str) -> None:
    """Bad CLI rules raise ValueError naming the key or value."""
    with pytest.raises(ValueError, match=message):
        LabelRule.parse(text)


# ----------------------------------------------------------------------------- masks, slices


def square_pixels(shape: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    expected = np.zeros(shape, dtype=bool)
    expected[y0:y1 + 1, x0:x1 + 1] = True
    return expected


def test_consensus_two_of_three_readers_overlap() -> None:
    """At agreement 0.5 with three readers, exactly the pixels two of them share."""
    nodule = nodule_of([
        mark(0, {"malignancy": 4}, [square_contour(10, 10, 20, 20)]),
        mark(1, {"malignancy": 4}, [square_contour(15, 16, 25, 25)]),
        mark(2, {"malignancy": 4}, [square_contour(24, 24, 26, 26)]),
    ])
    mask = consensus_mask(nodule, 0.0, (40, 50), z_tolerance_mm=1.0)
    expected = square_pixels((40, 50), 15, 16, 20, 20) | square_pixels((40, 50), 24, 24, 25, 25)
    assert mask.dtype == bool and mask.shape == (40, 50)
    np.testing.assert_array_equal(mask, expected)


def test_consensus_single_reader_includes_boundary() -> None:
    """One outlining reader: the filled square with its boundary pixels."""
    nodule = nodule_of([mark(0, {"malignancy": 4}, [square_contour(3, 4, 9, 12)])])
    mask = consensus_mask(nodule, 0.0, (20, 20), z_tolerance_mm=0.5)
    np.testing.assert_array_equal(mask, square_pixels((20, 20), 3, 4, 9, 12))


def test_consensus_exclusion_hole_removed() -> None:
    """An exclusion outline cuts its interior out; its boundary stays in the nodule."""
    nodule = nodule_of([mark(0, {"malignancy": 4}, [
        square_contour(10, 10, 30, 30), square_contour(15, 15, 25, 25, inclusion=False)])])
    mask = consensus_mask(nodule, 0.0, (40, 40), z_tolerance_mm=0.5)
    expected = square_pixels((40, 40), 10, 10, 30, 30) & ~square_pixels((40, 40), 16, 16, 24, 24)
    np.testing.assert_array_equal(mask, expected)
    assert mask.sum() == 21 * 21 - 9 * 9


def test_consensus_agreement_one_is_intersection() -> None:
    """agreement=1 keeps only pixels inside every outlining reader's outline."""
    nodule = nodule_of([
        mark(0, {"malignancy": 4}, [square_contour(10, 10, 20, 20)]),
        mark(1, {"malignancy": 4}, [square_contour(15, 15, 25, 25)]),
    ])
    mask = consensus_mask(nodule, 0.0, (30, 30), z_tolerance_mm=0.5, agreement=1.0)
    np.testing.assert_array_equal(mask, square_pixels((30, 30), 15, 15, 20, 20))


def test_consensus_uses_readers_on_this_slice_only() -> None:
    """Readers without a roi within the tolerance neither vote nor count."""
    nodule = nodule_of([
        mark(0, {"malignancy": 4}, [square_contour(10, 10, 20, 20, z_mm=0.0),
                                    square_contour(10, 10, 20, 20, z_mm=2.5)]),
        mark(1, {"malignancy": 4}, [square_contour(12, 12, 20, 20, z_mm=0.0)]),
    ])
    mask = consensus_mask(nodule, 2.5, (30, 30), z_tolerance_mm=1.0)
    np.testing.assert_array_equal(mask, square_pixels((30, 30), 10, 10, 20, 20))
    assert not consensus_mask(nodule, 7.5, (30, 30), z_tolerance_mm=1.0).any()


def test_consensus_small_marks_make_no_mask() -> None:
    """A nodule marked only as < 3 mm gives an all-False mask."""
    nodule = nodule_of([mark(r, None, [Contour(0.0, "", True, np.array([[5.0, 5.0]]))])
                        for r in range(2)])
    assert not consensus_mask(nodule, 0.0, (10, 10), z_tolerance_mm=1.0).any()


def test_consensus_rejects_bad_agreement() -> None:
    """agreement outside (0, 1] is refused."""
    with pytest.raises(ValueError, match=r"agreement must be within \(0, 1\], got 0"):
        consensus_mask(rated_nodule([4]), 0.0, (10, 10), 1.0, agreement=0)


def test_nodule_slices_by_z() -> None:
    """Slices within the tolerance of an outlined roi, by index; small marks ignored."""
    nodule = nodule_of([
        mark(0, {"malignancy": 4}, [square_contour(10, 10, 20, 20, z_mm=z) for z in (2.5, 5.0)]),
        mark(1, None, [Contour(7.5, "", True, np.array([[15.0, 15.0]]))]),
    ])
    slice_z = np.array([0.0, 2.5, 5.0, 7.5, 10.0]) + 0.01
    assert nodule_slices(nodule, slice_z, z_tolerance_mm=0.5) == [1, 2]
    assert nodule_slices(nodule, slice_z, z_tolerance_mm=0.0) == []


def test_far_from_marks_at_margin_boundary() -> None:
    """A slice exactly margin_mm from a mark is far; closer slices are not."""
    slice_z = np.array([-110.5, -108.0, -100.5, -93.0, -90.5, -80.5])
    result = far_from_marks(slice_z, np.array([-100.5]), margin_mm=10.0)
    assert result.tolist() == [True, False, False, False, True, True]


def test_far_from_marks_nearest_mark_decides_and_empty() -> None:
    """Every mark counts; with no marks every slice is far."""
    slice_z = np.arange(0.0, 50.0, 5.0)
    assert far_from_marks(slice_z, np.array([0.0, 40.0]), 10.0).tolist() == [
        False, False, True, True, True, True, True, False, False, False]
    assert far_from_marks(slice_z, np.array([]), 10.0).all()


def test_far_from_marks_rejects_negative_margin() -> None:
    """A negative margin is refused, naming the value."""
    with pytest.raises(ValueError, match=r"margin_mm must be a finite number >= 0, got -1"):
        far_from_marks(np.zeros(3), np.zeros(1), -1)


def test_xml_warnings_name_the_file_and_series(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A warning while parsing names the readings file and its series."""
    ratings = {**rated(4), "internalStructure": 5}
    text = document([nodule_xml("7", [roi_xml(0.0, square(10, 10, 20, 20))], ratings)],
                    series_uid="1.3.6.1.99")
    parse_readings(write(tmp_path, text))
    assert "069.xml (series 1.3.6.1.99): reader 0 nodule '7': ignoring internalStructure=" in (
        caplog.text)


def test_clustering_warnings_name_where(caplog: pytest.LogCaptureFixture) -> None:
    """A group that cannot be split by distance is named by the caller's patient and series."""
    contours = [square_contour(10, 10, 20, 20)]
    marks = (mark(0, rated(4), contours), mark(0, rated(4), contours),
             mark(1, rated(4), contours))
    readings = Readings(Path("069.xml"), "1.3.6.1.7", None, 2, marks, ())
    nodules = cluster_nodules(readings, 0.7, 2.5, "patient P1, series 1.3.6.1.7")
    assert sorted(n.n_readers for n in nodules) == [1, 2]
    assert "patient P1, series 1.3.6.1.7: marks [0, 1, 2] stay linked" in caplog.text
