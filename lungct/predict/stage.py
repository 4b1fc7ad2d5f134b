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
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lungct import __version__, contract
from lungct.cli import captured_stderr
from lungct.errors import UserError
from lungct.fileio import unsafe_relative
from lungct.fingerprint import fingerprint
from lungct.locking import output_lock, shared_lock
from lungct.parallel import chunk_size, exit_with_parent
from lungct.predict import outputs
from lungct.predict.config import PredictConfig
from lungct.predict.discovery import Discovered, input_roots, start_discovery
from lungct.predict.nodules_csv import check_rows, read_nodules
from lungct.predict.places import choose_places
from lungct.predict.recipe import Recipe, read_recipe
from lungct.predict.rendering import RenderedSeries, SeriesJob, render_series
from lungct.predict.series_results import SeriesOutcome, finish_series, reused_outcome
from lungct.prepare.candidates import display_path
from lungct.prepare.pseudonym import SALT_FILE, Pseudonymiser, masked_logging
from lungct.prepare.series import Series

__all__ = ["IN_FLIGHT_PER_WORKER", "run", "series_key"]

LOG = logging.getLogger(__name__)

#: Render jobs in flight per worker: enough to keep every worker busy while the caller
#: scores, few enough that the rendered images waiting for the model stay bounded.
IN_FLIGHT_PER_WORKER = 2


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
    out_dir = Path(config.out_dir)
    # A shared lock on the training results: no training run rewrites the model meanwhile.
    with shared_lock(config.results_path, "predict"):
        recipe = read_recipe(config.results_path, config.model_path)
        nodules = read_nodules(config.nodules_csv) if config.nodules_csv else None
        if nodules is not None and recipe.settings.view == "slice":
            LOG.warning("--nodules is ignored: a slice-view model scores every slice")
            nodules = None
        # The output lock lives inside --out: nothing is written outside it.
        with output_lock(out_dir / "predict", "predict"):
            if not config.pseudonymise:
                return _run_locked(config, recipe, nodules, out_dir, None)
            salt = Path(config.work_dir) / SALT_FILE
            if not salt.is_file():
                raise UserError(f"--pseudonymise needs prepare's salt {salt} (pass the "
                                "--work-dir prepare used) so that the pseudonyms match "
                                "prepare's")
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
    contract.write_skipped(out_dir, {masked_text(masker, f): masked_text(masker, r)
                                     for f, r in found.skipped.items()})
    if not found.series:
        raise UserError(f"no CT series in the input ({len(found.skipped)} files skipped; see "
                        f"{out_dir / contract.SKIPPED_FILE})")
    if nodules is not None:
        check_rows(nodules, found.series)
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


def series_key(series: Series, masker: Pseudonymiser | None) -> str | None:
    """The series' folder name under ``--out``: its (0020,000E) Series Instance UID (or its
    pseudonym); None when that is no safe folder name (a path, ``..``, a hidden name)."""
    key = masker.alias(series.series_uid) if masker is not None else series.series_uid
    if unsafe_relative(key) or "/" in key or "\\" in key or key.startswith("."):
        return None
    return key


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
        key = series_key(series, masker)
        if key is None:
            LOG.warning("series %r: its (0020,000E) Series Instance UID is no safe folder "
                        "name; not scored", masked_text(masker, series.series_uid))
            outcomes.append(SeriesOutcome.failed(
                series, "(0020,000E) Series Instance UID is not a safe folder name", masker,
                source))
            continue
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


def _rendered(jobs: list[SeriesJob], pool: ProcessPoolExecutor | None, workers: int
              ) -> Iterator[RenderedSeries | str]:
    """Rendered series in job order, or the reason one could not be rendered (the run goes
    on); with a pool at most :data:`IN_FLIGHT_PER_WORKER` x ``workers`` jobs are submitted
    ahead and rendered while the caller scores."""
    if pool is None:
        return (_guarded(lambda job=job: render_series(job)) for job in jobs)
    queued = iter(jobs)
    # submitted now, so that the workers render while the caller loads the model
    waiting = deque(_submit(pool, job)
                    for job in itertools.islice(queued, IN_FLIGHT_PER_WORKER * workers))
    return _in_order(pool, waiting, queued)


def _submit(pool: ProcessPoolExecutor, job: SeriesJob) -> Future | str:
    """The job's future, or why it could not be submitted (a broken pool)."""
    try:
        return pool.submit(render_series, job)
    except Exception as error:  # noqa: BLE001 - one series' failure, recorded; the run goes on
        return f"rendering failed ({one_line(error)})"


def _in_order(pool: ProcessPoolExecutor, waiting: deque[Future | str],
              queued: Iterator[SeriesJob]) -> Iterator[RenderedSeries | str]:
    """The results of ``waiting`` in order; each collected one makes room for the next job."""
    while waiting:
        item = waiting.popleft()
        result = item if isinstance(item, str) else _guarded(item.result)
        next_job = next(queued, None)
        if next_job is not None:
            waiting.append(_submit(pool, next_job))
        yield result


def _score_pending(config: PredictConfig, recipe: Recipe, pending: list[_Pending],
                   found: Discovered, masker: Pseudonymiser | None, model: _Model,
                   pool: ProcessPoolExecutor | None) -> list[SeriesOutcome]:
    """Render (in parallel), score in full batches, and finish every pending series."""
    rendered = _rendered([p.job for p in pending], pool, config.workers)
    scorer = model.get()
    outcomes: list[SeriesOutcome] = []
    batches = _Batches(scorer)
    for item, result in zip(pending, rendered, strict=True):
        for done, drawn, probabilities in batches.add(item, result, item is pending[-1]):
            outcomes.append(_finish(done, drawn, probabilities, scorer, config, recipe,
                                    found, masker))
    return outcomes


def _guarded(rendered: Callable[[], RenderedSeries]) -> RenderedSeries | str:
    """A rendered series, or the reason it could not be rendered (any error: a refused file,
    an I/O error, a worker that died, e.g. killed for memory); the traceback at DEBUG."""
    try:
        return rendered()
    except Exception as error:  # noqa: BLE001 - one series' failure, recorded; the run goes on
        LOG.debug("rendering failed", exc_info=True)
        return f"rendering failed ({one_line(error)})"


def one_line(error: BaseException) -> str:
    """``Type: message`` of ``error`` on one line (errors.csv holds one line per series)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def masked_text(masker: Pseudonymiser | None, text: str) -> str:
    """``text`` with identifiers pseudonymised when ``--pseudonymise`` is on."""
    return masker.text(text) if masker is not None else text


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
    """The outcome of one series: failed (its reason: rendering, or any error while writing
    its outputs, the traceback at DEBUG), or its outputs written."""
    series = item.job.series
    if isinstance(result, str):
        return SeriesOutcome.failed(series, masked_text(masker, result), masker, item.job.source)
    try:
        return finish_series(item.job, result, probabilities, scorer, config, recipe,
                             item.folder, item.key, item.warnings,
                             found.dropped.get(series.series_uid, {}), masker)
    except Exception as error:  # noqa: BLE001 - one series' failure, recorded; the run goes on
        LOG.debug("series %s: writing its results failed", item.folder.name, exc_info=True)
        reason = masked_text(masker, f"writing the results failed ({one_line(error)})")
        LOG.error("series %s: %s", item.folder.name, reason)
        return SeriesOutcome.failed(series, reason, masker, item.job.source)


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
