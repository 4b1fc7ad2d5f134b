"""lungct.prepare.dicom (headers, series assembly) and the pixel side of lungct.prepare.render
(HU conversion, windowing, resizing)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from lungct.prepare import decoders, dicom, dicom_files, render
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.series import assemble_series


def test_apply_window_dicom_linear_function():
    """PS3.3 C.11.2.1.2.1: centre maps to mid-grey, edges to 0 and 255."""
    hu = np.array([-1400.0, -1350.5, -600.0, 149.5, 200.0])
    out = render.apply_window(hu, -600.0, 1500.0)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_apply_window_width_one_is_a_threshold():
    """Width 1 is a step at centre - 0.5."""
    assert render.apply_window(np.array([-1.0, 0.0]), 0.0, 1.0).tolist() == [0, 255]


@pytest.mark.parametrize("width", [0.0, -5.0])
def test_apply_window_refuses_width_below_one(width):
    """Degenerate windows are refused with the value."""
    with pytest.raises(ValueError, match="window width must be >= 1 HU"):
        render.apply_window(np.zeros(2), 0.0, width)


def test_parse_window():
    """'lung' is -600/1500; C,W parses; junk names the value."""
    assert dicom.parse_window("lung") == (-600.0, 1500.0)
    assert dicom.parse_window("40,400") == (40.0, 400.0)
    with pytest.raises(ValueError, match="'abc'"):
        dicom.parse_window("abc")


def test_read_hu_rescale_and_padding(ct_slice):
    """HU = stored x slope + intercept; Pixel Padding Value becomes air."""
    hu = np.array([[-1000, 0], [80, 400]], dtype=float)
    path = ct_slice("a.dcm", hu, padding_value=-2000)
    out, inverted = render.read_hu(path)
    np.testing.assert_allclose(out, hu)
    assert not inverted

    padded = hu.copy()
    padded[0, 0] = -2000 - 1024  # stored value -2000 = padding
    out, _ = render.read_hu(ct_slice("b.dcm", padded, padding_value=-2000))
    assert out[0, 0] == dicom.AIR_HU
    assert out[1, 1] == 400


def test_read_hu_slope_two(ct_slice):
    """A slope other than 1 scales the stored values."""
    hu = np.array([[-1000.0, 100.0]])
    out, _ = render.read_hu(ct_slice("s.dcm", hu, slope=2.0, intercept=-1000.0))
    np.testing.assert_allclose(out, hu)


def test_monochrome1_flagged(ct_slice):
    """MONOCHROME1 is reported so the renderer inverts the display."""
    _, inverted = render.read_hu(ct_slice("m.dcm", np.zeros((2, 2)), photometric="MONOCHROME1"))
    assert inverted


def test_read_header_of_pydicom_ct_small():
    """The bundled CT_small.dcm reads as a CT slice with its geometry."""
    header = dicom.read_header(Path(get_testdata_file("CT_small.dcm", download=False)))
    assert header.rows == header.columns == 128
    assert header.z_mm == pytest.approx(-75.7)
    assert header.pixel_spacing_mm == pytest.approx(0.661468)
    assert header.patient_id == "1CT1"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_small.dcm", r"not a CT image \(\(0008,0060\) Modality MR\)"),
        ("rtplan.dcm", r"not a CT image"),
    ],
)
def test_read_header_refuses_non_ct(name, reason):
    """Other modalities are skipped with a pinned reason."""
    with pytest.raises(UnusableFileError, match=reason):
        dicom.read_header(Path(get_testdata_file(name, download=False)))


def test_read_header_not_dicom(tmp_path):
    """A text file is 'not DICOM'."""
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UnusableFileError, match="^not DICOM$"):
        dicom.read_header(path)


def test_read_header_truncated(tmp_path):
    """A CT file cut short inside its pixel data is 'truncated pixel data'."""
    source = Path(get_testdata_file("CT_small.dcm", download=False))
    path = tmp_path / "cut.dcm"
    path.write_bytes(source.read_bytes()[:-5000])
    with pytest.raises(UnusableFileError, match="truncated pixel data"):
        dicom.read_header(path)


def test_read_header_no_pixel_data(ct_slice):
    """A CT header without (7FE0,0010) is skipped."""
    import pydicom

    path = ct_slice("np.dcm", np.zeros((2, 2)))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(UnusableFileError, match=r"no pixel data \(7FE0,0010\)"):
        dicom.read_header(path)


def test_read_header_localizer(ct_slice):
    """Scout images are skipped."""
    path = ct_slice("loc.dcm", np.zeros((2, 2)), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(UnusableFileError, match="localizer"):
        dicom.read_header(path)


def test_assemble_series_sorts_and_drops_duplicate_z(ct_slice):
    """Slices sort by z; of two at one z the lower InstanceNumber stays."""
    hu = np.zeros((4, 4))
    paths = [
        ct_slice("c.dcm", hu, 5.0, instance_number=3),
        ct_slice("a.dcm", hu, -5.0, instance_number=1),
        ct_slice("b2.dcm", hu, 0.0, instance_number=7),
        ct_slice("b1.dcm", hu, 0.0, instance_number=2),
    ]
    series, dropped = assemble_series(dicom.read_header(p) for p in paths)
    assert len(series) == 1
    assert [s.instance_number for s in series[0].slices] == [1, 2, 3]
    assert series[0].z_mm.tolist() == [-5.0, 0.0, 5.0]
    assert series[0].slice_spacing_mm == 5.0
    assert dropped == [(paths[2], "duplicate slice position z=0 mm (kept InstanceNumber 2)")]


def test_square_and_resize_pads_with_fill():
    """A 2x4 image becomes a 4x4 square padded with fill, then resized."""
    image = np.ones((2, 4), dtype=np.float32)
    out, scale = render.square_and_resize(image, 2, fill=0.0)
    assert scale == 2.0
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.5, 0.5]])


def test_compressed_without_decoder_is_skipped(tmp_path, monkeypatch):
    """A compressed syntax with no decoder gets that reason."""
    source = Path(get_testdata_file("CT_small.dcm", download=False))
    path = tmp_path / "c.dcm"
    shutil.copy(source, path)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 10])
    ds.save_as(path)

    class NoDecoder:
        is_available = False

    monkeypatch.setattr(decoders, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(UnusableFileError, match="compressed transfer syntax JPEG 2000 Image "
                                              "Compression \\(Lossless Only\\) "
                                              "\\(1\\.2\\.840\\.10008\\.1\\.2\\.4\\.90\\) "
                                              "with no installed decoder$"):
        dicom.read_header(path)
    with pytest.raises(UnusableFileError, match=r"\(1\.2\.840\.10008\.1\.2\.4\.90\) with"):
        render.read_hu(path)


def test_syntax_without_any_pydicom_decoder_is_skipped(tmp_path):
    """MPEG-2 video has no decoder in pydicom: skipped at indexing, naming syntax and UID."""
    import pydicom

    path = tmp_path / "m.dcm"
    shutil.copy(Path(get_testdata_file("CT_small.dcm", download=False)), path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\0" * 16])
    ds.save_as(path)
    with pytest.raises(UnusableFileError, match=(
            r"^compressed transfer syntax MPEG2 Main Profile / Main Level "
            r"\(1\.2\.840\.10008\.1\.2\.4\.100\) with no installed decoder$")):
        dicom.read_header(path)


@pytest.mark.parametrize(("flag", "syntax", "lossy"), [
    (None, "1.2.840.10008.1.2.1", False), ("01", "1.2.840.10008.1.2.1", True),
    ("00", "1.2.840.10008.1.2.1", False), (None, "1.2.840.10008.1.2.4.91", True),
    ("00", "1.2.840.10008.1.2.4.91", False), (None, "1.2.840.10008.1.2.4.90", False),
    (None, "1.2.840.10008.1.2.4.50", True), (None, "1.2.840.10008.1.2.4.80", False),
    (None, "1.2.840.10008.1.2.4.81", True), (None, "1.2.840.10008.1.2.4.203", True)])
def test_lossy_is_the_flag_or_a_lossy_syntax(flag, syntax, lossy):
    """(0028,2110) Lossy Image Compression "01", or a lossy syntax unless the flag says "00"."""
    import pydicom

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    if flag is not None:
        ds.LossyImageCompression = flag
    assert decoders.is_lossy(ds, pydicom.uid.UID(syntax)) is lossy


def test_header_records_lossy_and_series_warns_once(ct_slice, caplog):
    """SliceHeader.lossy holds (0028,2110); assemble_series logs one warning per lossy series."""
    import pydicom

    paths = [ct_slice(f"s{z}.dcm", np.zeros((2, 2)), float(z)) for z in range(3)]
    for path in paths[:2]:
        ds = pydicom.dcmread(path)
        ds.LossyImageCompression = "01"
        ds.save_as(path)
    headers = [dicom.read_header(path) for path in paths]
    assert [h.lossy for h in headers] == [True, True, False]
    with caplog.at_level("WARNING", logger="lungct.prepare.series"):
        assemble_series(headers)
    assert [r.getMessage() for r in caplog.records] == [
        f"series {headers[0].series_uid}: 2 of 3 slices lossy-compressed; padding taken as HU "
        "below -1500"]


def test_absent_rescale_and_thickness_take_their_defaults(ct_slice):
    """Without (0028,1053), (0028,1052) and (0018,0050): slope 1, intercept 0, no thickness."""
    import pydicom

    path = ct_slice("d.dcm", np.array([[-1000.0, 40.0]]))
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.SliceThickness
    ds.save_as(path)
    assert dicom.read_header(path).slice_thickness_mm is None
    out, _ = render.read_hu(path)
    np.testing.assert_array_equal(out, [[24.0, 1064.0]])  # the stored values


def test_deflated_file_with_a_long_meta_is_read(ct_slice):
    """A file meta longer than the 4 KB sniffed is parsed by pydicom; the deflated data set
    is still measured before reading, then read."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    hu = np.array([[-1000.0, 40.0], [80.0, 400.0]])
    path = ct_slice("long_meta.dcm", hu)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\0" * 8192
    ds.save_as(path)
    assert dicom.read_header(path).rows == 2
    np.testing.assert_array_equal(render.read_hu(path)[0], hu)


def test_header_rules_name_tag_value_and_allowed_range(ct_slice):
    """A bad number is refused by indexing with its tag, name, value and the allowed range."""
    path = ct_slice("t.dcm", np.zeros((2, 2)), slope=5000.0)
    with pytest.raises(UnusableFileError, match=(
            r"^invalid \(0028,1053\) Rescale Slope: 5000(\.0)?; allowed: 0\.001 <= \|slope\| "
            r"<= 1000$")):
        dicom.read_header(path)


def test_no_finding_patch_without_lung_is_skipped(ct_slice):
    """A no_finding patch (no centre given) on a slice without lung tissue is skipped with
    its reason instead of falling back to the image centre; with a centre it renders."""
    from lungct.prepare.candidates import Candidate

    path = ct_slice("m.dcm", np.full((32, 32), 40.0))  # soft tissue only: mediastinum
    settings = render.RenderSettings(16, -600.0, 1500.0, "patch", 10.0)
    candidate = Candidate(path, path.name, "P", 0, "", series_uid="1.2", slice_z_mm=0.0,
                          pixel_spacing_mm=0.7)
    with pytest.raises(UnusableFileError,
                       match="^no lung tissue for a no_finding patch centre$"):
        render.render(candidate, settings)
    with pytest.raises(UnusableFileError, match="^no lung tissue"):
        render.lung_tissue_centre(np.full((32, 32), -1000.0), 8, "seed")  # air only
    centred = Candidate(path, path.name, "P", 0, "", series_uid="1.2", slice_z_mm=0.0,
                        pixel_spacing_mm=0.7, centre_xy_px=(16.0, 16.0))
    assert render.render(centred, settings).image.shape == (16, 16)


def test_non_axial_slice_is_skipped_with_its_tilt(ct_slice):
    """A coronal reformat or a gantry tilt beyond 5 degrees is not an axial slice."""
    path = ct_slice("coronal.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(path)
    with pytest.raises(UnusableFileError, match=r"non-axial slice \(\(0020,0037\) Image "
                       r"Orientation \(Patient\) normal 90.0 deg from the z axis; at most 5\)"):
        dicom.read_header(path)
    tilt = np.radians(3.0)
    ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))]
    ds.save_as(path)
    assert dicom.read_header(path).rows == 16


def test_burned_in_annotation_is_skipped(ct_slice):
    """(0028,0301) Burned In Annotation YES: text in the pixels, never a sample."""
    path = ct_slice("burned.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path)
    with pytest.raises(UnusableFileError, match="burned-in annotation"):
        dicom.read_header(path)


def test_acquisition_fields_are_read(ct_slice):
    """Manufacturer and convolution kernel (multi-valued joined by /) reach the header."""
    path = ct_slice("scanner.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(path)
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ConvolutionKernel = ["B30f", "SHARP"]
    ds.save_as(path)
    header = dicom.read_header(path)
    assert (header.manufacturer, header.convolution_kernel) == ("GE MEDICAL SYSTEMS", "B30f/SHARP")
    assert header.slice_thickness_mm == 2.5


def test_missing_slices_are_counted_as_z_gaps(ct_slice):
    """A step in z above 1.5 x the median step is a gap; the series is kept."""
    hu = np.zeros((16, 16))
    paths = [ct_slice(f"z{z}.dcm", hu, float(z)) for z in (0.0, 2.5, 5.0, 10.0, 12.5)]
    series, dropped = assemble_series(dicom.read_header(p) for p in paths)
    assert not dropped and series[0].z_gaps == 1


def test_unreadable_lossy_flag_counts_as_lossy():
    """(0028,2110) that cannot be converted: lossy, the safe side, not silently plain."""
    class Unreadable(pydicom.Dataset):
        def get(self, *args, **kwargs):
            raise ValueError("bad CS value")

    assert decoders.is_lossy(Unreadable(), pydicom.uid.ExplicitVRLittleEndian) is True


def test_unparseable_file_meta_is_refused_not_passed_on(tmp_path, monkeypatch):
    """A meta without a group length that pydicom cannot parse alone is refused: it could
    hide a deflated data set that dcmread would inflate without bound."""
    path = tmp_path / "meta.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\0" + b"x" * 64)

    def broken(_path):
        raise struct.error("unpack requires a buffer")

    monkeypatch.setattr(dicom_files, "read_file_meta_info", broken)
    with pytest.raises(UnusableFileError,
                       match=r"unreadable file meta information \(error\)"):
        dicom.read_header(path)


@pytest.mark.parametrize("keyword", ["SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("value", ["../../outside", "1.2.3/4", "1.2.3\x005", "1.2..3", ".1.2",
                                   "1." + "2" * 63, "1.2.3a", "1.2. 3"])
def test_invalid_uid_is_skipped_with_its_tag(ct_slice, keyword, value):
    """PS3.5 9.1: a UID is digits and dots, at most 64 characters; it names output files."""
    path = ct_slice("uid.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(path)
    with pydicom.config.disable_value_validation():
        ds[keyword].value = value
        ds.save_as(path)
    tag = {"SeriesInstanceUID": r"\(0020,000E\) Series Instance UID",
           "StudyInstanceUID": r"\(0020,000D\) Study Instance UID",
           "SOPInstanceUID": r"\(0008,0018\) SOP Instance UID"}[keyword]
    with pytest.raises(UnusableFileError,
                       match=rf"^invalid {tag} \(PS3.5 9.1: digits and dots, at most 64 "
                             r"characters\)$"):
        dicom.read_header(path)


def test_valid_uids_pass_and_only_series_uid_is_required(ct_slice):
    """64 characters, a leading zero and NUL padding pass; study and SOP UIDs may be absent."""
    path = ct_slice("uid.dcm", np.zeros((16, 16)))
    ds = pydicom.dcmread(path)
    long_uid = "1.02." + "3" * 59
    with pydicom.config.disable_value_validation():
        ds.SeriesInstanceUID = long_uid
        ds.StudyInstanceUID = "1.2.3\x00"
        del ds.SOPInstanceUID
        ds.save_as(path)
    header = dicom.read_header(path)
    assert (header.series_uid, header.study_uid, header.sop_uid) == (long_uid, "1.2.3", "")
    del ds.SeriesInstanceUID
    ds.save_as(path)
    with pytest.raises(UnusableFileError,
                       match=r"^missing \(0020,000E\) Series Instance UID$"):
        dicom.read_header(path)


def test_the_file_cap_is_twice_the_largest_slice() -> None:
    """dicom_files cannot import dicom (the other way round), so its cap is a number: pinned."""
    assert dicom_files.MAX_FILE_BYTES == 2 * dicom.MAX_SLICE_BYTES
