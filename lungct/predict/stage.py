"""Stage 4: score new CT scans with a trained model (``predictions/``).

The stage reads top to bottom: read the recipe (model, threshold, rendering), find the CT
series of the input (a forkserver worker pool indexes the headers while Keras imports), choose
where to look in each, reuse the series already scored with the same model and settings,
render the others in the pool while the model (loaded once) scores full batches, then per
series Grad-CAM of the top images, the outputs and the optional DICOM series, and last the
run's tables. A failing series is recorded and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lungct import __version__
from lungct.cli import captured_stderr
from lungct.errors import UserError
from lungct.fingerprint import fingerprint
from lungct.locking import output_lock
from lungct.parallel import chunk_size, exit_with_parent
from lungct.predict import outputs
from lungct.predict.config import PredictConfig
from lungct.predict.discovery import Discovered, input_roots, start_discovery
from lungct.predict.nodules_csv import read_nodules
from lungct.predict.places import choose_places
from lungct.predict.recipe import Recipe, read_recipe
from lungct.predict.rendering import RenderedSeries, SeriesJob, render_series
from lungct.predict.series_results import SeriesOutcome, finish_series, reused_outcome
from lungct.prepare.candidates import display_path
from lungct.prepare.dicom import UnusableFileError
from lungct.prepare.pseudonym import SALT_FILE, Pseudonymiser, masked_logging
from lungct.prepare.series import Series

__all__ = ["run"]

LOG = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: SeriesJob
    folder: Path
    key: str
    warnings: list[str]


def run(config: PredictConfig) -> dict[str, Any]:
    """Run the predict stage.

    Returns:
        ``{"scored", "reused", "failed", "not_scored"}`` series counts, and
        ``model_startup_s``: seconds spent importing the framework, loading the model and
        compiling its predict step (0 when every series was reused).

    Raises:
        UserError: a bad recipe, input or nodules CSV (exit 2).
    """
    recipe = read_recipe(config.results_path, config.model_path)
    nodules = read_nodules(config.nodules_csv) if config.nodules_csv else None
    if nodules is not None and recipe.settings.view == "slice":
        LOG.warning("--nodules is ignored: a slice-view model scores every slice")
        nodules = None
    out_dir = Path(config.out_dir)
    # The lock lives inside --out: nothing is written outside it.
    with output_lock(out_dir / "predict", "predict"):
        if not config.pseudonymise:
            return _run_locked(config, recipe, nodules, out_dir, None)
        salt = Path(config.work_dir) / SALT_FILE
        if not salt.is_file():
            raise UserError(f"--pseudonymise needs prepare's salt {salt} (pass the --work-dir "
                            "prepare used) so that the pseudonyms match prepare's")
        masker = Pseudonymiser(Path(config.work_dir), config.patient_regex)
        with masked_logging(masker):
            return _run_locked(config, recipe, nodules, out_dir, masker)


class _Model:
    """The scorer, loaded on first use, and the start-up time: importing the framework (may
    run earlier, while the workers index the headers), loading the model, compiling."""

    def __init__(self, recipe: Recipe, batch_size: int) -> None:
        self.recipe, self.batch_size = recipe, batch_size
        self.scorer: Any = None
        self.startup_s = 0.0

    def import_framework(self) -> Any:
        """Import Keras (its C++ start-up noise captured); the Scorer class."""
        started = time.perf_counter()
        with captured_stderr():
            from lungct.predict.scoring import Scorer
        self.startup_s += time.perf_counter() - started
        return Scorer

    def get(self) -> Any:
        """The loaded :class:`lungct.predict.scoring.Scorer` (its predict compiled)."""
        if self.scorer is None:
            scorer_class = self.import_framework()
            started = time.perf_counter()
            self.scorer = scorer_class(self.recipe, self.batch_size)
            self.startup_s += time.perf_counter() - started
            LOG.info("framework imported, model loaded and its predict compiled in %.1f s",
                     self.startup_s)
        return self.scorer


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A forkserver pool for indexing and rendering (None for one worker): its processes are
    forked from a fresh server, never from this process once it has imported a deep-learning
    framework, so Keras may load while they work. Workers exit when this process dies."""
    if workers == 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        yield pool


def _run_locked(config: PredictConfig, recipe: Recipe, nodules: list | None, out_dir: Path,
                masker: Pseudonymiser | None) -> dict[str, Any]:
    roots, skipped = input_roots(config.inputs, out_dir)
    model = _Model(recipe, config.batch_size)
    with _worker_pool(config.workers) as pool:
        header_map = map if pool is None else (
            lambda read, files: pool.map(read, files,
                                         chunksize=chunk_size(len(files), config.workers)))
        discovered = start_discovery(roots, skipped, header_map)
        if pool is not None and (config.overwrite
                                 or not any(out_dir.glob(f"*/{outputs.SERIES_FILE}"))):
            # a first run: import the framework while the workers index the headers (the
            # model loads once the series are submitted for rendering)
            model.import_framework()
        counts = _score_found(config, recipe, nodules, discovered(), out_dir, masker, model,
                              pool)
    return counts | {"model_startup_s": model.startup_s}


def _score_found(config: PredictConfig, recipe: Recipe, nodules: list | None,
                 found: Discovered, out_dir: Path, masker: Pseudonymiser | None, model: _Model,
                 pool: ProcessPoolExecutor | None) -> dict[str, Any]:
    """Choose places, reuse or score every series found, write the run's tables."""
    if config.patient_ids:
        found.series = _of_patients(found.series, config.patient_ids)
    if masker is not None:
        masker.add_patients(s.patient_id for s in found.series)
    masked = masker.text if masker is not None else (lambda text: text)
    outputs.write_csv(out_dir / "skipped.csv", outputs.SKIPPED_COLUMNS,
                      [{"file": masked(f), "reason": masked(r)}
                       for f, r in sorted(found.skipped.items())])
    if not found.series:
        raise UserError(f"no CT series in the input ({len(found.skipped)} files skipped; see "
                        f"{out_dir / 'skipped.csv'})")
    outcomes, pending = _plan(config, recipe, nodules, found, out_dir, masker)
    if pending:
        outcomes += _score_pending(config, recipe, pending, found, masker, model, pool)
    return _write_tables(out_dir, outcomes, recipe)


def _of_patients(series: list[Series], patient_ids: tuple[str, ...]) -> list[Series]:
    """The series of ``--patient-id`` patients.

    Raises:
        UserError: a named patient has no CT series in the input.
    """
    missing = sorted(set(patient_ids) - {s.patient_id for s in series})
    if missing:
        raise UserError(f"--patient-id {', '.join(missing)}: no CT series of this patient in "
                        "the input (ids are compared with (0010,0020) Patient ID as stored)")
    chosen = [s for s in series if s.patient_id in patient_ids]
    LOG.info("--patient-id: %d of %d series kept", len(chosen), len(series))
    return chosen


def _series_key(series: Series, masker: Pseudonymiser | None) -> str:
    return masker.alias(series.series_uid) if masker is not None else series.series_uid


def _plan(config: PredictConfig, recipe: Recipe, nodules: list | None, found: Discovered,
          out_dir: Path, masker: Pseudonymiser | None
          ) -> tuple[list[SeriesOutcome], list[_Pending]]:
    """Reused series' outcomes, and a job for every series to score."""
    outcomes: list[SeriesOutcome] = []
    pending: list[_Pending] = []
    for series in found.series:
        source, candidates, warnings = choose_places(
            series, recipe.settings.view, found.readings.get(series.series_uid),
            recipe.label_rule, nodules)
        key = _series_key(series, masker)
        folder = out_dir / key
        job = SeriesJob(series, source, tuple(candidates), recipe.settings)
        series_hash = fingerprint(
            {"settings": config.hashed_settings(), "recipe": recipe.to_json() | {
                "model_path": ""}, "source": source, "version": __version__,
             "places": [(c.source_file, c.centre_xy_px) for c in candidates]},
            listing=((display_path(str(h.path)), h.path) for h in series.slices))
        reused = None if config.overwrite else reused_outcome(folder, series_hash)
        if reused is not None:
            LOG.info("series %s: up to date, reused", key)
            outcomes.append(reused)
        else:
            pending.append(_Pending(job, folder, series_hash, warnings))
    return outcomes, pending


def _rendered(jobs: list[SeriesJob], pool: ProcessPoolExecutor | None
              ) -> Iterator[RenderedSeries | str]:
    """Rendered series in job order, or the reason one could not be rendered (the run goes
    on); with a pool every job is submitted at once and rendered while the caller scores."""
    if pool is None:
        return (_guarded(lambda job=job: render_series(job)) for job in jobs)
    futures = [pool.submit(render_series, job) for job in jobs]
    return (_guarded(future.result) for future in futures)


def _score_pending(config: PredictConfig, recipe: Recipe, pending: list[_Pending],
                   found: Discovered, masker: Pseudonymiser | None, model: _Model,
                   pool: ProcessPoolExecutor | None) -> list[SeriesOutcome]:
    """Render (in parallel), score in full batches, and finish every pending series."""
    rendered = _rendered([p.job for p in pending], pool)
    scorer = model.get()
    outcomes: list[SeriesOutcome] = []
    batches = _Batches(scorer)
    for item, result in zip(pending, rendered, strict=True):
        for done, drawn, probabilities in batches.add(item, result, item is pending[-1]):
            outcomes.append(_finish(done, drawn, probabilities, scorer, config, recipe,
                                    found, masker))
    return outcomes


def _guarded(rendered: Callable[[], RenderedSeries]) -> RenderedSeries | str:
    """A rendered series, or the reason it could not be rendered: a refused file, an I/O
    error, or a worker that died (e.g. killed for memory)."""
    try:
        return rendered()
    except (UnusableFileError, OSError, ValueError, BrokenProcessPool) as error:
        return f"rendering failed ({type(error).__name__}: {error})"


class _Batches:
    """Rendered series waiting for their probabilities. Only full batches are scored (but the
    run's last call), so one batch may hold the end of a series and the start of the next:
    no batch slot is wasted on padding between series."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.waiting: list[tuple[_Pending, RenderedSeries | str]] = []
        self.unscored: list[np.ndarray] = []
        self.scored = np.zeros(0)

    def add(self, item: _Pending, result: RenderedSeries | str, last: bool
            ) -> list[tuple[_Pending, RenderedSeries | str, np.ndarray]]:
        """Queue one series; score the full batches; the series now completely scored."""
        self.waiting.append((item, result))
        if not isinstance(result, str) and len(result.images):
            self.unscored.append(result.images)
        count = sum(len(images) for images in self.unscored)
        ready = count if last else count - count % self.scorer.batch_size
        if ready:
            images = np.concatenate(self.unscored)
            self.scored = np.concatenate([self.scored, self.scorer.predict(images[:ready])])
            self.unscored = [images[ready:]] if ready < count else []
        done = []
        while self.waiting:
            item, result = self.waiting[0]
            needed = 0 if isinstance(result, str) else len(result.images)
            if needed > len(self.scored):
                break
            done.append((*self.waiting.pop(0), self.scored[:needed]))
            self.scored = self.scored[needed:]
        return done


def _finish(item: _Pending, result: RenderedSeries | str, probabilities: np.ndarray,
            scorer: Any, config: PredictConfig, recipe: Recipe, found: Discovered,
            masker: Pseudonymiser | None) -> SeriesOutcome:
    """The outcome of one series: failed (its reason), or its outputs written."""
    if isinstance(result, str):
        return SeriesOutcome.failed(item.job.series, result, masker)
    return finish_series(item.job, result, probabilities, scorer, config, recipe, item.folder,
                         item.key, item.warnings,
                         found.dropped.get(item.job.series.series_uid, {}), masker)


def _write_tables(out_dir: Path, outcomes: list[SeriesOutcome], recipe: Recipe
                  ) -> dict[str, Any]:
    summary = sorted((o.summary for o in outcomes),
                     key=lambda r: (r["patient_id"], r["study_uid"], r["series_uid"]))
    outputs.write_csv(out_dir / "summary.csv", outputs.SUMMARY_COLUMNS, summary)
    outputs.write_csv(out_dir / "studies.csv", outputs.STUDIES_COLUMNS,
                      outputs.study_rows(summary))
    errors = [o.summary | {"reason": o.error} for o in outcomes if o.error]
    outputs.write_csv(out_dir / "errors.csv", outputs.ERRORS_COLUMNS, errors)
    counts = {status: sum(o.status == status for o in outcomes)
              for status in ("scored", "reused", "failed", "not_scored")}
    LOG.info("%s; summary in %s (%s)", ", ".join(f"{n} {s}" for s, n in counts.items()),
             out_dir / "summary.csv", outputs.RESEARCH_NOTICE)
    if recipe.settings.view == "patch" and any(o.summary["places"] == "sliding_window"
                                               for o in outcomes):
        LOG.warning("some series were scored by a sliding window: not a validated detector")
    return counts
