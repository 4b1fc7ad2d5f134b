"""K-fold cross-validation by patient over the pooled train and validation splits.

With ``--folds K`` > 1 the test split stays untouched; the train and validation patients are
pooled and dealt into K folds by patient, stratified by the patient's label (1 when any of the
patient's images is cancer, the rule prepare splits by), so one patient's images never sit on
both sides of a fold. Fold k validates the models trained on the other K - 1 folds; the K
validation folds together give every pooled image one out-of-fold prediction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from lungct.errors import UserError
from lungct.train.image_cache import SplitData

__all__ = ["MAX_FOLDS", "FoldPlan", "assign_folds", "patient_labels", "plan_folds", "pool_splits"]

LOG = logging.getLogger(__name__)

MAX_FOLDS = 20


def patient_labels(split: SplitData) -> dict[str, int]:
    """Patient id -> 1 when any of the patient's images in ``split`` is cancer, else 0."""
    labels: dict[str, int] = {}
    for patient, label in zip(split.patient_ids, split.labels, strict=True):
        labels[patient] = max(labels.get(patient, 0), int(label))
    return labels


def assign_folds(labels: dict[str, int], folds: int, seed: int) -> dict[str, int]:
    """Patient id -> fold in ``0 .. folds-1``, stratified by the patient's label.

    Each label's patients are sorted, shuffled with ``numpy.random.default_rng(seed)`` and
    dealt round-robin into the folds, the count continuing from one label to the next, so fold
    sizes differ by at most one patient and every fold holds patients of both labels.

    Raises:
        ValueError: ``folds`` outside ``2 .. MAX_FOLDS``.
        UserError: fewer patients of a label than folds (a fold would validate on one class).
    """
    if not 2 <= folds <= MAX_FOLDS:
        raise ValueError(f"folds must be in [2, {MAX_FOLDS}], got {folds}")
    counts = {label: sum(1 for value in labels.values() if value == label) for label in (0, 1)}
    if min(counts.values()) < folds:
        raise UserError(
            f"--folds {folds} needs at least {folds} pooled train+val patients of each label, "
            f"but {counts[1]} have a cancer image and {counts[0]} have none; lower --folds."
        )
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    dealt = 0
    for label in (1, 0):
        patients = sorted(patient for patient, value in labels.items() if value == label)
        for index in rng.permutation(len(patients)):
            assignment[patients[index]] = dealt % folds
            dealt += 1
    return assignment


def pool_splits(train: SplitData, val: SplitData) -> SplitData:
    """The train split followed by the validation split (each in manifest order), in memory."""
    return SplitData(
        name="train+val",
        paths=train.paths + val.paths,
        patient_ids=train.patient_ids + val.patient_ids,
        labels=np.concatenate([train.labels, val.labels]),
        images=np.concatenate([np.asarray(train.images), np.asarray(val.images)]),
    )


@dataclass(frozen=True)
class FoldPlan:
    """The pooled images and each patient's fold.

    Attributes:
        pooled: train then validation images (the order of the out-of-fold predictions).
        fold_of_patient: patient id -> fold.
        folds: K.
    """

    pooled: SplitData
    fold_of_patient: dict[str, int]
    folds: int

    def validation_indices(self, fold: int) -> np.ndarray:
        """Rows of ``pooled`` that fold ``fold`` validates on."""
        return np.flatnonzero(
            np.array([self.fold_of_patient[p] == fold for p in self.pooled.patient_ids]))

    def split(self, fold: int) -> tuple[SplitData, SplitData]:
        """``(train, val)`` of fold ``fold``: the other folds' images, and its own."""
        if not 0 <= fold < self.folds:
            raise ValueError(f"fold must be in [0, {self.folds - 1}], got {fold}")
        val_rows = self.validation_indices(fold)
        train_rows = np.setdiff1d(np.arange(len(self.pooled)), val_rows)
        train, val = self.pooled.subset(train_rows), self.pooled.subset(val_rows)
        return (SplitData("train", train.paths, train.patient_ids, train.labels, train.images),
                SplitData("val", val.paths, val.patient_ids, val.labels, val.images))

    def patients(self, fold: int) -> list[str]:
        """The sorted patient ids fold ``fold`` validates on."""
        return sorted(p for p, k in self.fold_of_patient.items() if k == fold)


def plan_folds(train: SplitData, val: SplitData, folds: int, seed: int) -> FoldPlan:
    """Pool the train and validation splits and assign their patients to ``folds`` folds.

    Raises:
        UserError: too few patients of a label for ``folds`` (see :func:`assign_folds`).
    """
    pooled = pool_splits(train, val)
    fold_of_patient = assign_folds(patient_labels(pooled), folds, seed)
    sizes = np.bincount(list(fold_of_patient.values()), minlength=folds)
    LOG.info("%d folds of %s patients (%d pooled train+val images)", folds,
             "/".join(str(int(size)) for size in sizes), len(pooled))
    return FoldPlan(pooled, fold_of_patient, folds)
