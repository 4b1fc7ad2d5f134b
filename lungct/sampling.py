"""Seeded, stratified draws: the one largest-remainder rule every stage uses.

Used for the patient split (prepare), the training-image cap (train) and the Grad-CAM sample
(interpret). Largest remainder (Hamilton's method): each share gets the floor of its exact
quota, and the units left over go to the largest fractional parts, earlier shares first on
ties.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["largest_remainder", "stratified_draw"]


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` items in proportion to ``weights``; the counts sum to ``total``.

    Every non-zero weight gets at least one item when ``total`` allows it, taken from the
    largest count.

    Raises:
        ValueError: ``total`` < 0, a negative weight, or all weights zero.
    """
    share = np.asarray(weights, dtype=float)
    if total < 0 or (share < 0).any() or share.sum() <= 0:
        raise ValueError(f"need total >= 0 and non-negative weights with a positive sum, got "
                         f"{total} and {list(weights)}")
    exact = share / share.sum() * total
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    if total >= np.count_nonzero(share):
        for index in np.flatnonzero((counts == 0) & (share > 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[index] += 1
    return counts.tolist()


def stratified_draw(labels: np.ndarray, max_count: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded draw of ``max_count`` items that keeps the label ratio.

    Quotas per label by :func:`largest_remainder` (every label present keeps at least one
    item when ``max_count`` allows); labels are drawn from the highest down, each with
    ``numpy.random.default_rng(seed).choice`` without replacement. ``None`` or a count of at
    least ``len(labels)`` keeps every item.

    Raises:
        ValueError: ``max_count`` < 0.
    """
    labels = np.asarray(labels)
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    if max_count is None or max_count >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)[::-1]
    members = [np.flatnonzero(labels == value) for value in classes]
    quotas = largest_remainder(max_count, [len(m) for m in members])
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(m, q, replace=False) for m, q in zip(members, quotas, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
