"""2.5D context: the HU planes at z - D and z + D of a slice, interpolated along z.

A sample with context ``D`` mm (prepare ``--context-mm``) shows three planes of its series:
z - D, z and z + D (RGB, ``lungct.contract.CHANNEL_ORDERS[3]``). A plane between two slices
is their linear interpolation in Hounsfield units, before any windowing, so the planes mean
the same distance whatever the slice spacing: neighbouring planes as the three channels of a
2D network's input, interpolated to fixed mm offsets, as in Yan, Bagheri and Summers, "3D
context enhanced region-based convolutional neural network for end-to-end lesion
detection", MICCAI 2018. A plane outside the series, or between two slices further apart
than the series' gap rule allows (:func:`lungct.prepare.series.max_step_mm`), cannot be
drawn: the sample is skipped with the reason (:func:`context_reason`, asked before the split
and balancing). The slices of a stack share one size
(:func:`lungct.prepare.series.assemble_series` drops the others).

Neighbour slices are decoded by the caller's reader (``lungct.prepare.render.read_hu``, the
same bounded decoding as the sample's own slice), through a small :class:`HuCache` so that
samples of one series rendered together decode each slice once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.series import Z_TOLERANCE_MM, SliceStack

__all__ = ["HU_CACHE_SLICES", "HuCache", "HuReader", "context_hu", "context_reason"]

#: Decoded slices kept by one :class:`HuCache`: a sample needs at most five (its own and two
#: bracketing slices on each side), and the next sample of the series shares most of them.
#: At the 512 x 512 px of most CT, 8 slices are 8 MB of float32.
HU_CACHE_SLICES = 8

#: Decodes one slice: HU (float32) and whether it is MONOCHROME1.
HuReader = Callable[[Path], tuple[np.ndarray, bool]]


class HuCache:
    """The last :data:`HU_CACHE_SLICES` slices decoded by ``read``, by path (least recently
    used dropped first). Cached arrays are read-only: a caller cannot change another's pixels.
    A slice that cannot be decoded is not cached (its error is raised again next time)."""

    def __init__(self, read: HuReader, capacity: int = HU_CACHE_SLICES) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 slice, got {capacity}")
        self._read = read
        self._capacity = capacity
        self._slices: OrderedDict[Path, tuple[np.ndarray, bool]] = OrderedDict()

    def read(self, path: Path) -> tuple[np.ndarray, bool]:
        """The slice at ``path``, decoded once while it stays in the cache."""
        if path in self._slices:
            self._slices.move_to_end(path)
            return self._slices[path]
        hu, monochrome1 = self._read(path)
        hu.flags.writeable = False
        self._slices[path] = (hu, monochrome1)
        if len(self._slices) > self._capacity:
            self._slices.popitem(last=False)
        return hu, monochrome1


def _offset_text(offset_mm: float) -> str:
    """``z - 2.5 mm`` for an offset of -2.5 mm."""
    return f"z {'-' if offset_mm < 0 else '+'} {abs(offset_mm):g} mm"


def context_reason(stack: SliceStack, z_mm: float, context_mm: float) -> str | None:
    """Why the planes at ``z_mm`` - D and + D of ``stack`` cannot be drawn, or None.

    Geometry only (no slice is decoded): prepare asks it when candidates are made, before the
    split and balancing, so a class never loses samples near a series end or a gap after
    balancing chose them. The rule is :func:`context_hu`'s own (:func:`_bracket`).
    """
    try:
        for offset_mm in (-context_mm, context_mm):
            _bracket(stack, z_mm + offset_mm, offset_mm)
    except UnusableFileError as error:
        return str(error)
    return None


def _bracket(stack: SliceStack, target: float, offset_mm: float) -> tuple[int, int, float]:
    """The slices around ``target`` and the weight of the upper one: ``(k, k, 0.0)`` for a
    slice within :data:`~lungct.prepare.series.Z_TOLERANCE_MM`, else ``(before, after, w)``.

    Raises:
        UnusableFileError: ``target`` is outside the series or across a gap in it.
    """
    z = np.asarray(stack.z_mm, dtype=np.float64)
    nearest = int(np.argmin(np.abs(z - target)))
    if abs(z[nearest] - target) <= Z_TOLERANCE_MM:
        return nearest, nearest, 0.0
    after = int(np.searchsorted(z, target))
    if after == 0 or after == len(z):
        raise UnusableFileError(f"2.5D context {_offset_text(offset_mm)} outside the series")
    before = after - 1
    if z[after] - z[before] > stack.max_step_mm:
        raise UnusableFileError(f"2.5D context {_offset_text(offset_mm)} across a gap in the "
                                "series")
    return before, after, float((target - z[before]) / (z[after] - z[before]))


def context_hu(stack: SliceStack, z_mm: float, offset_mm: float, read: HuReader) -> np.ndarray:
    """The HU plane at ``z_mm + offset_mm`` of a series: the one interpolation rule of 2.5D.

    A target within :data:`~lungct.prepare.series.Z_TOLERANCE_MM` of a slice is that slice,
    unchanged. Otherwise, with ``z_a < target < z_b`` the bracketing slices and
    ``w = (target - z_a) / (z_b - z_a)``, the plane is ``(1 - w) * HU(z_a) + w * HU(z_b)``
    (float32), computed before windowing.

    Args:
        stack: the series' slices along z (:attr:`lungct.prepare.series.Series.stack`).
        z_mm: the sample's z (mm).
        offset_mm: the signed context offset (-D or +D, mm).
        read: decodes one slice to HU (e.g. :meth:`HuCache.read`).

    Raises:
        UnusableFileError: ``2.5D context z - D mm outside the series`` or ``... across a gap
            in the series`` (the bracketing slices are further apart than
            ``stack.max_step_mm``), or a decoding refusal of a neighbour slice.
    """
    before, after, weight = _bracket(stack, z_mm + offset_mm, offset_mm)
    if before == after:
        return read(stack.paths[before])[0]
    below, above = read(stack.paths[before])[0], read(stack.paths[after])[0]
    return below * np.float32(1.0 - weight) + above * np.float32(weight)
