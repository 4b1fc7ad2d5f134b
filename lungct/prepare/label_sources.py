"""Which label source applies to an input tree, and the candidate samples it yields.

LIDC XML readings win when any readings file is present; otherwise a ``--labels`` CSV;
otherwise class-named folders (docs/lidc_format.md). Every input file that cannot be a
candidate gets a reason for skipped.csv. Relative names (a candidate's ``source_file``, the
patient regex's subject) are made by :func:`~lungct.prepare.candidates.relative_display_path`,
so file names that are not valid UTF-8 are kept and written with its stated escape.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lungct.errors import UserError
from lungct.prepare import dicom
from lungct.prepare.candidates import (
    IMAGE_SUFFIXES,
    Candidate,
    csv_candidates,
    folder_candidates,
    lidc_candidates,
    relative_display_path,
)
from lungct.prepare.context import context_reason
from lungct.prepare.executors import Executor
from lungct.prepare.header_index import read_headers
from lungct.prepare.lidc_xml import (
    LidcParseError,
    Readings,
    is_lidc_readings_file,
    parse_readings,
)
from lungct.prepare.series import assemble_series

if TYPE_CHECKING:
    from lungct.prepare.config import PrepareConfig

__all__ = ["Found", "HeaderSource", "find_candidates"]

LOG = logging.getLogger(__name__)


@dataclass
class Found:
    """Candidates, reasons for files that are not, the label source, nodule outcomes, the
    PatientID (0010,0020) of every DICOM header read (for pseudonyms of patients without
    samples too), per outcome the nodules that rest on a single reader's mark, and the CT
    series assembled with how many have missing slices (gaps in z)."""

    candidates: list[Candidate]
    skipped: dict[Path, str]
    label_source: str
    outcomes: dict[str, int] = field(default_factory=dict)
    patient_ids: frozenset[str] = frozenset()
    single_reader: dict[str, int] = field(default_factory=dict)
    series: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HeaderSource:
    """Where headers come from: the executor that reads them and the persistent index
    (:mod:`lungct.prepare.header_index`; None = read every header)."""

    executor: Executor
    index_file: Path | None


def _index_dicom(files: list[Path], root: Path, source: HeaderSource,
                 skipped: dict[Path, str]) -> list[dicom.SliceHeader]:
    headers = []
    for path, result in zip(files, read_headers(files, root, source.executor,
                                                source.index_file), strict=True):
        if isinstance(result, str):
            skipped[path] = result
        else:
            headers.append(result)
    return headers


def _from_lidc(config: PrepareConfig, root: Path, files: list[Path], xml_files: list[Path],
               skipped: dict[Path, str], header_source: HeaderSource) -> Found:
    def rel(path: Path) -> str:
        return relative_display_path(path, root)

    readings_by_series: dict[str, Readings] = {}
    for path in xml_files:
        try:
            readings = parse_readings(path)
        except LidcParseError as error:
            skipped[path] = str(error)
            continue
        if readings.series_uid in readings_by_series:
            skipped[path] = "second readings file for the same series"
        else:
            readings_by_series[readings.series_uid] = readings
    xml_set = set(xml_files)
    headers = _index_dicom([f for f in files if f not in xml_set], root, header_source,
                           skipped)
    series_list, dropped = assemble_series(headers)
    skipped.update(dict(dropped))
    candidates: list[Candidate] = []
    outcomes: Counter[str] = Counter()
    single_reader: Counter[str] = Counter()
    matched: set[str] = set()
    for series in series_list:
        readings = readings_by_series.get(series.series_uid)
        if readings is None:
            skipped.update({s.path: "no readings for series" for s in series.slices})
            continue
        matched.add(series.series_uid)
        found, reasons, counts, one_reader = lidc_candidates(
            series, readings, config.label_rule, config.negative_margin_mm, rel
        )
        candidates += _with_context(found, config.context_mm, skipped)
        skipped.update(reasons)
        outcomes.update(counts)
        single_reader.update(one_reader)
    for uid, readings in readings_by_series.items():
        if uid not in matched:
            skipped[readings.path] = "readings for a series that is not in the input"
    return Found(candidates, skipped, "lidc_xml", dict(sorted(outcomes.items())),
                 frozenset(h.patient_id for h in headers),
                 {outcome: single_reader[outcome] for outcome in sorted(outcomes)},
                 {"series": len(series_list),
                  "with_z_gaps": sum(s.z_gaps > 0 for s in series_list),
                  "z_gaps": sum(s.z_gaps for s in series_list)})


def _with_context(candidates: list[Candidate], context_mm: float,
                  skipped: dict[Path, str]) -> list[Candidate]:
    """The candidates whose 2.5D context planes at z -/+ ``context_mm`` exist (all when 0); the
    others' files get the reason here, before the split and balancing, not after them."""
    if not context_mm:
        return candidates
    kept = []
    for candidate in candidates:
        reason = (context_reason(candidate.stack, candidate.slice_z_mm, context_mm)
                  if candidate.stack is not None and candidate.slice_z_mm is not None else None)
        if reason is None:
            kept.append(candidate)
        else:
            skipped[candidate.source_path] = reason
    return kept


def _patient_finder(config: PrepareConfig, root: Path, headers: list[dicom.SliceHeader]
                    ) -> Callable[[Path], str | None]:
    """(0010,0020) PatientID of an indexed header, else the patient regex on the path."""
    pattern = re.compile(config.patient_regex)
    patients = {header.path: header.patient_id for header in headers}

    def patient_of(path: Path) -> str | None:
        if patients.get(path):
            return patients[path]
        match = pattern.search(relative_display_path(path, root))
        return match.group(0) if match else None

    return patient_of


def _from_user_labels(config: PrepareConfig, root: Path, files: list[Path],
                      skipped: dict[Path, str], header_source: HeaderSource) -> Found:
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    others = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    headers = _index_dicom(others, root, header_source, skipped)
    usable = images + [h.path for h in headers]
    usable.sort()
    if config.labels_csv is not None:
        candidates, reasons = csv_candidates(Path(config.labels_csv), root, usable)
        source = "labels_csv"
    else:
        candidates, reasons = folder_candidates(root, usable,
                                                _patient_finder(config, root, headers))
        source = "class_folders"
    skipped.update(reasons)
    return Found(candidates, skipped, source, patient_ids=frozenset(h.patient_id for h in headers))


def find_candidates(config: PrepareConfig, root: Path, files: list[Path],
                    skipped: dict[Path, str], header_source: HeaderSource) -> Found:
    """Candidates of the input tree ``root`` (its ``files``) from the label source that applies.

    ``skipped`` (reasons keyed by path) is completed with every file that is not a candidate
    and returned in :class:`Found`; the caller makes relative names of its keys with
    :func:`~lungct.prepare.candidates.relative_display_path`. Headers come from
    ``header_source`` (each file's header is read at most once per run, and not at all when
    the index holds it).

    Raises:
        UserError: no usable labels at all.
    """
    xml_files = [f for f in files if f.suffix.lower() == ".xml"]
    if any(is_lidc_readings_file(f) for f in xml_files):
        if config.labels_csv is not None:
            LOG.warning("LIDC XML readings found: they label the data, --labels is ignored")
        found = _from_lidc(config, root, files, xml_files, skipped, header_source)
    else:
        found = _from_user_labels(config, root, files, skipped, header_source)
    if not found.candidates:
        hint = ""
        if any(re.fullmatch(r"nodule-\d+", part) for f in files for part in f.parts):
            hint = (" Folders named nodule-N (as in zhangweiled/lidcidri) are nodule indices, "
                    "not classes: give a --labels CSV.")
        raise UserError(
            f"no usable labels in {root}: found no LIDC XML readings matching a CT series, "
            f"no --labels CSV and no class-named folders (e.g. cancer/, benign/).{hint}"
        )
    return found
