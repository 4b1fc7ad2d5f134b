"""--pseudonymise end to end: no original patient id or UID in any output or log line.

The input is a synthetic LIDC-format cohort dressed as a hospital export: hospital-style
patient ids (``HOSP`` + digits, which ``--patient-regex`` does not match) in the headers and
the folder names, files named ``<SOPInstanceUID>.dcm``, an id in the input folder's name, and a
patient whose series has no readings (no samples: its id is only in headers and skipped files).
The three stages run as processes with ``--verbose``; every byte they write and log is searched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from lungct.prepare.header_index import INDEX_NAME
from lungct.synthetic.cohort import generate_cohort

REPO = Path(__file__).resolve().parents[1]


def _hospital_export(tmp_path: Path) -> tuple[Path, set[str]]:
    """The cohort with hospital ids and UID file names; returns the folder and every id."""
    cohort = tmp_path / "cohort"
    generate_cohort(out_dir=cohort, n_patients=12, image_size_px=64, seed=42)
    export = tmp_path / "export-LIDC-IDRI-9001"
    identifiers = {"LIDC-IDRI-9001"}
    for number, patient in enumerate(sorted(p for p in cohort.iterdir() if p.is_dir())):
        hospital_id = f"HOSP{40000 + number * 7:05d}"
        identifiers |= {patient.name, hospital_id}
        for path in sorted(patient.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(patient)
            target_dir = export / hospital_id / relative.parent
            target_dir.mkdir(parents=True, exist_ok=True)
            if path.suffix != ".dcm":
                (target_dir / path.name).write_bytes(path.read_bytes())
                continue
            slice_ = pydicom.dcmread(path)
            identifiers |= {slice_.PatientID, slice_.StudyInstanceUID, slice_.SeriesInstanceUID,
                            slice_.SOPInstanceUID}
            slice_.PatientID = hospital_id
            slice_.save_as(target_dir / f"{slice_.SOPInstanceUID}.dcm")
    _add_patient_without_readings(cohort, export, identifiers)
    return export, identifiers


def _add_patient_without_readings(cohort: Path, export: Path, identifiers: set[str]) -> None:
    """A patient whose series has no XML: no samples, only skipped files and header ids."""
    first = sorted(cohort.rglob("*.dcm"))[:4]
    series_uid = generate_uid()
    identifiers |= {"HOSP99999", series_uid}
    for path in first:
        slice_ = pydicom.dcmread(path)
        slice_.PatientID = "HOSP99999"
        slice_.SeriesInstanceUID = series_uid
        slice_.SOPInstanceUID = slice_.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        identifiers.add(slice_.SOPInstanceUID)
        folder = export / "HOSP99999" / "study" / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        slice_.save_as(folder / f"{slice_.SOPInstanceUID}.dcm")


def _run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(REPO / script), *args, "-v"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_no_identifier_survives_in_any_output_or_log(tmp_path: Path) -> None:
    """Every file name, file and log line of the three stages is free of the original ids."""
    export, identifiers = _hospital_export(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    logs = _run("prepare_lung_dataset.py", "--input", str(export), "--pseudonymise",
                "--view", "patch", "--image-size", "32", "--target-count", "120",
                "--split", "0.5,0.25,0.25", "--workers", "2", cwd=work)
    logs += _run("training_lung_cnn.py", "--models", "baseline", "--preset", "quick",
                 "--epochs", "1", "--batch-size", "8", cwd=work)
    logs += _run("interpretation.py", "--bootstrap", "20", cwd=work)
    # The salt and the header index are prepare's private files (README: never share them).
    outputs = [p for p in work.rglob("*")
               if p.is_file() and p.name not in (".lungct_salt", INDEX_NAME)]
    assert any(p.name == "report.json" for p in outputs)
    leaks = []
    for path in outputs:
        content = path.read_bytes()
        name = str(path.relative_to(work))
        leaks += [f"{name}: {i}" for i in identifiers if i.encode() in content or i in name]
    leaks += [f"log: {i}" for i in identifiers if i in logs]
    assert not leaks, f"{len(leaks)} leaks, e.g. {sorted(leaks)[:10]}"
