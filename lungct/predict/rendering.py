"""Rendering one series in a worker process: its candidates -> the model's uint8 images.

Every image is drawn by :func:`lungct.prepare.render.render`, the code prepare drew the
training images with, so the same slice gives the same pixels (2.5D context included: the
candidates carry their slice header and the series' stack, as prepare's do). The candidates of
a series are drawn in z order through one :class:`lungct.prepare.context.HuCache`, as prepare
draws them, so each slice is decoded once however many patches (sliding-window positions, or
context planes) it serves. The sliding window (patch models without nodule centres) makes its
candidates here, from each slice's lung field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from lungct.predict.places import slice_candidates
from lungct.prepare.candidates import Candidate
from lungct.prepare.context import HuCache
from lungct.prepare.dicom import UnusableFileError
from lungct.prepare.render import RenderSettings, read_hu, render
from lungct.prepare.series import Series

__all__ = ["LUNG_FIELD_HU", "RenderedSeries", "SeriesJob", "render_series", "window_grid"]

#: HU; lung field = pixels inside the body below this (aerated lung, PS: air is -1000 HU).
LUNG_FIELD_HU = -400.0
_BODY_HU = -500.0


@dataclass(frozen=True)
class SeriesJob:
    """What a worker renders: a series, where to look, and how to draw."""

    series: Series
    source: str  # lungct.predict.places.PLACE_SOURCES
    candidates: tuple[Candidate, ...]
    settings: RenderSettings


@dataclass
class RenderedSeries:
    """The images of one series (uint8 (N, S, S, C)), the candidates they show, and a reason
    for every candidate that could not be drawn; ``grid`` (sliding window) maps each image to
    its (slice index, grid row, grid column) and holds the grid's shape."""

    images: np.ndarray
    candidates: list[Candidate]
    failed: dict[str, str] = field(default_factory=dict)
    grid: list[tuple[int, int, int]] = field(default_factory=list)
    grid_shape: tuple[int, int] = (0, 0)


def _lung_field(hu: np.ndarray) -> np.ndarray:
    """Pixels below :data:`LUNG_FIELD_HU` inside the body (largest component above -500 HU,
    holes filled)."""
    body = (hu > _BODY_HU).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(body, connectivity=4)
    if count < 2:
        return np.zeros(hu.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    contours, _ = cv2.findContours((components == largest).astype(np.uint8),
                                   cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(hu.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return (filled > 0) & (hu < LUNG_FIELD_HU)


def window_grid(rows: int, columns: int, side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Window centres (px) along rows and columns: stride half a patch, the first half a
    stride from the edge."""
    stride = max(1, side_px // 2)
    return (np.arange(stride / 2, rows, stride), np.arange(stride / 2, columns, stride))


def _window_centres(job: SeriesJob) -> tuple[np.ndarray, np.ndarray]:
    """The sliding window's centres (px) along rows and columns (empty for other places)."""
    if job.source != "sliding_window":
        return np.zeros(0), np.zeros(0)
    first = job.series.slices[0]
    side_px = max(2, int(round(job.settings.patch_mm / first.pixel_spacing_mm)))
    return window_grid(first.rows, first.columns, side_px)


def _windows(job: SeriesJob, centres: tuple[np.ndarray, np.ndarray], failed: dict[str, str],
             cache: HuCache) -> Iterator[tuple[Candidate, tuple[int, int, int]]]:
    """A candidate per window centre on the lung field of every slice, with its (slice index,
    grid row, grid column); lazily, slice by slice, so that its windows are drawn while the
    slice is still in ``cache``."""
    rows_px, columns_px = centres
    for index, base in enumerate(slice_candidates(job.series)):
        try:
            lung = _lung_field(cache.read(base.source_path)[0])
        except UnusableFileError as skip:
            failed[base.source_file] = str(skip)
            continue
        on_lung = lung[rows_px.astype(int)[:, None], columns_px.astype(int)[None, :]]
        for i, j in zip(*np.nonzero(on_lung), strict=True):
            centre = (float(columns_px[j]), float(rows_px[i]))
            yield replace(base, centre_xy_px=centre), (index, int(i), int(j))


def render_series(job: SeriesJob) -> RenderedSeries:
    """Render every candidate of ``job``; a candidate that cannot be drawn gets its reason."""
    failed: dict[str, str] = {}
    cache = HuCache(read_hu)
    centres = _window_centres(job)
    places: Iterable[tuple[Candidate, tuple[int, int, int] | None]] = (
        _windows(job, centres, failed, cache) if job.source == "sliding_window"
        else ((candidate, None) for candidate in job.candidates))
    images, kept, kept_grid = [], [], []
    for candidate, position in places:
        try:
            image = render(candidate, job.settings, cache).image
        except UnusableFileError as skip:
            failed[candidate.source_file] = str(skip)
            continue
        images.append(image if image.ndim == 3 else image[..., None])
        kept.append(candidate)
        if position is not None:
            kept_grid.append(position)
    size = job.settings.image_size_px
    stacked = (np.stack(images) if images
               else np.zeros((0, size, size, 3 if job.settings.context_mm else 1), np.uint8))
    return RenderedSeries(stacked, kept, failed, kept_grid, (len(centres[0]), len(centres[1])))
