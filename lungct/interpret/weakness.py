"""Weakness analysis: where the selected model errs, computed from this run's test split.

Errors are counted at the operating threshold on slices. False negatives (missed cancers) are
broken down by what the manifest knows about the cancer's nodule, false positives by the kind
of negative and, for benign nodules, by their nodule's properties. Every sentence in
``findings`` is built from these counts; none is fixed text.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["ACQUISITION_FACTORS", "DIAMETER_BINS_MM", "OUTCOMES", "error_table",
           "analyse_weaknesses", "confident_examples", "failure_cases"]

DIAMETER_BINS_MM = (0.0, 6.0, 10.0, 20.0, np.inf)
TOP_PATIENTS = 5
EXAMPLES_PER_OUTCOME = 3
#: How the scans were made: where models trained on one scanner fail on another.
ACQUISITION_FACTORS = ("manufacturer", "convolution_kernel", "slice_thickness_mm")
OUTCOMES = ("true_positive", "false_positive", "false_negative", "true_negative")


def _diameter_labels() -> list[str]:
    """Bin labels ``<6 mm``, ``6-10 mm``, ``10-20 mm``, ``>=20 mm``, in size order."""
    edges = DIAMETER_BINS_MM
    middle = [f"{lo:g}-{hi:g} mm" for lo, hi in zip(edges[1:-2], edges[2:-1], strict=True)]
    return [f"<{edges[1]:g} mm", *middle, f">={edges[-2]:g} mm"]


def _diameter_group(diameter_mm: pd.Series) -> pd.Series:
    """The diameter bin of each row (``nan`` where unknown)."""
    return pd.cut(diameter_mm, bins=list(DIAMETER_BINS_MM), labels=_diameter_labels(),
                  right=False).astype(str)


def _groups(frame: pd.DataFrame, factor: str) -> pd.Series:
    """Group label of each row for ``factor``; ``unknown`` where the manifest is empty."""
    if factor == "diameter_mm":
        groups = _diameter_group(frame["diameter_mm"])
    elif factor in ("malignancy", "n_readers", "slice_thickness_mm"):
        groups = frame[factor].map(lambda v: f"{v:g}" if np.isfinite(v) else "nan")
    else:
        groups = frame[factor].astype(str)
    return groups.replace({"nan": "unknown", "": "unknown"})


def _group_order(factor: str, group: str) -> tuple:
    """Sort key: diameter bins by size, numbers numerically, text alphabetically, unknown
    last."""
    if group == "unknown":
        return (2, 0.0, group)
    if factor == "diameter_mm":
        return (0, float(_diameter_labels().index(group)), group)
    try:
        return (0, float(group), group)
    except ValueError:
        return (1, 0.0, group)


def error_table(frame: pd.DataFrame, factor: str) -> list[dict]:
    """Per group of ``factor``: samples, errors and error rate (rows must hold ``error``)."""
    if frame.empty:
        return []
    grouped = frame.assign(group=_groups(frame, factor)).groupby("group")["error"]
    rows = [{"group": str(name), "n": int(len(errs)), "errors": int(errs.sum()),
             "rate": float(errs.mean())} for name, errs in grouped]
    return sorted(rows, key=lambda row: _group_order(factor, row["group"]))


def _rate(errors: pd.Series) -> dict:
    return {"n": int(len(errors)), "errors": int(errors.sum()),
            "rate": float(errors.mean()) if len(errors) else None}


def _extremes_sentence(kind: str, factor: str, table: list[dict]) -> str | None:
    """'Highest ... rate by factor: group, e of n (r%); lowest: ...' when two groups exist."""
    known = [row for row in table if row["group"] != "unknown" and row["n"] > 0]
    if len(known) < 2:
        return None
    high = max(known, key=lambda r: (r["rate"], r["n"]))
    low = min(known, key=lambda r: (r["rate"], -r["n"]))
    if high["rate"] == low["rate"]:
        return f"The {kind} rate by {factor} is the same in every group ({high['rate']:.0%})."
    return (f"Highest {kind} rate by {factor}: {high['group']}, {high['errors']} of {high['n']} "
            f"({high['rate']:.0%}); lowest: {low['group']}, {low['errors']} of {low['n']} "
            f"({low['rate']:.0%}).")


def confident_examples(frame: pd.DataFrame, per_outcome: int = EXAMPLES_PER_OUTCOME
                       ) -> dict[str, list[int]]:
    """Row positions of the most confident examples of each outcome, in OUTCOMES order.

    True and false positives with the highest probability of cancer first, false and true
    negatives with the lowest; equal probabilities keep the frame's order. The report's error
    table and the Grad-CAM gallery both use this one selection.
    """
    truth, called = frame["y_true"].to_numpy() == 1, frame["y_pred"].to_numpy(dtype=bool)
    members = {"true_positive": truth & called, "false_positive": ~truth & called,
               "false_negative": truth & ~called, "true_negative": ~truth & ~called}
    probability = frame["y_prob"].to_numpy(dtype=np.float64)
    rows = {}
    for outcome in OUTCOMES:
        positions = np.flatnonzero(members[outcome])
        score = probability[positions]
        key = -score if outcome in ("true_positive", "false_positive") else score
        rows[outcome] = positions[np.lexsort((positions, key))[:per_outcome]].tolist()
    return rows


def failure_cases(frame: pd.DataFrame) -> list[dict]:
    """The most confident errors: false negatives with the lowest and false positives with
    the highest probability of cancer (the gallery's error rows)."""
    examples = confident_examples(frame)
    return [{"path": str(frame["path"].iloc[row]), "kind": kind,
             "y_prob": float(frame["y_prob"].iloc[row])}
            for kind in ("false_negative", "false_positive") for row in examples[kind]]


def _patients_with_most_errors(frame: pd.DataFrame) -> list[dict]:
    total_errors = int(frame["error"].sum())
    if total_errors == 0:
        return []
    per_patient = frame.groupby("patient_id").agg(
        n_slices=("error", "size"), errors=("error", "sum"),
        false_negatives=("false_negative", "sum"), false_positives=("false_positive", "sum"))
    top = per_patient[per_patient["errors"] > 0].sort_values(
        ["errors", "n_slices"], ascending=[False, True]).head(TOP_PATIENTS)
    return [{"patient_id": str(pid), "n_slices": int(row.n_slices), "errors": int(row.errors),
             "false_negatives": int(row.false_negatives),
             "false_positives": int(row.false_positives),
             "share_of_errors": float(row.errors / total_errors)}
            for pid, row in top.iterrows()]


def analyse_weaknesses(frame: pd.DataFrame, threshold: float) -> dict:
    """Error rates and their breakdowns for the selected model's test slices.

    Args:
        frame: test rows with ``y_true``, ``y_prob``, ``patient_id``, ``negative_kind``,
            ``diameter_mm``, ``malignancy``, ``n_readers``, ``path``.
        threshold: operating threshold (predict cancer when y_prob >= threshold).

    Returns:
        The report.json ``weaknesses`` block.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    frame = frame.assign(y_pred=frame["y_prob"] >= threshold)
    frame = frame.assign(
        false_negative=(frame["y_true"] == 1) & ~frame["y_pred"],
        false_positive=(frame["y_true"] == 0) & frame["y_pred"])
    frame = frame.assign(error=frame["false_negative"] | frame["false_positive"])
    cancers = frame[frame["y_true"] == 1]
    negatives = frame[frame["y_true"] == 0]
    benign = negatives[negatives["negative_kind"] == "benign_nodule"]
    rates = {"cancer (false-negative rate)": _rate(cancers["error"]),
             "non_cancer (false-positive rate)": _rate(negatives["error"])}
    for kind, rows in negatives.groupby("negative_kind"):
        rates[f"{kind or 'unknown'} (false-positive rate)"] = _rate(rows["error"])
    acquisition = [f for f in ACQUISITION_FACTORS if f in frame]
    fn_by = {f: error_table(cancers, f) for f in ("diameter_mm", "malignancy", "n_readers",
                                                  *acquisition)}
    fp_by = {"negative_kind": error_table(negatives, "negative_kind"),
             **{f: error_table(negatives, f) for f in acquisition},
             **{f"benign_nodule {f}": error_table(benign, f)
                for f in ("diameter_mm", "malignancy", "n_readers")}}
    patients = _patients_with_most_errors(frame)
    return {
        "threshold": threshold, "error_rates": rates,
        "false_negatives_by": fn_by, "false_positives_by": fp_by,
        "patients_with_most_errors": patients,
        "failure_cases": failure_cases(frame),
        "findings": _findings(frame, fn_by, fp_by, patients),
    }


def _findings(frame: pd.DataFrame, fn_by: dict, fp_by: dict, patients: list[dict]) -> list[str]:
    """Sentences built from the counts above."""
    cancers = frame[frame["y_true"] == 1]
    negatives = frame[frame["y_true"] == 0]
    findings = [
        f"Missed cancers (false negatives): {int(cancers['error'].sum())} of {len(cancers)} "
        "cancer slices.",
        f"False positives: {int(negatives['error'].sum())} of {len(negatives)} non-cancer "
        "slices.",
    ]
    for factor, table in fn_by.items():
        findings.append(_extremes_sentence("false-negative", factor, table))
    for factor, table in fp_by.items():
        findings.append(_extremes_sentence("false-positive", factor, table))
    if patients:
        share = sum(p["share_of_errors"] for p in patients)
        findings.append(f"The {len(patients)} patients with most errors carry {share:.0%} of "
                        f"the {int(frame['error'].sum())} errors.")
    return [f for f in findings if f]
