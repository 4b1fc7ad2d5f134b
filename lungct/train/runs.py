"""One training run, trained or reused: a model (``runs/<model>/``) or one fold of it
(``runs/<model>/fold<k>/``), and its logits on a set of images.

A finished run is reused when its ``run.json`` fingerprint (settings, model, dataset, backend,
weights, fine-tuned layers and, for a fold, the fold index, K and the fold's validation
patients) equals the new one and ``model.keras`` still has the recorded SHA-256
(lungct.fingerprint); otherwise lungct.train.phases trains it.

In a multi-process job (lungct.train.job) every process trains, but only process 0
writes: it runs :func:`train_or_reuse`, the others :func:`train_as_worker`, which trains in a
scratch folder (seeded with the run's checkpoint, so that a resumed run resumes everywhere).
All processes must agree on whether a run is reused, resumed or trained from the start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from lungct import backend
from lungct.errors import UserError
from lungct.faults import kill_point
from lungct.fileio import atomic_path, atomic_write_json
from lungct.fingerprint import file_sha256, fingerprint
from lungct.modelio import load_classifier, logit_model
from lungct.train import models
from lungct.train.batches import predict_batches
from lungct.train.config import TrainConfig
from lungct.train.distribute import distribution_scope
from lungct.train.image_cache import SplitData
from lungct.train.job import agree_across_processes, process_count
from lungct.train.loop import CHECKPOINT_FILE
from lungct.train.phases import train_model

__all__ = ["MODEL_FILE", "RUN_FILE", "FoldRun", "predict_logits", "train_as_worker",
           "train_or_reuse"]

LOG = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
#: Settings that do not change what a run learns.
UNRELATED_SETTINGS = ("dataset_dir", "out_dir", "models", "overwrite", "progress",
                      "gradcam_max_images", "fine_tune_layers_by_model")


@dataclass(frozen=True)
class FoldRun:
    """Which fold a run is: ``fold`` of ``folds``, validating on ``patients``."""

    fold: int
    folds: int
    patients: tuple[str, ...]


def _run_fingerprint(name: str, config: TrainConfig, dataset_digest: str, channels: int,
                     weights: models.ResolvedWeights | None, fold: FoldRun | None) -> str:
    settings = config.to_json()
    for unrelated in UNRELATED_SETTINGS:
        settings.pop(unrelated)
    settings.update(
        model=name,
        dataset=dataset_digest,
        channels=channels,
        backend=backend.backend_name(),
        weights_source=weights.source if weights else None,
        fine_tune_layers=None if name == "baseline" else config.fine_tune_layer_count(name),
    )
    if fold is not None:
        settings.update(fold=fold.fold, fold_patients=list(fold.patients))
    return fingerprint(settings)


def train_or_reuse(
    name: str,
    config: TrainConfig,
    data: tuple[SplitData, SplitData],
    dataset_digest: str,
    weights: models.ResolvedWeights | None,
    run_dir: Path,
    fold: FoldRun | None = None,
) -> tuple[keras.Model, dict]:
    """Train model ``name`` on ``data`` = (train, val) in ``run_dir``, or reuse that run.

    Returns the model (its ``model.keras``, T = 1) and its run record (lungct.train.phases
    fields, ``fingerprint`` and ``model_sha256``). In a multi-process job this is process 0's
    part: the model it returns is read back from ``model.keras``, a copy on this process's
    devices alone, which it can predict with while the others go on.

    Raises:
        UserError: out of memory (naming --batch-size), the processes disagree on the run,
            or what training raises.
    """
    train, val = data
    channels = int(train.images.shape[-1])
    label = _label(name, fold)
    run_fingerprint = _run_fingerprint(name, config, dataset_digest, channels, weights, fold)
    record = _agreed_record(run_dir, run_fingerprint, label, config.overwrite)
    if record is not None:
        LOG.info("%s: reusing %s (same configuration and dataset; --overwrite retrains)",
                 label, run_dir)
        # A run killed after model.keras was saved leaves its (now redundant) checkpoint.
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        model = load_classifier(run_dir / MODEL_FILE, int(train.images.shape[1]),
                                str(run_dir / RUN_FILE), channels)
        return model, record
    with (
        _out_of_memory_as_user_error(label, config.batch_size),
        distribution_scope(config.distribute, config.batch_size),
    ):
        model, record = train_model(name, config, train, val, weights, run_dir,
                                    fingerprint=run_fingerprint)
    record["fingerprint"] = run_fingerprint
    with atomic_path(run_dir / MODEL_FILE) as temporary:
        model.save(temporary)
    record["model_sha256"] = file_sha256(run_dir / MODEL_FILE)
    atomic_write_json(run_dir / RUN_FILE, record)
    kill_point("train", "run_saved")
    # The checkpoint protects a run in progress; model.keras now holds the same weights.
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if process_count() > 1:
        # model.predict cannot fetch outputs from other processes' devices.
        model = load_classifier(run_dir / MODEL_FILE, int(train.images.shape[1]),
                                str(run_dir / RUN_FILE), channels)
    return model, record


def train_as_worker(
    name: str,
    config: TrainConfig,
    data: tuple[SplitData, SplitData],
    dataset_digest: str,
    weights: models.ResolvedWeights | None,
    run_dir: Path,
    fold: FoldRun | None = None,
) -> None:
    """A process other than 0: train beside process 0 (same arguments as
    :func:`train_or_reuse`), writing only into a scratch folder that is removed afterwards.

    Raises:
        UserError: the processes disagree on the run, out of memory, or what training raises.
    """
    train, val = data
    channels = int(train.images.shape[-1])
    label = _label(name, fold)
    run_fingerprint = _run_fingerprint(name, config, dataset_digest, channels, weights, fold)
    if _agreed_record(run_dir, run_fingerprint, label, config.overwrite) is not None:
        return
    with tempfile.TemporaryDirectory(prefix="lungct-worker-") as scratch:
        checkpoint = run_dir / CHECKPOINT_FILE
        if not config.overwrite and checkpoint.is_file():
            shutil.copyfile(checkpoint, Path(scratch) / CHECKPOINT_FILE)
        with (
            _out_of_memory_as_user_error(label, config.batch_size),
            distribution_scope(config.distribute, config.batch_size),
        ):
            train_model(name, config, train, val, weights, Path(scratch),
                        fingerprint=run_fingerprint)


def _label(name: str, fold: FoldRun | None) -> str:
    return name if fold is None else f"{name} fold {fold.fold + 1}/{fold.folds}"


def _agreed_record(run_dir: Path, expected: str, label: str, overwrite: bool) -> dict | None:
    """The reusable run record (or ``None``), after every process of a job has found the same:
    reuse, resume the same checkpoint, or train from the start."""
    record = None if overwrite else _reusable_record(run_dir, expected)
    if process_count() > 1:
        checkpoint = run_dir / CHECKPOINT_FILE
        if record is not None:
            state = "reuse " + record["model_sha256"]
        elif not overwrite and checkpoint.is_file():
            state = "resume " + file_sha256(checkpoint)
        else:
            state = "train"
        agree_across_processes(f"whether to reuse, resume or train {label} in {run_dir}", state)
    return record


@contextlib.contextmanager
def _out_of_memory_as_user_error(label: str, batch_size: int) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        if backend.is_out_of_memory(error):
            raise UserError(
                f"out of memory training {label} at --batch-size {batch_size}; lower "
                "--batch-size or --train-size."
            ) from error
        raise


def _reusable_record(run_dir: Path, expected: str) -> dict | None:
    try:
        record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != expected:
        return None
    try:
        unchanged = file_sha256(run_dir / MODEL_FILE) == record.get("model_sha256")
    except OSError:
        return None
    if not unchanged:
        LOG.warning("%s/%s changed since %s was written: retraining", run_dir, MODEL_FILE,
                    RUN_FILE)
    return record if unchanged else None


def predict_logits(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The logits before the temperature, float32 ``(N,)``, predicted in full batches."""
    return predict_batches(logit_model(model), images, batch_size).reshape(-1).astype(np.float32)
