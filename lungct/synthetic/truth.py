"""truth.json content: each lesion's true parameters and readings, the consensus labels,
reference pixels per tissue, slice classes and the cohort summary (part of
:mod:`lungct.synthetic`)."""

from __future__ import annotations

import logging
import math
import statistics

import numpy as np

from lungct.synthetic.anatomy import Anatomy, Vessel, vessel_section
from lungct.synthetic.lesions import Lesion
from lungct.synthetic.readers import Mark
from lungct.synthetic.scan import Geometry

__all__ = [
    "LABEL_RULE",
    "NEGATIVE_MARGIN_MM",
    "cohort_summary",
    "lesion_truth",
    "reference_points",
    "slice_classes",
]

LOG = logging.getLogger(__name__)

#: The default consensus rule, recorded with the labels in truth.json (docs/lidc_format.md).
LABEL_RULE = {"rating": "malignancy", "aggregate": "median", "cancer_at_least": 4,
              "non_cancer_at_most": 2, "min_readers": 1}
NEGATIVE_MARGIN_MM = 10.0  # no-finding slices: at least this far in z from every mark


def _consensus(lesion_marks: list[Mark]) -> tuple[float | None, str]:
    """Median malignancy of the readers who rated the nodule, and its label (LABEL_RULE)."""
    ratings = [mark.characteristics["malignancy"] for mark in lesion_marks
               if mark.characteristics is not None]
    if len(ratings) < LABEL_RULE["min_readers"]:
        return None, "unrated"
    median = float(statistics.median(ratings))
    if median >= LABEL_RULE["cancer_at_least"]:
        return median, "cancer"
    return median, "non_cancer" if median <= LABEL_RULE["non_cancer_at_most"] else "excluded"


def _consensus_slices(lesion_marks: list[Mark]) -> list[int]:
    """Slices outlined by at least half of the readers who outlined the nodule."""
    outliners = [mark for mark in lesion_marks if mark.characteristics is not None]
    counts: dict[int, int] = {}
    for mark in outliners:
        for k in {roi.slice_index for roi in mark.rois if roi.inclusion}:
            counts[k] = counts.get(k, 0) + 1
    return sorted(k for k, count in counts.items() if 2 * count >= len(outliners))


def lesion_truth(index: int, lesion: Lesion, lesion_marks: list[Mark],
                  geometry: Geometry) -> dict:
    x, y, z = lesion.centre_mm
    entry = {
        "index": index, "kind": lesion.kind, "diameter_mm": round(lesion.diameter_mm, 3),
        "centre_mm": [round(x, 3), round(y, 3), round(z, 3)],
        "centre_px": {"col": round(geometry.to_px(x), 2), "row": round(geometry.to_px(y), 2),
                      "slice_index": geometry.slice_of(z),
                      "instance_number": geometry.slice_of(z) + 1},
        "readings": [{"reader": mark.reader, "mark_id": mark.mark_id,
                      "characteristics": mark.characteristics,
                      "roi_z_mm": sorted({geometry.z_mm[roi.slice_index] for roi in mark.rois}),
                      "n_rois": len(mark.rois)} for mark in lesion_marks],
    }
    if lesion.kind == "nodule":
        median, label = _consensus(lesion_marks)
        entry.update({
            "texture": lesion.texture, "solid_fraction": round(lesion.solid_fraction, 4),
            "spiculation": round(lesion.spiculation, 4), "lobulation": round(lesion.lobulation, 4),
            "calcification": lesion.calcification,
            "calcified": lesion.calcification != "absent",
            "cavitated": lesion.cavity_radius_mm > 0, "elongation": round(lesion.elongation, 4),
            "n_spicules": len(lesion.spicule_dirs), "n_lobes": len(lesion.lobe_dirs),
            "latent_malignancy": round(lesion.latent_malignancy, 4),
            "median_malignancy": median, "label": label,
            "consensus_slice_indices": _consensus_slices(lesion_marks),
        })
    return entry


def _clear_lung_point(geometry: Geometry, anatomy: Anatomy, vessels: list[Vessel],
                      lesions: list[Lesion], k: int) -> tuple[float, float]:
    """A lung point on slice ``k`` clear of vessels and lesions (reference for lung HU)."""
    z = geometry.z_mm[k]
    sections = [s for s in (vessel_section(v, z) for v in vessels) if s is not None]
    for rho in (0.5, 0.35, 0.65, 0.2, 0.8):
        for angle in np.linspace(0, 2 * np.pi, 12, endpoint=False):
            for side in (0, 1):
                x = anatomy.lung_cx_mm[side] + rho * anatomy.lung_a_mm[side, k] * math.cos(angle)
                y = anatomy.lung_cy_mm + rho * anatomy.lung_b_mm[side, k] * math.sin(angle)
                if (anatomy.in_lung(side, k, x, y, 8.0)
                        and all(math.hypot(x - sx, y - sy) > 4 * r + 6 for sx, sy, r, _ in sections)
                        and all(math.dist((x, y, z), lesion.centre_mm) > lesion.extent_mm + 8
                                for lesion in lesions)):
                    return x, y
    LOG.debug("no clear lung point on slice %d; using the lung centre", k)
    return anatomy.lung_cx_mm[0], anatomy.lung_cy_mm


def reference_points(geometry: Geometry, anatomy: Anatomy, vessels: list[Vessel],
                      lesions: list[Lesion]) -> dict[str, dict[str, int]]:
    """Pixels known to hold air, lung parenchyma, soft tissue (heart) and bone (vertebra)."""
    mid, last = len(geometry.z_mm) // 2, len(geometry.z_mm) - 1
    scan_radius_mm = geometry.image_size_px / 2 * geometry.pixel_spacing_mm
    points = {
        "air": (mid, 0.0, (anatomy.body_cy_mm - anatomy.body_b_mm - scan_radius_mm) / 2),
        "lung": (mid, *_clear_lung_point(geometry, anatomy, vessels, lesions, mid)),
        "soft_tissue": (last, *anatomy.heart_xy_mm),
        "bone": (mid, *anatomy.vertebra_xy_mm),
    }
    return {name: {"slice_index": k, "row": round(geometry.to_px(y)),
                   "col": round(geometry.to_px(x))} for name, (k, x, y) in points.items()}


def slice_classes(geometry: Geometry, entries: list[dict], marks: list[Mark]
                   ) -> dict[str, list[int]]:
    """Slice indices per class under LABEL_RULE: cancer, benign nodule, no finding."""
    def outlined(label: str) -> set[int]:
        return {k for entry in entries if entry.get("label") == label
                for k in entry["consensus_slice_indices"]}

    cancer = outlined("cancer")
    mark_z = np.array([geometry.z_mm[roi.slice_index] for mark in marks for roi in mark.rois])
    no_finding = [k for k, z in enumerate(geometry.z_mm)
                  if mark_z.size == 0 or np.abs(mark_z - z).min() >= NEGATIVE_MARGIN_MM]
    return {"cancer": sorted(cancer), "benign_nodule": sorted(outlined("non_cancer") - cancer),
            "no_finding": no_finding}


def cohort_summary(patients: list[dict], max_per_patient: int = 20) -> dict:
    """Counts of nodules per outcome and of slices per class, also capped per patient (the
    demo's ``--max-per-patient``); negative = benign nodule or no finding."""
    nodules = [lesion for patient in patients for lesion in patient["lesions"]
               if lesion["kind"] == "nodule"]
    summary: dict[str, int] = {
        "patients": len(patients), "nodules": len(nodules),
        "patients_cancer_free": sum(patient["cancer_free"] for patient in patients)}
    for outcome in ("cancer", "non_cancer", "excluded", "unrated"):
        summary[f"nodules_{outcome}"] = sum(lesion["label"] == outcome for lesion in nodules)
    for kind in ("small_nodule", "non_nodule"):
        summary[f"{kind}s"] = sum(lesion["kind"] == kind for patient in patients
                                  for lesion in patient["lesions"])
    for name in ("cancer", "benign_nodule", "no_finding", "negative"):
        counts = [len(patient["slices"]["benign_nodule"]) + len(patient["slices"]["no_finding"])
                  if name == "negative" else len(patient["slices"][name])
                  for patient in patients]
        summary[f"slices_{name}"] = sum(counts)
        summary[f"slices_{name}_capped_{max_per_patient}"] = sum(min(count, max_per_patient)
                                                                  for count in counts)
        summary[f"patients_with_{name}_slices"] = sum(count > 0 for count in counts)
    return summary
