"""LIDC-IDRI XML readings -> label rule and consensus ROI masks.

The LIDC-IDRI collection (Armato et al. 2011, Med. Phys. 38:915; TCIA DOI
10.7937/K9/TCIA.2015.LO9QL9SX) ships one XML file of readings per CT series: up to four
radiologists (``readingSession``) each marked nodules >= 3 mm with outlines and nine
characteristic ratings, nodules < 3 mm with one point, and non-nodules with one point. Each
reader's nodule ids are local to that reader, so the marks of one lesion are grouped by
geometry in :mod:`lungct.prepare.nodules`; this module turns a group into a label with a
configurable :class:`LabelRule` and into a consensus ROI mask. docs/lidc_format.md describes
the elements read.

Readings are matched to CT slices by z position (mm), never by ``imageSOP_UID``: some UIDs in
the XML match no slice. The XML is untrusted input: DTD and entity declarations are refused.

Parsing lives in :mod:`lungct.prepare.lidc_xml` and reader clustering in
:mod:`lungct.prepare.nodules`; this module holds the label rule and the masks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import statistics
from collections.abc import Callable

import cv2
import numpy as np

from lungct.prepare.lidc_xml import (
    RATING_RANGES,
    Contour,
    ReaderMark,
)
from lungct.prepare.nodules import Nodule

__all__ = ["LabelRule", "consensus_mask", "nodule_slices", "far_from_marks"]

_Z_EPS_MM = 1e-6  # z positions equal within float noise
_AGGREGATES: dict[str, Callable[[list[int]], float]] = {
    "median": lambda values: float(statistics.median(values)),
    "mean": lambda values: float(statistics.fmean(values)),
    "max": lambda values: float(max(values)),
}
_OUTCOME_LABELS = {"cancer": 1, "non_cancer": 0}


# --------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """From the readers' ratings of a nodule to cancer (1) / non-cancer (0) / excluded.

    The default is the common LIDC rule: median malignancy of the readers who gave
    characteristics, >= 4 cancer, <= 2 non-cancer, in between (2.5-3.5) excluded.

    Attributes:
        rating: one of :data:`RATING_RANGES`.
        aggregate: "median", "mean" or "max" over the readers who gave that rating.
        cancer_at_least: aggregate >= this is cancer.
        non_cancer_at_most: aggregate <= this is non-cancer (< cancer_at_least).
        min_readers: fewer ratings than this excludes the nodule.
    """

    rating: str = "malignancy"
    aggregate: str = "median"
    cancer_at_least: float = 4.0
    non_cancer_at_most: float = 2.0
    min_readers: int = 1

    def __post_init__(self) -> None:
        if self.rating not in RATING_RANGES:
            raise ValueError(f"rating must be one of {sorted(RATING_RANGES)}, got {self.rating!r}")
        if self.aggregate not in _AGGREGATES:
            raise ValueError(
                f"aggregate must be one of {sorted(_AGGREGATES)}, got {self.aggregate!r}")
        low, high = RATING_RANGES[self.rating]
        for name in ("cancer_at_least", "non_cancer_at_most"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a number within {low}..{high} for "
                                 f"{self.rating}, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not self.non_cancer_at_most < self.cancer_at_least:
            raise ValueError(f"non_cancer_at_most ({self.non_cancer_at_most}) must be below "
                             f"cancer_at_least ({self.cancer_at_least})")
        if isinstance(self.min_readers, bool) \
                or not isinstance(self.min_readers, numbers.Integral) \
                or self.min_readers < 1:
            raise ValueError(f"min_readers must be an integer >= 1, got {self.min_readers!r}")
        object.__setattr__(self, "min_readers", int(self.min_readers))

    def outcome(self, nodule: Nodule) -> str:
        """The nodule's outcome under this rule.

        One of "cancer", "non_cancer", "excluded_indeterminate", "excluded_min_readers" or
        "excluded_unrated" (no reader gave the rating).

        ``min_readers`` counts the readers who gave the rating (``n_rated`` when every reader
        with characteristics rated it).
        """
        values = nodule.ratings(self.rating)
        if not values:
            return "excluded_unrated"
        if len(values) < self.min_readers:
            return "excluded_min_readers"
        score = _AGGREGATES[self.aggregate](values)
        if score >= self.cancer_at_least:
            return "cancer"
        if score <= self.non_cancer_at_most:
            return "non_cancer"
        return "excluded_indeterminate"

    def label(self, nodule: Nodule) -> int | None:
        """1 for cancer, 0 for non-cancer, None when the nodule is excluded."""
        return _OUTCOME_LABELS.get(self.outcome(nodule))

    def to_dict(self) -> dict:
        """The rule as JSON-ready values (recorded in dataset.json)."""
        return {"rating": self.rating, "aggregate": self.aggregate,
                "cancer_at_least": self.cancer_at_least,
                "non_cancer_at_most": self.non_cancer_at_most,
                "min_readers": self.min_readers}

    @classmethod
    def parse(cls, text: str) -> LabelRule:
        """The CLI form ``"cancer_at_least=4,non_cancer_at_most=2,min_readers=2"``.

        Keys left out keep their defaults; an empty string is the default rule.

        Raises:
            ValueError: naming the unknown key, the repeated key or the bad value.
        """
        converters: dict[str, Callable[[str], object]] = {
            "rating": str, "aggregate": str, "cancer_at_least": float,
            "non_cancer_at_most": float, "min_readers": int}
        values: dict[str, object] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, raw = (piece.strip() for piece in item.partition("="))
            if not sep:
                raise ValueError(f"label rule item {item!r} is not key=value")
            if key not in converters:
                raise ValueError(f"unknown label rule key {key!r}; expected one of "
                                 f"{sorted(converters)}")
            if key in values:
                raise ValueError(f"label rule key {key!r} given twice")
            try:
                values[key] = converters[key](raw)
            except ValueError:
                kind = "an integer" if converters[key] is int else "a number"
                raise ValueError(f"{key} must be {kind}, got {raw!r}") from None
            if isinstance(values[key], float) and not math.isfinite(values[key]):
                raise ValueError(f"{key} must be a finite number, got {raw!r}")
        return cls(**values)


# --------------------------------------------------------------------------- masks, slices


def _contours_near(mark: ReaderMark, z_mm: float, z_tolerance_mm: float) -> list[Contour]:
    """The mark's contours on its roi z nearest ``z_mm``, if within ``z_tolerance_mm``."""
    gaps = [abs(contour.z_mm - z_mm) for contour in mark.contours]
    nearest = min(gaps)
    if nearest > z_tolerance_mm + _Z_EPS_MM:
        return []
    return [contour for contour, gap in zip(mark.contours, gaps, strict=True)
            if gap <= nearest + _Z_EPS_MM]


def _pixel_polygon(contour: Contour) -> np.ndarray:
    points = np.clip(np.rint(contour.points_xy), -(1 << 20), 1 << 20)
    return points.astype(np.int32).reshape(-1, 1, 2)


def _reader_mask(contours: list[Contour], shape: tuple[int, int]) -> np.ndarray:
    """Inclusion outlines filled with their boundary pixels, hole interiors cut out.

    LIDC edge maps trace the outer boundary of the region; a hole's boundary pixels belong
    to the nodule, so only the inside of an exclusion outline is removed.
    """
    inside = np.zeros(shape, dtype=np.uint8)
    holes = np.zeros(shape, dtype=np.uint8)
    for contour in contours:
        polygon = _pixel_polygon(contour)
        target = inside if contour.inclusion else holes
        cv2.fillPoly(target, [polygon], 1)
        cv2.polylines(target, [polygon], True, 1 if contour.inclusion else 0)
    return (inside & (1 - holes)).astype(bool)


def consensus_mask(nodule: Nodule, z_mm: float, shape: tuple[int, int], z_tolerance_mm: float,
                   agreement: float = 0.5) -> np.ndarray:
    """Pixels inside the outlines of at least ``agreement`` of the readers outlining this slice.

    Readers count when they outlined the nodule (marks >= 3 mm; a < 3 mm mark is one point
    and makes no mask) with a roi within ``z_tolerance_mm`` of ``z_mm``; each uses its rois at
    its z nearest ``z_mm``. Pixels are (row, column); outline points are rounded to pixel
    centres.

    Args:
        nodule: from :func:`cluster_nodules`.
        z_mm: the slice's z.
        shape: (rows, columns) of the slice.
        z_tolerance_mm: how far a roi's z may be from ``z_mm`` (e.g. half the slice spacing).
        agreement: fraction of those readers, in (0, 1]; 0.5 is the usual LIDC consensus.

    Returns:
        bool (rows, columns); all False when no reader outlined the nodule there.
    """
    if len(shape) != 2 or any(int(size) != size or size < 1 for size in shape):
        raise ValueError(f"shape must be two positive integers (rows, columns), got {shape!r}")
    if not z_tolerance_mm >= 0:
        raise ValueError(f"z_tolerance_mm must be >= 0, got {z_tolerance_mm!r}")
    if not 0 < agreement <= 1:
        raise ValueError(f"agreement must be within (0, 1], got {agreement!r}")
    shape = (int(shape[0]), int(shape[1]))
    reader_masks = []
    for mark in nodule.marks:
        contours = [] if mark.is_small else _contours_near(mark, z_mm, z_tolerance_mm)
        if any(contour.inclusion for contour in contours):
            reader_masks.append(_reader_mask(contours, shape))
    if not reader_masks:
        return np.zeros(shape, dtype=bool)
    votes = np.sum(reader_masks, axis=0)
    return votes >= agreement * len(reader_masks) - 1e-9


def _validated_z(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a 1-D array of finite z values, got shape {array.shape}")
    return array


def nodule_slices(nodule: Nodule, slice_z_mm: np.ndarray, z_tolerance_mm: float) -> list[int]:
    """Indices into ``slice_z_mm`` of the slices on which some reader outlined the nodule.

    Outlines are the inclusion rois of marks >= 3 mm (the ones :func:`consensus_mask` draws),
    so a nodule marked only as < 3 mm has none.
    """
    slice_z = _validated_z(slice_z_mm, "slice_z_mm")
    if not z_tolerance_mm >= 0:
        raise ValueError(f"z_tolerance_mm must be >= 0, got {z_tolerance_mm!r}")
    outline_z = np.asarray([contour.z_mm for mark in nodule.marks if not mark.is_small
                            for contour in mark.contours if contour.inclusion])
    if outline_z.size == 0 or slice_z.size == 0:
        return []
    gaps = _nearest_gaps_mm(slice_z, outline_z)
    return np.flatnonzero(gaps <= z_tolerance_mm + _Z_EPS_MM).tolist()


def _nearest_gaps_mm(z_mm: np.ndarray, targets_mm: np.ndarray) -> np.ndarray:
    """Per value of ``z_mm``, its distance to the nearest of ``targets_mm`` (non-empty).

    Equal to ``abs(z[:, None] - targets[None, :]).min(axis=1)`` (the nearest target is a
    sorted neighbour), in O((n + m) log m) time and O(n + m) memory rather than O(n m).
    """
    targets = np.sort(targets_mm)
    index = np.searchsorted(targets, z_mm)
    below = targets[np.maximum(index - 1, 0)]
    above = targets[np.minimum(index, len(targets) - 1)]
    return np.minimum(np.abs(z_mm - below), np.abs(z_mm - above))


def far_from_marks(slice_z_mm: np.ndarray, mark_z_mm: np.ndarray, margin_mm: float
                   ) -> np.ndarray:
    """Per slice, True when it is at least ``margin_mm`` in z from every mark.

    Used to pick ``no_finding`` negatives; pass :meth:`Readings.all_mark_z_mm` so nodules of
    every size and non-nodules of every reader count. All True when there are no marks.
    Distances equal to ``margin_mm`` within 1e-6 mm (float noise) count as far.
    """
    slice_z = _validated_z(slice_z_mm, "slice_z_mm")
    mark_z = _validated_z(mark_z_mm, "mark_z_mm")
    if not (math.isfinite(margin_mm) and margin_mm >= 0):
        raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    if mark_z.size == 0:
        return np.ones(slice_z.shape, dtype=bool)
    gaps = _nearest_gaps_mm(slice_z, mark_z)
    return gaps >= margin_mm - _Z_EPS_MM
