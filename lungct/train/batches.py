"""Batches for Keras: a ``keras.utils.PyDataset`` over an array, and prediction in batches.

Works on every Keras backend (no ``tf.data``). Batches have one shape, so the training and
prediction steps compile once. Under a multi-process ``DataParallel`` (lungct.train.distribute)
each process yields its own contiguous slice of every global batch, and predictions are
gathered from every process.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from lungct.errors import UserError
from lungct.train.distribute import data_shard, predict_sharded

__all__ = ["ArrayBatches", "predict_batches"]


class ArrayBatches(keras.utils.PyDataset):
    """Batches ``(x, y, sample_weight)`` from an array (memory map or in memory).

    ``y`` is float32 ``(B, 1)``. Training batches are reshuffled every epoch from ``seed`` and
    the incomplete last batch is dropped (``drop_remainder``), so every step has one shape and
    compiles once. Evaluation batches keep every row, in order, and pad the last batch with
    weight-0 copies of its last row (``pad_final_batch``) for the same reason; weighted metrics
    ignore them and predictions are trimmed by the caller.

    Under a multi-process distribution (read when the batches are made), ``batch_size`` is
    the global batch: every process draws the same global batch (same order, same seed) and
    yields rows ``[k B/P, (k+1) B/P)`` of it, process ``k`` of ``P``.

    Args:
        x: inputs, first axis = rows.
        labels: ``(N,)`` 0/1.
        batch_size: rows per batch.
        shuffle: reshuffle the order every epoch.
        seed: seed of the shuffle.
        class_weight: per-label sample weight, or ``None`` for 1.
        drop_remainder: drop the incomplete last batch (training).
        pad_final_batch: pad the last batch to ``batch_size`` with weight-0 rows (evaluation).
    """

    def __init__(
        self,
        x: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        class_weight: dict[int, float] | None = None,
        drop_remainder: bool = False,
        pad_final_batch: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(labels):
            raise ValueError(f"x has {len(x)} rows but labels has {len(labels)}")
        self.shard_index, self.shard_count = data_shard()
        if batch_size % self.shard_count:
            raise UserError(
                f"--batch-size {batch_size} does not split evenly over {self.shard_count} "
                f"processes; use a multiple of {self.shard_count}."
            )
        if drop_remainder and len(x) < batch_size:
            raise UserError(
                f"{len(x)} training images are fewer than --batch-size {batch_size}; "
                "lower --batch-size."
            )
        self.x = x
        self.labels = np.asarray(labels, dtype=np.float32).reshape(-1, 1)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.pad_final_batch = pad_final_batch
        weights = class_weight or {0: 1.0, 1: 1.0}
        self.weights = np.where(self.labels[:, 0] > 0.5, weights[1], weights[0]).astype(np.float32)
        self._epoch = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.random.default_rng([self.seed, self._epoch]).permutation(len(self.x))

    def __len__(self) -> int:
        if self.drop_remainder:
            return len(self.x) // self.batch_size
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        weights = self.weights[rows]
        missing = self.batch_size - len(rows)
        if self.pad_final_batch and missing > 0:
            rows = np.concatenate([rows, np.full(missing, rows[-1])])
            weights = np.concatenate([weights, np.zeros(missing, dtype=np.float32)])
        if self.shuffle:
            # Sorted reads keep memory-map access sequential; rows stay paired with weights.
            sort = np.argsort(rows, kind="stable")
            rows, weights = rows[sort], weights[sort]
        if self.shard_count > 1:
            size = self.batch_size // self.shard_count
            own = slice(self.shard_index * size, (self.shard_index + 1) * size)
            rows, weights = rows[own], weights[own]
        return np.asarray(self.x[rows]), self.labels[rows], weights

    def on_epoch_end(self) -> None:
        self._epoch += 1
        self._order = self._epoch_order()


def predict_batches(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict`` in full batches (the last one padded), so it compiles for one shape.

    Under a multi-process distribution every process gets every row
    (lungct.train.distribute.predict_sharded).
    """
    batches = ArrayBatches(x, np.zeros(len(x)), batch_size, pad_final_batch=True)
    if batches.shard_count > 1:
        return predict_sharded(model, batches, batch_size)[: len(x)]
    return np.asarray(model.predict(batches, verbose=0))[: len(x)]
