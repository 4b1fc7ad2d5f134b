"""Rendering one series in a worker process: its candidates -> the model's uint8 images.

Every image is drawn by :func:`lungct.prepare.render.render`, the code prepare drew the
training images with, so the same slice gives the same pixels (2.5D context included: the
candidates carry their slice header and the series' stack, as prepare's do). The candidates of
a series are drawn in z order through one :class:`lungct.prepare.context.HuCache`, as prepare
draws them, so each slice is decoded once however many patches (sliding-window positions, or
context planes) it serves. The sliding window (patch models without nodule centres) makes its
candidates here, from each slice's lung field (:func:`lungct.prepare.render.lung_field`,
the rule prepare places its ``no_finding`` patches with).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from lungct.predict.places import slice_candidates
from lungct.prepare.candidates import Candidate
from lungct.prepare.context import HuCache
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.render import RenderSettings, lung_field, read_hu, render
from lungct.prepare.series import Series

__all__ = ["RenderedSeries", "SeriesJob", "render_series", "window_grid"]


@dataclass(frozen=True)
class SeriesJob:
    """What a worker renders: a series, where to look, and how to draw."""

    series: Series
    source: str  # lungct.predict.places.PLACE_SOURCES
    candidates: tuple[Candidate, ...]
    settings: RenderSettings


@dataclass
class RenderedSeries:
    """The images of one series (uint8 (N, S, S, C)), the candidates they show, the patch
    centre of each in patient x, y mm (``Rendered.patch_centre_xy_mm``: None for the slice
    view), and a reason for every candidate that could not be drawn; ``grid`` (sliding
    window) maps each image to its (slice index, grid row, grid column) and holds the grid's
    shape."""

    images: np.ndarray
    candidates: list[Candidate]
    centres_mm: list[tuple[float, float] | None] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    grid: list[tuple[int, int, int]] = field(default_factory=list)
    grid_shape: tuple[int, int] = (0, 0)


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
            lung = lung_field(cache.read(base.source_path)[0])
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
    images, kept, centres_mm, kept_grid = [], [], [], []
    for candidate, position in places:
        try:
            drawn = render(candidate, job.settings, cache)
        except UnusableFileError as skip:
            failed[candidate.source_file] = str(skip)
            continue
        images.append(drawn.image if drawn.image.ndim == 3 else drawn.image[..., None])
        kept.append(candidate)
        centres_mm.append(drawn.patch_centre_xy_mm)
        if position is not None:
            kept_grid.append(position)
    size = job.settings.image_size_px
    stacked = (np.stack(images) if images
               else np.zeros((0, size, size, 3 if job.settings.context_mm else 1), np.uint8))
    return RenderedSeries(stacked, kept, centres_mm, failed, kept_grid,
                          (len(centres[0]), len(centres[1])))
