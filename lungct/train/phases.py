"""Phases 1 and 2 for one model: the baseline from scratch, or a transfer model frozen then
fine-tuned.

Phase 1 trains the baseline CNN from scratch on augmented images. Phase 2 trains VGG16 /
ResNet50 with the backbone frozen (``training=False``), then fine-tunes its top layers at a
10x lower learning rate; with cached features, the frozen part of the backbone runs once over
the images and the rest trains on its activations.

An interrupted run continues from ``runs/<model>/checkpoint.npz`` (lungct.train.checkpoint)
when it was written by the same run (same fingerprint) and ``--overwrite`` is off: the model is
built and frozen/unfrozen as before, and lungct.train.loop.fit_phase skips the phases that had
ended and restores the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from lungct.errors import UserError
from lungct.sampling import stratified_draw
from lungct.train import models
from lungct.train.augment import AugmentationRanges, augmented_model
from lungct.train.batches import predict_batches
from lungct.train.checkpoint import read_checkpoint
from lungct.train.config import TrainConfig
from lungct.train.distribute import MIRRORED_NAN_HINT, FiniteLossCheck
from lungct.train.image_cache import SplitData
from lungct.train.loop import CHECKPOINT_FILE, PhaseTracker, fit_phase

__all__ = ["FINE_TUNE_LR_FACTOR", "train_model"]

LOG = logging.getLogger(__name__)

FINE_TUNE_LR_FACTOR = 0.1


def _progress_verbosity(progress: str) -> int:
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "epoch"
    return {"bar": 1, "epoch": 2, "none": 0}[progress]


def _balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """``n / (2 n_c)`` per class (scikit-learn's "balanced"); 1 and 1 on a balanced split."""
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.asarray(labels))
    return {0: float(weights[0]), 1: float(weights[1])}


def train_model(
    name: str,
    config: TrainConfig,
    train: SplitData,
    val: SplitData,
    weights: models.ResolvedWeights | None,
    run_dir: Path,
    *,
    fingerprint: str = "",
) -> tuple[keras.Model, dict]:
    """Build and train model ``name`` (phase 1 or 2); return it with its run record.

    ``fingerprint`` identifies the run (settings and dataset, lungct.train.stage): a checkpoint
    left in ``run_dir`` by an interrupted run resumes only when it carries the same one (and
    ``config.overwrite`` is off); the resumed run ends with the weights and history of an
    uninterrupted one (bit-identical on TensorFlow/CPU, tests/test_train_resume.py).

    The record holds the history, parameter count, weights source, timing, training images,
    class weights and the fine-tuned layers. The best validation-AUC weights are restored.
    """
    keras.utils.set_random_seed(config.seed)
    if config.max_train_images and len(train) > config.max_train_images:
        train = train.subset(stratified_draw(train.labels, config.max_train_images, config.seed))
    class_weight = _balanced_class_weights(train.labels)
    model = models.build_model(name, int(train.images.shape[1]), config.train_size, weights,
                               channels=int(train.images.shape[-1]))
    tracker = PhaseTracker(
        model, run_dir, verbose=_progress_verbosity(config.progress), fingerprint=fingerprint
    )
    if not config.overwrite:
        tracker.resume = read_checkpoint(run_dir / CHECKPOINT_FILE, fingerprint)
    hint = MIRRORED_NAN_HINT if config.distribute == "mirrored" else "lower --learning-rate"
    common = dict(
        tracker=tracker,
        config=config,
        val=val,
        class_weight=class_weight,
        extra_callbacks=[FiniteLossCheck(hint=hint)],
    )
    ranges = AugmentationRanges() if config.augment else None
    fine_tuned: list[str] = []
    if name == "baseline":
        fit_phase(
            augmented_model(model, ranges, config.seed),
            "scratch",
            train.images,
            train.labels,
            config.epochs,
            config.learning_rate,
            **common,
        )
    else:
        fine_tuned = _train_transfer(model, name, config, train, ranges, common)
    tracker.restore_best()
    seconds = tracker.train_seconds
    record = {
        "history": tracker.history,
        "params": int(model.count_params()),
        "weights_source": weights.source if weights else "random: trained from scratch",
        "train_seconds": round(seconds, 2),
        "images_per_second": round(tracker.images_trained / seconds, 2),
        "n_train_images": len(train),
        "class_weight": {str(label): weight for label, weight in class_weight.items()},
        "fine_tuned_layers": fine_tuned,
    }
    return model, record


def _train_transfer(
    model: keras.Model,
    name: str,
    config: TrainConfig,
    train: SplitData,
    ranges: AugmentationRanges | None,
    common: dict,
) -> list[str]:
    n_layers = config.fine_tune_layer_count(name)
    n_backbone_layers = len(models.backbone_of(model).layers)
    if n_layers > n_backbone_layers - 2:
        raise UserError(
            f"--fine-tune-layers {n_layers} is more than {name} allows ({n_backbone_layers - 2})."
        )
    models.freeze_backbone(model)
    split = models.split_below_top_layers(model, n_layers) if config.cached_features else None
    if config.cached_features and split is None:
        LOG.info(
            "%s: the top %d layers are not a clean cut of the backbone; training on "
            "augmented images instead of cached activations",
            name,
            n_layers,
        )
    if split is None:
        trainee, x, val = augmented_model(model, ranges, config.seed), train.images, common["val"]
    else:
        trainee, x, val = split[1], *_cached_activations(split[0], train, common["val"], config)
    phase_args = {**common, "val": val}
    if config.frozen_epochs:
        fit_phase(
            trainee,
            "frozen",
            x,
            train.labels,
            config.frozen_epochs,
            config.learning_rate,
            **phase_args,
        )
    if not config.fine_tune_epochs:
        return []
    fine_tuned = models.unfreeze_top_layers(model, n_layers)
    LOG.info(
        "%s: fine-tuning %d backbone layers (%s ... %s) at learning rate %g",
        name,
        len(fine_tuned),
        fine_tuned[0],
        fine_tuned[-1],
        config.learning_rate * FINE_TUNE_LR_FACTOR,
    )
    fit_phase(
        trainee,
        "fine_tune",
        x,
        train.labels,
        config.fine_tune_epochs,
        config.learning_rate * FINE_TUNE_LR_FACTOR,
        **phase_args,
    )
    return fine_tuned


def _cached_activations(
    lower: keras.Model, train: SplitData, val: SplitData, config: TrainConfig
) -> tuple[np.ndarray, SplitData]:
    """Run the frozen part of the backbone once over the train and validation images."""
    started = time.perf_counter()
    train_activations = predict_batches(lower, train.images, config.batch_size)
    val_activations = predict_batches(lower, val.images, config.batch_size)
    LOG.info(
        "%s: frozen-backbone activations %s of %d images in %.1f s",
        lower.name,
        train_activations.shape[1:],
        len(train) + len(val),
        time.perf_counter() - started,
    )
    return train_activations, dataclasses.replace(val, images=val_activations)
