"""Reading CT headers: every number checked, one :class:`SliceHeader` per usable slice.

Attributes are named with tag and keyword as in PS3.3. Opening a file within its caps is
:mod:`lungct.prepare.dicom_files`' job; decoding pixels to Hounsfield units, windowing and
resizing are :mod:`lungct.prepare.render`'s, on numbers checked here.

Every file is untrusted input. Each number read from a header is checked for type,
finiteness and range (:data:`HEADER_RULES`) before it is used, and the work one file can
cause is bounded before anything is decoded: the file-level caps of
:func:`~lungct.prepare.dicom_files.read_dataset`, and the decoded size the header implies
(:data:`MAX_SLICE_BYTES`) against the bytes present. A failed check raises
:class:`~lungct.prepare.dicom_files.UnusableFileError`, whose text (attribute, value, what is
allowed) goes to skipped.csv.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.multival import MultiValue

from lungct.prepare.decoders import PixelFormat, check_pixel_data, is_lossy
from lungct.prepare.dicom_files import (
    UnusableFileError,
    read_dataset,
    refuse_unreadable,
    transfer_syntax,
)

__all__ = [
    "AIR_HU", "LUNG_WINDOW", "CT_IMAGE_STORAGE", "MAX_ROWS", "MAX_COLUMNS", "MAX_FRAMES",
    "ALLOWED_BITS_ALLOCATED", "MAX_SLICE_BYTES", "MIN_PIXEL_SPACING_MM",
    "MAX_PIXEL_SPACING_MM", "MAX_ABS_POSITION_MM", "MIN_SLICE_THICKNESS_MM",
    "MAX_SLICE_THICKNESS_MM", "MIN_ABS_RESCALE_SLOPE", "MAX_ABS_RESCALE_SLOPE",
    "MAX_ABS_RESCALE_INTERCEPT_HU", "MAX_TILT_DEG", "HEADER_RULES", "SliceHeader",
    "pixel_format", "read_header", "parse_window",
]

LOG = logging.getLogger(__name__)

AIR_HU = -1000.0
LUNG_WINDOW = (-600.0, 1500.0)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

# Caps on one file. CT slices are 512 x 512 (LIDC-IDRI) to 1024 x 1024 (ultra-high-resolution
# scanners) at 16 bits; each cap leaves a wide margin above that, and together they keep one
# worker's peak memory for a slice (file, stored values, float32 HU, mask) under 600 MB.
MAX_ROWS = 4096  # px, (0028,0010) Rows
MAX_COLUMNS = 4096  # px, (0028,0011) Columns
MAX_FRAMES = 1  # (0028,0008) Number of Frames: a CT slice is one frame; multi-frame is refused
ALLOWED_BITS_ALLOCATED = (8, 16, 32)  # bits, (0028,0100) Bits Allocated (CT writes 16)
MAX_SLICE_BYTES = MAX_ROWS * MAX_COLUMNS * 2  # bytes decoded: one 4096 x 4096 16-bit slice
MIN_PIXEL_SPACING_MM, MAX_PIXEL_SPACING_MM = 0.01, 10.0  # mm per pixel (CT: 0.2-1 mm)
MAX_ABS_POSITION_MM = 10_000.0  # mm, each of (0020,0032): 5 x the longest table travel (2 m)
MIN_SLICE_THICKNESS_MM, MAX_SLICE_THICKNESS_MM = 0.01, 100.0  # mm (CT: 0.5-10 mm)
# HU per stored unit: CT writes 1 (rarely 0.5 or 2); three decades either side still map
# every stored value to a finite float32 HU.
MIN_ABS_RESCALE_SLOPE, MAX_ABS_RESCALE_SLOPE = 1e-3, 1e3
MAX_ABS_RESCALE_INTERCEPT_HU = 1e5  # HU (CT writes -1024, -1000 or 0)

_DEFER_BYTES = 1024
MAX_TILT_DEG = 5.0  # slice normal vs the patient z axis: beyond it a reformat or tilted gantry
_SHOWN_CHARS = 40
_TEXT_CHARS = 64  # (0008,0070) Manufacturer and (0018,1210) Convolution Kernel are LO/SH
_UNREADABLE = object()  # stands for a value pydicom cannot convert
#: PS3.5 9.1 UIDs (leading zeros tolerated); they name output files, so nothing else passes.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_CHARS = 64


def _integer(low: float, high: float) -> Callable[[float], bool]:
    return lambda value: value.is_integer() and low <= value <= high


#: keyword -> (number of values, test of each value, what is allowed). Every value must also
#: be a finite number. An absent or empty attribute is None (its default applies) unless it
#: is one of ``_REQUIRED``.
HEADER_RULES: dict[str, tuple[int, Callable[[float], bool], str]] = {
    "Rows": (1, _integer(1, MAX_ROWS), f"an integer 1-{MAX_ROWS}"),
    "Columns": (1, _integer(1, MAX_COLUMNS), f"an integer 1-{MAX_COLUMNS}"),
    "BitsAllocated": (1, lambda v: v in ALLOWED_BITS_ALLOCATED,
                      "one of " + ", ".join(map(str, ALLOWED_BITS_ALLOCATED))),
    "BitsStored": (1, _integer(1, max(ALLOWED_BITS_ALLOCATED)),
                   "an integer from 1 to (0028,0100) Bits Allocated"),
    "PixelRepresentation": (1, lambda v: v in (0, 1), "0 or 1"),
    "SamplesPerPixel": (1, lambda v: v == 1, "1 (grayscale)"),
    "NumberOfFrames": (1, _integer(1, MAX_FRAMES),
                       f"at most {MAX_FRAMES} (enhanced (multi-frame) CT is not supported)"),
    "RescaleSlope": (1, lambda v: MIN_ABS_RESCALE_SLOPE <= abs(v) <= MAX_ABS_RESCALE_SLOPE,
                     f"{MIN_ABS_RESCALE_SLOPE:g} <= |slope| <= {MAX_ABS_RESCALE_SLOPE:g}"),
    "RescaleIntercept": (1, lambda v: abs(v) < MAX_ABS_RESCALE_INTERCEPT_HU,
                         f"|intercept| < {MAX_ABS_RESCALE_INTERCEPT_HU:g} HU"),
    "PixelPaddingValue": (1, _integer(-(2**31), 2**32 - 1), "an integer stored value"),
    "PixelPaddingRangeLimit": (1, _integer(-(2**31), 2**32 - 1), "an integer stored value"),
    "ImagePositionPatient": (3, lambda v: abs(v) <= MAX_ABS_POSITION_MM,
                             f"3 numbers within +-{MAX_ABS_POSITION_MM:g} mm"),
    "PixelSpacing": (2, lambda v: MIN_PIXEL_SPACING_MM <= v <= MAX_PIXEL_SPACING_MM,
                     f"2 numbers, {MIN_PIXEL_SPACING_MM:g}-{MAX_PIXEL_SPACING_MM:g} mm"),
    "SliceThickness": (1, lambda v: MIN_SLICE_THICKNESS_MM <= v <= MAX_SLICE_THICKNESS_MM,
                       f"{MIN_SLICE_THICKNESS_MM:g}-{MAX_SLICE_THICKNESS_MM:g} mm"),
    "InstanceNumber": (1, _integer(-(2**31), 2**31 - 1), "an integer"),
    "ImageOrientationPatient": (6, lambda v: abs(v) <= 1.0 + 1e-3,
                                "6 direction cosines within [-1, 1]"),
}
_PIXEL_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                   "SamplesPerPixel", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
                   "PixelPaddingValue", "PixelPaddingRangeLimit")
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "PixelSpacing", "SliceThickness", "InstanceNumber",
                      "ImageOrientationPatient")
_REQUIRED = frozenset({"Rows", "Columns", "BitsAllocated", "ImagePositionPatient",
                       "PixelSpacing"})
#: The only attributes indexing parses (pixel data stays on disk, deferred).
HEADER_TAGS = ("Modality", "SOPClassUID", "ImageType", "SeriesInstanceUID", "StudyInstanceUID",
               "SOPInstanceUID", "PatientID", "PixelData", "LossyImageCompression",
               "Manufacturer", "ConvolutionKernel", "BurnedInAnnotation",
               *_PIXEL_KEYWORDS, *_GEOMETRY_KEYWORDS)


@dataclass(frozen=True)
class SliceHeader:
    """What the header of one CT slice says (no pixel data read)."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    z_mm: float
    instance_number: int
    rows: int
    columns: int
    pixel_spacing_mm: float
    slice_thickness_mm: float | None
    lossy: bool = False  # (0028,2110) Lossy Image Compression 01 or a lossy syntax (decoders)
    manufacturer: str = ""  # (0008,0070)
    convolution_kernel: str = ""  # (0018,1210), values joined by "/"
    #: (0020,0032) Image Position (Patient): x, y, z of the centre of the first pixel, mm.
    position_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: (0020,0037) Image Orientation (Patient): row then column direction cosines (axial if absent).
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    #: (0028,0030) Pixel Spacing: between rows (first value) and between columns (second), mm.
    row_spacing_mm: float = 0.0
    column_spacing_mm: float = 0.0
    # What decides decoding, as read_header checked it (defaults: a 16-bit native slice).
    transfer_syntax_uid: str = "1.2.840.10008.1.2"  # (0002,0010); Implicit VR LE if absent
    sop_class_uid: str = ""  # (0008,0016)
    modality: str = "CT"  # (0008,0060), upper case
    image_type: str = ""  # (0008,0008), values joined by "\\", cut to 64 characters
    number_of_frames: int = 1  # (0028,0008); always 1: multi-frame images are refused
    bits_allocated: int = 16  # (0028,0100)
    bits_stored: int = 16  # (0028,0101); Bits Allocated when absent
    signed: bool = False  # (0028,0103) Pixel Representation 1
    rescale_slope: float = 1.0  # (0028,1053)
    rescale_intercept_hu: float = 0.0  # (0028,1052)
    #: (0028,0120) Pixel Padding Value and (0028,0121) Range Limit: lowest and highest
    #: padding stored value, None without padding.
    padding_low: int | None = None
    padding_high: int | None = None
    #: file offset of the (7FE0,0010) Pixel Data value, bytes: the pixels of a native syntax,
    #: the first Item tag of an encapsulated one; None in a deflated data set
    pixel_data_offset_bytes: int | None = None
    burned_in_annotation: str = ""  # (0028,0301), upper case; "" if absent ("YES" is refused)

    def patient_xy_mm(self, row_px: float, column_px: float) -> tuple[float, float]:
        """Patient x, y (mm) of a pixel position (row, column; 0 = first pixel's centre).

        PS3.3 C.7.6.2.1.1: P = S + column * column_spacing * X + row * row_spacing * Y, with
        S = Image Position, X the row direction and Y the column direction cosines.
        """
        x_dir, y_dir = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        point = (np.asarray(self.position_mm) + column_px * self.column_spacing_mm * x_dir
                 + row_px * self.row_spacing_mm * y_dir)
        return float(point[0]), float(point[1])

    def pixel_of_patient_xy(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        """Row, column (px, fractional) of patient x, y on this slice: the inverse of
        :meth:`patient_xy_mm` in the slice plane (least squares for a slightly tilted plane)."""
        x_dir, y_dir = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        basis = np.stack([x_dir[:2] * self.column_spacing_mm, y_dir[:2] * self.row_spacing_mm],
                         axis=1)
        offset = np.array([x_mm, y_mm]) - np.asarray(self.position_mm[:2])
        column_px, row_px = np.linalg.lstsq(basis, offset, rcond=None)[0]
        return float(row_px), float(column_px)


def _label(keyword: str) -> str:
    """``"(0028,1053) Rescale Slope"`` for ``"RescaleSlope"``."""
    tag = tag_for_keyword(keyword) or 0
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {dictionary_description(tag)}"


def _checked(ds: pydicom.Dataset, keywords: Iterable[str]) -> dict[str, tuple[float, ...] | None]:
    """The values of ``keywords`` as floats, each passing its :data:`HEADER_RULES` test.

    Raises:
        UnusableFileError: ``missing <tag> <name>`` for an absent required attribute, else
            ``invalid <tag> <name>: <value>; allowed: <rule>``.
    """
    values: dict[str, tuple[float, ...] | None] = {}
    for keyword in keywords:
        try:  # pydicom converts a value on first access, raising many types on bad ones
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - not hidden: the sentinel is refused just below
            value = _UNREADABLE
        if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
            if keyword in _REQUIRED:
                raise UnusableFileError(f"missing {_label(keyword)}")
            values[keyword] = None
            continue
        count, test, allowed = HEADER_RULES[keyword]
        try:
            numbers = tuple(map(float, value if isinstance(value, (list, MultiValue))
                                else (value,)))
        except (TypeError, ValueError, OverflowError):
            numbers = ()
        if len(numbers) != count or not all(math.isfinite(n) and test(n) for n in numbers):
            shown = ("unreadable value" if value is _UNREADABLE else repr(value)
                     if isinstance(value, (str, bytes)) else str(value))
            raise UnusableFileError(f"invalid {_label(keyword)}: {shown[:_SHOWN_CHARS]}; "
                                    f"allowed: {allowed}")
        values[keyword] = numbers
    return values


def pixel_format(ds: pydicom.Dataset) -> PixelFormat:
    """The checked numbers of (0028,xxxx) Image Pixel and (0028,1052)/(0028,1053) Rescale.

    Raises:
        UnusableFileError: a number breaks :data:`HEADER_RULES`, (0028,0101) Bits Stored
            exceeds Bits Allocated, or the decoded size exceeds :data:`MAX_SLICE_BYTES`.
    """
    first = {key: value and value[0] for key, value in _checked(ds, _PIXEL_KEYWORDS).items()}
    rows, columns, bits = (int(first[key]) for key in ("Rows", "Columns", "BitsAllocated"))
    bits_stored = int(first["BitsStored"] or bits)
    if bits_stored > bits:
        raise UnusableFileError(f"invalid {_label('BitsStored')}: {bits_stored}; allowed: "
                                f"at most (0028,0100) Bits Allocated {bits}")
    padding, limit = first["PixelPaddingValue"], first["PixelPaddingRangeLimit"]
    if padding is not None:
        padding = tuple(sorted((int(padding), int(padding if limit is None else limit))))
    n_bytes = rows * columns * bits // 8
    if n_bytes > MAX_SLICE_BYTES:
        raise UnusableFileError(f"image of {n_bytes} bytes ((0028,0010) Rows {rows} x (0028,0011) "
                                f"Columns {columns} x (0028,0100) Bits Allocated {bits} / 8) "
                                f"exceeds {MAX_SLICE_BYTES}")
    slope = first["RescaleSlope"]
    return PixelFormat(rows, columns, bits, bits_stored, first["PixelRepresentation"] == 1,
                       1.0 if slope is None else slope, first["RescaleIntercept"] or 0.0,
                       padding, n_bytes)


def _reason_not_ct(ds: pydicom.Dataset) -> str | None:
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT":
        return f"not a CT image ((0008,0060) Modality {modality or 'missing'})"
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        return "enhanced (multi-frame) CT is not supported ((0008,0016) SOP Class UID)"
    if sop_class and sop_class != CT_IMAGE_STORAGE:
        return f"not CT Image Storage ((0008,0016) SOP Class UID {sop_class})"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer image ((0008,0008) Image Type LOCALIZER)"
    return None


@refuse_unreadable
def read_header(path: Path) -> SliceHeader:
    """Read one file's header (pixel data deferred, never decoded) and check it is a CT slice.

    Every number used later is checked here (:data:`HEADER_RULES`), so a slice with a bad
    (0028,1053) Rescale Slope or (0028,0030) Pixel Spacing never becomes a sample.

    Raises:
        UnusableFileError: with the reason this file cannot be a sample.
    """
    ds = read_dataset(path, defer_size=_DEFER_BYTES, specific_tags=list(HEADER_TAGS))
    reason = _reason_not_ct(ds)
    if reason:
        raise UnusableFileError(reason)
    if "PixelData" not in ds:
        raise UnusableFileError("no pixel data (7FE0,0010)")
    pixels = pixel_format(ds)
    geometry = _checked(ds, _GEOMETRY_KEYWORDS)
    series_uid, study_uid, sop_uid = (_uid(ds, f"{what}InstanceUID")
                                      for what in ("Series", "Study", "SOP"))
    if not series_uid:
        raise UnusableFileError(f"missing {_label('SeriesInstanceUID')}")
    syntax = transfer_syntax(ds)
    pixel_data_offset = check_pixel_data(ds, path, pixels, syntax)
    _check_axial(geometry["ImageOrientationPatient"])
    burned_in = _text(ds, "BurnedInAnnotation").upper()
    if burned_in == "YES":
        raise UnusableFileError("burned-in annotation ((0028,0301) Burned In Annotation YES)")
    thickness, instance = geometry["SliceThickness"], geometry["InstanceNumber"]
    padding_low, padding_high = pixels.padding or (None, None)
    return SliceHeader(
        path=path, patient_id=str(ds.get("PatientID", "")).strip(),
        study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, rows=pixels.rows,
        z_mm=geometry["ImagePositionPatient"][2], columns=pixels.columns,
        instance_number=int(instance[0]) if instance else 0, lossy=is_lossy(ds, syntax),
        pixel_spacing_mm=float(np.mean(geometry["PixelSpacing"])),
        slice_thickness_mm=thickness[0] if thickness else None,
        manufacturer=_text(ds, "Manufacturer"), convolution_kernel=_text(ds, "ConvolutionKernel"),
        position_mm=tuple(geometry["ImagePositionPatient"][:3]),
        orientation=tuple(geometry["ImageOrientationPatient"] or (1.0, 0, 0, 0, 1.0, 0)),
        row_spacing_mm=geometry["PixelSpacing"][0], column_spacing_mm=geometry["PixelSpacing"][1],
        transfer_syntax_uid=str(syntax), sop_class_uid=_uid(ds, "SOPClassUID"),
        modality=_text(ds, "Modality").upper(), image_type=_text(ds, "ImageType", "\\"),
        number_of_frames=int(ds.get("NumberOfFrames") or 1),  # checked by pixel_format
        bits_allocated=pixels.bits_allocated, bits_stored=pixels.bits_stored,
        signed=pixels.signed, rescale_slope=pixels.slope, rescale_intercept_hu=pixels.intercept,
        padding_low=padding_low, padding_high=padding_high,
        pixel_data_offset_bytes=pixel_data_offset, burned_in_annotation=burned_in)


def _uid(ds: pydicom.Dataset, keyword: str) -> str:
    """A UID attribute without its padding ("" when absent), refused unless valid (:data:`_UID`)."""
    value = str(ds.get(keyword, "")).strip(" \x00")
    if value and (len(value) > _UID_CHARS or not _UID.fullmatch(value)):
        raise UnusableFileError(f"invalid {_label(keyword)} (PS3.5 9.1: digits and dots, at most "
                                f"{_UID_CHARS} characters)")
    return value


def _text(ds: pydicom.Dataset, keyword: str, separator: str = "/") -> str:
    """A short text attribute, multi-valued joined by ``separator``, cut to 64 characters."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - an unreadable free-text value is simply unknown
        return ""
    parts = value if isinstance(value, (list, MultiValue)) else [value]
    return separator.join(str(part).strip() for part in parts)[:_TEXT_CHARS]


def _check_axial(orientation: tuple[float, ...] | None) -> None:
    """Refuse a slice whose plane is not axial within :data:`MAX_TILT_DEG`.

    The slice normal is the cross product of the row and column direction cosines of
    (0020,0037) Image Orientation (Patient) (PS3.3 C.7.6.2.1.1); an absent attribute is taken
    as axial.
    """
    if orientation is None:
        return
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        raise UnusableFileError(f"invalid {_label('ImageOrientationPatient')}: row and column "
                                "directions are not orthogonal unit vectors")
    tilt_deg = math.degrees(math.acos(min(1.0, abs(float(normal[2])) / length)))
    if tilt_deg > MAX_TILT_DEG:
        raise UnusableFileError(f"non-axial slice ({_label('ImageOrientationPatient')} normal "
                                f"{tilt_deg:.1f} deg from the z axis; at most {MAX_TILT_DEG:g})")


def parse_window(text: str) -> tuple[float, float]:
    """``"lung"`` -> (-600, 1500); ``"C,W"`` -> (C, W) in HU. Width must be >= 1."""
    if text.strip().lower() == "lung":
        return LUNG_WINDOW
    parts = text.split(",")
    try:
        center_hu, width_hu = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"window must be 'lung' or 'CENTER,WIDTH' in HU, got {text!r}") from None
    if width_hu < 1:
        raise ValueError(f"window width must be >= 1 HU, got {width_hu:g}")
    return center_hu, width_hu
