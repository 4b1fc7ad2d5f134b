"""Stage 2: train every model, select one on validation, choose its threshold, save.

The stage reads as named steps: load the dataset; apply the preset; for each model, train it
(phases 1-2, :mod:`lungct.train.phases`) or reuse its finished run; phase 3: every model
predicts the validation and test splits once, the highest validation AUC is selected, the
decision threshold is chosen on validation (Youden's J); write the selected model
(``lung_cancer_cnn_enhanced.h5`` / ``.keras``), ``runs/<model>/`` and
``training_results.json`` (docs/formats.md).
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

from lungct import backend, contract
from lungct.errors import UserError
from lungct.faults import kill_point
from lungct.fileio import atomic_path, atomic_write_json
from lungct.fingerprint import file_set_sha256, file_sha256, fingerprint
from lungct.locking import output_lock, shared_lock
from lungct.metrics import auc
from lungct.modelio import load_classifier
from lungct.threshold import youden_threshold
from lungct.train import models
from lungct.train.batches import predict_batches
from lungct.train.config import TrainConfig, resolve_config
from lungct.train.distribute import distribution_scope
from lungct.train.image_cache import SplitData, check_split_classes, load_split
from lungct.train.loop import CHECKPOINT_FILE
from lungct.train.phases import train_model

__all__ = ["Dataset", "load_dataset", "run", "start_model_session"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    """The splits and provenance a run trains on."""

    train: SplitData
    val: SplitData
    test: SplitData
    image_size: int
    digest: str
    provenance: dict


def load_dataset(dataset_dir: Path) -> Dataset:
    """Read the manifest, refuse unusable splits, and load the three splits' images."""
    manifest = contract.read_manifest(dataset_dir)
    check_split_classes(manifest)
    splits = {split: load_split(dataset_dir, manifest, split) for split in contract.SPLITS}
    if len(splits["test"]) == 0:
        raise UserError(f"the test split of {dataset_dir} is empty.")
    return Dataset(
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        image_size=int(splits["train"].images.shape[1]),
        digest=contract.manifest_sha256(dataset_dir),
        provenance=contract.read_dataset_info(dataset_dir, required=False),
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

    Raises:
        UserError: bad dataset, output folder, weights, or out of memory.
    """
    _check_output_dir(config.out_dir)
    with (output_lock(config.out_dir / contract.RESULTS_FILE, "train"),
          shared_lock(config.dataset_dir, "train")):
        return _run_locked(config)


def _run_locked(config: TrainConfig) -> dict:
    dataset = load_dataset(config.dataset_dir)
    config = resolve_config(config, dataset.image_size, backend.accelerator_kind())
    mixed_precision = _mixed_precision_enabled(config.mixed_precision)
    weight_choices = models.parse_weights_option(config.weights)
    LOG.info(
        "training %s on %d/%d/%d train/val/test images (%d px, computing at %d px), %s preset, "
        "%s backend on %s",
        ", ".join(config.models),
        len(dataset.train),
        len(dataset.val),
        len(dataset.test),
        dataset.image_size,
        config.train_size,
        config.preset,
        backend.backend_name(),
        ", ".join(backend.list_devices()),
    )
    outcomes = {}
    for name in config.models:
        start_model_session(mixed_precision)
        outcomes[name] = _train_or_reuse(name, config, dataset, weight_choices)
    best = max(config.models, key=lambda name: outcomes[name]["val_auc"])
    threshold = youden_threshold(
        dataset.val.labels, np.asarray(outcomes[best]["validation"]["y_prob"])
    )
    _save_selected(config.out_dir, outcomes[best]["model_path"], dataset.image_size)
    kill_point("train", "selected_saved")
    results = _results(config, dataset, outcomes, best, threshold, mixed_precision)
    results["files_sha256"] = file_set_sha256(config.out_dir, [
        *contract.MODEL_FILES.values(), *(o["model_path"] for o in outcomes.values())])
    contract.write_training_results(config.out_dir, results)
    _log_summary(results, config.out_dir)
    return results


def _run_fingerprint(
    name: str, config: TrainConfig, dataset: Dataset, weights: models.ResolvedWeights | None
) -> str:
    settings = config.to_json()
    for unrelated in ("dataset_dir", "out_dir", "models", "overwrite", "progress",
                      "gradcam_max_images",
                      "fine_tune_layers_by_model"):
        settings.pop(unrelated)
    settings.update(
        model=name,
        dataset=dataset.digest,
        backend=backend.backend_name(),
        weights_source=weights.source if weights else None,
        fine_tune_layers=None if name == "baseline" else config.fine_tune_layer_count(name),
    )
    return fingerprint(settings)


def _train_or_reuse(
    name: str, config: TrainConfig, dataset: Dataset, weight_choices: dict[str, str]
) -> dict:
    run_dir = config.out_dir / "runs" / name
    weights = None if name == "baseline" else models.resolve_weights(name, weight_choices[name])
    run_fingerprint = _run_fingerprint(name, config, dataset, weights)
    record = None if config.overwrite else _reusable_record(run_dir, run_fingerprint)
    with (
        _out_of_memory_as_user_error(name, config.batch_size),
        distribution_scope(config.distribute, config.batch_size),
    ):
        if record is None:
            model, record = train_model(name, config, dataset.train, dataset.val, weights,
                                        run_dir, fingerprint=run_fingerprint)
            record["fingerprint"] = run_fingerprint
            with atomic_path(run_dir / "model.keras") as temporary:
                model.save(temporary)
            record["model_sha256"] = file_sha256(run_dir / "model.keras")
            atomic_write_json(run_dir / "run.json", record)
            kill_point("train", "run_saved")
            # The checkpoint protects a run in progress; model.keras now holds the same weights.
            (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        else:
            LOG.info(
                "%s: reusing %s (same configuration and dataset; --overwrite retrains)",
                name,
                run_dir,
            )
            model = load_classifier(run_dir / "model.keras", dataset.image_size,
                                    str(run_dir / "run.json"))
        return _predict_outcome(model, name, config, dataset, record)


@contextlib.contextmanager
def _out_of_memory_as_user_error(name: str, batch_size: int) -> Iterator[None]:
    try:
        yield
    except Exception as error:
        if backend.is_out_of_memory(error):
            raise UserError(
                f"out of memory training {name} at --batch-size {batch_size}; lower "
                "--batch-size or --train-size."
            ) from error
        raise


def _reusable_record(run_dir: Path, fingerprint: str) -> dict | None:
    try:
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    try:
        unchanged = file_sha256(run_dir / "model.keras") == record.get("model_sha256")
    except OSError:
        return None
    if not unchanged:
        LOG.warning("%s/model.keras changed since run.json was written: retraining",
                    run_dir)
    return record if unchanged else None


def _predict_outcome(
    model: keras.Model, name: str, config: TrainConfig, dataset: Dataset, record: dict
) -> dict:
    blocks = {}
    for key, split in (("validation", dataset.val), ("test", dataset.test)):
        probabilities = predict_batches(model, split.images, config.batch_size).reshape(-1)
        blocks[key] = {
            "paths": list(split.paths),
            "patient_ids": list(split.patient_ids),
            "y_true": [int(label) for label in split.labels],
            "y_prob": [float(p) for p in probabilities.astype(np.float32)],
        }
    val_auc = auc(dataset.val.labels, blocks["validation"]["y_prob"])
    test_auc = auc(dataset.test.labels, blocks["test"]["y_prob"])
    LOG.info(
        "%s: validation AUC %.3f, test AUC %s",
        name,
        val_auc,
        "undefined" if test_auc is None else f"{test_auc:.3f}",
    )
    fields = (
        "history",
        "params",
        "weights_source",
        "train_seconds",
        "images_per_second",
        "n_train_images",
        "class_weight",
        "fine_tuned_layers",
    )
    return {
        **{field: record[field] for field in fields},
        "val_auc": val_auc,
        "test_auc": test_auc,
        "grad_cam_layer": models.grad_cam_layer(model),
        "model_path": f"runs/{name}/model.keras",
        **blocks,
    }


def _save_selected(out_dir: Path, model_path: str, image_size: int) -> None:
    source = out_dir / model_path
    with atomic_path(out_dir / contract.MODEL_FILES["keras"]) as temporary:
        shutil.copyfile(source, temporary)
    model = load_classifier(source, image_size, contract.RESULTS_FILE)
    absl_logger = logging.getLogger("absl")
    previous = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # the .h5 is kept on purpose; hide Keras' legacy notice
    try:
        with atomic_path(out_dir / contract.MODEL_FILES["h5"]) as temporary:
            model.save(temporary)
    finally:
        absl_logger.setLevel(previous)


def _results(config, dataset, outcomes, best, threshold, mixed_precision) -> dict:
    return {
        "class_names": list(contract.CLASS_NAMES),
        "best_model": best,
        "selection": {
            "metric": "val_auc",
            "rule": "highest validation AUC; ties: first in --models",
        },
        "threshold": threshold,
        "models": outcomes,
        "validation": outcomes[best]["validation"],
        "test": outcomes[best]["test"],
        "config": {**config.to_json(), "image_size": dataset.image_size},
        "environment": {
            **backend.environment(),
            "mixed_precision": mixed_precision,
            "jit_compile": backend.training_jit_compile(),
        },
        "dataset": dataset.provenance,
        "dataset_manifest_sha256": dataset.digest,
        "model_files": dict(contract.MODEL_FILES),
    }


def _log_summary(results: dict, out_dir: Path) -> None:
    for name, outcome in results["models"].items():
        test_auc = outcome["test_auc"]
        LOG.info(
            "%-9s val AUC %.3f  test AUC %s  %6.1f s  %s%s",
            name,
            outcome["val_auc"],
            "  n/a" if test_auc is None else f"{test_auc:.3f}",
            outcome["train_seconds"],
            outcome["weights_source"],
            "  <- selected" if name == results["best_model"] else "",
        )
    LOG.info(
        "threshold %.4f (Youden's J on validation); wrote %s, %s and %s in %s",
        results["threshold"]["value"],
        contract.MODEL_FILES["h5"],
        contract.MODEL_FILES["keras"],
        contract.RESULTS_FILE,
        out_dir.resolve(),
    )
