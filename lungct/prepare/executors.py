"""Where prepare's tasks run: this machine's process pool, or a Dask cluster.

``--executor local`` (the default) is :func:`lungct.parallel.pool_map`: forked processes of
this machine, nothing to install or start. ``--executor dask`` hands the same tasks to a Dask
``distributed`` cluster: a ``LocalCluster`` of ``--workers`` processes of one thread each, or
the user's running cluster at ``--dask-scheduler`` (e.g. one started by ``dask-jobqueue`` on
SLURM). Dask is imported only here and only for ``--executor dask`` (the ``lungct[dask]``
extra).

A task is a whole series (rendering) or a batch of files (the header index), never one file,
and only paths and small records cross process boundaries (pydicom datasets do not pickle
reliably). Results come back in the order of the tasks, whatever the executor, so the output
does not depend on it. Every worker must see the input and the output folder under the same
absolute paths (a shared file system on a cluster) and run the same lungct:
:meth:`DaskExecutor.check_shared` asks every worker before any task is sent, and a failed task
ends the run as one sentence naming the task and its error (the traceback is in the workers'
logs, and at ``--verbose`` here).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm import tqdm

import lungct
from lungct.errors import UserError
from lungct.parallel import pool_map

__all__ = ["CONNECT_TIMEOUT_S", "EXECUTORS", "MAX_TASK_FAILURES", "Executor", "open_executor"]

LOG = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")
#: Seconds to reach a user's scheduler, and to wait for its first worker, before giving up
#: with one sentence (never a hang on a wrong address or an empty cluster).
CONNECT_TIMEOUT_S = 30.0
#: Times a task may lose its worker (killed, out of memory) before the run stops: Dask's
#: ``distributed.scheduler.allowed-failures``, set for the clusters prepare starts.
MAX_TASK_FAILURES = 2
_INSTALL_HINT = "--executor dask needs Dask: pip install 'lungct[dask]'"
_SHOWN_CHARS = 200  # of a failed task's error message

Item = TypeVar("Item")
Result = TypeVar("Result")


class Executor(Protocol):
    """Runs module-level functions over tasks, results in the order of the tasks."""

    workers: int

    def map(self, function: Callable[[Item], Result], items: Sequence[Item],
            description: str) -> Iterator[Result]:
        """Yield ``function(item)`` for every item, in order."""
        ...

    def check_shared(self, folder: Path, purpose: str) -> None:
        """Raise :class:`~lungct.errors.UserError` when a worker cannot see ``folder``."""
        ...


class LocalExecutor:
    """This machine's process pool (:func:`lungct.parallel.pool_map`)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map(self, function: Callable[[Item], Result], items: Sequence[Item],
            description: str) -> Iterator[Result]:
        return pool_map(function, items, self.workers, description)

    def check_shared(self, folder: Path, purpose: str) -> None:
        """Nothing to check: the pool's processes are this machine's."""


def _worker_view(folders: list[str]) -> tuple[list[str], str]:
    """On a worker: which of ``folders`` it cannot see, and its lungct version."""
    return [folder for folder in folders if not os.path.isdir(folder)], lungct.__version__


class DaskExecutor:
    """A Dask ``distributed`` client: one future per task, gathered in order."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.workers = max(1, len(client.scheduler_info().get("workers", {})))

    def map(self, function: Callable[[Item], Result], items: Sequence[Item],
            description: str) -> Iterator[Result]:
        from distributed import KilledWorker

        if not items:
            return
        futures = self.client.map(function, list(items), pure=False)
        bar = tqdm(total=len(futures), desc=description, unit="task", disable=None, leave=False)
        try:
            for future in futures:
                try:
                    yield future.result()
                except KilledWorker:
                    raise UserError(
                        f"a Dask worker died {MAX_TASK_FAILURES + 1} times running one "
                        f"{description} task (out of memory, or killed?): see the workers' "
                        "logs, give them more memory or use --executor local.") from None
                except UserError:
                    raise
                except Exception as error:  # noqa: BLE001 - any task error, shown in one line
                    LOG.debug("a %s task failed on a Dask worker", description, exc_info=True)
                    shown = " ".join(str(error).split())[:_SHOWN_CHARS]
                    raise UserError(
                        f"a {description} task failed on a Dask worker "
                        f"({type(error).__name__}: {shown}): see the workers' logs, or run "
                        "with --executor local to see it here.") from None
                bar.update()
        finally:
            bar.close()
            self.client.cancel(futures)


    def check_shared(self, folder: Path, purpose: str) -> None:
        """Ask every worker whether it sees ``folder`` and runs this lungct version.

        Args:
            folder: an absolute folder the tasks will read or write.
            purpose: how the tasks use it, for the message (``"read the input from"``).

        Raises:
            UserError: a worker cannot see ``folder``, runs another lungct, or cannot run
                lungct at all.
        """
        try:
            views = self.client.run(_worker_view, [str(folder)])
        except Exception as error:  # noqa: BLE001 - e.g. lungct missing on a worker
            raise UserError(f"the Dask workers cannot run lungct ({type(error).__name__}): "
                            f"install lungct {lungct.__version__} on every worker.") from None
        blind = sorted(worker for worker, (missing, _) in views.items() if missing)
        if blind:
            raise UserError(f"the Dask workers cannot see {folder} ({len(blind)} of "
                            f"{len(views)}, e.g. {blind[0]}): workers must {purpose} a path "
                            "they all share.")
        versions = sorted({version for _, version in views.values()} - {lungct.__version__})
        if versions:
            raise UserError(f"the Dask workers run lungct {', '.join(versions)} but this process "
                            f"runs {lungct.__version__}: install the same lungct on every "
                            "worker.")


def _dashboard_address() -> str | None:
    """``":0"`` (any free port) when the dashboard can run (it needs bokeh), else None."""
    return ":0" if importlib.util.find_spec("bokeh") is not None else None


@contextlib.contextmanager
def open_executor(kind: str, workers: int, scheduler_address: str | None = None,
                  dashboard_address: str | None = "auto") -> Iterator[Executor]:
    """The executor of ``--executor kind``; closes what it started, also on Ctrl-C.

    Args:
        kind: ``"local"`` or ``"dask"``.
        workers: local processes; for a started ``LocalCluster``, its worker processes (one
            thread each); ignored for a user's cluster (its size decides).
        scheduler_address: a running Dask scheduler (``tcp://host:8786``); None starts a
            ``LocalCluster``.
        dashboard_address: for a started ``LocalCluster``: ``"auto"`` = a free port when
            bokeh is installed, None = no dashboard (tests).

    Raises:
        UserError: Dask is not installed, or the scheduler cannot be reached or has no worker
            within :data:`CONNECT_TIMEOUT_S`.
    """
    if kind == "local":
        yield LocalExecutor(workers)
        return
    if kind != "dask":
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError(f"{_INSTALL_HINT}.") from None
    if not LOG.isEnabledFor(logging.DEBUG):
        # distributed logs every worker's start and stop at INFO; --verbose shows them
        logging.getLogger("distributed").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if scheduler_address is None:
            if dashboard_address == "auto":
                dashboard_address = _dashboard_address()
            with dask.config.set({"distributed.scheduler.allowed-failures": MAX_TASK_FAILURES}):
                cluster = stack.enter_context(LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True,
                    dashboard_address=dashboard_address))
            client = stack.enter_context(Client(cluster))
            LOG.info("Dask LocalCluster: %d worker processes of one thread", workers)
        else:
            client = stack.enter_context(_connect(Client, scheduler_address))
            LOG.info("Dask cluster at %s: %d workers (--workers does not apply)",
                     scheduler_address, len(client.scheduler_info().get("workers", {})))
        if client.dashboard_link and (scheduler_address is not None or dashboard_address):
            LOG.info("Dask dashboard: %s", client.dashboard_link)
        yield DaskExecutor(client)


@contextlib.contextmanager
def _connect(client_class: Any, address: str) -> Iterator[Any]:
    """A client of the scheduler at ``address`` with at least one worker."""
    try:
        client = client_class(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as error:
        raise UserError(f"cannot reach the Dask scheduler at {address} within "
                        f"{CONNECT_TIMEOUT_S:g} s ({type(error).__name__}): check "
                        "--dask-scheduler or DASK_SCHEDULER_ADDRESS.") from None
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError):
            raise UserError(f"the Dask scheduler at {address} has no worker after "
                            f"{CONNECT_TIMEOUT_S:g} s: start workers for it first.") from None
        yield client
    finally:
        client.close()
