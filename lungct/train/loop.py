"""One training phase (compile + fit) and the callbacks that follow a model across phases.

A model trains in one to two phases (baseline: from scratch; transfer: frozen backbone, then
fine-tuning). :class:`PhaseTracker` keeps one history over the phases, writes
``runs/<model>/history.csv`` after every epoch, logs an ETA after a phase's first epoch, and
restores the weights of the best validation AUC at the end of each phase, so a phase never
leaves the model worse than the one before it. :class:`EpochCheckpoint` writes
``runs/<model>/checkpoint.npz`` (lungct.train.checkpoint) after every epoch, and
:func:`fit_phase` continues from it when an interrupted run is started again: earlier phases
are skipped, every state is restored, and ``fit`` starts at the next epoch
(the stage removes the checkpoint once the final ``model.keras`` is written). On
TensorFlow, Keras' TensorBoard callback logs to ``runs/<model>/logs/``.
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
from lungct.faults import kill_point
from lungct.fileio import atomic_write_text
from lungct.train.batches import ArrayBatches
from lungct.train.checkpoint import (
    EARLY_STOPPING_FIELDS,
    REDUCE_LR_FIELDS,
    TrainingState,
    assign_values,
    counters_of,
    set_counters,
    state_variables,
    variable_values,
    write_checkpoint,
)
from lungct.train.image_cache import SplitData

__all__ = [
    "CHECKPOINT_FILE",
    "HISTORY_COLUMNS",
    "LOGS_DIR",
    "EpochCheckpoint",
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
#: The state of a run in progress (lungct.train.checkpoint); removed with the run finished.
CHECKPOINT_FILE = "checkpoint.npz"
#: TensorBoard event files, under runs/<model>/ (TensorFlow backend only).
LOGS_DIR = "logs"
LR_FACTOR = 0.5
MIN_LEARNING_RATE = 1e-6


class PhaseTracker(keras.callbacks.Callback):
    """History, ETA and best-weights restoring over the phases of one model.

    Args:
        classifier: the model that is saved (the training model may wrap it).
        run_dir: ``runs/<model>/``.
        verbose: Keras ``fit`` verbosity (0 none, 1 bars, 2 a line per epoch).
        fingerprint: the run's fingerprint, written into every checkpoint.

    Attributes:
        resume: the checkpoint state an interrupted run continues from, until
            :func:`fit_phase` has restored it (``None``: nothing to resume).
    """

    def __init__(
        self, classifier: keras.Model, run_dir: Path, verbose: int = 2, fingerprint: str = ""
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.run_dir = Path(run_dir)
        self.verbose = verbose
        self.fingerprint = fingerprint
        self.resume: TrainingState | None = None
        self.rows: list[dict] = []
        self.images_trained = 0
        self.best_val_auc = -math.inf
        self._best_weights: list[np.ndarray] | None = None
        self._phase = ""
        self._phase_epochs = 0
        self._images_per_epoch = 0
        self._phase_epoch = 0
        self._epoch_started = 0.0
        self._started = time.perf_counter()

    @property
    def epochs_done(self) -> int:
        """Epochs trained so far, over all phases."""
        return len(self.rows)

    @property
    def phase(self) -> str:
        """The phase being trained."""
        return self._phase

    @property
    def phase_epochs_done(self) -> int:
        """Epochs trained so far in the current phase."""
        return self._phase_epoch

    @property
    def best_weights(self) -> list[np.ndarray] | None:
        """The classifier's weights at the best validation AUC so far."""
        return self._best_weights

    @property
    def train_seconds(self) -> float:
        """Seconds since training began, over every interrupted session of this run."""
        return time.perf_counter() - self._started

    @property
    def history(self) -> dict[str, list]:
        """The per-epoch log as columns, like ``keras.callbacks.History.history``."""
        return {column: [row.get(column) for row in self.rows] for column in HISTORY_COLUMNS}

    def start_phase(self, phase: str, epochs: int, images_per_epoch: int) -> None:
        """Announce the next ``fit``: its name, epochs and training images per epoch."""
        self._phase, self._phase_epochs = phase, epochs
        self._images_per_epoch = images_per_epoch
        self._phase_epoch = 0

    def restore(self, state: TrainingState) -> None:
        """Take over the history, counters and best weights of a checkpoint (after
        :meth:`start_phase` of its phase) and rewrite history.csv to match it."""
        self.rows = [dict(row) for row in state.rows]
        self.images_trained = state.images_trained
        self.best_val_auc = state.best_val_auc
        self._best_weights = state.best_weights
        self._phase_epoch = state.phase_epochs_done
        self._started = time.perf_counter() - state.train_seconds
        self._write_history()

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


class EpochCheckpoint(keras.callbacks.Callback):
    """Write ``runs/<model>/checkpoint.npz`` after every epoch; restore counters on resume.

    It must be the last callback of the ``fit``: by then early stopping and learning-rate
    reduction have updated their counters, the optimizer's learning rate and
    ``stop_training`` for this epoch, so the checkpoint holds the state the next epoch
    starts from.

    Args:
        tracker: the model's :class:`PhaseTracker` (history, best weights, fingerprint).
        early_stopping: the phase's EarlyStopping.
        reduce_lr: the phase's ReduceLROnPlateau.
        last_epoch: the epoch index (over all phases) after which the phase ends.
        resume: counters to put back when ``fit`` begins (they reset in ``on_train_begin``).
    """

    def __init__(
        self,
        tracker: PhaseTracker,
        early_stopping: keras.callbacks.EarlyStopping,
        reduce_lr: keras.callbacks.ReduceLROnPlateau,
        last_epoch: int,
        resume: TrainingState | None = None,
    ) -> None:
        super().__init__()
        self.tracker = tracker
        self.early_stopping = early_stopping
        self.reduce_lr = reduce_lr
        self.last_epoch = last_epoch
        self.resume = resume

    def on_train_begin(self, logs=None) -> None:
        if self.resume is not None:
            set_counters(self.early_stopping, self.resume.early_stopping)
            set_counters(self.reduce_lr, self.resume.reduce_lr)

    def on_epoch_end(self, epoch, logs=None) -> None:
        tracker = self.tracker
        state = TrainingState(
            fingerprint=tracker.fingerprint,
            phase=tracker.phase,
            phase_epochs_done=tracker.phase_epochs_done,
            phase_finished=bool(self.model.stop_training) or epoch >= self.last_epoch,
            rows=tracker.rows,
            images_trained=tracker.images_trained,
            train_seconds=tracker.train_seconds,
            best_val_auc=tracker.best_val_auc,
            early_stopping=counters_of(self.early_stopping, EARLY_STOPPING_FIELDS),
            reduce_lr=counters_of(self.reduce_lr, REDUCE_LR_FIELDS),
            model_variables=variable_values(state_variables(tracker.classifier, self.model)),
            optimizer_variables=variable_values(self.model.optimizer.variables),
            best_weights=tracker.best_weights,
        )
        write_checkpoint(tracker.run_dir / CHECKPOINT_FILE, state)
        kill_point("train", "epoch_saved")


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
    the numbering of earlier phases. With ``tracker.resume`` set, a phase that ended before the
    checkpoint is skipped (not even compiled), and the checkpoint's phase restores every state
    and continues at its next epoch, or only restores its best weights if it had ended.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    resume = _resume_for(tracker, phase)
    if resume is not None and phase in resume.earlier_phases:
        LOG.info("%s %s: finished before the interruption", tracker.classifier.name, phase)
        return
    compile_for_training(training_model, learning_rate)
    first_epoch = tracker.epochs_done if resume is None else (
        resume.epochs_done - resume.phase_epochs_done)
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
    if resume is not None:
        _restore(training_model, train_batches, tracker, resume)
        if resume.phase_finished:
            tracker.restore_best()
            return
    early_stopping = keras.callbacks.EarlyStopping(
        monitor=MONITOR, mode="max", patience=config.patience)
    reduce_lr = keras.callbacks.ReduceLROnPlateau(
        monitor=MONITOR,
        mode="max",
        factor=LR_FACTOR,
        patience=max(1, config.patience // 2),
        min_lr=MIN_LEARNING_RATE,
    )
    callbacks = [
        tracker,
        early_stopping,
        reduce_lr,
        *extra_callbacks,
        *_tensorboard(tracker.run_dir),
        EpochCheckpoint(tracker, early_stopping, reduce_lr, first_epoch + epochs - 1, resume),
    ]
    training_model.fit(
        train_batches,
        validation_data=val_batches,
        initial_epoch=tracker.epochs_done,
        epochs=first_epoch + epochs,
        callbacks=callbacks,
        verbose=tracker.verbose,
        # ArrayBatches shuffles from (seed, epoch); Keras' own batch-order shuffle would draw
        # from Python's global `random`, a state no checkpoint can restore exactly.
        shuffle=False,
    )


def _resume_for(tracker: PhaseTracker, phase: str) -> TrainingState | None:
    """The checkpoint state that concerns ``phase``; a state that cannot is dropped."""
    resume = tracker.resume
    if resume is None or phase == resume.phase or phase in resume.earlier_phases:
        return resume
    LOG.warning(
        "%s: the checkpoint's phase %s does not follow phase %s: training from the start",
        tracker.classifier.name,
        resume.phase,
        phase,
    )
    tracker.resume = None
    return None


def _restore(
    training_model: keras.Model,
    train_batches: ArrayBatches,
    tracker: PhaseTracker,
    resume: TrainingState,
) -> None:
    """Put a checkpoint's state back: variables (seed states included), optimizer, loader
    epoch and the tracker; the callbacks' counters follow in EpochCheckpoint.on_train_begin."""
    path = tracker.run_dir / CHECKPOINT_FILE
    assign_values(state_variables(tracker.classifier, training_model), resume.model_variables,
                  path, "model")
    training_model.optimizer.build(training_model.trainable_variables)
    assign_values(training_model.optimizer.variables, resume.optimizer_variables, path,
                  "optimizer")
    for _ in range(resume.phase_epochs_done):
        train_batches.on_epoch_end()
    tracker.restore(resume)
    tracker.resume = None
    LOG.info(
        "%s: resuming %s after epoch %d from %s",
        tracker.classifier.name,
        resume.phase,
        resume.epochs_done,
        path,
    )


def _tensorboard(run_dir: Path) -> list[keras.callbacks.Callback]:
    """Keras' TensorBoard callback logging to ``runs/<model>/logs/``, where it can run."""
    if not backend.tensorboard_available():
        return []
    # No graph: the training wrapper's augmentation layer has no JSON config to show.
    return [keras.callbacks.TensorBoard(log_dir=str(run_dir / LOGS_DIR), write_graph=False)]
