"""A multi-process training job: joining it, keeping its processes in step, and ending it
cleanly when one of them fails.

A job is described the way Keras documents it, by ``KERAS_DISTRIBUTION_JOB_ADDRESSES``,
``KERAS_DISTRIBUTION_NUM_PROCESSES`` and ``KERAS_DISTRIBUTION_PROCESS_ID``
(``keras.distribution.initialize``), or by SLURM (more than one task: ``initialize()`` is called
with no arguments and JAX reads SLURM's variables). :func:`join_processes` joins it before
anything touches a device; process 0 is the one that writes (lungct.train.stage).

Barriers and agreements go through the key-value store of JAX's coordination service (which
process 0 hosts), never through a device collective: a collective waits for ever for a process
that stopped, while a key-value barrier also watches for the failure every process records on
its way out (:func:`reporting_failures`). A process that fails:

1. records ``lungct/failed/<id>`` with its one-line reason;
2. waits up to :data:`PEER_WAIT_S` until every other process has seen it or failed too (the
   others stop at their next barrier with "process <id> of the job stopped: <reason>");
3. leaves with :func:`leave`, without JAX's shutdown barrier (which would wait up to 5 minutes
   for processes that already left); process 0, whose exit takes the coordination service
   down, leaves last (it waits up to :data:`PEER_WAIT_S` more for the others to leave).

A process killed outright (``kill -9``, a lost machine) records nothing. A worker's death
breaks process 0's next gradient all-reduce at once (JAX's gloo collectives on CPU), and
process 0 stops with one sentence, the worker's recorded reason where there is one. Process
0's death takes the coordination service with it, and JAX aborts the others at once (SIGABRT,
its own "another task died" message), as it does a worker still busy (compiling, in an
all-reduce) when process 0 leaves after a failure. A process waiting at a barrier for a killed
one is stopped by JAX's heartbeat check after about 100 s. None of these hangs. On GPUs the
collectives are NCCL's, whose reaction to a dead peer was not measured here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from lungct.errors import UserError

__all__ = ["MULTI_PROCESS_VARIABLES", "PEER_WAIT_S", "SLURM_TASKS_VARIABLE", "PeerFailedError",
           "agree_across_processes", "barrier", "is_primary", "join_processes", "leave",
           "process_count", "reporting_failures"]

LOG = logging.getLogger(__name__)

#: Keras' variables for a multi-process job (``keras.distribution.initialize``): the
#: coordinator's (process 0's) ``host:port`` first, the number of processes, this one's id.
MULTI_PROCESS_VARIABLES = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
#: SLURM's task count, the variable JAX's SLURM detection reads too.
SLURM_TASKS_VARIABLE = "SLURM_NTASKS"
#: s; how long a failing process waits for the others to see its failure (and process 0 for
#: the others to leave) before it leaves anyway: long enough for a worker finishing an epoch
#: on a CPU to reach its next barrier.
PEER_WAIT_S = 30.0
_POLL_S = 0.1  # s between two looks at the key-value store
_FAILED, _SEEN, _LEFT = "lungct/failed/", "lungct/seen/", "lungct/left/"

_joined = {"multi_process": False, "collective_broken": False}
#: How many barriers and agreements this process has entered: every process enters the same
#: ones in the same order, so the count keeps a name used twice from meeting its old keys.
_entered = {"count": 0}


class PeerFailedError(UserError):
    """Another process of the job recorded its failure; this one stops too."""


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
    import keras

    from lungct import backend

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
    return not _joined["multi_process"] or _process_id() == 0


def _client() -> Any:
    """The coordination service's client of this process (``jax.distributed``; jaxlib's
    ``DistributedRuntimeClient`` has no public type)."""
    from jax._src import distributed

    return distributed.global_state.client


def _process_id() -> int:
    """This process's id in the job it joined (``jax.process_index``)."""
    import jax

    return jax.process_index()


def _peer_failure(client: Any) -> PeerFailedError | None:
    """The first failure another process recorded (marking it seen), or None."""
    failed = [(key, reason) for key, reason in client.key_value_dir_get(_FAILED)
              if key.rsplit("/", 1)[1] != str(_process_id())]
    if not failed:
        return None
    client.key_value_set(f"{_SEEN}{_process_id()}", "1", allow_overwrite=True)
    key, reason = sorted(failed)[0]
    return PeerFailedError(f"process {key.rsplit('/', 1)[1]} of the job stopped: {reason}")


def _wait_for_all(client: Any, prefix: str) -> None:
    """Wait until every process has a key under ``prefix``; stop if another one failed
    (looked at once more after the last key came, so no failure slips through)."""
    while len(client.key_value_dir_get(prefix)) < process_count():
        if failure := _peer_failure(client):
            raise failure
        time.sleep(_POLL_S)
    if failure := _peer_failure(client):
        raise failure


def _wait_for_ids(client: Any, prefixes: tuple[str, ...], timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until every other process has a key under one of
    ``prefixes``; whether they all did."""
    others = {str(i) for i in range(process_count())} - {str(_process_id())}
    deadline = time.monotonic() + timeout_s
    while True:
        done = {key.rsplit("/", 1)[1] for prefix in prefixes
                for key, _ in client.key_value_dir_get(prefix)}
        if others <= done:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)


def _step_prefix(what: str) -> str:
    """The key-value folder of this process's next barrier or agreement."""
    _entered["count"] += 1
    return f"lungct/{_entered['count']}-{what}/"


def barrier(name: str) -> None:
    """Wait until every process of the job reaches the barrier ``name`` (no-op alone).

    Raises:
        UserError: another process recorded its failure first (the message carries its reason).
    """
    if process_count() == 1:
        return
    client, prefix = _client(), _step_prefix(f"barrier/{name}")
    client.key_value_set(f"{prefix}{_process_id()}", "1")
    _wait_for_all(client, prefix)


def agree_across_processes(what: str, state: str) -> None:
    """Refuse to go on unless every process holds the same ``state`` (no-op alone).

    Raises:
        UserError: the processes differ, e.g. each sees its own output folder, or another
            process failed first.
    """
    if process_count() == 1:
        return
    client, prefix = _client(), _step_prefix("agree")
    client.key_value_set(f"{prefix}{_process_id()}",
                         hashlib.sha256(state.encode("utf-8")).hexdigest())
    _wait_for_all(client, prefix)
    if len({value for _, value in client.key_value_dir_get(prefix)}) > 1:
        raise UserError(
            f"the processes of the job disagree on {what}; give every process the same "
            "--dataset and --out folders on a file system they all see."
        )


def _collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a device collective broken by a process that stopped (JAX's gloo
    collectives on CPU raise it with "Gloo" in the first line)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return isinstance(error, (RuntimeError, ValueError)) and "Gloo" in first


@contextlib.contextmanager
def reporting_failures() -> Iterator[None]:
    """Record this process's failure for the others, and wait (bounded) until they saw it.

    Inside a multi-process job, any exception (Ctrl-C included) is recorded as
    ``lungct/failed/<id>`` with its first line, then re-raised. A broken collective becomes
    the reason another process recorded, or else a UserError that says another process
    stopped. Outside a job this does nothing.
    """
    try:
        yield
    except PeerFailedError:
        raise
    except BaseException as error:
        if process_count() == 1:
            raise
        broken = _collective_failure(error)
        _joined["collective_broken"] = broken
        translated: UserError | None = None
        with contextlib.suppress(Exception):  # the service may be gone with process 0
            client = _client()
            if broken:  # the peers are gone or see it break too: no wait
                translated = _peer_failure(client)
            else:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                client.key_value_set(f"{_FAILED}{_process_id()}", reason[:500],
                                     allow_overwrite=True)
                if not _wait_for_ids(client, (_SEEN, _FAILED), PEER_WAIT_S):
                    LOG.warning("not every process of the job saw this failure within %g s",
                                PEER_WAIT_S)
        if broken and translated is None:
            first = str(error).strip().splitlines()[0]
            translated = UserError(f"a collective operation across the job's processes failed "
                                   f"({first[:200]}); another process has stopped: its log "
                                   "says why.")
        if translated is not None:
            raise translated from error
        raise


def leave(exit_code: int) -> int:
    """End a failed process of a multi-process job now; return ``exit_code`` otherwise.

    After a failure the processes must not run JAX's shutdown (it waits for every process at
    a barrier, up to 5 minutes, and those that left never come): a process flushes its
    output and exits at once, ignoring a second Ctrl-C. Process 0 hosts the coordination
    service, so it first waits (up to :data:`PEER_WAIT_S`) until the others have left,
    unless a broken collective said they are gone.
    """
    if exit_code == 0 or process_count() == 1:
        return exit_code
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):  # the service may be gone with process 0
        client = _client()
        if not is_primary():
            client.key_value_set(f"{_LEFT}{_process_id()}", "1", allow_overwrite=True)
        elif not _joined["collective_broken"]:
            _wait_for_ids(client, (_LEFT,), PEER_WAIT_S)
            time.sleep(10 * _POLL_S)  # the others' last instructions after recording it
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
