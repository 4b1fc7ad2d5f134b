"""Turn one candidate into the PNG image (and ROI mask) the dataset stores.

Order: decode -> HU (padding to air) -> with 2.5D context, the HU planes at z - D and z + D
(lungct.prepare.context) -> crop (patch view, every plane at the same place) or pad to square
(slice view) in HU -> area resize in HU -> window to uint8 -> invert for MONOCHROME1. Resizing
before windowing averages Hounsfield units, not clipped grey levels.

Decoding is bounded: it starts only after :func:`lungct.prepare.dicom.pixel_format` has
checked the header's numbers and capped the decoded size, never decodes more than one frame
of that size, and refuses a patch wider than :data:`MAX_PATCH_SIDE_PX`; an image file (PNG,
JPEG, BMP, TIFF) is decoded only once its header's size is within the same caps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom

from lungct.prepare.candidates import IMAGE_SUFFIXES, Candidate
from lungct.prepare.context import HuCache, context_hu
from lungct.prepare.decoders import (
    DecodeRefusedError,
    PixelFormat,
    codestream_size,
    decode_compressed,
    is_lossy,
    syntax_label,
)
from lungct.prepare.dicom import AIR_HU, MAX_COLUMNS, MAX_ROWS, pixel_format
from lungct.prepare.dicom_files import (
    MAX_FILE_BYTES,
    UnusableFileError,
    read_dataset,
    refuse_unreadable,
    transfer_syntax,
)

__all__ = [
    "MAX_PATCH_SIDE_PX", "NO_SERIES_REASON", "RenderSettings",
    "Rendered", "render", "read_hu", "apply_window", "square_and_resize",
    "lung_field", "lung_tissue_centre", "LOSSY_AIR_BELOW_HU", "NO_LUNG_REASON",
]

_LUNG_MAX_HU = -500.0
_BODY_MIN_HU = -500.0
#: HU; in lossy data every pixel below this is padding (or codec ringing next to it) -> air.
LOSSY_AIR_BELOW_HU = -1500.0
NO_LUNG_REASON = "no lung tissue for a no_finding patch centre"
NO_SERIES_REASON = "2.5D context needs the slice's CT series (not known for this file)"
#: px; a patch (--patch-mm / pixel spacing) wider than the largest slice (4096 px, 64 MB of
#: float32 HU) is refused rather than allocated.
MAX_PATCH_SIDE_PX = 4096


@dataclass(frozen=True)
class RenderSettings:
    """How every sample is drawn."""

    image_size_px: int
    window_center_hu: float
    window_width_hu: float
    view: str  # "slice" | "patch"
    patch_mm: float
    context_mm: float = 0.0  # 2.5D context D: 0 = one plane, else z - D, z, z + D as RGB


@dataclass(frozen=True)
class Rendered:
    """One drawn sample."""

    image: np.ndarray  # uint8 (S, S), or (S, S, 3) RGB = z - D, z, z + D with 2.5D context
    mask: np.ndarray | None  # uint8 0/255 (S, S), of the plane at z
    mm_per_px: float | None
    #: Patient x, y (mm) of the patch centre (:func:`patch_centre_px`); None in the slice
    #: view and without a DICOM header.
    patch_centre_xy_mm: tuple[float, float] | None = None


def _resize_mask(mask: np.ndarray, size_px: int) -> np.ndarray:
    """Area-resize a boolean mask and keep pixels at least half covered (0/255)."""
    coverage = cv2.resize(mask.astype(np.float32), (size_px, size_px),
                          interpolation=cv2.INTER_AREA if mask.shape[0] >= size_px
                          else cv2.INTER_LINEAR)
    result = (coverage >= 0.5).astype(np.uint8) * 255
    if mask.any() and not result.any():  # a nodule smaller than one output pixel
        row, col = np.unravel_index(int(np.argmax(coverage)), coverage.shape)
        result[row, col] = 255
    return result


def lung_field(hu: np.ndarray) -> np.ndarray:
    """The lung field of one HU slice (bool, the slice's shape): pixels below -500 HU inside
    the body, the body being the largest 4-connected component above -500 HU with its holes
    filled (air outside the patient is -1000 HU, aerated lung about -850 HU). All False when
    no body is found. Prepare's ``no_finding`` patch centres and predict's sliding window use
    this one rule."""
    body = (hu > _BODY_MIN_HU).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=4)
    if count < 2:
        return np.zeros(hu.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours((components == largest).astype(np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(hu.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return (filled > 0) & (hu < _LUNG_MAX_HU)


def lung_tissue_centre(hu: np.ndarray, patch_px: int, seed_text: str) -> tuple[float, float]:
    """A reproducible patch centre inside lung parenchyma for a ``no_finding`` patch.

    Lung = :func:`lung_field`; the centre is drawn, seeded by ``seed_text``, among lung
    pixels whose surrounding patch is mostly lung or body.

    Raises:
        UnusableFileError: :data:`NO_LUNG_REASON` when the slice has no lung pixel (a patch
            there would show mediastinum or air, all alike): the sample is skipped.
    """
    lung = lung_field(hu)
    rows, cols = hu.shape
    half = patch_px // 2
    inner = np.zeros_like(lung)
    inner[half : rows - half, half : cols - half] = True
    ys, xs = np.nonzero(lung & inner if (lung & inner).any() else lung)
    if len(ys):
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
        pick = int(np.random.default_rng(seed).integers(len(ys)))
        return float(xs[pick]), float(ys[pick])
    raise UnusableFileError(NO_LUNG_REASON)


def _patch_origin(centre_xy: tuple[float, float], side_px: int) -> tuple[int, int]:
    """Column and row (left, top) of the first pixel of a ``side_px`` patch around
    ``centre_xy`` (x = column, y = row, px): the one rounding rule of the patch view."""
    return int(round(centre_xy[0] - side_px / 2)), int(round(centre_xy[1] - side_px / 2))


def patch_centre_px(centre_xy: tuple[float, float], side_px: int) -> tuple[float, float]:
    """The centre of the patch drawn around ``centre_xy``, as (row, column) px.

    It is the patch's first pixel + ``side_px / 2`` in both directions: the output pixel
    (S/2, S/2) for an even side, half a pixel past the middle pixel for an odd one. Taken as
    the centre again, it gives back the same patch exactly: its distance to the rounding
    boundaries of :func:`_patch_origin` is half a pixel, so an error of a few micrometres
    (the manifest's 3 decimals in mm) cannot move the crop.
    """
    left, top = _patch_origin(centre_xy, side_px)
    return top + side_px / 2, left + side_px / 2


def _crop(image: np.ndarray, origin: tuple[int, int], side_px: int, fill: float) -> np.ndarray:
    """The ``side_px`` square of ``image`` whose first pixel is ``origin`` (left, top), padded
    with ``fill`` where it leaves the image."""
    left, top = origin
    out = np.full((side_px, side_px), fill, dtype=image.dtype)
    rows, cols = image.shape
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + side_px, rows), min(left + side_px, cols)
    if src_bottom > src_top and src_right > src_left:
        out[src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
            src_top:src_bottom, src_left:src_right
        ]
    return out


@refuse_unreadable
def read_hu(path: Path) -> tuple[np.ndarray, bool]:
    """Decode one slice to Hounsfield units (float32), padding pixels set to air.

    HU = stored value x (0028,1053) Rescale Slope + (0028,1052) Rescale Intercept (1 and 0
    when absent). Pixels equal to (0028,0120) Pixel Padding Value (or within the range up to
    (0028,0121) Pixel Padding Range Limit) lie outside the scan and become -1000 HU. Lossy
    data (:func:`lungct.prepare.decoders.is_lossy`: (0028,2110) Lossy Image Compression "01" or
    a lossy transfer syntax) no longer holds the padding value exactly (lossy JPEG 2000 moves
    99 % of padding pixels off it, by up to 2000 units), so there every pixel below
    :data:`LOSSY_AIR_BELOW_HU` (-1500 HU) becomes -1000 HU as well: no tissue lies below air
    (-1000 HU), so such a pixel is padding or codec ringing at the padding's edge. Padding
    whose HU is above -1500 is still found only by exact equality. The numbers are checked
    (:func:`lungct.prepare.dicom.pixel_format`) before any pixel is decoded.

    Returns:
        The HU image and whether (0028,0004) Photometric Interpretation is MONOCHROME1
        (display inverted).

    Raises:
        UnusableFileError: when a number is invalid or the pixel data cannot be decoded.
    """
    ds = read_dataset(path)
    if "PixelData" not in ds:
        raise UnusableFileError("no pixel data (7FE0,0010)")
    pixels = pixel_format(ds)
    try:
        stored = _stored_pixels(ds, pixels)
    except (UnusableFileError, DecodeRefusedError):  # refuse_unreadable keeps the reason
        raise
    except Exception as error:  # decoders raise many types on corrupt data
        reason = (f"{syntax_label(transfer_syntax(ds))} pixel data could not be decoded "
                  f"({type(error).__name__})")
        raise UnusableFileError(reason) from None
    if stored.shape != (pixels.rows, pixels.columns):
        raise UnusableFileError(f"not a single-frame grayscale image (array shape {stored.shape})")
    hu = stored.astype(np.float32)
    if pixels.slope != 1:
        hu *= np.float32(pixels.slope)
    hu += np.float32(pixels.intercept)
    if pixels.padding is not None:
        low, high = pixels.padding
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    if is_lossy(ds, transfer_syntax(ds)):
        hu[hu < LOSSY_AIR_BELOW_HU] = AIR_HU
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    return hu, monochrome1


def _stored_pixels(ds: pydicom.Dataset, pixels: PixelFormat) -> np.ndarray:
    """Stored values of a single-frame image, never decoding more than the header implies.

    Uncompressed little-endian 16-bit data whose (0028,0101) Bits Stored fills the word, or
    is unsigned, is viewed straight from the buffer (the common CT case, about 2x faster).
    Compressed data goes to :func:`lungct.prepare.decoders.decode_compressed` (bounded before
    the codec runs).
    """
    syntax = transfer_syntax(ds)
    if syntax.is_compressed:
        return decode_compressed(ds, pixels, syntax)
    if len(ds.PixelData) < pixels.n_bytes:
        raise UnusableFileError("truncated pixel data")
    if not (syntax.is_little_endian and pixels.bits_allocated == 16
            and (pixels.bits_stored == 16 or not pixels.signed)):
        return ds.pixel_array
    dtype = "<i2" if pixels.signed else "<u2"
    count = pixels.rows * pixels.columns
    return np.frombuffer(ds.PixelData, dtype=dtype, count=count).reshape(pixels.rows,
                                                                         pixels.columns)


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


def render(candidate: Candidate, settings: RenderSettings,
           cache: HuCache | None = None) -> Rendered:
    """Draw one candidate.

    With ``settings.context_mm`` D > 0 the image has three channels, R, G, B = the HU planes
    at z - D, z and z + D (:func:`lungct.prepare.context.context_hu`), each cropped at the
    same place, resized and windowed as the single plane is, and inverted when the sample's
    own slice is MONOCHROME1; the mask is that of the plane at z.

    Args:
        candidate: the sample; for 2.5D context it needs its ``stack``.
        settings: how every sample is drawn.
        cache: decoded slices shared by the samples of one series drawn in a row; a fresh
            one for this sample when None.

    Raises:
        lungct.prepare.dicom_files.UnusableFileError: its pixels (or a context plane's) cannot be
            read, its patch would be wider than :data:`MAX_PATCH_SIDE_PX`, a patch without a
            centre (a ``no_finding`` sample) finds no lung tissue (:data:`NO_LUNG_REASON`),
            a context plane falls outside the series or across a gap in it, or the candidate
            has no series for its context (:data:`NO_SERIES_REASON`).
    """
    if settings.context_mm and (candidate.stack is None or candidate.slice_z_mm is None):
        raise UnusableFileError(NO_SERIES_REASON)
    if candidate.source_path.suffix.lower() in IMAGE_SUFFIXES:
        return _render_image_file(candidate, settings)
    spacing_mm = candidate.pixel_spacing_mm
    patch = settings.view == "patch" and spacing_mm
    side_px = max(2, int(round(settings.patch_mm / spacing_mm))) if patch else 0
    if side_px > MAX_PATCH_SIDE_PX:
        raise UnusableFileError(
            f"patch of {side_px} px (--patch-mm {settings.patch_mm:g} / pixel spacing "
            f"{spacing_mm:g} mm) exceeds {MAX_PATCH_SIDE_PX} px")
    cache = cache if cache is not None else HuCache(read_hu)
    hu, monochrome1 = cache.read(candidate.source_path)
    planes = _planes(candidate, settings.context_mm, hu, cache)
    mask = candidate.mask.full(hu.shape) if candidate.mask is not None else None
    centre_mm = None
    if patch:
        centre = candidate.centre_xy_px or lung_tissue_centre(
            hu, side_px, f"{candidate.series_uid}:{candidate.slice_z_mm}"
        )
        origin = _patch_origin(centre, side_px)
        planes = [_crop(plane, origin, side_px, AIR_HU) for plane in planes]
        mask = _crop(mask, origin, side_px, False) if mask is not None else None
        if candidate.header is not None:
            centre_mm = candidate.header.patient_xy_mm(*patch_centre_px(centre, side_px))
    channels = []
    for plane in planes:
        resized, scale = square_and_resize(plane, settings.image_size_px, AIR_HU)
        image = apply_window(resized, settings.window_center_hu, settings.window_width_hu)
        channels.append(255 - image if monochrome1 else image)
    if mask is not None:
        side = max(mask.shape)
        square = np.zeros((side, side), dtype=bool)
        top, left = (side - mask.shape[0]) // 2, (side - mask.shape[1]) // 2
        square[top : top + mask.shape[0], left : left + mask.shape[1]] = mask
        mask = _resize_mask(square, settings.image_size_px)
    mm_per_px = spacing_mm * scale if spacing_mm else None
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    return Rendered(image, mask, mm_per_px, centre_mm)


def _planes(candidate: Candidate, context_mm: float, hu: np.ndarray,
            cache: HuCache) -> list[np.ndarray]:
    """The HU planes a sample shows: its slice, or with context the planes at z - D, z, z + D
    (``lungct.contract.CHANNEL_ORDERS``)."""
    if not context_mm:
        return [hu]
    below, above = (context_hu(candidate.stack, candidate.slice_z_mm, offset, cache.read)
                    for offset in (-context_mm, context_mm))
    if below.shape != hu.shape or above.shape != hu.shape:
        raise UnusableFileError(f"2.5D context slices differ in size from the sample's slice "
                                f"{hu.shape}")
    return [below, hu, above]


def _image_file_shape(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) a PNG, JPEG, BMP or TIFF header declares; None when not found."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):  # IHDR: width, height
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data.startswith(b"BM"):  # BITMAPINFOHEADER: width, height (negative: top-down)
        return (abs(int.from_bytes(data[22:26], "little", signed=True)),
                int.from_bytes(data[18:22], "little", signed=True))
    if data[:4] in (b"II*\x00", b"MM\x00*"):  # first IFD: ImageWidth 256, ImageLength 257
        order = "little" if data[:2] == b"II" else "big"
        ifd = int.from_bytes(data[4:8], order)
        sizes = {}
        for entry in range(ifd + 2, ifd + 2 + 12 * int.from_bytes(data[ifd : ifd + 2], order), 12):
            tag, kind = (int.from_bytes(data[entry + i : entry + i + 2], order) for i in (0, 2))
            width = 2 if kind == 3 else 4  # SHORT or LONG
            sizes[tag] = int.from_bytes(data[entry + 8 : entry + 8 + width], order)
        return (sizes[257], sizes[256]) if {256, 257} <= sizes.keys() else None
    return codestream_size(data)  # JPEG: SOFn


def _render_image_file(candidate: Candidate, settings: RenderSettings) -> Rendered:
    """An already-windowed image file: grayscale, padded to square with black, resized.

    The header's image size is checked before decoding: a file over MAX_FILE_BYTES, or
    larger than MAX_ROWS x MAX_COLUMNS pixels, is refused unread.
    """
    path = candidate.source_path
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UnusableFileError(f"file of {path.stat().st_size} bytes exceeds {MAX_FILE_BYTES}")
    data = path.read_bytes()
    shape = _image_file_shape(data)
    if shape is not None and not (0 < shape[0] <= MAX_ROWS and 0 < shape[1] <= MAX_COLUMNS):
        raise UnusableFileError(f"image file of {shape[0]} x {shape[1]} px; allowed: "
                                f"1-{MAX_ROWS} x 1-{MAX_COLUMNS} px")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if shape else None
    if image is None:
        raise UnusableFileError("image file could not be decoded")
    resized, _ = square_and_resize(image, settings.image_size_px, 0)
    return Rendered(resized, None, None)
