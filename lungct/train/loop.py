"""One training phase (compile + fit) and the callback that follows a model across phases.

A model trains in one to two phases (baseline: from scratch; transfer: frozen backbone, then
fine-tuning). :class:`PhaseTracker` keeps one history over the phases, writes
``runs/<model>/history.csv`` after every epoch and the best-so-far
``runs/<model>/checkpoint.keras`` after every improvement (atomically; lungct.train.stage removes
the checkpoint once the final ``model.keras`` is written), logs an ETA after a phase's first
epoch, and restores the weights of the best validation AUC at the end of each phase, so a
phase never leaves the model worse than the one before it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path

import keras
import numpy as np

from lungct import backend
from lungct.fileio import atomic_path, atomic_write_text
from lungct.train.batches import ArrayBatches
from lungct.train.image_cache import SplitData

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_COLUMNS",
    "PhaseTracker",
    "compile_for_training",
    "fit_phase",
]

LOG = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "epoch",
    "phase",
    "loss",
    "auc",
    "val_loss",
    "val_auc",
    "learning_rate",
    "seconds",
)
MONITOR = "val_auc"
CHECKPOINT_FILE = "checkpoint.keras"
LR_FACTOR = 0.5
MIN_LEARNING_RATE = 1e-6


class PhaseTracker(keras.callbacks.Callback):
    """History, checkpoint, ETA and best-weights restoring over the phases of one model.

    Args:
        classifier: the model that is saved (the training model may wrap it).
        run_dir: ``runs/<model>/``.
        verbose: Keras ``fit`` verbosity (0 none, 1 bars, 2 a line per epoch).
    """

    def __init__(self, classifier: keras.Model, run_dir: Path, verbose: int = 2) -> None:
        super().__init__()
        self.classifier = classifier
        self.run_dir = Path(run_dir)
        self.verbose = verbose
        self.rows: list[dict] = []
        self.images_trained = 0
        self.best_val_auc = -math.inf
        self._best_weights: list[np.ndarray] | None = None
        self._phase = ""
        self._phase_epochs = 0
        self._images_per_epoch = 0
        self._phase_epoch = 0
        self._epoch_started = 0.0

    @property
    def epochs_done(self) -> int:
        """Epochs trained so far, over all phases."""
        return len(self.rows)

    @property
    def history(self) -> dict[str, list]:
        """The per-epoch log as columns, like ``keras.callbacks.History.history``."""
        return {column: [row.get(column) for row in self.rows] for column in HISTORY_COLUMNS}

    def start_phase(self, phase: str, epochs: int, images_per_epoch: int) -> None:
        """Announce the next ``fit``: its name, epochs and training images per epoch."""
        self._phase, self._phase_epochs = phase, epochs
        self._images_per_epoch = images_per_epoch
        self._phase_epoch = 0

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        seconds = time.perf_counter() - self._epoch_started
        logs = logs or {}
        row = {
            "epoch": self.epochs_done + 1,
            "phase": self._phase,
            "seconds": round(seconds, 3),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        row.update(
            {key: float(logs[key]) for key in ("loss", "auc", "val_loss", "val_auc") if key in logs}
        )
        self.rows.append(row)
        self.images_trained += self._images_per_epoch
        self._phase_epoch += 1
        self._write_history()
        if self._phase_epoch == 1 and self._phase_epochs > 1:
            LOG.info(
                "%s %s: epoch 1 of %d took %.1f s (with compiling); at most about %.0f s "
                "left in this phase",
                self.classifier.name,
                self._phase,
                self._phase_epochs,
                seconds,
                seconds * (self._phase_epochs - 1),
            )
        value = row.get(MONITOR, -math.inf)
        if value > self.best_val_auc:
            self.best_val_auc = value
            self._best_weights = self.classifier.get_weights()
            with atomic_path(self.run_dir / CHECKPOINT_FILE) as temporary:
                self.classifier.save(temporary)

    def on_train_end(self, logs=None) -> None:
        self.restore_best()

    def restore_best(self) -> None:
        """Put the weights of the best validation AUC so far back into the classifier."""
        if self._best_weights is not None:
            self.classifier.set_weights(self._best_weights)

    def _write_history(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.run_dir / "history.csv", buffer.getvalue())


def compile_for_training(model: keras.Model, learning_rate: float) -> None:
    """Adam + binary cross-entropy + AUC (weighted: padded evaluation rows weigh 0)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        weighted_metrics=[keras.metrics.AUC(name="auc")],
        jit_compile=backend.training_jit_compile(),
    )


def fit_phase(
    training_model: keras.Model,
    phase: str,
    x: np.ndarray,
    labels: np.ndarray,
    epochs: int,
    learning_rate: float,
    *,
    tracker: PhaseTracker,
    config,
    val: SplitData,
    class_weight: dict[int, float] | None,
    extra_callbacks: list[keras.callbacks.Callback],
) -> None:
    """Compile ``training_model`` and fit it for up to ``epochs`` epochs on ``(x, labels)``.

    Early stopping and learning-rate reduction follow the validation AUC; the epochs continue
    the numbering of earlier phases.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    compile_for_training(training_model, learning_rate)
    first_epoch = tracker.epochs_done
    train_batches = ArrayBatches(
        x,
        labels,
        config.batch_size,
        shuffle=True,
        seed=config.seed + first_epoch,
        class_weight=class_weight,
        drop_remainder=True,
    )
    val_batches = ArrayBatches(val.images, val.labels, config.batch_size, pad_final_batch=True)
    tracker.start_phase(phase, epochs, len(train_batches) * config.batch_size)
    callbacks = [
        tracker,
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience),
        keras.callbacks.ReduceLROnPlateau(
            monitor=MONITOR,
            mode="max",
            factor=LR_FACTOR,
            patience=max(1, config.patience // 2),
            min_lr=MIN_LEARNING_RATE,
        ),
        *extra_callbacks,
    ]
    training_model.fit(
        train_batches,
        validation_data=val_batches,
        initial_epoch=first_epoch,
        epochs=first_epoch + epochs,
        callbacks=callbacks,
        verbose=tracker.verbose,
    )
