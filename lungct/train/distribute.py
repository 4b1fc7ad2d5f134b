"""Training on several devices: data parallelism on JAX, MirroredStrategy on TensorFlow.

``--distribute data-parallel`` uses ``keras.distribution.DataParallel`` (JAX backend): the
scale-out path, multi-process capable through ``keras.distribution.initialize`` and the
``KERAS_DISTRIBUTION_*`` environment variables. ``--distribute mirrored`` uses TensorFlow's
``tf.distribute.MirroredStrategy`` over the visible devices; it is best-effort because upstream
Keras 3 reports NaN losses and failures with it on some versions (keras-team/keras issues 21061
and 21069), so :class:`FiniteLossCheck` stops a run whose first losses are not finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import keras

from lungct import backend
from lungct.errors import UserError

__all__ = [
    "DISTRIBUTE_MODES",
    "MIRRORED_NAN_HINT",
    "FiniteLossCheck",
    "distribution_scope",
]

LOG = logging.getLogger(__name__)

DISTRIBUTE_MODES = ("none", "data-parallel", "mirrored")

#: Environment variables that make ``keras.distribution.initialize`` join a multi-process job.
MULTI_PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES")


@contextlib.contextmanager
def distribution_scope(mode: str, batch_size: int) -> Iterator[None]:
    """Build, compile and fit models inside this context to train on every device.

    Args:
        mode: one of :data:`DISTRIBUTE_MODES`.
        batch_size: the global batch size; it must divide evenly over the devices.

    Raises:
        UserError: the mode does not fit the backend, or the batch does not split evenly.
    """
    if mode not in DISTRIBUTE_MODES:
        raise ValueError(f"distribute mode must be one of {DISTRIBUTE_MODES}, got {mode!r}")
    if mode == "none":
        yield
        return
    if mode == "data-parallel":
        with _data_parallel(batch_size):
            yield
        return
    with _mirrored(batch_size):
        yield


def _check_batch_split(batch_size: int, n_devices: int) -> None:
    if batch_size % n_devices:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over {n_devices} devices; "
            f"use a multiple of {n_devices}."
        )


@contextlib.contextmanager
def _data_parallel(batch_size: int) -> Iterator[None]:
    if backend.backend_name() != "jax":
        raise UserError(
            "--distribute data-parallel needs the JAX backend (run with KERAS_BACKEND=jax); "
            "with TensorFlow use --distribute mirrored."
        )
    if any(os.environ.get(name) for name in MULTI_PROCESS_VARIABLES):
        keras.distribution.initialize()
    devices = keras.distribution.list_devices()
    _check_batch_split(batch_size, len(devices))
    LOG.info("data-parallel training over %d devices: %s", len(devices), ", ".join(devices))
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


@contextlib.contextmanager
def _mirrored(batch_size: int) -> Iterator[None]:
    if backend.backend_name() != "tensorflow":
        raise UserError(
            "--distribute mirrored needs the TensorFlow backend; with JAX use "
            "--distribute data-parallel."
        )
    import tensorflow as tf

    # MirroredStrategy() alone takes the GPUs or one CPU; name the devices so that logical
    # CPU devices (the tests' stand-in for GPUs) are mirrored too.
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    _check_batch_split(batch_size, strategy.num_replicas_in_sync)
    LOG.warning(
        "--distribute mirrored is best-effort: upstream Keras 3 reports NaN losses with "
        "MirroredStrategy on some versions (keras-team/keras issues 21061, 21069); the first "
        "losses are checked. Training over %d replicas.",
        strategy.num_replicas_in_sync,
    )
    with strategy.scope():
        yield


#: What to do when the first losses of a mirrored run are not finite.
MIRRORED_NAN_HINT = (
    "this is a known upstream Keras 3 problem with MirroredStrategy (keras-team/keras issues "
    "21061, 21069): train without --distribute, or with KERAS_BACKEND=jax and "
    "--distribute data-parallel"
)


class FiniteLossCheck(keras.callbacks.Callback):
    """Stop with a clear message when one of the first ``n_batches`` training losses is NaN/inf.

    Args:
        n_batches: how many first batches of each ``fit`` to check (each check syncs the device).
        hint: what the user can do, appended to the message.
    """

    def __init__(self, n_batches: int = 5, hint: str = "lower --learning-rate") -> None:
        super().__init__()
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.n_batches = n_batches
        self.hint = hint
        self._seen = 0

    def on_train_begin(self, logs=None) -> None:
        self._seen = 0

    def on_train_batch_end(self, batch, logs=None) -> None:
        if self._seen >= self.n_batches:
            return
        self._seen += 1
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise UserError(f"the training loss was {loss} at batch {batch + 1}; {self.hint}.")
