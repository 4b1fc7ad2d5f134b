"""A process-pool ``map`` with a progress bar, inline for one worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TypeVar

from tqdm import tqdm

__all__ = ["pool_map"]

Item = TypeVar("Item")
Result = TypeVar("Result")


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
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            for result in pool.map(function, items, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()
