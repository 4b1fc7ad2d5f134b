"""Compressed DICOM from real scanners and lossless transcodes decode to the same HU and PNGs.

Real files: pydicom's bundled ``CT_small.dcm`` (GE) and the ``pydicom-data`` package's
``693_*`` CT slice (uncompressed, JPEG 2000 lossless, and JPEG 2000 lossy with its decoded
uncompressed twin) and ``bad_sequence.dcm`` (JPEG Lossless SV1), plus its MR slices in JPEG-LS
and RLE (read_hu does not look at the modality). Syntaxes no bundled CT uses are tested by
transcoding a synthetic CT slice losslessly: RLE and JPEG-LS and JPEG 2000 with pydicom's
encoders, JPEG Lossless (process 14, and its selection value 1) with GDCM, Deflate by
pydicom's writer. HTJ2K has neither an encoder here nor a bundled file: untested.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from lungct import contract
from lungct.prepare import dicom, render
from lungct.prepare.candidates import Candidate
from lungct.prepare.dicom_files import UnusableFileError

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
PADDING = -2000  # stored; outside the synthetic scanner's circular field of view
SLICE = render.RenderSettings(128, -600.0, 1500.0, "slice", 64.0)
PATCH = render.RenderSettings(64, -600.0, 1500.0, "patch", 64.0)
JPEG_LOSSLESS_P14 = "1.2.840.10008.1.2.4.57"
# bad_sequence.dcm holds hex hashes where UIDs belong: pydicom warns, lungct refuses them
# (PS3.5 9.1), so its copy here gets real UIDs (the pixel data stays as it is).
HASH_UID_FILE = "bad_sequence.dcm"
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def real(name: str, tmp_path: Path) -> Path:
    """A copy of a bundled test file in its own folder (the 693 files share series and z)."""
    source = get_testdata_file(name, download=False)
    assert source is not None, f"{name}: install pydicom-data (requirements-dev.txt)"
    folder = tmp_path / name.removesuffix(".dcm")
    folder.mkdir()
    copy = Path(shutil.copy(source, folder / name))
    if name == HASH_UID_FILE:
        ds = pydicom.dcmread(copy)
        for keyword in UID_KEYWORDS:
            setattr(ds, keyword, generate_uid(entropy_srcs=[name, keyword]))
        ds.save_as(copy)
    return copy


def pngs(path: Path) -> tuple[bytes, bytes]:
    """The slice-view and patch-view PNGs prepare writes for ``path`` (a no_finding sample)."""
    header = dicom.read_header(path)
    candidate = Candidate(path, path.name, header.patient_id, 0, "",
                          series_uid=header.series_uid, slice_z_mm=header.z_mm,
                          pixel_spacing_mm=header.pixel_spacing_mm)
    return tuple(contract.encode_png(render.render(candidate, settings).image)
                 for settings in (SLICE, PATCH))


def rescaled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """pydicom's own HU (apply_rescale of pixel_array) and where the stored value is padding."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    padding = ds.get("PixelPaddingValue")
    return apply_rescale(stored, ds), (stored == padding if padding is not None
                                       else np.zeros(stored.shape, bool))


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCR.dcm", "693_J2KR.dcm",
                                  "bad_sequence.dcm"])
def test_real_lossless_slices_give_pydicoms_hu(tmp_path, name):
    """HU = pydicom's apply_rescale, except padding pixels, which are air (-1000 HU)."""
    path = real(name, tmp_path)
    header = dicom.read_header(path)
    assert not header.lossy
    hu, monochrome1 = render.read_hu(path)
    expected, padding = rescaled(path)
    assert not monochrome1 and hu.dtype == np.float32
    np.testing.assert_array_equal(hu[~padding], expected[~padding].astype(np.float32))
    assert np.all(hu[padding] == dicom.AIR_HU)


def test_bad_sequence_jpeg_lossless_sv1_is_decoded(tmp_path):
    """A real JPEG Lossless SV1 CT slice (12 bits, unsigned) decodes to plausible HU; as
    bundled, with hashes for UIDs, it is refused as a sample."""
    with pytest.raises(UnusableFileError, match=r"^invalid \(0020,000E\) Series Instance "
                                                      r"UID \(PS3\.5 9\.1: digits and dots"):
        dicom.read_header(Path(get_testdata_file(HASH_UID_FILE, download=False)))
    path = real(HASH_UID_FILE, tmp_path)
    hu, _ = render.read_hu(path)
    assert hu.shape == (512, 512) and -1024 <= hu.min() < -900 and 1000 < hu.max() < 3072
    assert all(len(png) > 100 for png in pngs(path))


@pytest.mark.parametrize(("compressed", "uncompressed"), [("693_J2KR.dcm", "693_UNCR.dcm"),
                                                          ("693_J2KI.dcm", "693_UNCI.dcm")])
def test_jpeg2000_equals_its_uncompressed_twin(tmp_path, compressed, uncompressed):
    """JPEG 2000 (lossless, and lossy with its decoded twin): identical HU and PNG bytes."""
    a, b = real(compressed, tmp_path), real(uncompressed, tmp_path)
    assert dicom.read_header(a).lossy == dicom.read_header(b).lossy == ("J2KI" in compressed)
    np.testing.assert_array_equal(render.read_hu(a)[0], render.read_hu(b)[0])
    assert pngs(a) == pngs(b)


def test_lossy_padding_is_found_without_exact_equality(tmp_path):
    """Lossy JPEG 2000 keeps under 1 % of padding pixels at (0028,0120) Pixel Padding Value
    (-2000); the rule for lossy data (HU < -1500 -> air) makes 97 % of them air, and no HU
    below -1500 is left."""
    lossy, _ = render.read_hu(real("693_J2KI.dcm", tmp_path))
    stored = pydicom.dcmread(real("693_UNCR.dcm", tmp_path)).pixel_array
    outside = stored == PADDING
    assert np.mean(pydicom.dcmread(get_testdata_file("693_J2KI.dcm")).pixel_array[outside]
                   == PADDING) < 0.01
    assert np.mean(lossy[outside] == dicom.AIR_HU) > 0.97
    assert lossy.min() >= render.LOSSY_AIR_BELOW_HU


@pytest.mark.parametrize(("compressed", "uncompressed"), [
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"), ("MR_small_RLE.dcm", "MR_small.dcm")])
def test_real_jpeg_ls_and_rle_equal_uncompressed(tmp_path, compressed, uncompressed):
    """Real scanner JPEG-LS and RLE files (MR, signed 16-bit) decode to the same values."""
    a, b = real(compressed, tmp_path), real(uncompressed, tmp_path)
    np.testing.assert_array_equal(render.read_hu(a)[0], render.read_hu(b)[0])


def test_enhanced_ct_is_skipped_with_its_reason(tmp_path):
    with pytest.raises(UnusableFileError, match=(
            r"^enhanced \(multi-frame\) CT is not supported \(\(0008,0016\) SOP Class UID\)$")):
        dicom.read_header(real("eCT_Supplemental.dcm", tmp_path))


# ----------------------------------------------------------------------------- transcodes


def synthetic_hu(size: int = 256) -> np.ndarray:
    """A CT-like slice: body (soft tissue, noise), two lungs with vessels, bone, and the
    corners outside a circular field of view at the padding value (-3024 HU)."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:size, :size] / (size / 2) - 1
    hu = np.full((size, size), -1000.0)
    hu[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    for side in (-0.4, 0.4):
        hu[((x - side) / 0.3) ** 2 + (y / 0.5) ** 2 < 1] = -850.0
    hu[(x**2 + (y - 0.55) ** 2) < 0.01] = 700.0
    hu += rng.normal(0, 20, hu.shape)
    hu[x**2 + y**2 > 1] = PADDING - 1024
    return np.rint(hu)


def gdcm_transcode(path: Path, syntax: str) -> None:
    """Re-encode ``path`` in place with GDCM (JPEG Lossless: pydicom has no encoder)."""
    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(
        gdcm.TransferSyntax.JPEGLosslessProcess14 if syntax == JPEG_LOSSLESS_P14
        else gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(path))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


def transcode(plain: Path, syntax: str, folder: Path) -> Path:
    """A lossless copy of ``plain`` in ``syntax``."""
    folder.mkdir()
    path = Path(shutil.copy(plain, folder / plain.name))
    if syntax in (JPEG_LOSSLESS_P14, JPEGLosslessSV1):
        gdcm_transcode(path, syntax)
        return path
    ds = pydicom.dcmread(path)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)  # RLE: pydicom; JPEG-LS: pyjpegls; JPEG 2000: pylibjpeg-openjpeg
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ct_slice(tmp_path_factory.mktemp("plain") / "s.dcm", synthetic_hu(), 0.0,
                          padding_value=PADDING)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless,
                                    JPEG_LOSSLESS_P14, JPEGLosslessSV1,
                                    DeflatedExplicitVRLittleEndian])
def test_lossless_transcodes_give_identical_hu_and_pngs(tmp_path, plain, syntax):
    """Every lossless syntax: the same HU (padding to air included) and PNG bytes as the
    uncompressed slice, through prepare's own read path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = transcode(plain, syntax, tmp_path / "t")
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == syntax
    assert pydicom.dcmread(plain).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    hu, _ = render.read_hu(path)
    expected, _ = render.read_hu(plain)
    np.testing.assert_array_equal(hu, expected)
    assert np.mean(hu == dicom.AIR_HU) > 0.2  # the padded corners
    assert pngs(path) == pngs(plain)


def test_undecodable_codestream_names_the_syntax(tmp_path, plain):
    """A codestream the codec rejects: skipped with the syntax's name and UID."""
    path = transcode(plain, JPEGLSLossless, tmp_path / "t")
    ds = pydicom.dcmread(path)
    frame = bytearray(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[-200:-2] = b"\xff" * 198  # scan data destroyed; SOF intact
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    ds.save_as(path)
    with pytest.raises(UnusableFileError, match=(
            r"^JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\.4\.80\) pixel data "
            r"could not be decoded \(\w+\)$")):
        render.read_hu(path)


def test_htj2k_syntax_decodes_a_part_1_codestream(tmp_path, plain):
    """HTJ2K Lossless (1.2.840.10008.1.2.4.201) goes through the JPEG 2000 decoder and checks.

    No encoder here writes HT block coding, so this tests the dispatch and the bounds with a
    Part 1 codestream (which HTJ2K decoders also read); the HT block decoder itself is
    pylibjpeg-openjpeg's and untested here.
    """
    path = transcode(plain, JPEG2000Lossless, tmp_path / "t")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS
    ds.save_as(path)
    hu, _ = render.read_hu(path)
    np.testing.assert_array_equal(hu, render.read_hu(plain)[0])
