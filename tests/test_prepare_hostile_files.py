"""Hostile input files through prepare: each is skipped with its pinned reason (or renders when
it is valid), nothing crashes, and no file makes prepare use 600 MB.

The corpus is built in a temporary folder, one sub-folder per class (nothing is committed; all
files are under 5 MB but one 32 MB control, the largest slice the caps allow):

- ``bad_numbers``: NaN, infinite, zero or absurd values of the numbers the image depends on;
- ``wrong_vr``: text (or a sequence) where a number belongs;
- ``size_bombs``: headers claiming more pixels than the file holds or than the caps allow,
  RLE and deflate bombs, codestreams larger than their header, patches larger than a slice;
- ``truncated``: zero-length and cut files;
- ``valid``: plain, compressed (RLE, JPEG, JPEG 2000, JPEG-LS) and deflated slices that must
  still decode (controls);
- ``image_files``: PNG, JPEG, BMP and TIFF headers claiming huge images (class-folder input);
- ``xml``: LIDC readings with non-finite or absurd coordinates, huge outlines, too many marks
  or elements.

``through_prepare`` is prepare's own path for one file: ``read_header`` (indexing), then
``render`` (patch view) for a DICOM slice; ``render`` for an image file; ``parse_readings``
then ``lidc_candidates`` on a 512 x 512 series for a readings file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

import prepare_lung_dataset
from lungct.prepare import dicom, nodules, render
from lungct.prepare.candidates import IMAGE_SUFFIXES, Candidate, lidc_candidates
from lungct.prepare.dicom import SliceHeader
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.lidc import LabelRule
from lungct.prepare.lidc_xml import LidcParseError, parse_readings
from lungct.prepare.series import Series
from lungct.synthetic.cohort import generate_cohort

REPO = Path(__file__).resolve().parents[1]
PEAK_MEMORY_LIMIT_MB = 600
SETTINGS = render.RenderSettings(64, -600.0, 1500.0, "patch", 64.0)
SERIES_UID = "1.2.3.4.5"
NIH = "http://www.nih.gov"


# ----------------------------------------------------------------------------- DICOM builders


def hu_pattern(rows: int = 16, columns: int = 16) -> np.ndarray:
    """A small CT-like slice: air around a soft-tissue square around lung (a patch centre)."""
    hu = np.full((rows, columns), -1000.0)
    hu[rows // 4 : 3 * rows // 4, columns // 4 : 3 * columns // 4] = 40.0
    hu[3 * rows // 8 : 5 * rows // 8, 3 * columns // 8 : 5 * columns // 8] = -850.0
    return hu


def ct(path: Path, **kwargs) -> Path:
    """A valid uncompressed 16 x 16 CT slice (tests/conftest.py write_ct_slice)."""
    return write_ct_slice(path, hu_pattern(), 0.0, series_uid=SERIES_UID, **kwargs)


def with_raw(keyword: str, vr: str, value: str | bytes) -> Callable[[Path], Path]:
    """A valid slice whose ``keyword`` holds ``value`` written verbatim with ``vr``."""

    def build(path: Path) -> Path:
        ds = pydicom.dcmread(ct(path))
        tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
        data = value.encode() if isinstance(value, str) else value
        data += b" " if len(data) % 2 else b""
        ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
        ds.save_as(path)
        return path

    return build


def us(value: int) -> bytes:
    return value.to_bytes(2, "little")


def with_pixels(syntax: str, pixel_data: bytes, rows: int, columns: int, bits: int = 16,
                signed: int = 1) -> Callable[[Path], Path]:
    """A slice whose header claims ``rows`` x ``columns`` and whose pixel data is given."""

    def build(path: Path) -> Path:
        ds = pydicom.dcmread(ct(path))
        ds.file_meta.TransferSyntaxUID = syntax
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = signed
        ds.PixelData = pixel_data
        if syntax != ExplicitVRLittleEndian:
            ds["PixelData"].VR = "OB"
        ds.save_as(path)
        return path

    return build


def rle_frame(*segments: bytes) -> bytes:
    """An RLE Lossless frame: the 64-byte header (segment count, offsets), then segments."""
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header = [len(segments), *offsets] + [0] * (15 - len(segments))
    return b"".join(v.to_bytes(4, "little") for v in header) + b"".join(segments)


def rle_replicate(n_bytes: int, value: int = 0) -> bytes:
    """A PackBits segment repeating ``value`` ``n_bytes`` times (runs of 128)."""
    full, rest = divmod(n_bytes, 128)
    tail = bytes([257 - rest, value]) if rest > 1 else bytes([0, value]) if rest else b""
    return bytes([129, value]) * full + tail


def compressed_pixels(hu: np.ndarray, syntax: str) -> Callable[[Path], Path]:
    """A slice of ``hu`` stored compressed: RLE and JPEG-LS by pydicom, JPEG 2000 by Pillow
    (unsigned)."""

    def build(path: Path) -> Path:
        if syntax in (RLELossless, JPEGLSLossless):
            ds = pydicom.dcmread(write_ct_slice(path, hu, 0.0, series_uid=SERIES_UID))
            ds.compress(syntax)
        else:
            ds = pydicom.dcmread(write_ct_slice(path, hu, 0.0, series_uid=SERIES_UID))
            stored = (np.asarray(hu) + 1024).astype(np.uint16)
            buffer = io.BytesIO()
            Image.fromarray(stored).save(buffer, "JPEG2000", irreversible=False, no_jp2=True)
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelRepresentation, ds.RescaleIntercept = 0, -1024
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
        ds.save_as(path)
        return path

    return build


def jpeg_baseline(claimed_rows: int | None = None) -> Callable[[Path], Path]:
    """An 8-bit JPEG baseline slice (8 HU per stored unit from -1000 HU: air, tissue around
    lung); ``claimed_rows`` rewrites the SOF0 height and width."""

    def build(path: Path) -> Path:
        stored = np.rint((hu_pattern() + 1000) / 8).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, "JPEG", quality=95)
        frame = bytearray(buffer.getvalue())
        if claimed_rows is not None:
            sof = frame.find(b"\xff\xc0")
            frame[sof + 5 : sof + 9] = claimed_rows.to_bytes(2, "big") * 2
        ds = pydicom.dcmread(ct(path))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.RescaleSlope, ds.RescaleIntercept = 8, -1000
        ds.PixelData = encapsulate([bytes(frame)])
        ds["PixelData"].VR = "OB"
        ds.save_as(path)
        return path

    return build


def j2k_claiming(rows: int) -> Callable[[Path], Path]:
    """A JPEG 2000 slice (header 16 x 16) whose SIZ claims ``rows`` x ``rows``."""

    def build(path: Path) -> Path:
        compressed_pixels(hu_pattern(), JPEG2000Lossless)(path)
        ds = pydicom.dcmread(path)
        frame = bytearray(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1))
        siz = frame.find(b"\xff\x4f\xff\x51")
        frame[siz + 8 : siz + 16] = rows.to_bytes(4, "big") * 2
        ds.PixelData = encapsulate([bytes(frame)])
        ds.save_as(path)
        return path

    return build


def claiming(syntax: str, rows: int = 0, components: int = 0) -> Callable[[Path], Path]:
    """A JPEG-LS or JPEG 2000 slice (header 16 x 16) whose codestream claims ``rows`` x
    ``rows`` pixels (SOF55 Y X, or SIZ Xsiz Ysiz) or ``components`` components (SIZ Csiz)."""

    def build(path: Path) -> Path:
        compressed_pixels(hu_pattern(), syntax)(path)
        ds = pydicom.dcmread(path)
        frame = bytearray(pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1))
        if syntax == JPEGLSLossless:
            sof = frame.find(b"\xff\xf7")
            frame[sof + 5 : sof + 9] = rows.to_bytes(2, "big") * 2
        else:
            siz = frame.find(b"\xff\x4f\xff\x51")
            frame[siz + 40 : siz + 42] = components.to_bytes(2, "big")
        ds.PixelData = encapsulate([bytes(frame)])
        ds.save_as(path)
        return path

    return build


def rle_with_trailing_runs(path: Path) -> Path:
    """A 512 x 512 RLE slice of :func:`hu_pattern` whose two segments each go on with 250 KB
    of runs past the image (pydicom's decoder would expand them 64-fold, to 32 MB)."""
    compressed_pixels(hu_pattern(512, 512), RLELossless)(path)
    ds = pydicom.dcmread(path)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    starts = [int.from_bytes(frame[i : i + 4], "little") for i in (4, 8)]
    segments = [frame[start:end] + rle_replicate(64 * 250_000)
                for start, end in zip(starts, [starts[1], len(frame)], strict=True)]
    ds.PixelData = encapsulate([rle_frame(*segments)])
    ds.save_as(path)
    return path


def largest_allowed(syntax: str | None = None) -> Callable[[Path], Path]:
    """The largest slice the caps allow (4096 x 4096 x 16 bits of noise, 0.05 mm pixels),
    uncompressed or losslessly compressed in ``syntax`` by pydicom's encoder."""

    def build(path: Path) -> Path:
        write_ct_slice(path, np.random.default_rng(0).integers(-1000, 400, (4096, 4096)), 0.0,
                       series_uid=SERIES_UID, pixel_spacing_mm=0.05)
        if syntax is not None:
            ds = pydicom.dcmread(path)
            ds.compress(syntax)
            ds.save_as(path)
        return path

    return build


def deflated(inflated_extra_bytes: int) -> Callable[[Path], Path]:
    """A Deflated Explicit VR Little Endian slice followed by a private OB element of
    ``inflated_extra_bytes`` zeros (a 70 KB file can inflate to 70 MB)."""

    def build(path: Path) -> Path:
        ds = pydicom.dcmread(ct(path))
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        if not inflated_extra_bytes:
            ds.save_as(path)
            return path
        plain = io.BytesIO()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(plain)
        body = plain.getvalue()
        meta_end = 144 + int.from_bytes(body[140:144], "little")
        body = body[meta_end:] + b"\xe1\x7f\x10\x10OB\x00\x00" + inflated_extra_bytes.to_bytes(
            4, "little")
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        with open(path, "wb") as handle:
            handle.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(handle, ds.file_meta, enforce_standard=True)
            deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            handle.write(deflater.compress(body))
            zeros = bytes(1 << 20)
            for start in range(0, inflated_extra_bytes, len(zeros)):
                handle.write(deflater.compress(zeros[: inflated_extra_bytes - start]))
            handle.write(deflater.flush())
        return path

    return build


def raw_bytes(data: bytes) -> Callable[[Path], Path]:
    """A file holding exactly ``data``."""

    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return build


def cut(before: bytes = b"", drop: int = 0) -> Callable[[Path], Path]:
    """A valid slice cut 3 bytes into the element starting with ``before``, or with its last
    ``drop`` bytes gone."""

    def build(path: Path) -> Path:
        data = ct(path).read_bytes()
        path.write_bytes(data[: data.index(before) + 3] if before else data[:-drop])
        return path

    return build


def image_file(suffix: str, claimed: int | None = None) -> Callable[[Path], Path]:
    """A 16 x 16 grayscale image file written by OpenCV; ``claimed`` rewrites the size its
    header declares (PNG IHDR, BMP info header, TIFF first IFD, JPEG SOF0)."""

    def build(path: Path) -> Path:
        ok, encoded = cv2.imencode(suffix, np.tile(np.arange(0, 256, 16, dtype=np.uint8),
                                                   (16, 1)))
        data = bytearray(encoded.tobytes())
        if claimed is not None and suffix == ".png":
            data[16:24] = claimed.to_bytes(4, "big") * 2
        elif claimed is not None and suffix == ".bmp":
            data[18:26] = claimed.to_bytes(4, "little") * 2
        elif claimed is not None and suffix == ".tif":
            order = "little" if data[:2] == b"II" else "big"
            ifd = int.from_bytes(data[4:8], order)
            for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(data[ifd:ifd + 2], order),
                               12):
                if int.from_bytes(data[entry:entry + 2], order) in (256, 257):
                    data[entry + 2 : entry + 12] = ((4).to_bytes(2, order)
                                                    + (1).to_bytes(4, order)
                                                    + claimed.to_bytes(4, order))
        elif claimed is not None:
            sof = data.find(b"\xff\xc0")
            data[sof + 5 : sof + 9] = min(claimed, 65535).to_bytes(2, "big") * 2
        path.write_bytes(bytes(data))
        return path

    return build


# ----------------------------------------------------------------------------- XML builders


def roi(z_mm: object, points: list[tuple[object, object]], inclusion: bool = True) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    for x, y in points)
    return (f"<roi><imageZposition>{z_mm}</imageZposition><imageSOP_UID>1.2</imageSOP_UID>"
            f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>")


def mark(nodule_id: str, *rois: str, malignancy: int = 5) -> str:
    chars = f"<characteristics><malignancy>{malignancy}</malignancy></characteristics>"
    return (f"<unblindedReadNodule><noduleID>{nodule_id}</noduleID>{chars}{''.join(rois)}"
            "</unblindedReadNodule>")


def readings(*sessions: list[str], extra: str = "") -> str:
    body = "".join(f"<readingSession>{''.join(items)}</readingSession>" for items in sessions)
    return (f'<?xml version="1.0" encoding="UTF-8"?><LidcReadMessage xmlns="{NIH}">'
            f"<ResponseHeader><SeriesInstanceUid>{SERIES_UID}</SeriesInstanceUid>"
            f"</ResponseHeader>{body}{extra}</LidcReadMessage>")


def circle(n_points: int, radius: float = 40.0, centre: float = 256.0) -> list[tuple]:
    angles = np.arange(n_points) * 2 * math.pi / n_points
    return [(f"{centre + radius * math.cos(a):.4f}", f"{centre + radius * math.sin(a):.4f}")
            for a in angles]


def square(x0: int, y0: int, side: int) -> list[tuple[int, int]]:
    return ([(x, y0) for x in range(x0, x0 + side)] + [(x0 + side, y) for y in range(y0, y0 + side)]
            + [(x, y0 + side) for x in range(x0 + side, x0, -1)]
            + [(x0, y) for y in range(y0 + side, y0, -1)])


def xml(text: Callable[[], str]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_text(text())
        return path

    return build


def one_point(x: object, y: object, z: object = 0.0) -> str:
    return readings([mark("n1", roi(z, [(x, y)]))])


# ----------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Hostile:
    """One corpus file: how to build it and what prepare must say (None: it renders)."""

    build: Callable[[Path], Path]
    reason: str | None


SLOPE = "; allowed: 0.001 <= |slope| <= 1000"
INTERCEPT = "; allowed: |intercept| < 100000 HU"
SPACING = "; allowed: 2 numbers, 0.01-10 mm"
POSITION = "; allowed: 3 numbers within +-10000 mm"
FRAMES = "; allowed: at most 1 (enhanced (multi-frame) CT is not supported)"

CORPUS: dict[str, dict[str, Hostile]] = {
    "bad_numbers": {
        "slope_nan.dcm": Hostile(with_raw("RescaleSlope", "DS", "nan"),
                                 "invalid (0028,1053) Rescale Slope: nan" + SLOPE),
        "slope_inf.dcm": Hostile(with_raw("RescaleSlope", "DS", "inf"),
                                 "invalid (0028,1053) Rescale Slope: inf" + SLOPE),
        "slope_zero.dcm": Hostile(with_raw("RescaleSlope", "DS", "0"),
                                  "invalid (0028,1053) Rescale Slope: 0" + SLOPE),
        "slope_two_values.dcm": Hostile(with_raw("RescaleSlope", "DS", "1\\2"),
                                        "invalid (0028,1053) Rescale Slope: [1, 2]" + SLOPE),
        "intercept_nan.dcm": Hostile(with_raw("RescaleIntercept", "DS", "NaN"),
                                     "invalid (0028,1052) Rescale Intercept: NaN" + INTERCEPT),
        "intercept_inf.dcm": Hostile(with_raw("RescaleIntercept", "DS", "-inf"),
                                     "invalid (0028,1052) Rescale Intercept: -inf" + INTERCEPT),
        "intercept_huge.dcm": Hostile(with_raw("RescaleIntercept", "DS", "1e6"),
                                      "invalid (0028,1052) Rescale Intercept: 1e6" + INTERCEPT),
        "spacing_nan.dcm": Hostile(with_raw("PixelSpacing", "DS", "nan\\nan"),
                                   "invalid (0028,0030) Pixel Spacing: [nan, nan]" + SPACING),
        "spacing_inf.dcm": Hostile(with_raw("PixelSpacing", "DS", "inf\\0.7"),
                                   "invalid (0028,0030) Pixel Spacing: [inf, 0.7]" + SPACING),
        "spacing_1e-9.dcm": Hostile(with_raw("PixelSpacing", "DS", "1e-9\\1e-9"),
                                    "invalid (0028,0030) Pixel Spacing: [1e-9, 1e-9]" + SPACING),
        "spacing_one_value.dcm": Hostile(with_raw("PixelSpacing", "DS", "0.7"),
                                         "invalid (0028,0030) Pixel Spacing: 0.7" + SPACING),
        "z_nan.dcm": Hostile(with_raw("ImagePositionPatient", "DS", "0\\0\\nan"),
                             "invalid (0020,0032) Image Position (Patient): [0, 0, nan]"
                             + POSITION),
        "z_inf.dcm": Hostile(with_raw("ImagePositionPatient", "DS", "0\\0\\-inf"),
                             "invalid (0020,0032) Image Position (Patient): [0, 0, -inf]"
                             + POSITION),
        "z_1e300.dcm": Hostile(with_raw("ImagePositionPatient", "DS", "0\\0\\1e300"),
                               "invalid (0020,0032) Image Position (Patient): [0, 0, 1e300]"
                               + POSITION),
        "thickness_nan.dcm": Hostile(with_raw("SliceThickness", "DS", "nan"),
                                     "invalid (0018,0050) Slice Thickness: nan; allowed: "
                                     "0.01-100 mm"),
        "rows_zero.dcm": Hostile(with_raw("Rows", "US", us(0)),
                                 "invalid (0028,0010) Rows: 0; allowed: an integer 1-4096"),
        "bits_allocated_12.dcm": Hostile(with_raw("BitsAllocated", "US", us(12)),
                                         "invalid (0028,0100) Bits Allocated: 12; allowed: "
                                         "one of 8, 16, 32"),
        "bits_stored_over_allocated.dcm": Hostile(
            with_raw("BitsStored", "US", us(20)),
            "invalid (0028,0101) Bits Stored: 20; allowed: at most (0028,0100) Bits "
            "Allocated 16"),
        "three_samples.dcm": Hostile(with_raw("SamplesPerPixel", "US", us(3)),
                                     "invalid (0028,0002) Samples per Pixel: 3; allowed: 1 "
                                     "(grayscale)"),
        "missing_spacing.dcm": Hostile(with_raw("PixelSpacing", "DS", ""),
                                       "missing (0028,0030) Pixel Spacing"),
    },
    "wrong_vr": {
        "slope_text.dcm": Hostile(with_raw("RescaleSlope", "LO", "abc"),
                                  "invalid (0028,1053) Rescale Slope: 'abc'" + SLOPE),
        "spacing_text.dcm": Hostile(with_raw("PixelSpacing", "LO", "abc\\def"),
                                    "invalid (0028,0030) Pixel Spacing: ['abc', 'def']"
                                    + SPACING),
        "rows_text.dcm": Hostile(with_raw("Rows", "LO", "abc"),
                                 "invalid (0028,0010) Rows: 'abc'; allowed: an integer 1-4096"),
        "instance_text.dcm": Hostile(with_raw("InstanceNumber", "IS", "abc"),
                                     "invalid (0020,0013) Instance Number: 'abc'; allowed: an "
                                     "integer"),
        "padding_text.dcm": Hostile(with_raw("PixelPaddingValue", "LO", "abc"),
                                    "invalid (0028,0120) Pixel Padding Value: 'abc'; allowed: "
                                    "an integer stored value"),
        "slope_sequence.dcm": Hostile(with_raw("RescaleSlope", "SQ", b""),
                                      "invalid (0028,1053) Rescale Slope: []"
                                      + SLOPE),
    },
    "size_bombs": {
        "rows_16384_uncompressed.dcm": Hostile(
            with_pixels(ExplicitVRLittleEndian, bytes(8), 16384, 16384),
            "invalid (0028,0010) Rows: 16384; allowed: an integer 1-4096"),
        "4096x4096_holding_8_bytes.dcm": Hostile(
            with_pixels(ExplicitVRLittleEndian, bytes(8), 4096, 4096),
            "pixel data of 8 bytes, fewer than the 33554432 of (0028,0010) Rows x (0028,0011) "
            "Columns x (0028,0100) Bits Allocated / 8"),
        "4096x4096x32_bits.dcm": Hostile(
            with_pixels(ExplicitVRLittleEndian, bytes(8), 4096, 4096, bits=32),
            "image of 67108864 bytes ((0028,0010) Rows 4096 x (0028,0011) Columns 4096 x "
            "(0028,0100) Bits Allocated 32 / 8) exceeds 33554432"),
        "multi_frame_1000.dcm": Hostile(with_raw("NumberOfFrames", "IS", "1000"),
                                        "invalid (0028,0008) Number of Frames: 1000" + FRAMES),
        "rle_claiming_16384x16384.dcm": Hostile(
            with_pixels(RLELossless, encapsulate([rle_frame(rle_replicate(600),
                                                            rle_replicate(600))]), 16384, 16384),
            "invalid (0028,0010) Rows: 16384; allowed: an integer 1-4096"),
        "rle_claiming_4096x4096.dcm": Hostile(
            with_pixels(RLELossless, encapsulate([rle_frame(rle_replicate(600),
                                                            rle_replicate(600))]), 4096, 4096),
            "RLE segment decodes to 600 of 16777216 bytes"),
        "rle_runs_past_the_image.dcm": Hostile(  # 2 x 35 KB of runs, 64-fold in pydicom
            with_pixels(RLELossless, encapsulate([rle_frame(rle_replicate(64 * 35_000),
                                                            rle_replicate(64 * 35_000))]), 16, 16),
            "compressed pixel data of 70084 bytes (RLE Lossless) is over 2 x the 512 bytes it "
            "decodes to"),
        "rle_wrong_segment_count.dcm": Hostile(
            with_pixels(RLELossless, encapsulate([rle_frame(rle_replicate(256))]), 16, 16),
            "RLE header does not describe 2 segments of 256 bytes"),
        "jpeg_claiming_16000x16000.dcm": Hostile(
            jpeg_baseline(claimed_rows=16000),
            "JPEG Baseline (Process 1) codestream image size (16000, 16000) differs from "
            "(0028,0010) Rows x (0028,0011) Columns (16, 16)"),
        "j2k_claiming_12000x12000.dcm": Hostile(
            j2k_claiming(12000),
            "JPEG 2000 Image Compression (Lossless Only) codestream image size (12000, 12000) "
            "differs from (0028,0010) Rows x (0028,0011) Columns (16, 16)"),
        "jpegls_claiming_16000x16000.dcm": Hostile(
            claiming(JPEGLSLossless, rows=16000),
            "JPEG-LS Lossless Image Compression codestream image size (16000, 16000) differs "
            "from (0028,0010) Rows x (0028,0011) Columns (16, 16)"),
        "j2k_claiming_4_components.dcm": Hostile(
            claiming(JPEG2000Lossless, components=4),
            "JPEG 2000 Image Compression (Lossless Only) codestream declares 4 components of "
            "16 bits; allowed: 1 of at most (0028,0100) Bits Allocated 16"),
        "spacing_0.01_patch_6400_px.dcm": Hostile(  # allowed spacing, but 64 mm = 6400 px
            with_raw("PixelSpacing", "DS", "0.01\\0.01"),
            "patch of 6400 px (--patch-mm 64 / pixel spacing 0.01 mm) exceeds 4096 px"),
        "deflate_bomb_70MB.dcm": Hostile(
            deflated(70_000_000),
            "Deflated Explicit VR Little Endian data set inflates beyond 67108864"),
    },
    "truncated": {
        "zero_length.dcm": Hostile(raw_bytes(b""), "not DICOM"),
        "preamble_only.dcm": Hostile(raw_bytes(b"\0" * 128 + b"DICM"),
                                     "not a CT image ((0008,0060) Modality missing)"),
        "cut_in_rows.dcm": Hostile(cut(before=b"\x28\x00\x10\x00US"),
                                   "no pixel data (7FE0,0010)"),
        "cut_in_pixel_data.dcm": Hostile(cut(drop=100), "truncated pixel data"),
    },
    "valid": {
        "plain.dcm": Hostile(ct, None),
        "rle.dcm": Hostile(compressed_pixels(hu_pattern(), RLELossless), None),
        "jpeg2000.dcm": Hostile(compressed_pixels(hu_pattern(), JPEG2000Lossless), None),
        "jpegls.dcm": Hostile(compressed_pixels(hu_pattern(), JPEGLSLossless), None),
        "jpeg_baseline.dcm": Hostile(jpeg_baseline(), None),
        "deflated.dcm": Hostile(deflated(0), None),
        # The largest slice the caps allow (4096 x 4096 x 16 bits, 32 MB), in patch view at
        # 0.05 mm per pixel (1280 px patches): the peak memory the caps are sized for.
        "largest_allowed_4096x4096.dcm": Hostile(largest_allowed(), None),
        # The same slice compressed: what the codecs allocate stays within the same budget.
        "largest_allowed_jpegls_4096x4096.dcm": Hostile(largest_allowed(JPEGLSLossless), None),
        "largest_allowed_jpeg2000_4096x4096.dcm": Hostile(largest_allowed(JPEG2000Lossless),
                                                          None),
        # Within the compressed-length cap, runs past the image are decoded up to its size
        # only (pydicom's decoder would expand these 2 x 250 KB 64-fold, to 32 MB).
        "rle_with_trailing_runs.dcm": Hostile(rle_with_trailing_runs, None),
    },
    "image_files": {  # class-folder inputs: decoded by OpenCV only within the same caps
        "png_claiming_100000.png": Hostile(image_file(".png", 100_000),
                                           "image file of 100000 x 100000 px; allowed: 1-4096 x "
                                           "1-4096 px"),
        "jpeg_claiming_60000.jpg": Hostile(image_file(".jpg", 60_000),
                                           "image file of 60000 x 60000 px; allowed: 1-4096 x "
                                           "1-4096 px"),
        "bmp_claiming_100000.bmp": Hostile(image_file(".bmp", 100_000),
                                           "image file of 100000 x 100000 px; allowed: 1-4096 x "
                                           "1-4096 px"),
        "tiff_claiming_100000.tif": Hostile(image_file(".tif", 100_000),
                                            "image file of 100000 x 100000 px; allowed: 1-4096 x "
                                            "1-4096 px"),
        "not_an_image.png": Hostile(raw_bytes(b"hello"), "image file could not be decoded"),
        "valid.png": Hostile(image_file(".png"), None),
        "valid.jpg": Hostile(image_file(".jpg"), None),
        "valid.bmp": Hostile(image_file(".bmp"), None),
        "valid.tif": Hostile(image_file(".tif"), None),
    },
    "xml": {
        "x_nan.xml": Hostile(xml(lambda: one_point("nan", 5)),
                             "reader 0 nodule 'n1': xCoord 'nan' is not finite"),
        "y_inf.xml": Hostile(xml(lambda: one_point(5, "inf")),
                             "reader 0 nodule 'n1': yCoord 'inf' is not finite"),
        "x_1e300.xml": Hostile(xml(lambda: one_point("1e300", 5)),
                               "reader 0 nodule 'n1': xCoord '1e300' is outside +-65536"),
        "z_nan.xml": Hostile(xml(lambda: one_point(5, 5, "NaN")),
                             "reader 0 nodule 'n1': imageZposition 'NaN' is not finite"),
        "z_1e300.xml": Hostile(xml(lambda: one_point(5, 5, "-1e300")),
                               "reader 0 nodule 'n1': imageZposition '-1e300' is outside "
                               "+-10000"),
        "outline_20000_points.xml": Hostile(
            xml(lambda: readings([mark("n1", roi(0.0, circle(20_000)))])),
            "reader 0 nodule 'n1': edgeMap points in one roi: more than 10000"),
        "marks_1001.xml": Hostile(
            xml(lambda: readings([mark(f"n{i}", roi(0.0, [(i % 500, 5)])) for i in range(1001)])),
            "nodule marks (unblindedReadNodule): more than 1000"),
        "elements_1100000.xml": Hostile(xml(lambda: readings(extra="<a/>" * 1_100_000)),
                                        "XML elements: more than 1000000"),
        # Within the caps: two readers' 9,000-point outlines on three slices, and a normal
        # nodule; these must be read, in bounded memory (an all-pairs hull held 1.3 GB).
        "outlines_9000_points.xml": Hostile(xml(lambda: readings(
            [mark("a", *(roi(z, circle(9000)) for z in (-2.5, 0.0, 2.5)))],
            [mark("b", *(roi(z, circle(9000, radius=39.0)) for z in (-2.5, 0.0, 2.5)))],
            [mark("c", roi(10.0, square(100, 100, 12)))])), None),
    },
}

ENTRIES = [(kind, name) for kind, files in CORPUS.items() for name in files]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The corpus on disk: ``<class>/<name>`` for every entry."""
    root = tmp_path_factory.mktemp("corpus")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns while writing invalid values
        for kind, name in ENTRIES:
            (root / kind).mkdir(exist_ok=True)
            paths[name] = CORPUS[kind][name].build(root / kind / name)
    return paths


def series_for(series_uid: str, path: Path) -> Series:
    """A 512 x 512 series of 41 slices, z -50..50 mm, for readings to be matched to."""
    headers = tuple(SliceHeader(path, "P", "", series_uid, "", float(z), index, 512, 512, 0.7,
                                2.5) for index, z in enumerate(np.arange(-50.0, 50.1, 2.5)))
    return Series(series_uid, "P", headers)


def through_prepare(path: Path) -> str:
    """What prepare does with one file: ``"skipped: <reason>"`` or ``"ok: ..."``."""
    if path.suffix == ".xml":
        try:
            parsed = parse_readings(path)
        except LidcParseError as error:
            return f"skipped: {error}"
        found, _, outcomes, _ = lidc_candidates(series_for(parsed.series_uid, path), parsed,
                                             LabelRule(), 10.0, str)
        return f"ok: {len(found)} candidates, nodules {outcomes}"
    try:
        if path.suffix in IMAGE_SUFFIXES:
            rendered = render.render(Candidate(path, path.name, "P", 1, ""), SETTINGS)
            return f"ok: image {rendered.image.shape}, mean {float(rendered.image.mean()):.1f}"
        header = dicom.read_header(path)
        candidate = Candidate(path, path.name, header.patient_id, 1, "",
                              series_uid=header.series_uid, slice_z_mm=header.z_mm,
                              pixel_spacing_mm=header.pixel_spacing_mm)
        rendered = render.render(candidate, SETTINGS)
    except UnusableFileError as error:
        return f"skipped: {error}"
    return f"ok: image {rendered.image.shape}, mean {float(rendered.image.mean()):.1f}"


# ----------------------------------------------------------------------------- reasons


@pytest.mark.parametrize(("kind", "name"), ENTRIES, ids=[f"{k}/{n}" for k, n in ENTRIES])
def test_hostile_file_gets_its_pinned_reason(corpus, kind, name):
    """Every corpus file is skipped with exactly its reason, or (controls) renders."""
    expected = CORPUS[kind][name].reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = through_prepare(corpus[name])
    if expected is None:
        assert outcome.startswith("ok: "), outcome
    else:
        assert outcome == f"skipped: {expected}"


def test_bad_number_is_refused_by_read_hu_too(corpus):
    """Decoding re-checks the numbers: a file changed after indexing is still refused."""
    with pytest.raises(UnusableFileError, match=r"^invalid \(0028,1053\) Rescale Slope"):
        render.read_hu(corpus["slope_nan.dcm"])


@pytest.mark.parametrize("name", ["rle.dcm", "jpeg2000.dcm", "jpegls.dcm", "deflated.dcm"])
def test_compressed_controls_decode_to_the_same_hu(corpus, name):
    """Lossless RLE, JPEG 2000, JPEG-LS and deflate give exactly the HU of the plain slice."""
    plain, _ = render.read_hu(corpus["plain.dcm"])
    hu, _ = render.read_hu(corpus[name])
    np.testing.assert_array_equal(hu, plain)


@pytest.mark.parametrize(("bits", "signed", "bits_stored"), [(16, 1, 16), (16, 1, 12),
                                                              (16, 0, 16), (8, 0, 8)])
def test_rle_decoder_matches_pydicom(tmp_path, bits, signed, bits_stored):
    """The bounded RLE decoder returns what pydicom's returns, for 8/16 bits, both signs."""
    rng = np.random.default_rng(bits + signed)
    dtype = {(16, 1): np.int16, (16, 0): np.uint16, (8, 0): np.uint8}[bits, signed]
    high = 1 << (bits_stored - signed)
    stored = rng.integers(-high if signed else 0, high, (40, 24)).astype(dtype)
    stored[10:20] = stored[10, 0]  # runs as well as literals
    ds = pydicom.dcmread(ct(tmp_path / "s.dcm"))
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored, bits_stored - 1
    ds.PixelRepresentation = signed
    ds.PixelData = stored.tobytes()
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "s.dcm")
    reference = pydicom.dcmread(tmp_path / "s.dcm").pixel_array
    hu, _ = render.read_hu(tmp_path / "s.dcm")
    np.testing.assert_array_equal(hu, reference.astype(np.float32) - 1024)


def mutants(seed: bytes, count: int, rng: np.random.Generator, tokens: list[bytes]
            ) -> list[bytes]:
    """``count`` copies of ``seed`` with 1-8 random byte edits each: a byte overwritten, four
    bytes set to a length-like value, a run deleted, or a token spliced in."""
    out = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(int(rng.integers(1, 9))):
            at, kind = int(rng.integers(len(data))), rng.random()
            if kind < 0.5:
                data[at] = int(rng.integers(256))
            elif kind < 0.7:
                data[at : at + 4] = [b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\x10\0\0"][
                    int(rng.integers(3))]
            elif kind < 0.85:
                del data[at : at + int(rng.integers(1, 64))]
            else:
                data[at:at] = tokens[int(rng.integers(len(tokens)))]
        out.append(bytes(data))
    return out


@pytest.mark.filterwarnings("ignore")
def test_random_corruptions_never_crash_prepare(corpus, tmp_path):
    """Seeded mutants of the valid slices and of a readings file: every one is skipped with a
    reason or used, none raises (found: unknown VRs, unknown transfer syntaxes and unknown
    XML encodings used to raise)."""
    rng = np.random.default_rng(2024)
    seeds = [corpus[name].read_bytes() for name in
             ("plain.dcm", "rle.dcm", "jpeg2000.dcm", "jpeg_baseline.dcm", "deflated.dcm",
              "jpegls.dcm")]
    xml_seed = readings([mark("a", roi(0.0, square(100, 100, 12)), roi(2.5, square(101, 101, 10)))],
                        [mark("b", roi(0.0, square(102, 100, 12)), malignancy=1)]).encode()
    files = [(f"m{i}.dcm", data) for i, data in enumerate(
        data for seed in seeds for data in mutants(seed, 80, rng, [b"UN", b"\xff\xd8"]))]
    files += [(f"m{i}.xml", data) for i, data in enumerate(mutants(
        xml_seed, 150, rng, [b"nan", b"-1e300", b"<a/>", b"UT8", b"\xff"]))]
    outcomes = []
    for name, data in files:
        (tmp_path / name).write_bytes(data)
        outcomes.append(through_prepare(tmp_path / name))
    assert all(o.startswith(("skipped: ", "ok: ")) for o in outcomes)
    assert sum(o.startswith("ok: ") for o in outcomes) > 20  # the mutants are not all junk


# ----------------------------------------------------------------------------- outlines


def test_nine_thousand_point_outlines_are_clustered(corpus):
    """Two readers' huge outlines of one lesion form one nodule with the circle's diameter."""
    parsed = parse_readings(corpus["outlines_9000_points.xml"])
    found = nodules.cluster_nodules(parsed, 0.7, 2.5)
    assert [n.n_readers for n in found] == [2, 1]
    assert found[0].diameter_mm == pytest.approx(np.median([80.0, 78.0]) * 0.7, rel=1e-4)


def test_tree_and_pairwise_distances_agree(tmp_path, monkeypatch):
    """Marks measured by the k-d tree get the pairwise distances (where they matter: within
    the tolerance) and cluster exactly alike."""
    rng = np.random.default_rng(7)
    sessions = [[mark(f"r{reader}m{index}", *(
        roi(2.5 * (z + k), circle(int(rng.integers(20, 200)), float(rng.uniform(3, 15)),
                                  float(rng.uniform(100, 140))))
        for k in range(int(rng.integers(1, 4)))))
        for index, z in enumerate(rng.integers(-4, 4, 6))] for reader in range(4)]
    (tmp_path / "r.xml").write_text(readings(*sessions))
    parsed = parse_readings(tmp_path / "r.xml")

    def measured() -> tuple[np.ndarray, list]:
        distances = nodules._mark_distances_mm(parsed.marks, 0.7, 2.5)
        groups = [tuple((m.reader, m.nodule_id) for m in n.marks)
                  for n in nodules.cluster_nodules(parsed, 0.7, 2.5)]
        return distances, groups

    monkeypatch.setattr(nodules, "_EXACT_POINT_PAIRS", 1 << 60)
    monkeypatch.setattr(nodules, "_EXACT_PLANE_PAIRS", 1 << 60)
    exact, exact_groups = measured()
    monkeypatch.setattr(nodules, "_EXACT_POINT_PAIRS", 0)
    tree, tree_groups = measured()
    near = exact <= 2.5
    assert near.sum() > 10 and np.all(tree[~near] > 2.5)
    np.testing.assert_allclose(tree[near], exact[near], rtol=1e-12, atol=1e-12)
    assert tree_groups == exact_groups


# ----------------------------------------------------------------------------- memory


CHILD = r"""
import json, os, resource, signal, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
from test_prepare_hostile_files import through_prepare

for line in sys.stdin:
    path = Path(line.strip())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # one fresh process per file: its peak RSS is this file's
        os.close(read)
        signal.alarm(120)  # a time bomb fails the test instead of hanging it
        with open("/proc/self/status") as status:  # a memory bomb fails instead of swapping
            size_kb = next(int(l.split()[1]) for l in status if l.startswith("VmSize:"))
        limit = size_kb * 1024 + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            outcome = through_prepare(path)
        except BaseException as error:
            outcome = f"crash: {type(error).__name__}: {error}"
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        os.write(write, json.dumps({"name": path.name, "outcome": outcome,
                                    "peak_mb": round(peak_mb, 1)}).encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    print(b"".join(chunks).decode() or json.dumps(
        {"name": path.name, "outcome": f"crash: exit status {status}", "peak_mb": -1}),
        flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_hostile_file_stays_under_600_mb(corpus):
    """Each file goes through prepare's path in its own process; its peak RSS (imports
    included) stays under 600 MB, and the outcome is the pinned one."""
    listing = "".join(f"{corpus[name]}\n" for _, name in ENTRIES)
    result = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], input=listing,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = {row["name"]: row for row in map(json.loads, result.stdout.splitlines())}
    table = "\n".join(f"{row['peak_mb']:8.1f} MB  {name}: {row['outcome'][:100]}"
                      for name, row in measured.items())
    print(f"\npeak memory per hostile file (limit {PEAK_MEMORY_LIMIT_MB} MB):\n{table}")
    for kind, name in ENTRIES:
        row = measured[name]
        expected = CORPUS[kind][name].reason
        assert 0 < row["peak_mb"] < PEAK_MEMORY_LIMIT_MB, (name, row)
        assert (row["outcome"].startswith("ok: ") if expected is None
                else row["outcome"] == f"skipped: {expected}"), (name, row)


# ----------------------------------------------------------------------------- end to end


def refused_at_indexing(path: Path) -> bool:
    try:
        dicom.read_header(path)
    except UnusableFileError:
        return True
    return False


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prepare_skips_hostile_files_end_to_end(tmp_path, corpus):
    """prepare on a synthetic cohort with hostile files mixed in: exit 0, every hostile file
    in skipped.csv with its reason, and a real slice made hostile never reaches the manifest."""
    source = tmp_path / "input"
    generate_cohort(source, n_patients=6, image_size_px=64, seed=3)
    slices = sorted(source.rglob("*.dcm"))
    poisoned = slices[len(slices) // 2]  # a slice of a real series with readings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(poisoned)
        ds.RescaleSlope = "nan"
        ds.save_as(poisoned)
    # Files refused at indexing; those refused when rendered share one series and z here,
    # so series assembly drops them first (their render-time reasons are tested above).
    hostile = [(kind, name) for kind, name in ENTRIES
               if kind == "xml" and CORPUS[kind][name].reason or kind not in (
                   "valid", "xml", "image_files") and refused_at_indexing(corpus[name])]
    for kind, name in hostile:
        shutil.copy(corpus[name], source / f"{kind}_{name}")
    code = prepare_lung_dataset.main([
        "--source", "local", "--input", str(source), "--work-dir", str(tmp_path),
        "--output", str(tmp_path / "out"), "--view", "patch", "--image-size", "32",
        "--target-count", "40", "--workers", "2", "-q"])
    assert code == 0
    with open(tmp_path / "out" / "skipped.csv", newline="") as handle:
        reasons = {row["file"]: row["reason"] for row in csv.DictReader(handle)}
    for kind, name in hostile:
        assert reasons[f"{kind}_{name}"] == CORPUS[kind][name].reason
    assert reasons[poisoned.relative_to(source).as_posix()] == (
        "invalid (0028,1053) Rescale Slope: nan" + SLOPE)
    with open(tmp_path / "out" / "manifest.csv", newline="") as handle:
        sources = {row["source_file"] for row in csv.DictReader(handle)}
    assert poisoned.relative_to(source).as_posix() not in sources
