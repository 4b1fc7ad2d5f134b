"""``generate_cohort``: validate, reuse or regenerate, write every patient, then
truth.json and the completeness marker cohort.json (part of :mod:`lungct.synthetic`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungct.errors import UserError
from lungct.fileio import atomic_write_bytes, atomic_write_json
from lungct.synthetic.anatomy import (
    render_anatomy,
    render_vessels,
    sample_anatomy,
    sample_vessels,
)
from lungct.synthetic.files import is_complete, remove_previous, series_ids, write_series
from lungct.synthetic.lesions import CANCER_FREE_FRACTION, place_lesions, render_lesion
from lungct.synthetic.readers import (
    READERS_PER_SERIES,
    read_series,
    readings_xml,
    sample_readers,
)
from lungct.synthetic.scan import (
    FIELD_OF_VIEW_MM,
    SLICE_THICKNESS_MM,
    SLICES_PER_PATIENT,
    add_noise,
    make_geometry,
    stored_values,
)
from lungct.synthetic.truth import (
    LABEL_RULE,
    NEGATIVE_MARGIN_MM,
    cohort_summary,
    lesion_truth,
    reference_points,
    slice_classes,
)

__all__ = [
    "COHORT_VERSION",
    "DEFAULT_IMAGE_SIZE_PX",
    "DEFAULT_PATIENTS",
    "generate_cohort",
]

LOG = logging.getLogger(__name__)

COHORT_VERSION = 2
DEFAULT_PATIENTS = 64
DEFAULT_IMAGE_SIZE_PX = 256


def _patient(out_dir: Path, index: int, params: dict) -> dict:
    """Generate, write and describe patient ``index`` (``LIDC-IDRI-9001`` is index 0).

    The first draw of the patient's stream decides whether the patient is cancer-free
    (probability ``CANCER_FREE_FRACTION``): then every nodule gets a benign-end shape.
    """
    rng = np.random.default_rng([params["seed"], index])
    cancer_free = bool(rng.random() < CANCER_FREE_FRACTION)
    patient_id = f"LIDC-IDRI-{9001 + index}"
    geometry = make_geometry(params["image_size_px"], rng)
    anatomy = sample_anatomy(geometry, rng)
    hu, lung = render_anatomy(geometry, anatomy, rng)
    vessels = sample_vessels(geometry, anatomy, rng)
    render_vessels(hu, lung, geometry, vessels)
    lesions = place_lesions(geometry, anatomy, rng, cancer_free)
    footprints = [render_lesion(hu, geometry, lesion) for lesion in lesions]
    add_noise(hu, rng)
    readers = sample_readers(rng)
    marks = read_series(lesions, footprints, readers, geometry, rng)
    ids = series_ids(patient_id, params, len(geometry.z_mm), rng)
    series_dir = out_dir / patient_id / ids.study_uid / ids.series_uid
    write_series(series_dir, stored_values(hu), geometry, ids)
    atomic_write_bytes(series_dir / ids.readings_name,
                       readings_xml(geometry, ids, readers, marks, lesions))
    entries = [lesion_truth(i, lesion, [mark for mark in marks if mark.lesion == i], geometry)
               for i, lesion in enumerate(lesions)]
    return {
        "patient_id": patient_id, "study_instance_uid": ids.study_uid,
        "series_instance_uid": ids.series_uid, "cancer_free": cancer_free,
        "series_dir": series_dir.relative_to(out_dir).as_posix(),
        "readings_file": (series_dir / ids.readings_name).relative_to(out_dir).as_posix(),
        "pixel_spacing_mm": geometry.pixel_spacing_mm, "slice_z_mm": list(geometry.z_mm),
        "readers": [{"reader": r, "servicing_radiologist_id": reader.radiologist_id}
                    for r, reader in enumerate(readers)],
        "reference_px": reference_points(geometry, anatomy, vessels, lesions),
        "lesions": entries, "slices": slice_classes(geometry, entries, marks),
    }


def _cohort_params(n_patients: int, image_size_px: int, seed: int) -> dict:
    return {"generator": "lungct.synthetic", "version": COHORT_VERSION,
            "n_patients": n_patients, "image_size_px": image_size_px, "seed": seed,
            "field_of_view_mm": FIELD_OF_VIEW_MM, "slice_thickness_mm": SLICE_THICKNESS_MM,
            "slices_per_patient": SLICES_PER_PATIENT, "readers_per_series": READERS_PER_SERIES}



def _validate(n_patients: int, image_size_px: int, seed: int) -> None:
    if isinstance(n_patients, bool) or not isinstance(n_patients, int) \
            or not 1 <= n_patients <= 999:
        raise ValueError(f"n_patients must be an integer from 1 to 999, got {n_patients!r}")
    if isinstance(image_size_px, bool) or not isinstance(image_size_px, int) \
            or not 48 <= image_size_px <= 1024:
        raise ValueError(f"image_size_px must be an integer from 48 to 1024, got {image_size_px!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def generate_cohort(out_dir: Path, n_patients: int = DEFAULT_PATIENTS,
                    image_size_px: int = DEFAULT_IMAGE_SIZE_PX, seed: int = 0) -> Path:
    """Write (or reuse) a synthetic LIDC-IDRI-format cohort in ``out_dir``.

    Patients ``LIDC-IDRI-9001`` ... each get a CT series (``SLICES_PER_PATIENT`` slices of
    ``SLICE_THICKNESS_MM``, pixel spacing ``FIELD_OF_VIEW_MM / image_size_px``) in the classic
    layout ``<patient>/<StudyInstanceUID>/<SeriesInstanceUID>/000001.dcm`` with the LIDC XML
    readings of four simulated radiologists beside the slices. ``truth.json`` holds the true
    lesion parameters, every reader's ratings and the consensus labels; ``cohort.json``, written
    last, records the parameters. Every file is written atomically and the output is
    byte-identical for equal arguments.

    Args:
        out_dir: folder to write into; created if missing. Only ``LIDC-IDRI-9xxx`` folders,
            ``truth.json`` and ``cohort.json`` are touched.
        n_patients: patients to generate, 1 to 999.
        image_size_px: rows = columns of every slice, 48 to 1024.
        seed: non-negative seed; patient ``i`` depends only on ``seed``, ``i`` and the size.

    Returns:
        ``out_dir``. When ``out_dir/cohort.json`` already records the same parameters the
        cohort is reused as it is; otherwise the files of an earlier generation are removed and
        the cohort is generated again.

    Raises:
        ValueError: an argument is out of range.
        UserError: ``out_dir`` cannot be written.
    """
    _validate(n_patients, image_size_px, seed)
    out_dir = Path(out_dir)
    params = _cohort_params(n_patients, image_size_px, seed)
    if is_complete(out_dir, params):
        LOG.info("reusing the synthetic cohort in %s (%d patients, %d px)", out_dir, n_patients,
                 image_size_px)
        return out_dir
    LOG.info("generating a synthetic LIDC-format cohort (%d patients, %d px, seed %d) in %s",
             n_patients, image_size_px, seed, out_dir)
    started = time.perf_counter()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_previous(out_dir)
        patients = [_patient(out_dir, index, params) for index in
                    tqdm(range(n_patients), desc="synthetic patients", unit="patient",
                         disable=None)]
        summary = cohort_summary(patients)
        atomic_write_json(out_dir / "truth.json", {
            "cohort": params, "label_rule": LABEL_RULE,
            "negative_margin_mm": NEGATIVE_MARGIN_MM, "summary": summary, "patients": patients})
        atomic_write_json(out_dir / "cohort.json", params)
    except OSError as error:
        raise UserError(f"cannot write the synthetic cohort to {out_dir}: "
                        f"{error.strerror or error}") from error
    LOG.info("synthetic cohort ready in %.1f s: %d nodules (%d cancer, %d non-cancer, "
             "%d excluded, %d unrated), %d cancer slices", time.perf_counter() - started,
             summary["nodules"], summary["nodules_cancer"], summary["nodules_non_cancer"],
             summary["nodules_excluded"], summary["nodules_unrated"], summary["slices_cancer"])
    return out_dir
