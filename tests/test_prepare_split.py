"""lungct.prepare.split: patient-level split and balancing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungct.prepare.candidates import Candidate
from lungct.prepare.split import balance, split_patients


def _cand(patient: str, label: int, index: int, kind: str = "") -> Candidate:
    kind = kind or ("" if label else "no_finding")
    return Candidate(Path(f"/{patient}/{index}.dcm"), f"{patient}/{index}.dcm", patient, label,
                     kind, series_uid=f"1.2.{patient}", slice_z_mm=float(index))


def test_split_is_stratified_disjoint_and_deterministic():
    """Each label's patients are spread 70/15/15; same seed, same split."""
    labels = {f"P{i:02d}": int(i < 20) for i in range(40)}
    first = split_patients(labels, (0.7, 0.15, 0.15), seed=3)
    assert first == split_patients(labels, (0.7, 0.15, 0.15), seed=3)
    assert first != split_patients(labels, (0.7, 0.15, 0.15), seed=4)
    for label in (0, 1):
        splits = [first[p] for p, lab in labels.items() if lab == label]
        assert (splits.count("train"), splits.count("val"), splits.count("test")) == (14, 3, 3)


def test_split_rejects_bad_fractions():
    """Fractions must be three and sum to 1."""
    with pytest.raises(ValueError, match=r"summing to 1, got \[0.5, 0.5, 0.5\]"):
        split_patients({}, (0.5, 0.5, 0.5), 0)


def test_balance_caps_per_patient_and_never_duplicates():
    """No candidate twice, at most max_per_patient per patient and class."""
    candidates = [_cand(f"P{p}", 1, i) for p in range(4) for i in range(30)]
    candidates += [_cand(f"N{p}", 0, i) for p in range(4) for i in range(30)]
    split_of = {c.patient_id: "train" for c in candidates}
    selection = balance(candidates, split_of, (1.0, 0.0, 0.0), 100, 5, seed=0)
    keys = [c.key for _, c in selection.samples]
    assert len(keys) == len(set(keys))
    per_patient = {}
    for _, c in selection.samples:
        per_patient[c.patient_id] = per_patient.get(c.patient_id, 0) + 1
    assert max(per_patient.values()) == 5
    assert len(selection.samples) == 40  # 4 patients x 5 per class: shortfall kept
    assert selection.requested["train"] == {"cancer": 50, "non_cancer": 50}
    assert selection.available["train"] == {"cancer": 120, "non_cancer": 120}


def test_balance_splits_negatives_between_kinds():
    """Negatives are half benign_nodule, half no_finding where both exist."""
    candidates = [_cand(f"P{p}", 1, i) for p in range(5) for i in range(10)]
    candidates += [_cand(f"B{p}", 0, i, "benign_nodule") for p in range(5) for i in range(10)]
    candidates += [_cand(f"F{p}", 0, i, "no_finding") for p in range(5) for i in range(10)]
    split_of = {c.patient_id: "train" for c in candidates}
    selection = balance(candidates, split_of, (1.0, 0.0, 0.0), 40, 20, seed=1)
    kinds = [c.negative_kind for _, c in selection.samples if c.label == 0]
    assert kinds.count("benign_nodule") == 10 and kinds.count("no_finding") == 10


def test_balance_fills_a_short_kind_with_the_other():
    """When benign nodules run short, no_finding slices fill the negatives."""
    candidates = [_cand("P0", 1, i) for i in range(10)]
    candidates += [_cand("B0", 0, 0, "benign_nodule")]
    candidates += [_cand("F0", 0, i, "no_finding") for i in range(20)]
    split_of = {c.patient_id: "train" for c in candidates}
    selection = balance(candidates, split_of, (1.0, 0.0, 0.0), 20, 20, seed=1)
    kinds = [c.negative_kind for _, c in selection.samples if c.label == 0]
    assert sorted(kinds) == ["benign_nodule"] + ["no_finding"] * 9


def test_balance_is_deterministic():
    """Same inputs and seed give the same samples in the same order."""
    candidates = [_cand(f"P{p}", p % 2, i) for p in range(6) for i in range(10)]
    split_of = split_patients({f"P{p}": p % 2 for p in range(6)}, (0.7, 0.15, 0.15), 0)
    a = balance(candidates, split_of, (0.7, 0.15, 0.15), 30, 4, seed=9)
    b = balance(candidates, split_of, (0.7, 0.15, 0.15), 30, 4, seed=9)
    assert [c.key for _, c in a.samples] == [c.key for _, c in b.samples]
