"""Decoding compressed pixel data, bounded before any codec runs.

Every transfer syntax pydicom can decode is read: RLE Lossless by the bounded decoder here;
JPEG (baseline, extended, lossless processes 14 and 14 SV1), JPEG-LS, JPEG 2000 and HTJ2K by
pydicom's decoders and the plugins lungct depends on (``python-gdcm``, ``pyjpegls``,
``pylibjpeg`` + ``pylibjpeg-openjpeg``). Deflated Explicit VR Little Endian is not pixel
compression: :func:`lungct.prepare.dicom_files.read_dataset` inflates it within a cap.

Before a codec runs, three checks bound its work:

1. the compressed bytes are at most :data:`MAX_COMPRESSED_TO_DECODED` x the decoded size the
   header implies (+ :data:`COMPRESSED_SLACK_BYTES`), and that size is within
   :data:`lungct.prepare.dicom.MAX_SLICE_BYTES` (:func:`lungct.prepare.dicom.pixel_format`);
2. the codestream's own header (JPEG / JPEG-LS SOFn, JPEG 2000 / HTJ2K SIZ) declares the
   same (0028,0010) Rows x (0028,0011) Columns as the DICOM header;
3. it declares one component of at most (0028,0100) Bits Allocated bits, so what the codec
   allocates is at most the decoded size already capped.

Only the first frame is decoded. A slice that cannot be decoded is refused with a reason
naming its transfer syntax (name and UID). This module imports nothing from lungct:
:mod:`lungct.prepare.dicom` (indexing: decoder installed? lossy?) and
:mod:`lungct.prepare.render` (decoding) build on it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import UID, RLELossless

__all__ = [
    "PixelFormat", "DecodeRefusedError", "MAX_COMPRESSED_TO_DECODED", "COMPRESSED_SLACK_BYTES",
    "PREFERRED_PLUGINS", "LOSSY_SYNTAXES", "syntax_label", "decoder_available", "is_lossy",
    "check_pixel_data", "codestream_info", "codestream_size", "decode_compressed",
]

# Compressed pixel data may hold at most 2 x its decoded bytes + 64 KiB: lossless codecs grow
# incompressible data by under 1 %, so anything longer only makes work.
MAX_COMPRESSED_TO_DECODED = 2
COMPRESSED_SLACK_BYTES = 65536  # bytes
#: pydicom's decoding plugins, most preferred first; the first installed one that supports a
#: syntax decodes it. pydicom's own order puts GDCM first; on one core per worker (prepare's
#: pool) the dedicated codecs are as fast or faster on a 512 x 512 CT slice (JPEG-LS: pyjpegls
#: 190 vs GDCM 140 slices/s; JPEG 2000: pylibjpeg 36 vs 34; benchmarks/bench_decode.py), and
#: GDCM's JPEG 2000 threads would compete with the other workers.
PREFERRED_PLUGINS = ("pyjpegls", "pylibjpeg", "gdcm", "pillow")
_SOF_MARKERS = (frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}) | {0xF7}  # JPEG, JPEG-LS
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: how a JPEG 2000 codestream starts
_CODESTREAM_SEARCH_BYTES = 4096  # bytes; where SIZ may sit (after a JP2 header)
#: Transfer syntaxes whose codec may discard information: JPEG Baseline, JPEG Extended, JPEG-LS
#: Near-Lossless, JPEG 2000, JPEG 2000 Part 2 Multi-component, HTJ2K. A file in one is lossy
#: unless (0028,2110) Lossy Image Compression says "00".
LOSSY_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 81, 91, 93, 203))


class DecodeRefusedError(Exception):
    """Pixel data this module will not or cannot decode; ``str(error)`` is the reason.

    :func:`lungct.prepare.dicom_files.refuse_unreadable` turns it into UnusableFileError with
    the same reason (this module imports nothing from lungct, so dicom_files.py can use it).
    """


class PixelFormat(NamedTuple):
    """The checked numbers that decide how stored values are decoded and mapped to HU
    (made by :func:`lungct.prepare.dicom.pixel_format`).

    Defaults of absent attributes: (0028,0101) Bits Stored = Bits Allocated, (0028,0103)
    Pixel Representation 0 (unsigned), (0028,1053) Rescale Slope 1, (0028,1052) Rescale
    Intercept 0, no padding.
    """

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    padding: tuple[int, int] | None  # lowest and highest padding stored value
    n_bytes: int  # decoded: Rows x Columns x Bits Allocated / 8


def syntax_label(syntax: UID) -> str:
    """``"JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)"``: name and UID."""
    return f"{syntax.name} ({syntax})"


def decoder_available(syntax: UID) -> bool:
    """Whether a decoder for ``syntax`` is installed (RLE: lungct's own)."""
    if syntax == RLELossless:
        return True
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # e.g. MPEG-2, MPEG-4, HEVC: no decoder in pydicom
        return False


def is_lossy(ds: pydicom.Dataset, syntax: UID) -> bool:
    """(0028,2110) Lossy Image Compression "01", or a :data:`LOSSY_SYNTAXES` member unless
    that attribute says "00". An unreadable value counts as lossy: the tolerant padding rule
    and the manifest's flag are the safe side when the header cannot say."""
    try:
        flag = str(ds.get("LossyImageCompression") or "").strip()
    except Exception:  # noqa: BLE001 - pydicom raises many types converting a bad value
        return True
    return flag == "01" or (flag != "00" and syntax in LOSSY_SYNTAXES)


def check_pixel_data(ds: pydicom.Dataset, path: Path, pixels: PixelFormat,
                     syntax: UID) -> int | None:
    """At indexing (pixel data deferred): refuse pixel data that is short, truncated, or in a
    compressed transfer ``syntax`` no installed decoder reads.

    Returns:
        The file offset (bytes) of the (7FE0,0010) Pixel Data value; None for a deflated data
        set, whose offsets count in the inflated stream.
    """
    raw = ds.get_item("PixelData", keep_deferred=True)
    tell = None if syntax.is_deflated else getattr(raw, "value_tell", None)
    if syntax.is_compressed:
        if not decoder_available(syntax):
            raise DecodeRefusedError(f"compressed transfer syntax {syntax_label(syntax)} with "
                                    "no installed decoder")
        return tell
    length = getattr(raw, "length", None)
    length = len(raw.value or b"") if length is None else length
    if length < pixels.n_bytes:
        raise DecodeRefusedError(
            f"pixel data of {length} bytes, fewer than the {pixels.n_bytes} of (0028,0010) "
            "Rows x (0028,0011) Columns x (0028,0100) Bits Allocated / 8")
    if tell is not None and tell + pixels.n_bytes > os.path.getsize(path):
        raise DecodeRefusedError("truncated pixel data")
    return tell


def codestream_info(frame: bytes) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, bits) a JPEG / JPEG-LS SOFn or JPEG 2000 SIZ segment
    declares (bits: the first component's precision); None when not found."""
    number = lambda at: int.from_bytes(frame[at : at + 2], "big")  # noqa: E731
    if frame[:2] == b"\xff\xd8":  # JPEG: SOI, then marker segments up to SOFn (Lf P Y X Nf)
        position = 2
        while position + 10 <= len(frame) and frame[position] == 0xFF:
            marker = frame[position + 1]
            if marker in _SOF_MARKERS:
                return (number(position + 5), number(position + 7), frame[position + 9],
                        frame[position + 4])
            position += 1 if marker == 0xFF else 2 + number(position + 2)
        return None
    at = frame.find(_J2K_SIZ, 0, _CODESTREAM_SEARCH_BYTES)
    if at < 0 or len(frame) < at + 43:
        return None
    # SIZ: Lsiz Rsiz (2 bytes each), Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz (4 bytes
    # each), Csiz (2 bytes), then Ssiz (sign bit + precision - 1) of the first component.
    x, y, x0, y0 = (int.from_bytes(frame[at + i : at + i + 4], "big") for i in (8, 12, 16, 20))
    return y - y0, x - x0, number(at + 40), (frame[at + 42] & 0x7F) + 1


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG SOFn or JPEG 2000 SIZ segment declares; None when not found."""
    info = codestream_info(frame)
    return info[:2] if info else None


def _checked_codestream(frame: bytes, syntax: UID, pixels: PixelFormat) -> None:
    """Refuse a codestream whose declared image is not the header's (see the module doc)."""
    info = codestream_info(frame)
    if info is None or info[:2] != (pixels.rows, pixels.columns):
        raise DecodeRefusedError(
            f"{syntax.name} codestream image size {info and info[:2] or 'not found'} differs "
            f"from (0028,0010) Rows x (0028,0011) Columns ({pixels.rows}, {pixels.columns})")
    if info[2] != 1 or not 1 <= info[3] <= pixels.bits_allocated:
        raise DecodeRefusedError(
            f"{syntax.name} codestream declares {info[2]} components of {info[3]} bits; "
            f"allowed: 1 of at most (0028,0100) Bits Allocated {pixels.bits_allocated}")


def decode_compressed(ds: pydicom.Dataset, pixels: PixelFormat, syntax: UID) -> np.ndarray:
    """Stored values of the first frame of compressed pixel data, after the checks above.

    Raises:
        DecodeRefusedError: a check fails, no decoder is installed, or the codec fails.
    """
    data, limit = ds.PixelData, MAX_COMPRESSED_TO_DECODED * pixels.n_bytes
    if len(data) > limit + COMPRESSED_SLACK_BYTES:
        raise DecodeRefusedError(
            f"compressed pixel data of {len(data)} bytes ({syntax.name}) is over "
            f"{MAX_COMPRESSED_TO_DECODED} x the {pixels.n_bytes} bytes it decodes to")
    if not decoder_available(syntax):
        raise DecodeRefusedError(f"compressed transfer syntax {syntax_label(syntax)} with no "
                                "installed decoder")
    try:
        frame = get_frame(data, 0, number_of_frames=1)
        if syntax == RLELossless:
            return _decode_rle(frame, pixels)
        _checked_codestream(frame, syntax, pixels)
        decoder = get_decoder(syntax)
        plugin = next(p for p in PREFERRED_PLUGINS if p in decoder.available_plugins)
        return decoder.as_array(ds, index=0, decoding_plugin=plugin)[0]
    except DecodeRefusedError:
        raise
    except Exception as error:  # codecs raise many types on corrupt data
        raise DecodeRefusedError(f"{syntax_label(syntax)} pixel data could not be decoded "
                                f"({type(error).__name__})") from None


def _rle_segment(data: bytes, size: int) -> bytes:
    """One PackBits segment (PS3.5 G.3.1) decoded to ``size`` bytes and never further."""
    out, position = bytearray(), 0
    while len(out) < size and position < len(data):
        header = data[position]
        if header < 128:  # copy the next header + 1 bytes
            out += data[position + 1 : position + header + 2]
            position += header + 2
        elif header > 128:  # repeat the next byte 257 - header times
            out += data[position + 1 : position + 2] * (257 - header)
            position += 2
        else:
            position += 1
    if len(out) < size:
        raise DecodeRefusedError(f"RLE segment decodes to {len(out)} of {size} bytes")
    return bytes(out[:size])


def _decode_rle(frame: bytes, pixels: PixelFormat) -> np.ndarray:
    """RLE Lossless (PS3.5 Annex G): one segment per byte of a sample, most significant first.

    Equal to pydicom's RLE decoder on valid data (no sign extension of unused high bits), but
    each segment stops at the bytes the header implies, so a segment of runs repeating 128
    bytes cannot expand 64-fold, and the loop never outlasts the (capped) compressed length.
    """
    n_pixels, n_segments = pixels.rows * pixels.columns, pixels.bits_allocated // 8
    header = [int.from_bytes(frame[i : i + 4], "little") for i in range(0, 64, 4)]
    offsets = [*header[1 : 1 + n_segments], len(frame)]
    if len(frame) < 64 or header[0] != n_segments or any(
            not 64 <= start <= end for start, end in zip(offsets, offsets[1:], strict=False)):
        raise DecodeRefusedError(f"RLE header does not describe {n_segments} segments of "
                                f"{n_pixels} bytes")
    planes = [np.frombuffer(_rle_segment(frame[start:end], n_pixels), dtype=np.uint8)
              for start, end in zip(offsets, offsets[1:], strict=False)]
    dtype = f"<{'i' if pixels.signed else 'u'}{n_segments}"
    little_endian = np.stack(planes[::-1], axis=-1).reshape(-1)
    return little_endian.view(dtype).reshape(pixels.rows, pixels.columns)
