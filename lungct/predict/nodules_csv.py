"""``--nodules CSV``: where a patch model looks, as nodule centres in patient coordinates.

Columns: ``series_uid`` or ``patient_id`` (at least one; a row names its series, or every
series of its patient), and the centre ``x_mm``, ``y_mm``, ``z_mm`` in the patient coordinate
system of (0020,0032) Image Position (Patient). A centre is placed on the slice nearest in z
(within half the series' slice spacing) and converted to a pixel position with that slice's
(0020,0032) Image Position (Patient), (0020,0037) Image Orientation (Patient) and (0028,0030)
Pixel Spacing (:meth:`lungct.prepare.dicom.SliceHeader.pixel_of_patient_xy`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lungct.errors import UserError
from lungct.prepare.candidates import Candidate, display_path
from lungct.prepare.series import Series

__all__ = ["MAX_BYTES", "NoduleCentre", "centre_candidates", "check_rows", "read_nodules"]

LOG = logging.getLogger(__name__)

MAX_ROWS = 1_000_000  # a nodule list longer than this is not a list of nodules
MAX_BYTES = 50_000_000  # bytes; 1e6 rows of UIDs and coordinates fit in well under this
_SHOWN = 5  # rows named in the warning about unmatched rows
_COORDINATES = ("x_mm", "y_mm", "z_mm")


@dataclass(frozen=True)
class NoduleCentre:
    """One row of the nodules CSV (``row`` = its line number, the header being line 1)."""

    row: int
    series_uid: str
    patient_id: str
    x_mm: float
    y_mm: float
    z_mm: float


def read_nodules(path: Path) -> list[NoduleCentre]:
    """Read and check the nodules CSV.

    Raises:
        UserError: unreadable or larger than :data:`MAX_BYTES` file, missing columns, an
            empty identifier or a coordinate that is not a finite number.
    """
    try:
        size = Path(path).stat().st_size
    except OSError as error:
        raise UserError(f"cannot read --nodules {path} ({error.strerror})") from None
    if size > MAX_BYTES:
        raise UserError(f"--nodules {path} has {size} bytes, more than the {MAX_BYTES} a list "
                        "of nodule centres needs")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=MAX_ROWS + 1)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise UserError(f"cannot read --nodules {path} ({type(error).__name__})") from None
    missing = [c for c in _COORDINATES if c not in table.columns]
    if missing or not {"series_uid", "patient_id"} & set(table.columns):
        raise UserError(f"--nodules {path} needs the columns series_uid or patient_id, and "
                        f"x_mm, y_mm, z_mm; it has {', '.join(table.columns) or 'none'}")
    if len(table) > MAX_ROWS:
        raise UserError(f"--nodules {path} has more than {MAX_ROWS} rows")
    centres = []
    for number, row in enumerate(table.to_dict("records"), start=2):
        series_uid = str(row.get("series_uid", "")).strip()
        patient_id = str(row.get("patient_id", "")).strip()
        if not series_uid and not patient_id:
            raise UserError(f"--nodules row {number}: neither series_uid nor patient_id is given")
        try:
            xyz = [float(row[c]) for c in _COORDINATES]
        except ValueError:
            xyz = [math.nan]
        if not all(math.isfinite(v) and abs(v) <= 10_000 for v in xyz):
            raise UserError(f"--nodules row {number}: x_mm, y_mm, z_mm must be finite numbers "
                            f"within +-10000 mm, got {[row[c] for c in _COORDINATES]}")
        centres.append(NoduleCentre(number, series_uid, patient_id, *xyz))
    return centres


def centre_candidates(series: Series, centres: list[NoduleCentre]
                      ) -> tuple[list[Candidate], list[str]]:
    """Candidates of ``series`` at the centres that name it, and a warning per centre that
    lies outside it (z beyond half a slice spacing from every slice)."""
    mine = [c for c in centres if c.series_uid == series.series_uid
            or (not c.series_uid and c.patient_id == series.patient_id)]
    z_mm = series.z_mm
    tolerance_mm = 0.5 * series.slice_spacing_mm + 1e-3
    candidates: list[Candidate] = []
    warnings: list[str] = []
    for centre in mine:
        index = int(np.argmin(np.abs(z_mm - centre.z_mm)))
        if abs(z_mm[index] - centre.z_mm) > tolerance_mm:
            warnings.append(f"--nodules row {centre.row}: z {centre.z_mm:g} mm is outside the "
                            f"series ({z_mm[0]:g} to {z_mm[-1]:g} mm)")
            continue
        header = series.slices[index]
        row_px, column_px = header.pixel_of_patient_xy(centre.x_mm, centre.y_mm)
        if not (-0.5 <= row_px < header.rows - 0.5 and -0.5 <= column_px < header.columns - 0.5):
            warnings.append(f"--nodules row {centre.row}: ({centre.x_mm:g}, {centre.y_mm:g}) mm "
                            "lies outside the slice")
            continue
        candidates.append(Candidate(
            source_path=header.path, source_file=display_path(str(header.path)),
            patient_id=series.patient_id, label=0, negative_kind="",
            series_uid=series.series_uid, slice_z_mm=header.z_mm,
            nodule_id=f"row{centre.row}", pixel_spacing_mm=header.pixel_spacing_mm,
            slice_thickness_mm=header.slice_thickness_mm, manufacturer=header.manufacturer,
            convolution_kernel=header.convolution_kernel, lossy=header.lossy,
            centre_xy_px=(column_px, row_px), header=header, stack=series.stack))
    return candidates, warnings


def check_rows(centres: list[NoduleCentre], series: list[Series]) -> None:
    """Check the rows against the series of the input: a row whose series_uid and
    patient_id contradict that series' (0010,0020) Patient ID is refused; rows that name no
    series of the input get one warning (up to :data:`_SHOWN` of them listed).

    Raises:
        UserError: a row's patient_id is not the patient of the series it names.
    """
    patients = {s.series_uid: s.patient_id for s in series}
    known_patients = set(patients.values())
    unmatched = []
    for centre in centres:
        if centre.series_uid and centre.series_uid in patients:
            if centre.patient_id and centre.patient_id != patients[centre.series_uid]:
                raise UserError(f"--nodules row {centre.row}: series {centre.series_uid} "
                                f"belongs to patient {patients[centre.series_uid]!r} in its "
                                f"(0010,0020) Patient ID, not {centre.patient_id!r}")
        elif centre.series_uid or centre.patient_id not in known_patients:
            unmatched.append(centre.row)
    if unmatched:
        shown = ", ".join(str(r) for r in unmatched[:_SHOWN])
        more = f" and {len(unmatched) - _SHOWN} more" if len(unmatched) > _SHOWN else ""
        LOG.warning("--nodules rows %s%s name no series of the input: not used", shown, more)
