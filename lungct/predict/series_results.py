"""One series from probabilities to files: slices.csv, Grad-CAM overlays of the top images,
the sliding window's probability map, the optional DICOM series, and series.json (last).

Identifiers pass through the pseudonymiser when ``--pseudonymise`` is on: the same salted
pseudonyms prepare gives (same salt file).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lungct import __version__, contract
from lungct.environment import package_versions
from lungct.fileio import atomic_path, atomic_write_bytes
from lungct.fingerprint import fingerprint
from lungct.predict import outputs
from lungct.predict.config import PredictConfig
from lungct.predict.places import SLIDING_WINDOW_NOTICE
from lungct.predict.recipe import Recipe
from lungct.predict.rendering import RenderedSeries, SeriesJob
from lungct.prepare.candidates import Candidate
from lungct.prepare.dicom import SliceHeader
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.pseudonym import Pseudonymiser
from lungct.prepare.render import render
from lungct.prepare.series import Series

__all__ = ["SeriesOutcome", "finish_series", "reused_outcome"]

LOG = logging.getLogger(__name__)


def _identity(text: str) -> str:
    return text


@dataclass
class SeriesOutcome:
    """A series' row of summary.csv, its status and, when it failed, why."""

    summary: dict[str, Any]
    status: str  # "scored" | "reused" | "failed" | "not_scored"
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, series: Series, reason: str, masker: Pseudonymiser | None,
               places: str = "") -> SeriesOutcome:
        """The outcome of a series that could not be scored."""
        return cls(_summary_base(series, masker, places) | {"status": f"failed: {reason}"},
                   "failed", reason)


def _summary_base(series: Series, masker: Pseudonymiser | None, places: str) -> dict[str, Any]:
    alias = masker.alias if masker is not None else _identity
    return {"patient_id": alias(series.patient_id), "study_uid": alias(series.slices[0].study_uid),
            "series_uid": alias(series.series_uid), "places": places, "n_scored": 0,
            "max_probability": "", "max_probability_z_mm": "", "called_cancer": "",
            "threshold": ""}


def reused_outcome(folder: Path, series_hash: str) -> SeriesOutcome | None:
    """The recorded outcome when ``folder`` holds a complete result with this fingerprint."""
    try:
        record = json.loads((folder / outputs.SERIES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("fingerprint") != series_hash
            or not (folder / "slices.csv").is_file() or not isinstance(record.get("summary"),
                                                                       dict)):
        return None
    return SeriesOutcome(record["summary"] | {"status": "reused"}, "reused")


def _slice_rows(result: RenderedSeries, probabilities: np.ndarray, headers: dict[Path, SliceHeader],
                threshold: float, source: str, masked: Callable[[str], str],
                alias: Callable[[str], str]) -> list[dict[str, Any]]:
    """slices.csv: one row per image; the patch centre is the drawn patch's
    (``Rendered.patch_centre_xy_mm``, prepare's manifest rule)."""
    rows = []
    for candidate, centre_mm, probability in zip(result.candidates, result.centres_mm,
                                                 probabilities, strict=True):
        header = headers[candidate.source_path]
        centre_x, centre_y = (f"{v:.3f}" for v in centre_mm) if centre_mm else ("", "")
        rows.append({"z_mm": f"{header.z_mm:.2f}", "instance_number": header.instance_number,
                     "sop_instance_uid": alias(header.sop_uid),
                     "probability": f"{probability:.6f}",
                     "above_threshold": "yes" if probability >= threshold else "no",
                     "patch_centre_x_mm": centre_x, "patch_centre_y_mm": centre_y,
                     "place": source, "source_file": masked(candidate.source_file)})
    return rows


def _window_map(job: SeriesJob, result: RenderedSeries, probabilities: np.ndarray,
                folder: Path, top: int, threshold: float) -> None:
    """The sliding window's per-slice probability map (NaN where no window was scored) as
    ``probability_map.npy`` (slices x grid rows x grid columns, z order), and a PNG overlay
    of the map on the slice for the ``top`` slices with the highest window probability."""
    grid = np.full((len(job.series.slices), *result.grid_shape), np.nan, np.float32)
    for (index, row, column), probability in zip(result.grid, probabilities, strict=True):
        grid[index, row, column] = probability
    with atomic_path(folder / "probability_map.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, grid)
    peaks = np.nan_to_num(np.nanmax(grid, axis=(1, 2), initial=-1.0), nan=-1.0)
    whole = replace(job.settings, view="slice", context_mm=0.0)  # the slice itself, in grey
    for index in [i for i in np.argsort(-peaks, kind="stable")[:top] if peaks[i] >= 0]:
        header = job.series.slices[index]
        candidate = Candidate(header.path, "", job.series.patient_id, 0, "",
                              series_uid=job.series.series_uid, slice_z_mm=header.z_mm,
                              pixel_spacing_mm=header.pixel_spacing_mm)
        try:
            image = render(candidate, whole).image
        except UnusableFileError:
            continue
        overlay = outputs.overlay_image(image, np.nan_to_num(grid[index], nan=0.0),
                                        float(peaks[index]), threshold)
        atomic_write_bytes(folder / "probability_map" / f"z{header.z_mm:+09.2f}.png",
                           contract.encode_png(overlay))


def _clear(folder: Path) -> None:
    """Remove a series folder's previous results: series.json first (the completion mark),
    then the overlays, DICOM files and probability map it listed."""
    (folder / outputs.SERIES_FILE).unlink(missing_ok=True)
    for name in ("gradcam", "dicom", "probability_map"):
        shutil.rmtree(folder / name, ignore_errors=True)
    (folder / "probability_map.npy").unlink(missing_ok=True)


def _uid_entropy(recipe: Recipe, config: PredictConfig) -> str:
    """What the ``--dicom-out`` UIDs derive from besides the source series: the model and the
    settings that change the images (Grad-CAM top, lungct version), so that different
    outputs never share a SOP Instance UID."""
    return fingerprint({"model_sha256": recipe.model_sha256,
                        "gradcam_top": config.gradcam_top, "version": __version__})


def _warnings(series: Series, recipe: Recipe) -> list[str]:
    """Acquisition outside what the model was trained on."""
    thickness = {h.slice_thickness_mm for h in series.slices if h.slice_thickness_mm}
    trained = recipe.slice_thickness_mm
    if trained and thickness and (min(thickness) < trained[0] - 1e-6
                                  or max(thickness) > trained[1] + 1e-6):
        return [f"(0018,0050) Slice Thickness {min(thickness):g}-{max(thickness):g} mm is "
                f"outside the range the model was trained on ({trained[0]:g}-{trained[1]:g} mm)"]
    return []


def finish_series(job: SeriesJob, result: RenderedSeries, probabilities: np.ndarray,
                  scorer: Any, config: PredictConfig, recipe: Recipe, folder: Path,
                  series_hash: str, warnings: list[str], dropped: dict[str, str],
                  masker: Pseudonymiser | None) -> SeriesOutcome:
    """Write the outputs of one scored series; its summary row.

    The folder's previous results go first, series.json (the completion mark) before
    anything else, so a run that stops half way never leaves a series that looks complete.
    """
    _clear(folder)
    series = job.series
    masked = masker.text if masker is not None else _identity
    alias = masker.alias if masker is not None else _identity
    base = _summary_base(series, masker, job.source)
    if not len(result.images):
        if result.failed:
            reason = "no image could be drawn: " + "; ".join(sorted(set(result.failed.values())))
            return SeriesOutcome.failed(series, masked(reason), masker, job.source)
        return SeriesOutcome(base | {"status": "not scored: " + "; ".join(warnings)},
                             "not_scored")
    threshold = recipe.threshold_value
    headers = {h.path: h for h in series.slices}
    rows = _slice_rows(result, probabilities, headers, threshold, job.source, masked, alias)
    warnings = warnings + _warnings(series, recipe)
    if job.source == "sliding_window":
        _window_map(job, result, probabilities, folder, config.gradcam_top, threshold)
    overlays = _gradcam(result, probabilities, scorer, config.gradcam_top, threshold, folder)
    dicom_files: dict[str, Any] | None = None
    if config.dicom_out and overlays:
        # highdicom is imported only when DICOM results are asked for.
        from lungct.predict.dicom_out import SERIES_DESCRIPTION, write_secondary_capture

        written = write_secondary_capture([o for o, _ in overlays], [p for _, p in overlays],
                                          folder / "dicom", series.series_uid,
                                          _uid_entropy(recipe, config))
        dicom_files = {"files": [p.relative_to(folder).as_posix() for p in written],
                       "series_description": SERIES_DESCRIPTION}
    outputs.write_csv(folder / "slices.csv", outputs.SLICES_COLUMNS, rows)
    best = int(np.argmax(probabilities))
    summary = base | {
        "n_scored": len(rows), "max_probability": rows[best]["probability"],
        "max_probability_z_mm": rows[best]["z_mm"],
        "called_cancer": "yes" if probabilities[best] >= threshold else "no",
        "threshold": f"{threshold:.6f}", "status": "scored"}
    outputs.write_series_json(folder, _record(job, result, recipe, config, summary, warnings,
                                              dropped, dicom_files, series_hash, masked))
    for warning in warnings:
        LOG.warning("series %s: %s", summary["series_uid"], masked(warning))
    return SeriesOutcome(summary, "scored")


def _gradcam(result: RenderedSeries, probabilities: np.ndarray, scorer: Any, top: int,
             threshold: float, folder: Path) -> list[tuple[np.ndarray, Path]]:
    """Grad-CAM overlays (RGB) of the ``top`` most suspicious images, written as PNGs."""
    chosen = np.argsort(-probabilities, kind="stable")[:top]
    if not len(chosen):
        return []
    maps = scorer.gradcam(result.images[chosen])
    overlays = []
    for rank, (index, cam) in enumerate(zip(chosen, maps, strict=True), start=1):
        candidate = result.candidates[int(index)]
        overlay = outputs.overlay_image(result.images[index], cam,
                                        float(probabilities[index]), threshold)
        name = f"{rank:02d}_z{candidate.slice_z_mm:+09.2f}.png"
        atomic_write_bytes(folder / "gradcam" / name, contract.encode_png(overlay))
        overlays.append((overlay, candidate.source_path))
    return overlays


def _record(job: SeriesJob, result: RenderedSeries, recipe: Recipe, config: PredictConfig,
            summary: dict[str, Any], warnings: list[str], dropped: dict[str, str],
            dicom_files: dict[str, Any] | None, series_hash: str, masked: Callable[[str], str]
            ) -> dict[str, Any]:
    """The content of series.json: what produced these results."""
    used = sorted({masked(c.source_file) for c in result.candidates})
    return {
        "summary": summary, "places": job.source,
        "places_note": SLIDING_WINDOW_NOTICE if job.source == "sliding_window" else None,
        "model": recipe.to_json() | {"model_path": masked(str(recipe.model_path))},
        "training_results": masked(str(config.results_path)),
        "dataset": {k: recipe.dataset.get(k) for k in (
            "source", "synthetic", "label_source", "input_hash", "files_sha256", "view",
            "image_size", "window", "patch_mm", "channels", "context_mm", "pseudonymised")},
        "lungct_version": __version__,
        "versions": package_versions("numpy", "pydicom", "opencv-python-headless", "keras"),
        "input_files_used": used,
        "input_files_skipped": {masked(k): masked(v) for k, v in
                                sorted({**dropped, **result.failed}.items())},
        "warnings": [masked(w) for w in warnings],
        "dicom_out": dicom_files,
        "research_use_only": outputs.RESEARCH_NOTICE,
        "fingerprint": series_hash,
    }
