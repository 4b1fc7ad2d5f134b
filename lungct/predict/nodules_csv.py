"""``--nodules CSV``: where a patch model looks, as nodule centres in patient coordinates.

Columns: ``series_uid`` or ``patient_id`` (at least one; a row names its series, or every
series of its patient), and the centre ``x_mm``, ``y_mm``, ``z_mm`` in the patient coordinate
system of (0020,0032) Image Position (Patient). A centre is placed on the slice nearest in z
(within half the series' slice spacing) and converted to a pixel position with that slice's
(0020,0032) Image Position (Patient), (0020,0037) Image Orientation (Patient) and (0028,0030)
Pixel Spacing (:meth:`lungct.prepare.dicom.SliceHeader.pixel_of_patient_xy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lungct.errors import UserError
from lungct.prepare.candidates import Candidate, display_path
from lungct.prepare.series import Series

__all__ = ["NoduleCentre", "centre_candidates", "read_nodules"]

MAX_ROWS = 1_000_000  # a nodule list longer than this is not a list of nodules
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
        UserError: unreadable file, missing columns, an empty identifier or a coordinate that
            is not a finite number.
    """
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
