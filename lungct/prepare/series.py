"""CT slices -> series: grouped by (0020,000E) Series Instance UID, sorted by z, one per z.

Ordering rule (docs/lidc_format.md): of two slices at the same z the lower (0020,0013)
Instance Number is kept; a slice whose size differs from its series' first slice is dropped.
A step in z above ``Z_GAP_FACTOR`` times the series' median step counts as a missing slice
(:func:`max_step_mm`); 2.5D context (lungct.prepare.context) does not interpolate across one.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lungct.prepare.dicom import SliceHeader

__all__ = ["Z_GAP_FACTOR", "Z_TOLERANCE_MM", "Series", "SliceStack", "assemble_series",
           "max_step_mm"]

LOG = logging.getLogger(__name__)

Z_GAP_FACTOR = 1.5  # a z step above 1.5 x the series' median step is a missing slice
#: mm; two slices closer in z than this are at the same position (the second is a duplicate).
Z_TOLERANCE_MM = 1e-3


def max_step_mm(z_mm: Sequence[float]) -> float:
    """The largest step between neighbouring slices (ascending ``z_mm``) that is no gap.

    :data:`Z_GAP_FACTOR` x the median step; infinite for fewer than two slices (no step).
    """
    steps = np.diff(np.asarray(z_mm, dtype=np.float64))
    return Z_GAP_FACTOR * float(np.median(steps)) if len(steps) else math.inf


@dataclass(frozen=True)
class SliceStack:
    """Where the slices of one series lie along z: what 2.5D context needs of the series.

    ``z_mm`` ascending (third value of (0020,0032) Image Position (Patient)), ``paths`` the
    slices' files in the same order, ``max_step_mm`` the series' gap rule
    (:func:`max_step_mm`).
    """

    z_mm: tuple[float, ...]
    paths: tuple[Path, ...]
    max_step_mm: float


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
    def z_gaps(self) -> int:
        """Steps in z above :data:`Z_GAP_FACTOR` x the median step: missing slices."""
        return int(np.count_nonzero(np.diff(self.z_mm) > max_step_mm(self.z_mm)))

    @cached_property
    def stack(self) -> SliceStack:
        """The series' z positions and files, one object shared by all its candidates."""
        return SliceStack(tuple(float(z) for z in self.z_mm),
                          tuple(s.path for s in self.slices), max_step_mm(self.z_mm))

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
            if kept and abs(header.z_mm - kept[-1].z_mm) < Z_TOLERANCE_MM:
                dropped.append(
                    (header.path, f"duplicate slice position z={header.z_mm:g} mm "
                                  f"(kept InstanceNumber {kept[-1].instance_number})")
                )
            elif (header.rows, header.columns) != (ordered[0].rows, ordered[0].columns):
                dropped.append((header.path, "slice size differs from the rest of its series"))
            else:
                kept.append(header)
        series.append(Series(uid, kept[0].patient_id, tuple(kept)))
        if lossy := sum(header.lossy for header in kept):
            LOG.warning("series %s: %d of %d slices lossy-compressed; padding taken as HU "
                        "below -1500", uid, lossy, len(kept))
    return series, dropped
