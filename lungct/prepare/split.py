"""Patient-level split and balancing of candidate samples.

Splitting by slice or by nodule puts one patient in train and test and inflates every metric
(docs/lidc_format.md, pitfalls), so patients are split first and samples follow their patient.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungct.contract import SPLITS
from lungct.prepare.candidates import Candidate
from lungct.sampling import largest_remainder

__all__ = ["split_patients", "Selection", "balance"]

LOG = logging.getLogger(__name__)

def split_patients(
    patient_labels: dict[str, int], fractions: Sequence[float], seed: int
) -> dict[str, str]:
    """Assign each patient to train/val/test, stratified by the patient's label.

    Deterministic for a given seed and set of patients: each label's patients are sorted,
    shuffled with ``numpy.random.default_rng(seed)`` and cut by largest-remainder counts.

    Args:
        patient_labels: patient id -> 1 if any of its samples is cancer, else 0.
        fractions: train, val, test fractions summing to 1.
        seed: random seed.
    """
    if (len(fractions) != len(SPLITS) or not all(math.isfinite(f) for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {list(fractions)}")
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(set(patient_labels.values()), reverse=True):
        patients = sorted(p for p, lab in patient_labels.items() if lab == label)
        order = rng.permutation(len(patients))
        start = 0
        for split, count in zip(SPLITS, largest_remainder(len(patients), fractions), strict=True):
            for index in order[start : start + count]:
                assignment[patients[index]] = split
            start += count
    return assignment


@dataclass(frozen=True)
class Selection:
    """The chosen samples and what was asked for, per split and class."""

    samples: list[tuple[str, Candidate]]  # (split, candidate)
    requested: dict[str, dict[str, int]]  # split -> class name -> count asked for
    available: dict[str, dict[str, int]]  # split -> class name -> candidates there were


def _round_robin(
    candidates: list[Candidate], quota: int, cap_used: dict[str, int], cap: int,
    rng: np.random.Generator,
) -> list[Candidate]:
    """Take up to ``quota`` candidates one patient at a time, at most ``cap`` per patient."""
    by_patient: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_patient[candidate.patient_id].append(candidate)
    queues = []
    for patient in sorted(by_patient):
        items = sorted(by_patient[patient], key=lambda c: c.key)
        queues.append([items[i] for i in rng.permutation(len(items))])
    queues = [queues[i] for i in rng.permutation(len(queues))]
    chosen: list[Candidate] = []
    while len(chosen) < quota:
        progressed = False
        for queue in queues:
            if len(chosen) >= quota:
                break
            if queue and cap_used[queue[0].patient_id] < cap:
                candidate = queue.pop(0)
                cap_used[candidate.patient_id] += 1
                chosen.append(candidate)
                progressed = True
        if not progressed:
            break
    return chosen


def balance(
    candidates: Sequence[Candidate],
    split_of: dict[str, str],
    fractions: Sequence[float],
    target_count: int,
    max_per_patient: int,
    seed: int,
) -> Selection:
    """Choose ``target_count`` samples, half per class, spread over patients.

    Each split gets its fraction of each class's half. Within a class, samples are drawn
    without replacement, one patient at a time in seeded order, at most ``max_per_patient``
    per patient; non-cancer samples are split evenly between negative kinds where both exist,
    the other kind filling a shortfall. A shortfall is kept (never filled by duplicates) and
    shows in ``requested`` vs the samples.
    """
    if target_count < 2:
        raise ValueError(f"target count must be >= 2, got {target_count}")
    if max_per_patient < 1:
        raise ValueError(f"max per patient must be >= 1, got {max_per_patient}")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, int], list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        groups[(split_of[candidate.patient_id], candidate.label)].append(candidate)
    per_class = target_count // 2
    samples: list[tuple[str, Candidate]] = []
    requested: dict[str, dict[str, int]] = {}
    available: dict[str, dict[str, int]] = {}
    quotas = dict(zip(SPLITS, largest_remainder(per_class, fractions), strict=True))
    for split in SPLITS:
        requested[split], available[split] = {}, {}
        for label, class_name in ((1, "cancer"), (0, "non_cancer")):
            pool = groups.get((split, label), [])
            quota = quotas[split] + (target_count % 2 if label == 0 and split == "train" else 0)
            requested[split][class_name], available[split][class_name] = quota, len(pool)
            cap_used: dict[str, int] = defaultdict(int)
            kinds = sorted({c.negative_kind for c in pool})
            chosen: list[Candidate] = []
            for position, kind in enumerate(kinds):
                share = (quota - len(chosen)) // (len(kinds) - position)
                subset = [c for c in pool if c.negative_kind == kind]
                chosen += _round_robin(subset, share, cap_used, max_per_patient, rng)
            taken = {c.key for c in chosen}
            rest = [c for c in pool if c.key not in taken]
            chosen += _round_robin(rest, quota - len(chosen), cap_used, max_per_patient, rng)
            samples += [(split, c) for c in chosen]
            if len(chosen) < quota:
                LOG.warning("%s/%s: %d of %d requested samples available (shortfall kept)",
                            split, class_name, len(chosen), quota)
    return Selection(samples, requested, available)
