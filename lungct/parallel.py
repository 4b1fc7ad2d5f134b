"""A process-pool ``map`` with a progress bar, inline for one worker.

Workers watch their parent: when the stage process dies (even by ``SIGKILL``), each worker
exits within a second instead of living on as an orphan.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

__all__ = ["pool_map"]

PARENT_POLL_S = 0.5

Item = TypeVar("Item")
Result = TypeVar("Result")


def _exit_with_parent(parent_pid: int) -> None:
    """Pool initializer: a daemon thread ends this worker once its parent is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="lungct-parent-watch", daemon=True).start()


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
        chunk = max(1, min(64, len(items) // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=get_context("fork"),
                                 initializer=_exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            for result in pool.map(function, items, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()
