"""Training on several devices and processes: data parallelism on JAX, MirroredStrategy on
TensorFlow.

``--distribute data-parallel`` uses ``keras.distribution.DataParallel`` (JAX backend) over every
device of the job. A job of several processes (machines) is described the way Keras documents
it, by ``KERAS_DISTRIBUTION_JOB_ADDRESSES``, ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and
``KERAS_DISTRIBUTION_PROCESS_ID`` (``keras.distribution.initialize``), or by SLURM (more than
one task: ``initialize()`` is called with no arguments and JAX reads SLURM's variables).
:func:`join_processes` joins it before anything touches a device. Without tf.data, Keras does
not shard the input (``auto_shard_dataset=False``): each process feeds its own contiguous
slice of every global batch (:func:`data_shard`, lungct.train.batches), and predictions under
the distribution are gathered from every process (:func:`predict_sharded`). Process 0 is the
one that writes (lungct.train.stage); :func:`barrier` and :func:`agree_across_processes`
keep the others in step with it. On CPU the cross-process collectives are JAX's gloo ones.

``--distribute mirrored`` uses TensorFlow's ``tf.distribute.MirroredStrategy`` over the visible
devices; it is best-effort because upstream Keras 3 reports NaN losses and failures with it on
some versions (keras-team/keras issues 21061 and 21069), so :class:`FiniteLossCheck` stops a
run whose first losses are not finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence

import keras
import numpy as np

from lungct import backend
from lungct.errors import UserError

__all__ = [
    "DISTRIBUTE_MODES",
    "MIRRORED_NAN_HINT",
    "MULTI_PROCESS_VARIABLES",
    "FiniteLossCheck",
    "agree_across_processes",
    "barrier",
    "data_shard",
    "distribution_scope",
    "is_primary",
    "join_processes",
    "predict_sharded",
    "process_count",
]

LOG = logging.getLogger(__name__)

DISTRIBUTE_MODES = ("none", "data-parallel", "mirrored")

#: Keras' variables for a multi-process job (``keras.distribution.initialize``): the
#: coordinator's (process 0's) ``host:port`` first, the number of processes, this one's id.
MULTI_PROCESS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
#: SLURM's task count, the variable JAX's SLURM detection reads too.
SLURM_TASKS_VARIABLE = "SLURM_NTASKS"

_joined = {"multi_process": False}


def _int_variable(name: str, minimum: int, maximum: int | None = None) -> int:
    text = os.environ[name].strip()
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UserError(f"{name}={text!r} must be a whole number {allowed}.")
    return value


def _requested_processes() -> tuple[int, str]:
    """The number of processes the environment asks for, and who asked (1: none asked)."""
    present = [name for name in MULTI_PROCESS_VARIABLES if os.environ.get(name, "").strip()]
    if present:
        missing = [name for name in MULTI_PROCESS_VARIABLES if name not in present]
        if missing:
            raise UserError(
                f"{', '.join(present)} is set but {', '.join(missing)} is not; a multi-process "
                f"job needs all of {', '.join(MULTI_PROCESS_VARIABLES)}."
            )
        count = _int_variable(MULTI_PROCESS_VARIABLES[1], 1)
        _int_variable(MULTI_PROCESS_VARIABLES[2], 0, count - 1)
        addresses = [a for a in os.environ[MULTI_PROCESS_VARIABLES[0]].split(",") if a.strip()]
        if len(addresses) > 1 and len(addresses) != count:
            raise UserError(
                f"{MULTI_PROCESS_VARIABLES[0]} lists {len(addresses)} addresses but "
                f"{MULTI_PROCESS_VARIABLES[1]} is {count}; list process 0's host:port alone "
                "or one address per process."
            )
        return count, "KERAS_DISTRIBUTION_* variables"
    if os.environ.get("SLURM_JOB_ID") and os.environ.get(SLURM_TASKS_VARIABLE, "").strip():
        return _int_variable(SLURM_TASKS_VARIABLE, 1), "SLURM"
    return 1, ""


def join_processes(mode: str) -> None:
    """Join the multi-process job the environment describes, once, before any device is used.

    Only ``--distribute data-parallel`` joins a job. With the ``KERAS_DISTRIBUTION_*``
    variables (all three), or under SLURM with more than one task, this calls
    ``keras.distribution.initialize()`` with no arguments: Keras reads its variables and
    ``jax.distributed.initialize`` detects SLURM itself. One process asked for: nothing to join.

    Raises:
        UserError: incomplete or invalid variables, another backend than JAX, or the
            coordinator could not be reached.
    """
    if mode != "data-parallel" or _joined["multi_process"]:
        return
    count, source = _requested_processes()
    if count == 1:
        return
    if backend.backend_name() != "jax":
        raise UserError(
            f"{source} ask for {count} processes, but multi-process training needs the JAX "
            "backend (run with KERAS_BACKEND=jax)."
        )
    import jax

    try:
        keras.distribution.initialize()
    except (RuntimeError, ValueError) as error:
        raise UserError(
            f"could not join the {count}-process job described by {source} "
            f"({str(error).splitlines()[0]}); check that process 0 runs and its address "
            "and port are reachable from this machine."
        ) from error
    _joined["multi_process"] = True
    LOG.info("process %d of %d joined the job (%s); %d devices in all",
             jax.process_index(), jax.process_count(), source, jax.device_count())


def process_count() -> int:
    """The number of processes of the job this process joined (1 when it joined none)."""
    if not _joined["multi_process"]:
        return 1
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this is process 0, the one that writes models, checkpoints and results."""
    if not _joined["multi_process"]:
        return True
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process of the job reaches the barrier ``name`` (no-op alone).

    Raises:
        UserError: another process stopped first (its own log says why).
    """
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils

    try:
        multihost_utils.sync_global_devices(name)
    except RuntimeError as error:
        raise UserError(
            f"another process of the job stopped before {name!r} "
            f"({str(error).splitlines()[0]}); process 0's log says why."
        ) from error


def agree_across_processes(what: str, state: str) -> None:
    """Refuse to go on unless every process holds the same ``state`` (no-op alone).

    Raises:
        UserError: the processes differ, e.g. each sees its own output folder.
    """
    if process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(state.encode("utf-8")).digest(), dtype=np.uint8)
    try:
        gathered = np.asarray(multihost_utils.process_allgather(digest))
    except RuntimeError as error:
        raise UserError(
            f"another process of the job stopped before agreeing on {what} "
            f"({str(error).splitlines()[0]}); process 0's log says why."
        ) from error
    if not np.all(gathered == gathered[0]):
        raise UserError(
            f"the processes of the job disagree on {what}; give every process the same "
            "--dataset and --out folders on a file system they all see."
        )


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
