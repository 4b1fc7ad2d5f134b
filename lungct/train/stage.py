"""Stage 2: train every model, select one on validation, calibrate it, choose its threshold.

The stage reads as named steps: load the dataset; apply the preset; with ``--folds K`` > 1,
pool the train and validation patients into K folds (lungct.train.folds); for each model (and
fold), train it (phases 1-2, :mod:`lungct.train.phases`) or reuse its finished run
(lungct.train.runs), and predict its logits on the validation (out-of-fold) and test images
once; with folds, save the model's fold ensemble (lungct.train.ensemble). Phase 3: the highest
validation AUC is selected; its temperature is fitted on its validation logits
(lungct.train.calibration, Guo et al. 2017) and becomes part of the saved selected model
(``lung_cancer_cnn_enhanced.h5`` / ``.keras``); the decision threshold is chosen on the
calibrated validation probabilities (Youden's J); ``training_results.json`` is written last
(lungct.train.results, docs/formats.md).

With ``--distribute data-parallel`` in a multi-process job (lungct.train.job), process 0
runs all of the above and is the only one that locks the output, builds the image cache and
writes; every other process waits at a barrier until the cache is built, reads it, and trains
the same models and folds in the same order beside process 0 (:func:`_run_as_worker`).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from lungct import backend, contract
from lungct.errors import UserError
from lungct.faults import kill_point
from lungct.fileio import atomic_path
from lungct.fingerprint import file_set_sha256
from lungct.locking import output_lock, shared_lock
from lungct.metrics import auc
from lungct.modelio import load_classifier
from lungct.threshold import youden_threshold
from lungct.train import models
from lungct.train.calibration import TemperatureFit, fit_temperature, sigmoid
from lungct.train.config import TrainConfig, resolve_config
from lungct.train.ensemble import build_ensemble, with_temperature
from lungct.train.folds import FoldPlan, plan_folds
from lungct.train.image_cache import SplitData, check_split_classes, load_split
from lungct.train.job import barrier, is_primary, join_processes, reporting_failures
from lungct.train.results import (
    ModelOutcome,
    calibration_block,
    cross_validation_block,
    log_summary,
    model_entry,
)
from lungct.train.runs import (
    MODEL_FILE,
    FoldRun,
    predict_logits,
    train_as_worker,
    train_or_reuse,
)

__all__ = ["Dataset", "load_dataset", "run", "start_model_session"]

LOG = logging.getLogger(__name__)

#: Barriers of a multi-process job: process 0 has built the image cache; it has written
#: training_results.json (the others leave together with it).
CACHE_BARRIER = "lungct image cache built"
RESULTS_BARRIER = "lungct training results written"


@dataclass(frozen=True)
class Dataset:
    """The splits and provenance a run trains on."""

    train: SplitData
    val: SplitData
    test: SplitData
    image_size: int
    channels: int
    digest: str
    provenance: dict


def load_dataset(dataset_dir: Path, *, write_cache: bool = True) -> Dataset:
    """Read the manifest, refuse unusable splits, and load the three splits' images.

    The channel count (1, or 3 with 2.5D context) is ``dataset.json``'s
    (``contract.dataset_channels``; 1 when the dataset has no dataset.json). Without
    ``write_cache`` a missing image cache is decoded into memory and not written.
    """
    manifest = contract.read_manifest(dataset_dir)
    check_split_classes(manifest)
    provenance = contract.read_dataset_info(dataset_dir, required=False)
    channels = contract.dataset_channels(provenance)
    splits = {split: load_split(dataset_dir, manifest, split, channels,
                                write_cache=write_cache)
              for split in contract.SPLITS}
    if len(splits["test"]) == 0:
        raise UserError(f"the test split of {dataset_dir} is empty.")
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_size=int(splits["train"].images.shape[1]),
        channels=channels,
        digest=contract.manifest_sha256(dataset_dir),
        provenance=provenance,
    )


def _check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise UserError(f"output folder {out_dir} is not writable ({error.strerror}).") from error


def _mixed_precision_enabled(mode: str) -> bool:
    enabled = mode == "on" or (mode == "auto" and backend.supports_bf16())
    if enabled and not backend.supports_bf16():
        LOG.warning("bf16 mixed precision on a device without native bf16 is slow")
    return enabled


def start_model_session(mixed_precision: bool) -> None:
    """Free the previous model's Keras state, then set the dtype policy for the next model.

    ``keras.backend.clear_session`` also resets the global dtype policy to float32, so the
    policy is set after it, for every model.
    """
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed_precision else "float32")


def run(config: TrainConfig) -> dict:
    """Train, select and save; return the content written to ``training_results.json``.

    In a multi-process job only process 0 returns that content; the others return ``{}``. A
    process that fails records why for the others (:func:`lungct.train.job.reporting_failures`).

    Raises:
        UserError: bad dataset, output folder, weights, out of memory, or a multi-process job
            that cannot be joined or whose processes disagree.
    """
    join_processes(config.distribute)
    with reporting_failures():
        if not is_primary():
            _run_as_worker(config)
            return {}
        _check_output_dir(config.out_dir)
        with (output_lock(config.out_dir / contract.RESULTS_FILE, "train"),
              shared_lock(config.dataset_dir, "train")):
            results = _run_locked(config)
        barrier(RESULTS_BARRIER)
    return results


def _run_as_worker(config: TrainConfig) -> None:
    """A process other than 0: train every model (and fold) in step with process 0, write
    nothing, and leave once process 0 has written its results."""
    barrier(CACHE_BARRIER)
    with shared_lock(config.dataset_dir, "train"):
        dataset = load_dataset(config.dataset_dir, write_cache=False)
    config = resolve_config(config, dataset.image_size, backend.accelerator_kind())
    mixed_precision = _mixed_precision_enabled(config.mixed_precision)
    weight_choices = models.parse_weights_option(config.weights)
    plan = (plan_folds(dataset.train, dataset.val, config.folds, config.seed)
            if config.folds > 1 else None)
    for name in config.models:
        weights = None if name == "baseline" else models.resolve_weights(
            name, weight_choices[name])
        run_dir = config.out_dir / "runs" / name
        if plan is None:
            start_model_session(mixed_precision)
            train_as_worker(name, config, (dataset.train, dataset.val), dataset.digest, weights,
                            run_dir)
            continue
        for fold in range(plan.folds):
            start_model_session(mixed_precision)
            fold_run = FoldRun(fold, plan.folds, tuple(plan.patients(fold)))
            train_as_worker(name, config, plan.split(fold), dataset.digest, weights,
                            run_dir / f"fold{fold}", fold_run)
    barrier(RESULTS_BARRIER)


def _run_locked(config: TrainConfig) -> dict:
    dataset = load_dataset(config.dataset_dir)
    barrier(CACHE_BARRIER)
    config = resolve_config(config, dataset.image_size, backend.accelerator_kind())
    mixed_precision = _mixed_precision_enabled(config.mixed_precision)
    weight_choices = models.parse_weights_option(config.weights)
    LOG.info(
        "training %s on %d/%d/%d train/val/test images (%d px, %d channel(s), computing at "
        "%d px), %s preset, %s backend on %s",
        ", ".join(config.models),
        len(dataset.train),
        len(dataset.val),
        len(dataset.test),
        dataset.image_size,
        dataset.channels,
        config.train_size,
        config.preset,
        backend.backend_name(),
        ", ".join(backend.list_devices()),
    )
    plan = (plan_folds(dataset.train, dataset.val, config.folds, config.seed)
            if config.folds > 1 else None)
    outcomes = {}
    for name in config.models:
        weights = None if name == "baseline" else models.resolve_weights(
            name, weight_choices[name])
        if plan is None:
            start_model_session(mixed_precision)
            outcomes[name] = _train_single(name, config, dataset, weights)
        else:
            outcomes[name] = _train_folds(name, config, dataset, weights, plan, mixed_precision)
    _check_finite(outcomes)
    best = max(config.models, key=lambda name: outcomes[name].val_auc)
    fit = fit_temperature(outcomes[best].val_logits, outcomes[best].val.labels)
    start_model_session(mixed_precision)
    selected_layer = _save_selected(config.out_dir, outcomes[best], fit.temperature, dataset)
    kill_point("train", "selected_saved")
    results = _results(config, dataset, outcomes, best, fit, selected_layer, mixed_precision)
    if plan is not None:
        results["cross_validation"] = cross_validation_block(outcomes, plan.fold_of_patient,
                                                             best)
    results["files_sha256"] = file_set_sha256(config.out_dir, [
        *contract.MODEL_FILES.values(), *(f for o in outcomes.values() for f in o.files)])
    contract.write_training_results(config.out_dir, results)
    log_summary(results, config.out_dir)
    return results


def _check_finite(outcomes: dict[str, ModelOutcome]) -> None:
    """Refuse a model whose validation or test logits are not finite (a diverged run).

    Raises:
        UserError: naming the model, before selection and calibration use its logits.
    """
    for name, outcome in outcomes.items():
        if not (np.isfinite(outcome.val_logits).all() and np.isfinite(outcome.test_logits).all()):
            raise UserError(f"{name} predicts non-finite logits (training diverged); lower "
                            "--learning-rate and re-run with --overwrite.")


def _train_single(name: str, config: TrainConfig, dataset: Dataset,
                  weights: models.ResolvedWeights | None) -> ModelOutcome:
    """Train (or reuse) ``runs/<name>/`` on the train split; logits on validation and test."""
    model, record = train_or_reuse(name, config, (dataset.train, dataset.val), dataset.digest,
                                   weights, config.out_dir / "runs" / name)
    model_file = f"runs/{name}/{MODEL_FILE}"
    return ModelOutcome(
        name=name,
        records=(record,),
        val=dataset.val,
        val_logits=predict_logits(model, dataset.val.images, config.batch_size),
        test_logits=predict_logits(model, dataset.test.images, config.batch_size),
        model_file=model_file,
        files=(model_file,),
        params=int(model.count_params()),
        grad_cam_layer=models.grad_cam_layer(model),
    )


def _train_folds(name: str, config: TrainConfig, dataset: Dataset,
                 weights: models.ResolvedWeights | None, plan: FoldPlan,
                 mixed_precision: bool) -> ModelOutcome:
    """Train (or reuse) ``runs/<name>/fold<k>/`` per fold; save the fold ensemble.

    Each fold model predicts its own validation fold (the out-of-fold logits, in pooled
    order) and the test split; the test logits of the ensemble are the mean of the folds'.
    """
    records, files, fold_auc, test_logits = [], [], [], []
    oof_logits = np.zeros(len(plan.pooled), dtype=np.float32)
    for fold in range(plan.folds):
        start_model_session(mixed_precision)
        train, val = plan.split(fold)
        fold_run = FoldRun(fold, plan.folds, tuple(plan.patients(fold)))
        model, record = train_or_reuse(name, config, (train, val), dataset.digest, weights,
                                       config.out_dir / "runs" / name / f"fold{fold}", fold_run)
        val_logits = predict_logits(model, val.images, config.batch_size)
        oof_logits[plan.validation_indices(fold)] = val_logits
        fold_auc.append(auc(val.labels, sigmoid(val_logits)))
        test_logits.append(predict_logits(model, dataset.test.images, config.batch_size))
        records.append(record)
        files.append(f"runs/{name}/fold{fold}/{MODEL_FILE}")
    start_model_session(mixed_precision)
    ensemble = build_ensemble([_load(config.out_dir, file, dataset) for file in files], name)
    ensemble_file = f"runs/{name}/ensemble.keras"
    with atomic_path(config.out_dir / ensemble_file) as temporary:
        ensemble.save(temporary)
    LOG.info("%s: %d-fold out-of-fold validation AUC %.3f (folds %s); ensemble %s", name,
             plan.folds, auc(plan.pooled.labels, sigmoid(oof_logits)),
             ", ".join("n/a" if v is None else f"{v:.3f}" for v in fold_auc), ensemble_file)
    return ModelOutcome(
        name=name,
        records=tuple(records),
        val=plan.pooled,
        val_logits=oof_logits,
        test_logits=np.mean(np.stack(test_logits), axis=0, dtype=np.float32),
        model_file=ensemble_file,
        files=(*files, ensemble_file),
        params=int(ensemble.count_params()),
        grad_cam_layer=models.grad_cam_layer(ensemble),
        fold_val_auc=tuple(fold_auc),
    )


def _load(out_dir: Path, relative: str, dataset: Dataset) -> keras.Model:
    return load_classifier(out_dir / relative, dataset.image_size, contract.RESULTS_FILE,
                           dataset.channels)


def _save_selected(out_dir: Path, outcome: ModelOutcome, temperature: float,
                   dataset: Dataset) -> str | list[str]:
    """Write the selected model with its temperature as .keras and .h5; its Grad-CAM layer."""
    selected = with_temperature(_load(out_dir, outcome.model_file, dataset), temperature)
    with atomic_path(out_dir / contract.MODEL_FILES["keras"]) as temporary:
        selected.save(temporary)
    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # the .h5 is kept on purpose; hide Keras' legacy notice
    try:
        with atomic_path(out_dir / contract.MODEL_FILES["h5"]) as temporary:
            selected.save(temporary)
    finally:
        absl_logger.setLevel(previous)
    return models.grad_cam_layer(selected)


def _results(config: TrainConfig, dataset: Dataset, outcomes: dict[str, ModelOutcome],
             best: str, fit: TemperatureFit, selected_layer: str | list[str],
             mixed_precision: bool) -> dict:
    entries = {
        name: model_entry(outcome, dataset.test, fit=fit, model_path=contract.MODEL_FILES[
            "keras"], grad_cam_layer=selected_layer) if name == best
        else model_entry(outcome, dataset.test)
        for name, outcome in outcomes.items()
    }
    validation = "validation" if config.folds == 1 else "pooled out-of-fold validation"
    threshold = youden_threshold(outcomes[best].val.labels,
                                 np.asarray(entries[best]["validation"]["y_prob"]))
    # lungct.threshold's rule, applied to the calibrated (and, with folds, pooled) probabilities.
    threshold["rule"] = ("youden_j_on_calibrated_validation" if config.folds == 1
                         else "youden_j_on_calibrated_pooled_out_of_fold_validation")
    return {
        "class_names": list(contract.CLASS_NAMES),
        "best_model": best,
        "selection": {
            "metric": "val_auc",
            "rule": f"highest {validation} AUC; ties: first in --models",
        },
        "threshold": threshold,
        "calibration": calibration_block(fit, config.folds),
        "models": entries,
        "validation": entries[best]["validation"],
        "test": entries[best]["test"],
        "config": {**config.to_json(), "image_size": dataset.image_size,
                   "channels": dataset.channels},
        "environment": {
            **backend.environment(),
            "mixed_precision": mixed_precision,
            "jit_compile": backend.training_jit_compile(),
        },
        "dataset": dataset.provenance,
        "dataset_manifest_sha256": dataset.digest,
        "model_files": dict(contract.MODEL_FILES),
    }
