"""Shared tiny fixtures: real CT DICOM slices written with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    z_mm: float,
    *,
    series_uid: str = "1.2.3.4.5",
    patient_id: str = "LIDC-IDRI-0001",
    instance_number: int = 1,
    pixel_spacing_mm: float = 0.7,
    intercept: float = -1024.0,
    slope: float = 1.0,
    padding_value: int | None = None,
    modality: str = "CT",
    photometric: str = "MONOCHROME2",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Path:
    """Write one uncompressed CT slice whose HU equal ``hu`` (int16 stored values)."""
    stored = np.rint((np.asarray(hu, dtype=np.float64) - intercept) / slope).astype(np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path), str(z_mm)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = series_uid + ".1"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [-100.0, -100.0, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ct_slice(tmp_path: Path):
    """Factory writing CT slices under tmp_path."""

    def make(name: str, hu: np.ndarray, z_mm: float = 0.0, **kwargs) -> Path:
        return write_ct_slice(tmp_path / name, hu, z_mm, **kwargs)

    return make


def read_stored(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepare, train (baseline, one epoch) and interpret a tiny synthetic cohort, once.

    The three stages run in order through their CLIs, in-process, in one session folder;
    tests read the outputs and must not change them.
    """
    import interpretation
    import prepare_lung_dataset
    import training_lung_cnn

    root = tmp_path_factory.mktemp("pipeline")
    dataset, reports = root / "output_dataset", root / "reports"
    assert prepare_lung_dataset.main([
        "--source", "synthetic", "--synthetic-patients", "12", "--synthetic-size", "64",
        "--view", "patch", "--image-size", "32", "--target-count", "120",
        "--split", "0.5,0.25,0.25", "--work-dir", str(root), "--output", str(dataset),
        "--workers", "1", "-q"]) == 0
    assert training_lung_cnn.main([
        "--dataset", str(dataset), "--out", str(root), "--models", "baseline",
        "--preset", "quick", "--epochs", "1", "--batch-size", "8", "-q"]) == 0
    assert interpretation.main([
        "--results", str(root / "training_results.json"), "--out", str(reports),
        "--bootstrap", "50", "-q"]) == 0
    return {"root": root, "dataset": dataset, "results": root / "training_results.json",
            "reports": reports}
