"""Candidate samples: which slices (or images) could enter the dataset, with their labels.

Three label sources, in order of trust (docs/lidc_format.md): LIDC XML readings, a
labels CSV given by the user, class-named folders. A candidate records everything the manifest
needs; rendering it to a PNG is lungct.prepare.render's job, choosing among candidates
lungct.prepare.split's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lungct.errors import UserError
from lungct.prepare import lidc
from lungct.prepare.dicom import SliceHeader
from lungct.prepare.lidc_xml import Readings
from lungct.prepare.nodules import Nodule, cluster_nodules
from lungct.prepare.series import Series, SliceStack

__all__ = [
    "IMAGE_SUFFIXES",
    "CLASS_KEYWORDS",
    "Candidate",
    "MaskCrop",
    "lidc_candidates",
    "class_from_path",
    "csv_candidates",
    "display_path",
    "relative_display_path",
    "folder_candidates",
]

LOG = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")  # anything else never enters an output file name
_ID_CHARS = 64

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: Folder-name keywords per label, matched against a folder's words (split at space - _ .).
#: A folder whose name starts with "non"/"no" followed by a cancer word is non-cancer.
CLASS_KEYWORDS: dict[int, frozenset[str]] = {
    0: frozenset({"noncancer", "nonmalignant", "benign", "normal", "negative", "healthy"}),
    1: frozenset({"cancer", "cancerous", "malignant", "malignancy", "tumor", "tumour",
                  "positive", "carcinoma", "adenocarcinoma"}),
}


def display_path(relative: str) -> str:
    """A relative path as it is written in manifest.csv ``source_file`` and skipped.csv ``file``.

    File names need not be valid UTF-8: on Linux ``os.walk`` returns the undecodable bytes of
    a name as lone surrogates (``surrogateescape``), which no UTF-8 file can hold. The stated
    escape: each byte that is not part of valid UTF-8 is written ``\\xNN`` (two lower-case hex
    digits), i.e. ``os.fsencode(relative).decode("utf-8", "backslashreplace")``; valid names,
    backslashes in them included, are returned unchanged. So the file ``b"bad\\xff.dcm"`` is
    listed as the text ``bad\\xff.dcm``. The escape is for reading only: the file itself is
    still opened by its real name.
    """
    try:
        raw = os.fsencode(relative)
    except UnicodeEncodeError:  # a surrogate os.walk never makes (e.g. from a JSON record)
        raw = relative.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def relative_display_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, POSIX separators, as :func:`display_path` writes it."""
    return display_path(path.relative_to(root).as_posix())


@dataclass(frozen=True)
class MaskCrop:
    """A binary ROI mask stored as its bounding box: ``mask[top:top+h, left:left+w] = bits``."""

    top: int
    left: int
    bits: np.ndarray  # bool (h, w)

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at full slice size."""
        mask = np.zeros(shape, dtype=bool)
        h, w = self.bits.shape
        mask[self.top : self.top + h, self.left : self.left + w] = self.bits
        return mask

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> MaskCrop:
        rows, cols = np.nonzero(mask)
        top, left = int(rows.min()), int(cols.min())
        return cls(top, left, mask[top : rows.max() + 1, left : cols.max() + 1].copy())

    @property
    def centroid_xy_px(self) -> tuple[float, float]:
        rows, cols = np.nonzero(self.bits)
        return float(cols.mean() + self.left), float(rows.mean() + self.top)


@dataclass(frozen=True)
class Candidate:
    """One possible sample: a CT slice (or an image file) with its label and provenance."""

    source_path: Path
    source_file: str  # relative to the input root, for manifest/skipped.csv
    patient_id: str
    label: int  # 1 cancer, 0 non-cancer
    negative_kind: str  # "benign_nodule" | "no_finding" | "" (cancer, or not known)
    series_uid: str = ""
    slice_z_mm: float | None = None
    nodule_id: str = ""
    malignancy: float | None = None
    n_readers: int | None = None
    diameter_mm: float | None = None
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None  # (0018,0050)
    manufacturer: str = ""  # (0008,0070)
    convolution_kernel: str = ""  # (0018,1210)
    lossy: bool | None = None  # (0028,2110) or a lossy transfer syntax; None: not DICOM
    mask: MaskCrop | None = field(default=None, compare=False)
    centre_xy_px: tuple[float, float] | None = None  # patch centre; None = choose in lung tissue
    #: The slice's own header: its (0020,0032)/(0020,0037)/(0028,0030) geometry places the
    #: patch centre in patient coordinates. None for image files.
    header: SliceHeader | None = field(default=None, compare=False, repr=False)
    #: The slice's series along z, for 2.5D context (one object shared by the series'
    #: candidates). None for image files and DICOM labelled one file at a time.
    stack: SliceStack | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """A stable identifier, also the stem of the output file name."""
        if self.series_uid:
            # The series UID passed dicom's PS3.5 9.1 check; the (0010,0020) Patient ID is free
            # text, so "/", ".." or a NUL in it can neither leave the class folder nor break
            # the name.
            patient = self.patient_id
            if len(patient) > _ID_CHARS or _UNSAFE.search(patient):
                patient = _safe_stem(patient[:_ID_CHARS], patient)
            stem = f"{patient}_{self.series_uid[-12:]}_z{self.slice_z_mm:+09.2f}"
            return f"{stem}_{self.nodule_id}" if self.nodule_id else stem
        return _safe_stem(self.source_file.rsplit(".", 1)[0], self.source_file)


def _safe_stem(readable: str, whole: str) -> str:
    """``readable`` with every run of characters other than ``A-Z a-z 0-9 _ -`` replaced by
    ``_``, then ``-`` and 8 hex digits of the SHA-256 of ``whole``, so that a.png, a.jpg and
    names that only differ in punctuation never share an output name."""
    digest = hashlib.sha256(whole.encode("utf-8", "surrogateescape"))
    return f"{_UNSAFE.sub('_', readable)}-{digest.hexdigest()[:8]}"


def _slice_samples(
    series: Series,
    nodules: list[Nodule],
    rule: lidc.LabelRule,
) -> dict[int, list[tuple[Nodule, MaskCrop, int | None]]]:
    """Per slice index, the nodules outlined there with their consensus masks and labels.

    Masks are kept as bounding-box crops: memory grows with the outlines, not with the number
    of nodule-slice pairs times the slice size.
    """
    z_mm = series.z_mm
    tolerance_mm = 0.5 * series.slice_spacing_mm
    shape = (series.slices[0].rows, series.slices[0].columns)
    on_slice: dict[int, list[tuple[Nodule, MaskCrop, int | None]]] = {}
    for nodule in nodules:
        label = rule.label(nodule)
        for index in lidc.nodule_slices(nodule, z_mm, tolerance_mm):
            mask = lidc.consensus_mask(nodule, float(z_mm[index]), shape, tolerance_mm)
            if mask.any():
                on_slice.setdefault(index, []).append((nodule, MaskCrop.from_mask(mask), label))
    return on_slice


def lidc_candidates(
    series: Series,
    readings: Readings,
    rule: lidc.LabelRule,
    negative_margin_mm: float,
    rel: Callable[[Path], str],
) -> tuple[list[Candidate], dict[Path, str], dict[str, int]]:
    """Candidates of one CT series from its LIDC readings.

    A slice is a sample of a nodule where that nodule's consensus mask is non-empty; its label
    is the highest label of its labelled nodules and its mask their union. A slice holding only
    excluded nodules (or an excluded nodule beside benign ones) is not a sample. Negatives
    without a nodule are slices at least ``negative_margin_mm`` in z from every mark of every
    reader (nodules of any size and non-nodules).

    Returns:
        The candidates, a reason for each slice that is not one, the count of nodules per
        label-rule outcome, and per outcome the count of nodules marked by one reader only.
    """
    nodules = cluster_nodules(readings, series.pixel_spacing_mm, series.slice_spacing_mm,
                              f"patient {series.patient_id}, series {series.series_uid}")
    outcomes: dict[str, int] = {}
    single_reader: dict[str, int] = {}
    for nodule in nodules:
        outcome = rule.outcome(nodule)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if nodule.n_readers == 1:
            single_reader[outcome] = single_reader.get(outcome, 0) + 1
    on_slice = _slice_samples(series, nodules, rule)
    far = lidc.far_from_marks(series.z_mm, readings.all_mark_z_mm(), negative_margin_mm)
    candidates: list[Candidate] = []
    reasons: dict[Path, str] = {}
    for index, header in enumerate(series.slices):
        entries = on_slice.get(index, [])
        common = dict(
            source_path=header.path,
            source_file=rel(header.path),
            patient_id=series.patient_id,
            series_uid=series.series_uid,
            slice_z_mm=header.z_mm,
            pixel_spacing_mm=header.pixel_spacing_mm,
            slice_thickness_mm=header.slice_thickness_mm,
            manufacturer=header.manufacturer,
            convolution_kernel=header.convolution_kernel,
            lossy=header.lossy,
            header=header,
            stack=series.stack,
        )
        labelled = [(n, m, lab) for n, m, lab in entries if lab is not None]
        if not entries:
            if far[index]:
                candidates.append(Candidate(label=0, negative_kind="no_finding", **common))
            else:
                reasons[header.path] = f"within {negative_margin_mm:g} mm of a reader's mark"
            continue
        top_label = max((lab for _, _, lab in labelled), default=None)
        if top_label is None or (top_label == 0 and len(labelled) < len(entries)):
            reasons[header.path] = "holds a nodule excluded by the label rule"
            continue
        chosen = [(n, m) for n, m, lab in labelled if lab == top_label]
        nodule, own_mask = max(chosen, key=lambda item: (int(item[1].bits.sum()),
                                                         item[0].nodule_id))
        shape = (header.rows, header.columns)
        union = np.logical_or.reduce([m.full(shape) for _, m, _ in labelled])
        candidates.append(
            Candidate(
                label=top_label,
                negative_kind="" if top_label == 1 else "benign_nodule",
                nodule_id=nodule.nodule_id,
                malignancy=nodule.malignancy,
                n_readers=nodule.n_readers,
                diameter_mm=nodule.diameter_mm,
                mask=MaskCrop.from_mask(union),
                centre_xy_px=own_mask.centroid_xy_px,
                **common,
            )
        )
    return candidates, reasons, outcomes, single_reader


def _folder_label(name: str) -> int | None:
    words = [w for w in re.split(r"[\s._-]+", name.lower()) if w]
    if set(words) & CLASS_KEYWORDS[0]:
        return 0
    for position, word in enumerate(words):
        if word in CLASS_KEYWORDS[1]:
            negated = position > 0 and words[position - 1] in {"non", "no", "not"}
            return 0 if negated else 1
    return None


def class_from_path(relative_path: str) -> int | None:
    """The label named by the nearest class-named folder of ``relative_path``, else None."""
    for part in reversed(Path(relative_path).parts[:-1]):
        label = _folder_label(part)
        if label is not None:
            return label
    return None


def _parse_label(value: object, row_number: int) -> int:
    text = str(value).strip()
    label = int(text) if text in {"0", "1"} else _folder_label(text) if text else None
    if label is not None:
        return label
    raise UserError(
        f"--labels row {row_number}: label {value!r} is neither 0/1 nor a known class name"
    )


def csv_candidates(
    labels_csv: Path, root: Path, files: Iterable[Path]
) -> tuple[list[Candidate], dict[Path, str]]:
    """Candidates from a user CSV with columns ``path`` (relative to the input), ``label``
    (0/1 or a class name) and ``patient_id``; input files it does not list are skipped."""
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read --labels {labels_csv}: {error}") from None
    missing = {"path", "label", "patient_id"} - set(table.columns)
    if missing:
        raise UserError(
            f"--labels {labels_csv} lacks the column(s) {', '.join(sorted(missing))}; "
            "it needs path, label and patient_id"
        )
    listed: dict[str, tuple[int, str]] = {}
    for number, row in enumerate(table.itertuples(index=False), start=2):
        if not row.patient_id.strip():
            raise UserError(f"--labels row {number}: empty patient_id (a split needs patients)")
        listed[Path(row.path).as_posix()] = (_parse_label(row.label, number), row.patient_id)
    candidates: list[Candidate] = []
    reasons: dict[Path, str] = {}
    for path in files:
        rel = relative_display_path(path, root)
        if rel not in listed:
            reasons[path] = "not listed in --labels"
            continue
        label, patient = listed.pop(rel)
        candidates.append(Candidate(path, rel, patient, label, ""))
    for rel in sorted(listed):
        LOG.warning("--labels lists %s, which is not in the input", rel)
    return candidates, reasons


def folder_candidates(
    root: Path, files: Iterable[Path], patient_of: Callable[[Path], str | None]
) -> tuple[list[Candidate], dict[Path, str]]:
    """Candidates from class-named folders (CLASS_KEYWORDS); mask images are never samples."""
    candidates: list[Candidate] = []
    reasons: dict[Path, str] = {}
    for path in files:
        rel = relative_display_path(path, root)
        if any("mask" in part.lower() for part in Path(rel).parts):
            reasons[path] = "mask image, never a sample"
            continue
        label = class_from_path(rel)
        if label is None:
            reasons[path] = "no class-named folder in its path"
            continue
        patient = patient_of(path)
        if not patient:
            raise UserError(
                f"no patient id for {rel}: neither DICOM PatientID nor --patient-regex matches; "
                "a split by file would leak patients between train and test"
            )
        candidates.append(Candidate(path, rel, patient, label, ""))
    return candidates, reasons
