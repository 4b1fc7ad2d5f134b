"""Reading CT slices: header-only indexing, series assembly, HU conversion and windowing.

DICOM attributes are named with tag and keyword as in PS3.3. Ordering rules: stored values
are first mapped to Hounsfield units by the Modality LUT ((0028,1053) Rescale Slope,
(0028,1052) Rescale Intercept), padding pixels are set to air, and only then is the VOI
window applied (PS3.3 C.11.2.1.2.1).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

__all__ = [
    "AIR_HU",
    "LUNG_WINDOW",
    "CT_IMAGE_STORAGE",
    "SliceHeader",
    "Series",
    "UnusableFileError",
    "read_header",
    "assemble_series",
    "read_hu",
    "apply_window",
    "parse_window",
    "square_and_resize",
]

LOG = logging.getLogger(__name__)

AIR_HU = -1000.0
LUNG_WINDOW = (-600.0, 1500.0)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_DEFER_BYTES = 1024
#: The only attributes indexing parses (pixel data stays on disk, deferred).
HEADER_TAGS = (
    "Modality", "SOPClassUID", "ImageType", "ImagePositionPatient", "PixelSpacing", "Rows",
    "Columns", "SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "PatientID",
    "InstanceNumber", "SliceThickness", "BitsAllocated", "PixelData",
)


class UnusableFileError(Exception):
    """A file that is not a usable CT slice; ``str(error)`` is the reason for skipped.csv."""


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


@dataclass(frozen=True)
class Series:
    """The slices of one CT series, sorted by z, one slice per z position."""

    series_uid: str
    patient_id: str
    slices: tuple[SliceHeader, ...]

    @property
    def z_mm(self) -> np.ndarray:
        """z of every slice (mm), ascending."""
        return np.array([s.z_mm for s in self.slices], dtype=np.float64)

    @property
    def pixel_spacing_mm(self) -> float:
        """In-plane spacing of the first slice (mm per pixel)."""
        return self.slices[0].pixel_spacing_mm

    @property
    def slice_spacing_mm(self) -> float:
        """Median z gap between neighbouring slices, or the SliceThickness of a 1-slice series."""
        if len(self.slices) > 1:
            return float(np.median(np.diff(self.z_mm)))
        return self.slices[0].slice_thickness_mm or 1.0


def _reason_not_ct(ds: pydicom.Dataset) -> str | None:
    modality = str(ds.get("Modality", "")).upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "CT":
        return f"not a CT image ((0008,0060) Modality {modality or 'missing'})"
    if sop_class and sop_class not in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
        return f"not CT Image Storage ((0008,0016) SOP Class UID {sop_class})"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer image ((0008,0008) Image Type LOCALIZER)"
    return None


def _check_pixel_data(ds: pydicom.Dataset, path: Path) -> None:
    """Raise UnusableFileError when pixel data is missing, truncated or needs a missing decoder."""
    if "PixelData" not in ds:
        raise UnusableFileError("no pixel data (7FE0,0010)")
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax.is_compressed:
        if not get_decoder(syntax).is_available:
            raise UnusableFileError(
                f"compressed transfer syntax {syntax.name} with no installed decoder"
            )
        return
    raw = ds.get_item("PixelData", keep_deferred=True)
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated", 16)) // 8
    tell = getattr(raw, "value_tell", None)
    if tell is not None and tell + expected > os.path.getsize(path):
        raise UnusableFileError("truncated pixel data")


def read_header(path: Path) -> SliceHeader:
    """Read one file's header (pixel data deferred, never decoded) and check it is a CT slice.

    Raises:
        UnusableFileError: with the reason this file cannot be a sample.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, specific_tags=list(HEADER_TAGS))
    except InvalidDicomError:
        raise UnusableFileError("not DICOM") from None
    except Exception as error:  # pydicom raises many types on corrupt input
        raise UnusableFileError(f"unreadable DICOM ({type(error).__name__})") from None
    reason = _reason_not_ct(ds)
    if reason:
        raise UnusableFileError(reason)
    try:
        position = [float(v) for v in ds.ImagePositionPatient]
        spacing = [float(v) for v in ds.PixelSpacing]
        rows, columns = int(ds.Rows), int(ds.Columns)
        series_uid = str(ds.SeriesInstanceUID)
    except (AttributeError, TypeError, ValueError) as error:
        raise UnusableFileError(f"missing or invalid geometry tag ({error})") from None
    if len(position) != 3 or len(spacing) != 2 or min(spacing) <= 0:
        raise UnusableFileError(
            "invalid (0020,0032) Image Position (Patient) or (0028,0030) Pixel Spacing"
        )
    _check_pixel_data(ds, path)
    thickness = ds.get("SliceThickness")
    return SliceHeader(
        path=path,
        patient_id=str(ds.get("PatientID", "")).strip(),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        z_mm=position[2],
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
        rows=rows,
        columns=columns,
        pixel_spacing_mm=float(np.mean(spacing)),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
    )


def assemble_series(
    headers: Iterable[SliceHeader],
) -> tuple[list[Series], list[tuple[Path, str]]]:
    """Group slices by (0020,000E) Series Instance UID, sort by z, drop duplicate z positions.

    Of two slices at the same z the one with the lower (0020,0013) Instance Number is kept
    (docs/lidc_format.md). Slices whose size differs from the series' first slice are dropped.

    Returns:
        The series sorted by UID, and ``(path, reason)`` for every dropped slice.
    """
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_uid].append(header)
    series: list[Series] = []
    dropped: list[tuple[Path, str]] = []
    for uid in sorted(groups):
        ordered = sorted(groups[uid], key=lambda h: (h.z_mm, h.instance_number, str(h.path)))
        kept: list[SliceHeader] = []
        for header in ordered:
            if kept and abs(header.z_mm - kept[-1].z_mm) < 1e-3:
                dropped.append(
                    (header.path, f"duplicate slice position z={header.z_mm:g} mm "
                                  f"(kept InstanceNumber {kept[-1].instance_number})")
                )
            elif (header.rows, header.columns) != (ordered[0].rows, ordered[0].columns):
                dropped.append((header.path, "slice size differs from the rest of its series"))
            else:
                kept.append(header)
        series.append(Series(uid, kept[0].patient_id, tuple(kept)))
    return series, dropped


def read_hu(path: Path) -> tuple[np.ndarray, bool]:
    """Decode one slice to Hounsfield units (float32), padding pixels set to air.

    HU = stored value x (0028,1053) Rescale Slope + (0028,1052) Rescale Intercept. Pixels equal
    to (0028,0120) Pixel Padding Value (or within the range up to (0028,0121) Pixel Padding
    Range Limit) lie outside the scan and become -1000 HU.

    Returns:
        The HU image and whether (0028,0004) Photometric Interpretation is MONOCHROME1
        (display inverted).

    Raises:
        UnusableFileError: when the pixel data cannot be decoded.
    """
    try:
        ds = pydicom.dcmread(path)
        stored = _stored_pixels(ds)
    except Exception as error:  # decoders raise many types on corrupt data
        reason = f"pixel data could not be decoded ({type(error).__name__})"
        raise UnusableFileError(reason) from None
    if stored.ndim != 2:
        raise UnusableFileError(f"not a single-frame grayscale image (array shape {stored.shape})")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    hu = stored.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        limit = ds.get("PixelPaddingRangeLimit", padding)
        low, high = sorted((int(padding), int(limit)))
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    return hu, monochrome1


def _stored_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values of a single-frame image.

    Uncompressed little-endian 16-bit data whose (0028,0101) Bits Stored fills the word, or
    is unsigned, is viewed straight from the buffer (the common CT case, about 2x faster);
    everything else goes through pydicom's decoders.
    """
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    simple = (
        not syntax.is_compressed
        and syntax.is_little_endian
        and int(ds.get("BitsAllocated", 0)) == 16
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and (int(ds.get("BitsStored", 16)) == 16 or int(ds.get("PixelRepresentation", 0)) == 0)
    )
    if not simple:
        return ds.pixel_array
    dtype = "<i2" if int(ds.get("PixelRepresentation", 0)) == 1 else "<u2"
    rows, columns = int(ds.Rows), int(ds.Columns)
    return np.frombuffer(ds.PixelData, dtype=dtype, count=rows * columns).reshape(rows, columns)


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


def apply_window(hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """Map HU to uint8 with the DICOM linear VOI function (PS3.3 C.11.2.1.2.1).

    y = ((x - (c - 0.5)) / (w - 1) + 0.5) x 255, clipped to [0, 255]; below the window is 0,
    above is 255.
    """
    if width_hu < 1:
        raise ValueError(f"window width must be >= 1 HU, got {width_hu:g}")
    if width_hu == 1:
        return np.where(hu > center_hu - 0.5, 255, 0).astype(np.uint8)
    scaled = ((hu - (center_hu - 0.5)) / (width_hu - 1) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def square_and_resize(image: np.ndarray, size_px: int, fill: float) -> tuple[np.ndarray, float]:
    """Pad ``image`` to a centred square with ``fill``, then area-resize to ``size_px``.

    Returns:
        The resized image and the scale factor (source pixels per output pixel).
    """
    rows, columns = image.shape
    side = max(rows, columns)
    if rows != columns:
        padded = np.full((side, side), fill, dtype=image.dtype)
        top, left = (side - rows) // 2, (side - columns) // 2
        padded[top : top + rows, left : left + columns] = image
        image = padded
    interpolation = cv2.INTER_AREA if side >= size_px else cv2.INTER_LINEAR
    resized = cv2.resize(image, (size_px, size_px), interpolation=interpolation)
    return resized, side / size_px
