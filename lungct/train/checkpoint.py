"""The per-epoch training checkpoint: all the state an interrupted run needs to continue exactly.

Keras' ``BackupAndRestore`` keeps the weights and the epoch only. Continuing an interrupted
run as if it had never stopped also needs the random-generator states (the augmentation's and
dropout's ``keras.random.SeedGenerator`` states are model variables, so they travel with the
variables), the optimizer's variables (step, learning rate, moments), early stopping's and
learning-rate reduction's counters, the best weights so far, the history and where in which
phase the run was. :func:`write_checkpoint` puts all of it into ONE ``.npz`` file through a
temporary file renamed into place (lungct.fileio), so a kill leaves the previous epoch's
checkpoint or this epoch's, never a mix of two. The file is private to training
(docs/formats.md, "Training checkpoint").
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from lungct.errors import UserError
from lungct.fileio import atomic_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "EARLY_STOPPING_FIELDS",
    "REDUCE_LR_FIELDS",
    "TrainingState",
    "assign_values",
    "counters_of",
    "read_checkpoint",
    "set_counters",
    "state_variables",
    "variable_values",
    "write_checkpoint",
]

LOG = logging.getLogger(__name__)

#: Version of the checkpoint layout; a file of another version is not resumed from.
CHECKPOINT_FORMAT = 1
#: The counters of keras.callbacks.EarlyStopping / ReduceLROnPlateau that carry over epochs
#: (both reset them in ``on_train_begin``).
EARLY_STOPPING_FIELDS = ("wait", "best", "best_epoch", "stopped_epoch")
REDUCE_LR_FIELDS = ("wait", "best", "cooldown_counter")
_ARRAY_GROUPS = ("model", "optimizer", "best")
_META_KEY = "meta"


@dataclass
class TrainingState:
    """One model's training state at the end of an epoch.

    Attributes:
        fingerprint: the run's fingerprint (lungct.train.stage); resumed only when equal.
        phase: ``scratch``, ``frozen`` or ``fine_tune``: the phase the epoch belongs to.
        phase_epochs_done: epochs finished in that phase.
        phase_finished: the phase has ended (its last epoch, or early stopping).
        rows: the history rows so far, over all phases (lungct.train.loop.HISTORY_COLUMNS).
        images_trained: training images seen so far, over all phases.
        train_seconds: seconds spent training so far, over every interrupted session.
        best_val_auc: the best validation AUC so far (``-inf`` before any).
        early_stopping: :data:`EARLY_STOPPING_FIELDS` of the phase's EarlyStopping.
        reduce_lr: :data:`REDUCE_LR_FIELDS` of the phase's ReduceLROnPlateau.
        model_variables: values of :func:`state_variables` (weights and seed states).
        optimizer_variables: values of the optimizer's variables (step, learning rate, moments).
        best_weights: the classifier's ``get_weights()`` at the best validation AUC, or ``None``.
    """

    fingerprint: str
    phase: str
    phase_epochs_done: int
    phase_finished: bool
    rows: list[dict]
    images_trained: int
    train_seconds: float
    best_val_auc: float
    early_stopping: dict[str, Any]
    reduce_lr: dict[str, Any]
    model_variables: list[np.ndarray] = field(repr=False)
    optimizer_variables: list[np.ndarray] = field(repr=False)
    best_weights: list[np.ndarray] | None = field(repr=False)

    @property
    def epochs_done(self) -> int:
        """Epochs finished over all phases."""
        return len(self.rows)

    @property
    def earlier_phases(self) -> set[str]:
        """The phases that ended before :attr:`phase` began (they have history rows)."""
        return {row["phase"] for row in self.rows} - {self.phase}


def write_checkpoint(path: Path, state: TrainingState) -> None:
    """Write ``state`` to ``path`` as one ``.npz`` file, atomically."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": state.fingerprint,
        "phase": state.phase,
        "phase_epochs_done": state.phase_epochs_done,
        "phase_finished": state.phase_finished,
        "rows": state.rows,
        "images_trained": state.images_trained,
        "train_seconds": state.train_seconds,
        "best_val_auc": state.best_val_auc,
        "early_stopping": state.early_stopping,
        "reduce_lr": state.reduce_lr,
        "has_best_weights": state.best_weights is not None,
    }
    # JSON with NaN/Infinity (Python's json reads them back): -inf before any best AUC.
    arrays = {_META_KEY: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    groups = (state.model_variables, state.optimizer_variables, state.best_weights or [])
    for group, values in zip(_ARRAY_GROUPS, groups, strict=True):
        arrays.update({f"{group}_{index:05d}": value for index, value in enumerate(values)})
    with atomic_path(path) as temporary, temporary.open("wb") as handle:
        np.savez(handle, **arrays)


def read_checkpoint(path: Path, fingerprint: str) -> TrainingState | None:
    """The state in ``path`` if it belongs to the run ``fingerprint``, else ``None``.

    A missing file is ``None`` silently; an unreadable one, one of another checkpoint format
    and one of another run (stale: settings or dataset changed) are logged and ``None``, so
    training starts over and overwrites it at its first epoch.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(archive[_META_KEY].tobytes().decode("utf-8"))
            groups = {
                group: [archive[key] for key in sorted(archive.files) if key.startswith(group)]
                for group in _ARRAY_GROUPS
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        LOG.warning("%s is unreadable (%s): training this model from the start", path, error)
        return None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        LOG.warning("%s has another checkpoint format: training this model from the start", path)
        return None
    if meta.get("fingerprint") != fingerprint:
        LOG.warning(
            "%s is stale (another configuration or dataset): training this model from the start",
            path,
        )
        return None
    return TrainingState(
        fingerprint=fingerprint,
        phase=meta["phase"],
        phase_epochs_done=int(meta["phase_epochs_done"]),
        phase_finished=bool(meta["phase_finished"]),
        rows=list(meta["rows"]),
        images_trained=int(meta["images_trained"]),
        train_seconds=float(meta["train_seconds"]),
        best_val_auc=float(meta["best_val_auc"]),
        early_stopping=dict(meta["early_stopping"]),
        reduce_lr=dict(meta["reduce_lr"]),
        model_variables=groups["model"],
        optimizer_variables=groups["optimizer"],
        best_weights=groups["best"] if meta["has_best_weights"] else None,
    )


def state_variables(*models: keras.Model) -> list[keras.Variable]:
    """Every variable of ``models`` once, in order: weights, BatchNorm statistics and the
    ``SeedGenerator`` states of augmentation and dropout (``Model.variables``)."""
    seen: set[int] = set()
    unique = []
    for model in models:
        for variable in model.variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                unique.append(variable)
    return unique


def variable_values(variables: Sequence[keras.Variable]) -> list[np.ndarray]:
    """The values of ``variables`` as NumPy arrays (copies)."""
    return [np.array(keras.ops.convert_to_numpy(variable.value)) for variable in variables]


def assign_values(variables: Sequence[keras.Variable], values: Sequence[np.ndarray],
                  path: Path, what: str) -> None:
    """Assign ``values`` to ``variables`` after checking their count, shapes and dtypes.

    Raises:
        UserError: the checkpoint ``path`` does not fit (``what``: "model" or "optimizer").
    """
    fits = len(variables) == len(values) and all(
        tuple(variable.shape) == value.shape and np.dtype(variable.dtype) == value.dtype
        for variable, value in zip(variables, values, strict=False)
    )
    if not fits:
        raise UserError(
            f"{path} does not fit the {what} being trained (written by another lungct "
            "version?); delete it or run with --overwrite."
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def counters_of(callback: keras.callbacks.Callback, names: Sequence[str]) -> dict[str, Any]:
    """The counters ``names`` of ``callback`` as JSON values (``None`` stays ``None``)."""
    values = {}
    for name in names:
        value = getattr(callback, name)
        values[name] = value if value is None or isinstance(value, int) else float(value)
    return values


def set_counters(callback: keras.callbacks.Callback, values: dict[str, Any]) -> None:
    """Put counters saved by :func:`counters_of` back into ``callback``."""
    for name, value in values.items():
        setattr(callback, name, value)
