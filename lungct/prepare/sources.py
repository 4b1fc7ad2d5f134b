"""Where the raw data comes from: a local folder or archive, Kaggle, or the synthetic cohort.

``--source auto`` tries, in order: ``--input`` (a folder or an archive), a Kaggle download
when credentials exist, and otherwise the built-in synthetic cohort, which is announced with a
warning because its results say nothing about real patients.

Archive extraction (refusing unsafe entries) lives in :mod:`lungct.prepare.archives` and the
Kaggle download in :mod:`lungct.prepare.kaggle`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lungct.errors import UserError
from lungct.prepare.archives import (
    ARCHIVE_SUFFIXES,
    archive_suffix,
    extract_archive,
    read_refused_entries,
)
from lungct.prepare.candidates import display_path
from lungct.prepare.kaggle import (
    check_slug,
    download_kaggle,
    kaggle_credentials_present,
)

__all__ = [
    "DEFAULT_KAGGLE_DATASET", "SOURCES", "ResolvedSource", "listed_entry_name", "resolve_source",
]  # fmt: skip

LOG = logging.getLogger(__name__)

SOURCES = ("auto", "local", "kaggle", "synthetic")
DEFAULT_KAGGLE_DATASET = "washingtongold/lidcidri30"
#: A "/" at the start of a listed entry name or right after another "/" (an absolute part).
_EMPTY_COMPONENT_SLASH = re.compile(r"(?<![^/])/")


@dataclass(frozen=True)
class ResolvedSource:
    """The folder to scan for raw data and where it came from.

    Attributes:
        kind: ``"local"``, ``"kaggle"`` or ``"synthetic"``.
        root: folder to scan (for an archive, the folder it was extracted to).
        description: provenance for dataset.json: ``local:<path as given>`` (written as
            :func:`~lungct.prepare.candidates.display_path` writes names), ``kaggle:<slug>``
            or ``synthetic``.
        refused_entries: ``(listed name, reason)`` for every archive entry refused as unsafe,
            the name as :func:`listed_entry_name` writes it (relative to ``root``, safe to
            join to it); for an archive nested in a Kaggle download the name is
            ``<archive>!/<entry>``.
    """

    kind: str
    root: Path
    description: str
    refused_entries: tuple[tuple[str, str], ...] = ()


def listed_entry_name(name: str) -> str:
    """How a refused archive entry is listed in skipped.csv's ``file`` column.

    The entry name as stored in the archive, with the escapes of
    :func:`~lungct.prepare.candidates.display_path` (undecodable bytes written ``\\xNN``),
    and, so that the listing stays a relative name under the extracted folder, a ``/`` that
    starts the name or follows another ``/`` written ``\\x2f`` and a NUL written ``\\x00``:
    the absolute entry ``/abs/path.txt`` is listed as ``\\x2fabs/path.txt``. Other names,
    ``../evil.txt`` included, are listed as they are.
    """
    return _EMPTY_COMPONENT_SLASH.sub(r"\\x2f", display_path(name)).replace("\x00", "\\x00")


def _listed(entries: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((listed_entry_name(name), reason) for name, reason in entries)


def resolve_source(
    source: str,
    *,
    input_path: Path | None,
    kaggle_dataset: str,
    work_dir: Path,
    max_patients: int | None,
    synthetic_patients: int,
    synthetic_size_px: int,
    seed: int,
) -> ResolvedSource:
    """Decide where the raw data comes from and make it available as a folder.

    Args:
        source: one of :data:`SOURCES`; ``auto`` picks ``input_path``, else Kaggle when
            credentials exist, else the synthetic cohort (with a warning).
        input_path: ``--input``: a folder or an archive (see :data:`ARCHIVE_SUFFIXES`).
        kaggle_dataset: ``--kaggle-dataset`` slug, ``owner/dataset``.
        work_dir: folder holding ``extracted/``, ``raw_kaggle/`` and ``raw_synthetic/``.
        max_patients: download only this many patients from Kaggle where the file list
            allows; None for all.
        synthetic_patients: patients in the synthetic cohort.
        synthetic_size_px: synthetic slice size in pixels.
        seed: seed of the synthetic cohort.

    Raises:
        ValueError: ``source`` or ``max_patients`` is invalid.
        UserError: the chosen source cannot be used (missing input, no credentials, ...).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if max_patients is not None and max_patients < 1:
        raise ValueError(f"max_patients must be at least 1 or None, got {max_patients}")
    if source == "auto":
        source = _choose_source(input_path)
    if source == "local":
        if input_path is None:
            raise UserError("--source local needs --input PATH (a folder or an archive)")
        return _resolve_local(input_path, work_dir)
    if input_path is not None:
        raise UserError(
            f"--input cannot be combined with --source {source}: drop --input or use --source local"
        )
    if source == "kaggle":
        return _resolve_kaggle(kaggle_dataset, work_dir, max_patients)
    return _resolve_synthetic(work_dir, synthetic_patients, synthetic_size_px, seed)


def _choose_source(input_path: Path | None) -> str:
    if input_path is not None:
        return "local"
    if kaggle_credentials_present():
        LOG.info("no --input given and Kaggle credentials found: using --kaggle-dataset")
        return "kaggle"
    LOG.warning(
        "no --input and no Kaggle credentials: using the built-in SYNTHETIC cohort (simulated "
        "CT scans and readings); results say nothing about real patients"
    )
    return "synthetic"


def _resolve_local(input_path: Path, work_dir: Path) -> ResolvedSource:
    description = f"local:{display_path(str(input_path))}"
    if not input_path.exists():
        raise UserError(f"input path {input_path} does not exist")
    if input_path.is_dir():
        return ResolvedSource("local", input_path, description)
    if archive_suffix(input_path) is None:
        raise UserError(
            f"input path {input_path} is neither a folder nor an archive "
            f"({', '.join(ARCHIVE_SUFFIXES)})"
        )
    folder = extract_archive(input_path, work_dir / "extracted")
    return ResolvedSource("local", folder, description, _listed(read_refused_entries(folder)))


def _resolve_kaggle(slug: str, work_dir: Path, max_patients: int | None) -> ResolvedSource:
    check_slug(slug)
    if not kaggle_credentials_present():
        raise UserError(
            f"no Kaggle credentials to download {slug!r} (--kaggle-dataset): save kaggle.json "
            "from https://www.kaggle.com/settings/api as ~/.kaggle/kaggle.json (or in "
            "$KAGGLE_CONFIG_DIR), or set KAGGLE_USERNAME and KAGGLE_KEY, or set "
            "KAGGLE_API_TOKEN; or use --input DIR or --source synthetic"
        )
    download_dir = work_dir / "raw_kaggle" / slug.replace("/", "_")
    root = download_kaggle(slug, download_dir, work_dir / "extracted", max_patients)
    return ResolvedSource("kaggle", root, f"kaggle:{slug}", _listed(read_refused_entries(root)))


def _resolve_synthetic(
    work_dir: Path, n_patients: int, image_size_px: int, seed: int
) -> ResolvedSource:
    """Generate (or reuse) the synthetic cohort; 0 patients or 0 px means the module default."""
    # Imported here: the prepare stage must not pay for (or depend on) it with real data.
    synthetic = importlib.import_module("lungct.synthetic.cohort")
    out_dir = work_dir / "raw_synthetic"
    try:
        synthetic.generate_cohort(
            out_dir=out_dir,
            n_patients=n_patients or synthetic.DEFAULT_PATIENTS,
            image_size_px=image_size_px or synthetic.DEFAULT_IMAGE_SIZE_PX,
            seed=seed,
        )
    except ValueError as error:
        raise UserError(f"invalid synthetic cohort setting: {error}") from None
    return ResolvedSource("synthetic", out_dir, "synthetic")
