"""``--dicom-out``: the Grad-CAM overlays of a series as a DICOM Secondary Capture series a
PACS viewer shows beside the original.

Made with highdicom (``SCImage.from_ref_dataset``: patient and study modules copied from the
source slice), in the same study, in a new series whose UID derives from the source series,
the model and the scoring settings (a re-run gives the same UIDs; other settings, other
UIDs). ContentQualification (0018,9004) RESEARCH,
BurnedInAnnotation (0028,0301) YES (the probability is written on the image), and a Source
Image Sequence (0008,2112) naming the CT slice each overlay shows (highdicom has no parameter
for it, so it is added after construction).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from lungct import __version__
from lungct.fileio import atomic_path
from lungct.prepare.dicom_files import read_dataset

__all__ = ["SERIES_DESCRIPTION", "SERIES_NUMBER", "write_secondary_capture"]

SERIES_DESCRIPTION = "lungct Grad-CAM RESEARCH USE ONLY"  # (0008,103E) is LO: 64 characters
SERIES_NUMBER = 9901  # (0020,0011); high, so the results sort after the scanner's series


def _source_reference(ref: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    return item


def _secondary_capture(ref: Dataset, overlay: np.ndarray, new_series: str,
                       number: int) -> SCImage:
    """highdicom's Secondary Capture of ``overlay``, patient and study copied from ``ref``;
    rows run to the patient's left (L), columns to posterior (P), as in an axial CT slice."""
    return SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=np.ascontiguousarray(overlay),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=new_series, series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[new_series, str(number),
                                                    str(ref.SOPInstanceUID)]),
        instance_number=number, manufacturer="lungct", patient_orientation=("L", "P"),
        series_description=SERIES_DESCRIPTION, software_versions=f"lungct {__version__}")


def write_secondary_capture(overlays: list[np.ndarray], sources: list[Path], folder: Path,
                            series_uid: str, settings_hash: str) -> list[Path]:
    """Write one Secondary Capture image per overlay (RGB uint8) into ``folder``.

    Args:
        overlays: RGB uint8 (H, W, 3) images, probability burned in.
        sources: the CT slice each overlay shows (its patient, study and references).
        folder: where the ``.dcm`` files go.
        series_uid: the source series' (0020,000E) Series Instance UID.
        settings_hash: a hash of the model and the scoring settings (Grad-CAM top, lungct
            version): part of the new series' UID, from which every SOP Instance UID
            derives, so outputs of other settings never share a UID.

    Returns:
        The files written, in the order of ``overlays``.
    """
    new_series = generate_uid(entropy_srcs=["lungct-predict", series_uid, settings_hash])
    written = []
    for number, (overlay, source) in enumerate(zip(overlays, sources, strict=True), start=1):
        ref = read_dataset(source, stop_before_pixels=True)
        with warnings.catch_warnings():
            # The patient name is the source's, copied unchanged: its form is not ours to fix.
            warnings.filterwarnings("ignore", "The string .* person name", UserWarning)
            image = _secondary_capture(ref, overlay, new_series, number)
        image.ContentQualification = "RESEARCH"
        image.BurnedInAnnotation = "YES"
        image.SourceImageSequence = Sequence([_source_reference(ref)])
        image.ImageComments = "Grad-CAM overlay of the lungct model; research use only"
        target = folder / f"{number:04d}.dcm"
        with atomic_path(target) as tmp:
            pydicom.dcmwrite(tmp, image, enforce_file_format=True)
        written.append(target)
    return written
