"""CT slices -> series: grouped by (0020,000E) Series Instance UID, sorted by z, one per z.

Ordering rule (docs/lidc_format.md): of two slices at the same z the lower (0020,0013)
Instance Number is kept; a slice whose size differs from its series' first slice is dropped.
A step in z above ``Z_GAP_FACTOR`` times the series' median step counts as a missing slice.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungct.prepare.dicom import SliceHeader

__all__ = ["Z_GAP_FACTOR", "Series", "assemble_series"]

LOG = logging.getLogger(__name__)

Z_GAP_FACTOR = 1.5  # a z step above 1.5 x the series' median step is a missing slice


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
        steps = np.diff(self.z_mm)
        if len(steps) < 2:
            return 0
        return int(np.count_nonzero(steps > Z_GAP_FACTOR * float(np.median(steps))))

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
        if lossy := sum(header.lossy for header in kept):
            LOG.warning("series %s: %d of %d slices lossy-compressed; padding taken as HU "
                        "below -1500", uid, lossy, len(kept))
    return series, dropped
