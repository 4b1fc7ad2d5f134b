"""Files of the synthetic cohort on disk: deterministic DICOM UIDs, the CT slices, and
the reuse check and clean-up of an earlier generation (part of :mod:`lungct.synthetic`)."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from lungct.fileio import atomic_write_bytes
from lungct.synthetic.scan import (
    PIXEL_PADDING_STORED,
    RESCALE_INTERCEPT_HU,
    SLICE_THICKNESS_MM,
    Geometry,
)

__all__ = [
    "SeriesIds",
    "is_complete",
    "remove_previous",
    "series_ids",
    "write_series",
]

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_PATIENT_DIR = re.compile(r"LIDC-IDRI-9\d{3}")
_OWN_FILE = re.compile(r"(\.)?(\d{6}\.dcm|\d{3}\.xml)(\.tmp-.*)?")


@dataclass(frozen=True)
class SeriesIds:
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    sop_uids: tuple[str, ...]
    readings_uid: str  # the uid attribute of LidcReadMessage
    readings_name: str  # "NNN.xml": like LIDC, not the patient id
    message_id: int


def series_ids(patient_id: str, params: dict, n_slices: int,
                rng: np.random.Generator) -> SeriesIds:
    """Deterministic DICOM UIDs (pydicom ``generate_uid`` with entropy sources)."""
    key = ["lungct.synthetic", str(params["version"]), str(params["seed"]),
           str(params["image_size_px"]), patient_id]

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=[*key, *map(str, parts)])

    return SeriesIds(patient_id, uid("study"), uid("series"), uid("frame"),
                      tuple(uid("sop", k) for k in range(n_slices)), uid("readings"),
                      f"{int(rng.integers(1, 1000)):03d}.xml", int(rng.integers(-2 ** 31, 2 ** 31)))


def _slice_template(geometry: Geometry, ids: SeriesIds) -> Dataset:
    """The attributes shared by every slice of a series (CT Image Storage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = _CT_IMAGE_STORAGE
    ds.StudyDate = "20000101"
    ds.Modality = "CT"
    ds.Manufacturer = "lungct synthetic"
    ds.PatientName = ds.PatientID = ids.patient_id
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = SLICE_THICKNESS_MM
    ds.KVP = 120
    ds.StudyInstanceUID = ids.study_uid
    ds.SeriesInstanceUID = ids.series_uid
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = ids.frame_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geometry.image_size_px
    ds.PixelSpacing = [geometry.pixel_spacing_mm, geometry.pixel_spacing_mm]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed: the padding value is negative
    ds.PixelPaddingValue = PIXEL_PADDING_STORED
    ds.WindowCenter, ds.WindowWidth = -600, 1500  # lung window
    ds.RescaleIntercept = RESCALE_INTERCEPT_HU
    ds.RescaleSlope = 1
    return ds


def write_series(series_dir: Path, stored: np.ndarray, geometry: Geometry,
                  ids: SeriesIds) -> None:
    """One DICOM file per slice, ``000001.dcm`` = InstanceNumber 1 = highest z."""
    ds = _slice_template(geometry, ids)
    for k, z in enumerate(geometry.z_mm):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ids.sop_uids[k]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [geometry.origin_mm, geometry.origin_mm, z]
        ds.SliceLocation = z
        ds.PixelData = stored[k].tobytes()
        buffer = io.BytesIO()
        # The first slice is written and checked as a DICOM file (preamble, DICM, file meta);
        # read back, it keeps preamble and meta, and its shared attributes are raw elements
        # that dcmwrite copies without encoding them again: the same bytes, twice as fast.
        pydicom.dcmwrite(buffer, ds, enforce_file_format=k == 0)
        atomic_write_bytes(series_dir / f"{k + 1:06d}.dcm", buffer.getvalue())
        if k == 0:
            ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def is_complete(out_dir: Path, params: dict) -> bool:
    try:
        return json.loads((out_dir / "cohort.json").read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def remove_previous(out_dir: Path) -> None:
    """Delete what an earlier generation wrote (only this module's file names), marker first."""
    for name in ("cohort.json", "truth.json"):
        (out_dir / name).unlink(missing_ok=True)
    for path in out_dir.glob(".*.json.tmp-*"):
        if path.name.startswith((".cohort.json.", ".truth.json.")):
            path.unlink()
    for patient_dir in sorted(out_dir.iterdir()):
        if not (_PATIENT_DIR.fullmatch(patient_dir.name) and patient_dir.is_dir()
                and not patient_dir.is_symlink()):
            continue
        for root, _, files in os.walk(patient_dir, topdown=False):
            for name in files:
                if _OWN_FILE.fullmatch(name):
                    (Path(root) / name).unlink()
            if not os.listdir(root):
                os.rmdir(root)
