"""Input discovery: ``--input`` folders and archives -> CT series, LIDC readings, skip reasons.

Everything goes through prepare's rules: archives are extracted by
:func:`lungct.prepare.archives.extract_archive` (unsafe entries refused) under
``<out>/extracted/``, headers are read by :func:`lungct.prepare.dicom.read_header` (CT Image
Storage only; localizers, non-CT, truncated and unreadable files skipped with its reason), and
slices become series by :func:`lungct.prepare.series.assemble_series` (sorted by z, duplicate
z resolved). Each CT series is one case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lungct.errors import UserError
from lungct.prepare import dicom
from lungct.prepare.archives import (
    ARCHIVE_SUFFIXES,
    MARKER_SUFFIX,
    archive_suffix,
    extract_archive,
    read_refused_entries,
)
from lungct.prepare.candidates import display_path
from lungct.prepare.header_index import header_or_reason
from lungct.prepare.lidc_xml import LidcParseError, Readings, is_lidc_readings_file, parse_readings
from lungct.prepare.series import Series, assemble_series

__all__ = ["Discovered", "HeaderMap", "input_roots", "start_discovery"]

#: Maps the header reader over the files, lazily (``map``, or a process pool's ``map``).
HeaderMap = Callable[[Callable[[Path], "dicom.SliceHeader | str"], list[Path]],
                     Iterable["dicom.SliceHeader | str"]]

LOG = logging.getLogger(__name__)


@dataclass
class Discovered:
    """The CT series found, the LIDC readings per series UID, and a reason per unused file.

    ``dropped`` holds the slices :func:`assemble_series` left out of a series (duplicate z,
    other size), keyed by series UID, so each series' record lists its own.
    """

    series: list[Series]
    readings: dict[str, Readings]
    skipped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)


def input_roots(inputs: tuple[Path, ...], out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The folder of each ``--input`` (archives extracted under ``<out>/extracted``) and the
    refused archive entries with their reasons.

    Raises:
        UserError: an input does not exist, is neither a folder nor an archive, or is inside
            ``--out`` (its own outputs would be read back as input).
    """
    roots: list[Path] = []
    refused: dict[str, str] = {}
    for path in inputs:
        if not path.exists():
            raise UserError(f"--input {path} does not exist")
        if path.is_dir():
            resolved, out = path.resolve(), out_dir.resolve()
            if resolved == out or resolved.is_relative_to(out) or out.is_relative_to(resolved):
                raise UserError(f"--input {path} and --out {out_dir} overlap: outputs would be "
                                "read as input next time; choose an --out outside the input")
            roots.append(path)
        elif archive_suffix(path) is None:
            raise UserError(f"--input {path} is neither a folder nor an archive "
                            f"({', '.join(ARCHIVE_SUFFIXES)})")
        else:
            folder = extract_archive(path, out_dir / "extracted")
            refused.update({f"{path.name}!/{name}": f"unsafe archive entry: {why}"
                            for name, why in read_refused_entries(folder)})
            roots.append(folder)
    return roots, refused


def _list_files(root: Path, skipped: dict[str, str]) -> list[Path]:
    """Regular files under ``root``, sorted; links and special files get a reason."""
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            path = Path(folder, name)
            if path.is_symlink():
                skipped[display_path(str(path))] = "symbolic link, not followed"
            elif name.endswith(MARKER_SUFFIX):
                continue
            elif path.is_file():
                files.append(path)
            else:
                skipped[display_path(str(path))] = ("not a regular file (FIFO, socket or "
                                                    "device), not opened")
    return files


def _readings(xml_files: list[Path], skipped: dict[str, str]) -> dict[str, Readings]:
    readings: dict[str, Readings] = {}
    for path in xml_files:
        try:
            parsed = parse_readings(path)
        except LidcParseError as error:
            skipped[display_path(str(path))] = str(error)
            continue
        if parsed.series_uid in readings:
            skipped[display_path(str(path))] = "second readings file for the same series"
        else:
            readings[parsed.series_uid] = parsed
    return readings


def start_discovery(roots: list[Path], skipped: dict[str, str], header_map: HeaderMap = map
                    ) -> Callable[[], Discovered]:
    """List every file under ``roots``, read the LIDC readings, and start indexing the other
    files' headers with ``header_map`` (a process pool's ``map`` submits them all at once, so
    the caller can load the model meanwhile); the returned function collects the headers and
    assembles the CT series (none: an empty list)."""
    files = [path for root in roots for path in _list_files(root, skipped)]
    xml_files = [f for f in files if f.suffix.lower() == ".xml" and is_lidc_readings_file(f)]
    readings = _readings(xml_files, skipped)
    xml_set = set(xml_files)
    others = [f for f in files if f not in xml_set]
    results = iter(header_map(header_or_reason, others))
    return lambda: _assemble(len(files), others, results, readings, skipped)


def _assemble(n_files: int, others: list[Path], results: Iterator[dicom.SliceHeader | str],
              readings: dict[str, Readings], skipped: dict[str, str]) -> Discovered:
    """The indexed headers -> CT series; a reason per file that is not a usable slice."""
    headers = []
    for path, result in zip(others, results, strict=True):
        if isinstance(result, str):
            skipped[display_path(str(path))] = result
        else:
            headers.append(result)
    series, dropped_slices = assemble_series(headers)
    series_of = {h.path: h.series_uid for h in headers}
    dropped: dict[str, dict[str, str]] = {}
    for path, reason in dropped_slices:
        dropped.setdefault(series_of[path], {})[display_path(str(path))] = reason
        skipped[display_path(str(path))] = reason
    LOG.info("found %d CT series (%d slices) in %d files; %d files skipped", len(series),
             sum(len(s.slices) for s in series), n_files, len(skipped))
    return Discovered(series, readings, skipped, dropped)
