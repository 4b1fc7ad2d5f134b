"""--nodules CSV: checked reading, and patient coordinates -> slice and pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungct.errors import UserError
from lungct.predict.nodules_csv import centre_candidates, read_nodules
from lungct.prepare.dicom import read_header
from lungct.prepare.series import assemble_series


def _series(ct_slice) -> object:
    hu = np.full((40, 40), -800.0)
    paths = [ct_slice(f"s{i}.dcm", hu, z_mm=2.5 * i, instance_number=i + 1) for i in range(4)]
    (series,), _ = assemble_series(read_header(p) for p in paths)
    return series


def test_centre_maps_to_nearest_slice_and_pixel(ct_slice, tmp_path: Path) -> None:
    """x, y in mm become (column, row) with IPP (-100, -100) and 0.7 mm spacing."""
    series = _series(ct_slice)
    csv_path = tmp_path / "n.csv"
    csv_path.write_text("series_uid,x_mm,y_mm,z_mm\n1.2.3.4.5,-93.0,-86.0,5.2\n"
                        "1.2.3.4.5,0,0,50\n")
    (candidate,), warnings = centre_candidates(series, read_nodules(csv_path))
    assert candidate.slice_z_mm == 5.0
    assert candidate.centre_xy_px == pytest.approx((10.0, 20.0))
    assert warnings == ["--nodules row 3: z 50 mm is outside the series (0 to 7.5 mm)"]


def test_patient_id_rows_name_every_series_of_the_patient(ct_slice, tmp_path: Path) -> None:
    """A row without series_uid applies to the patient's series."""
    series = _series(ct_slice)
    csv_path = tmp_path / "n.csv"
    csv_path.write_text("patient_id,x_mm,y_mm,z_mm\nLIDC-IDRI-0001,-90,-90,0\nother,-90,-90,0\n")
    candidates, _ = centre_candidates(series, read_nodules(csv_path))
    assert len(candidates) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("series_uid,x_mm,y_mm\n1.2,0,0\n", "needs the columns series_uid or patient_id"),
    ("x_mm,y_mm,z_mm\n0,0,0\n", "needs the columns series_uid or patient_id"),
    ("series_uid,x_mm,y_mm,z_mm\n1.2,nan,0,0\n", "row 2: x_mm, y_mm, z_mm must be finite"),
    ("series_uid,x_mm,y_mm,z_mm\n1.2,abc,0,0\n", "row 2: x_mm, y_mm, z_mm must be finite"),
    ("series_uid,patient_id,x_mm,y_mm,z_mm\n,,0,0,0\n", "row 2: neither series_uid nor"),
])
def test_bad_rows_are_one_sentence(tmp_path: Path, text: str, message: str) -> None:
    """Every user-fixable problem names the row and the rule."""
    csv_path = tmp_path / "n.csv"
    csv_path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_nodules(csv_path)
