"""Training on several devices and processes: data parallelism on JAX, MirroredStrategy on
TensorFlow.

``--distribute data-parallel`` uses ``keras.distribution.DataParallel`` (JAX backend) over every
device of the job; a job of several processes (machines) is joined and kept in step by
:mod:`lungct.train.job`. Without tf.data, Keras does not shard the input
(``auto_shard_dataset=False``): each process feeds its own contiguous slice of every global
batch (:func:`data_shard`, lungct.train.batches), and predictions under the distribution are
gathered from every process (:func:`predict_sharded`). On CPU the cross-process collectives
are JAX's gloo ones.

``--distribute mirrored`` uses TensorFlow's ``tf.distribute.MirroredStrategy`` over the visible
devices; it is best-effort because upstream Keras 3 reports NaN losses and failures with it on
some versions (keras-team/keras issues 21061 and 21069), so :class:`FiniteLossCheck` stops a
run whose first losses are not finite.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import keras
import numpy as np

from lungct import backend
from lungct.errors import UserError
from lungct.train.job import join_processes, process_count

__all__ = [
    "DISTRIBUTE_MODES",
    "MIRRORED_NAN_HINT",
    "FiniteLossCheck",
    "data_shard",
    "distribution_scope",
    "predict_sharded",
]

LOG = logging.getLogger(__name__)

DISTRIBUTE_MODES = ("none", "data-parallel", "mirrored")


def data_shard() -> tuple[int, int]:
    """``(index, count)``: which slice of every global batch this process feeds.

    ``(0, 1)`` outside a multi-process distribution; under ``DataParallel`` over several
    processes, Keras' data shard id of this process and the number of processes.
    """
    distribution = keras.distribution.distribution()
    if distribution is None or distribution.num_processes == 1:
        return 0, 1
    return int(distribution.data_shard_id), int(distribution.num_processes)


def predict_sharded(model: keras.Model, batches: Sequence, batch_size: int) -> np.ndarray:
    """Predict ``batches`` (each process's slices of global batches) and gather every row.

    ``model.predict`` cannot fetch outputs that span other processes' devices; this runs the
    model's forward pass (inference mode) on each global batch, built from the processes'
    slices, and gathers the outputs on every process, in global order.

    Args:
        model: built under the current distribution.
        batches: ``batches[i][0]`` is this process's slice of global batch ``i``.
        batch_size: the global batch size.
    """
    import jax
    from jax.experimental import multihost_utils

    distribution = keras.distribution.distribution()

    @jax.jit
    def forward(trainable, non_trainable, images):
        outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    trainable = [variable.value for variable in model.trainable_variables]
    non_trainable = [variable.value for variable in model.non_trainable_variables]
    outputs = []
    for index in range(len(batches)):
        local = np.asarray(batches[index][0])
        layout = distribution.get_data_layout((batch_size, *local.shape[1:])).backend_layout
        images = jax.make_array_from_process_local_data(layout, local)
        outputs.append(np.asarray(multihost_utils.process_allgather(
            forward(trainable, non_trainable, images), tiled=True)))
    return np.concatenate(outputs)


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
    join_processes("data-parallel")
    devices = keras.distribution.list_devices()
    _check_batch_split(batch_size, len(devices))
    LOG.info("data-parallel training over %d devices in %d process(es): %s", len(devices),
             process_count(), ", ".join(devices))
    # No tf.data to shard: each process feeds its own slice of every global batch.
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
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
