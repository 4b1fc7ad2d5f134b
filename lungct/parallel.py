"""A process-pool ``map`` with a progress bar, inline for one worker.

Workers watch their parent: when the stage process dies (even by ``SIGKILL``), each worker
exits within a second instead of living on as an orphan.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

__all__ = ["chunk_size", "exit_with_parent", "pool_map"]

PARENT_POLL_S = 0.5

Item = TypeVar("Item")
Result = TypeVar("Result")


def exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: a daemon thread ends this worker once the stage process is gone.

    Args:
        parent_pid: the stage process (``os.getpid()`` where the pool is made). A ``fork``
            pool's workers are its children: they watch their parent id change. A
            ``forkserver`` pool's workers are children of the fork server, which lives as long
            as they do (they hold its keep-alive pipe), so they watch the stage process itself
            through a pidfd (Linux >= 5.3): it refers to that very process, never to a later
            one given the same id.
    """
    if os.getppid() == parent_pid:
        def alive() -> bool:
            return os.getppid() == parent_pid
    else:
        try:
            pidfd = os.pidfd_open(parent_pid)
        except ProcessLookupError:  # already gone
            os._exit(1)

        def alive() -> bool:
            return not select.select([pidfd], [], [], 0)[0]  # readable once it has exited

    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="lungct-parent-watch", daemon=True).start()


def chunk_size(n_items: int, workers: int) -> int:
    """Items per task of a pool map: about 8 tasks per worker (a slow item delays little),
    at most 64 items (the progress moves), at least 1."""
    return max(1, min(64, n_items // (workers * 8)))


def pool_map(
    function: Callable[[Item], Result], items: Sequence[Item], workers: int, description: str
) -> Iterator[Result]:
    """Yield ``function(item)`` in order, computed by ``workers`` forked processes.

    One worker (or one item) runs inline, without a pool. The bar shows only on a terminal.
    """
    bar = tqdm(total=len(items), desc=description, unit="file", disable=None, leave=False)
    try:
        if workers == 1 or len(items) < 2:
            for item in items:
                yield function(item)
                bar.update()
            return
        chunk = chunk_size(len(items), workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                                 initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            for result in pool.map(function, items, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()
