"""Where the raw data comes from: a local folder or archive, Kaggle, or the synthetic cohort.

``--source auto`` tries, in order (DESIGN.md section 3): ``--input`` (a folder or an archive),
a Kaggle download when credentials exist, and otherwise the built-in synthetic cohort, which
is announced with a warning because its results say nothing about real patients.

Archives are hostile input. Entries with absolute paths, ``..`` components or drive letters,
links whose target leaves the archive folder, device files and FIFOs are refused, logged and
recorded; links inside the archive are written as plain copies of their target, so no link is
ever created on disk. A zip declaring more than ``MAX_EXTRACTED_BYTES`` of content, or a tar
expanding beyond it, is refused as a possible zip bomb.

Bookkeeping lives beside each produced folder, never inside it, so the folder holds only
data: ``<folder>.lungct.json`` marks the folder complete (written last) and lists the refused
archive entries, which :func:`read_refused_entries` returns.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from tqdm import tqdm

from lungct.errors import UserError
from lungct.fileio import atomic_write_json

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DEFAULT_KAGGLE_DATASET",
    "MAX_EXTRACTED_BYTES",
    "SOURCES",
    "ResolvedSource",
    "archive_suffix",
    "download_kaggle",
    "extract_archive",
    "kaggle_credentials_present",
    "read_refused_entries",
    "resolve_source",
    "select_patient_files",
]

LOG = logging.getLogger(__name__)

SOURCES = ("auto", "local", "kaggle", "synthetic")
DEFAULT_KAGGLE_DATASET = "washingtongold/lidcidri30"
MAX_EXTRACTED_BYTES = 200 * 2**30
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")

# A patient id not followed by a digit or '-', so batch folders ("LIDC-IDRI-0001-0200") name none.
_PATIENT_ID = re.compile(r"LIDC-IDRI-\d{4}(?![\d-])")
# Files that name no patient but are kept by a patient-limited download (readings, metadata).
_SHARED_FILE_SUFFIXES = (".xml", ".csv", ".json", ".txt")
_KAGGLE_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")
MARKER_SUFFIX = ".lungct.json"
_COPY_CHUNK_BYTES = 1 << 20
_MAX_ZIP_LINK_BYTES = 4096
_KAGGLE_PAGE_SIZE = 200
_CORRUPT_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    NotImplementedError,  # zip compression methods Python cannot decode
)
_NAME_CONFLICT_ERRORS = (FileExistsError, IsADirectoryError, NotADirectoryError)
_T = TypeVar("_T")


@dataclass(frozen=True)
class ResolvedSource:
    """The folder to scan for raw data and where it came from.

    Attributes:
        kind: ``"local"``, ``"kaggle"`` or ``"synthetic"``.
        root: folder to scan (for an archive, the folder it was extracted to).
        description: provenance for dataset.json: ``local:<path as given>``,
            ``kaggle:<slug>`` or ``synthetic``.
        refused_entries: ``(entry name, reason)`` for every archive entry refused as unsafe;
            for an archive nested in a Kaggle download the name is ``<archive>!/<entry>``.
    """

    kind: str
    root: Path
    description: str
    refused_entries: tuple[tuple[str, str], ...] = ()


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
    description = f"local:{input_path}"
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
    return ResolvedSource("local", folder, description, tuple(read_refused_entries(folder)))


def _resolve_kaggle(slug: str, work_dir: Path, max_patients: int | None) -> ResolvedSource:
    _check_slug(slug)
    if not kaggle_credentials_present():
        raise UserError(
            f"no Kaggle credentials to download {slug!r} (--kaggle-dataset): save kaggle.json "
            "from https://www.kaggle.com/settings/api as ~/.kaggle/kaggle.json (or in "
            "$KAGGLE_CONFIG_DIR), or set KAGGLE_USERNAME and KAGGLE_KEY, or set "
            "KAGGLE_API_TOKEN; or use --input DIR or --source synthetic"
        )
    download_dir = work_dir / "raw_kaggle" / slug.replace("/", "_")
    root = download_kaggle(slug, download_dir, work_dir / "extracted", max_patients)
    return ResolvedSource("kaggle", root, f"kaggle:{slug}", tuple(read_refused_entries(root)))


def _resolve_synthetic(
    work_dir: Path, n_patients: int, image_size_px: int, seed: int
) -> ResolvedSource:
    """Generate (or reuse) the synthetic cohort; 0 patients or 0 px means the module default."""
    # Imported here: the prepare stage must not pay for (or depend on) it with real data.
    synthetic = importlib.import_module("lungct.synthetic")
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


# --------------------------------------------------------------------------- bookkeeping


def _marker_path(folder: Path) -> Path:
    return folder.with_name(folder.name + MARKER_SUFFIX)


def _read_marker(folder: Path) -> dict[str, Any]:
    """The completeness record of ``folder``; empty if absent, unreadable or the folder is gone."""
    try:
        record = json.loads(_marker_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and folder.is_dir() else {}


def read_refused_entries(folder: Path) -> list[tuple[str, str]]:
    """Archive entries refused while producing ``folder``, as ``(entry name, reason)``.

    Empty for a folder that no archive produced. The prepare stage lists them in skipped.csv
    with the reason ``unsafe archive entry: <reason>``.
    """
    entries = _read_marker(folder).get("refused_entries", [])
    return [(str(name), str(reason)) for name, reason in entries]


# --------------------------------------------------------------------------- archives


def archive_suffix(path: Path) -> str | None:
    """The archive suffix of ``path`` (case-insensitive, e.g. ``.tar.gz``), or None."""
    name = path.name.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if name.endswith(suffix)), None)


def extract_archive(
    archive: Path, extract_root: Path, *, max_total_bytes: int = MAX_EXTRACTED_BYTES
) -> Path:
    """Extract ``archive`` safely into ``extract_root/<archive name without suffix>/``.

    A completed extraction of the same archive (name, size, modification time) is reused.
    Anything else there (an interrupted or outdated extraction) is removed first; the archive
    is unpacked into a hidden ``.partial`` folder that is renamed into place when done, then
    the completeness marker is written.

    Args:
        archive: a ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2`` or ``.tar.xz`` file.
        extract_root: parent of the extracted folder.
        max_total_bytes: refuse an archive expanding to more than this many bytes.

    Returns:
        The extracted folder; its refused entries come from :func:`read_refused_entries`.

    Raises:
        ValueError: ``archive`` has no archive suffix, or ``max_total_bytes`` < 1.
        UserError: the archive is missing, corrupt or too large once expanded.
    """
    suffix = archive_suffix(archive)
    if suffix is None:
        raise ValueError(f"archive name must end with one of {ARCHIVE_SUFFIXES}, got {archive}")
    if max_total_bytes < 1:
        raise ValueError(f"max_total_bytes must be at least 1, got {max_total_bytes}")
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist or is not a file")
    stem = archive.name[: -len(suffix)]
    if not stem:
        raise UserError(f"archive {archive} needs a name before its {suffix} suffix")
    target = extract_root / stem
    status = archive.stat()
    identity = {"name": archive.name, "size_bytes": status.st_size, "mtime_ns": status.st_mtime_ns}
    if _read_marker(target).get("archive") == identity:
        LOG.info("reusing %s, extracted earlier from %s", target, archive)
        return target
    partial = target.with_name(f".{stem}.partial")
    _marker_path(target).unlink(missing_ok=True)
    for stale in (target, partial):
        if stale.is_dir() and not stale.is_symlink():
            LOG.info("removing incomplete or outdated extraction %s", stale)
            shutil.rmtree(stale)
        elif stale.exists() or stale.is_symlink():
            stale.unlink()
    partial.mkdir(parents=True)
    LOG.info("extracting %s into %s", archive, target)
    try:
        refused = _extract_members(archive, partial, max_total_bytes)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target)
    atomic_write_json(
        _marker_path(target),
        {"archive": identity, "refused_entries": [list(entry) for entry in refused]},
    )
    return target


def _extract_members(archive: Path, dest: Path, max_total_bytes: int) -> list[tuple[str, str]]:
    try:
        if archive.name.lower().endswith(".zip"):
            return _extract_zip(archive, dest, max_total_bytes)
        return _extract_tar(archive, dest, max_total_bytes)
    except _CORRUPT_ARCHIVE_ERRORS as error:
        raise UserError(f"archive {archive} is corrupt or unreadable ({_short(error)})") from error


def _relative_parts(name: str) -> list[str]:
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def _unsafe_name_reason(name: str) -> str | None:
    """Why an entry name could write outside the target folder, or None when it cannot."""
    normalized = name.replace("\\", "/")
    if "\x00" in name:
        return "NUL character in name"
    if normalized.startswith("/"):
        return "absolute path"
    if _DRIVE_LETTER.match(normalized):
        return "drive letter in path"
    if ".." in normalized.split("/"):
        return "'..' path component"
    if not _relative_parts(name):
        return "empty name"
    return None


def _link_target_name(member_name: str, link_name: str, *, symbolic: bool) -> str | None:
    """The archive-relative name a link points to, or None when it leaves the archive folder.

    A symbolic link is relative to its own folder, a (tar) hard link to the archive root.
    """
    link = link_name.replace("\\", "/")
    if not link or link.startswith("/") or _DRIVE_LETTER.match(link):
        return None
    base = posixpath.dirname(member_name.replace("\\", "/")) if symbolic else ""
    joined = posixpath.normpath(posixpath.join(base, link))
    if joined == ".." or joined.startswith("../"):
        return None
    return "/".join(_relative_parts(joined))


def _refuse(refused: list[tuple[str, str]], archive: Path, name: str, reason: str) -> None:
    LOG.warning("refused unsafe archive entry %r in %s: %s", name, archive.name, reason)
    refused.append((name, reason))


def _copy_limited(
    source: IO[bytes], path: Path, written_bytes: int, max_total_bytes: int, archive: Path
) -> int:
    """Copy ``source`` to ``path``; return the running total, refusing past the limit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with source, path.open("wb") as target:
        while chunk := source.read(_COPY_CHUNK_BYTES):
            written_bytes += len(chunk)
            if written_bytes > max_total_bytes:
                raise UserError(
                    f"archive {archive} expands to more than {_format_bytes(max_total_bytes)}: "
                    "refused as a possible zip bomb"
                )
            target.write(chunk)
    return written_bytes


def _extract_tar(archive: Path, dest: Path, max_total_bytes: int) -> list[tuple[str, str]]:
    refused: list[tuple[str, str]] = []
    written_bytes = 0
    with tarfile.open(archive, "r:*") as tar:
        by_name: dict[str, tarfile.TarInfo] | None = None
        for member in tar:
            source = member
            reason = _tar_member_refusal(member)
            if reason is None and (member.issym() or member.islnk()):
                if by_name is None:  # built on the first link only: it reads the whole archive
                    by_name = {"/".join(_relative_parts(m.name)): m for m in tar.getmembers()}
                source, reason = _tar_link_source(member, by_name)
            if reason is None:
                reason = _tar_data_filter_refusal(member, dest)
            if reason is not None:
                _refuse(refused, archive, member.name, reason)
                continue
            path = dest.joinpath(*_relative_parts(member.name))
            try:
                if member.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    data = tar.extractfile(source)
                    if data is None:
                        raise tarfile.ReadError(f"no data for {member.name!r}")
                    written_bytes = _copy_limited(
                        data, path, written_bytes, max_total_bytes, archive
                    )
            except _NAME_CONFLICT_ERRORS:
                _refuse(refused, archive, member.name, "name conflicts with another entry")
    return refused


def _tar_member_refusal(member: tarfile.TarInfo) -> str | None:
    reason = _unsafe_name_reason(member.name)
    if reason is not None:
        return reason
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO (named pipe)"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return "unsupported entry type"
    return None


def _tar_data_filter_refusal(member: tarfile.TarInfo, dest: Path) -> str | None:
    """A second opinion from tarfile's ``data`` filter (PEP 706), where Python has it."""
    data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4 / 3.10.12
    if data_filter is None:
        return None
    try:
        data_filter(member, str(dest))
    except tarfile.FilterError as error:
        return f"refused by tarfile's data filter ({error})"
    return None


def _tar_link_source(
    member: tarfile.TarInfo, by_name: Mapping[str, tarfile.TarInfo]
) -> tuple[tarfile.TarInfo, str | None]:
    """The regular file a safe link stands for, or the reason the link is refused."""
    kind = "symbolic link" if member.issym() else "hard link"
    target_name = _link_target_name(member.name, member.linkname, symbolic=member.issym())
    if target_name is None:
        return member, f"{kind} to {member.linkname!r} outside the archive folder"
    target = by_name.get(target_name)
    if target is None or not target.isfile():
        return member, f"{kind} to {member.linkname!r}, which is not a file in the archive"
    return target, None


def _extract_zip(archive: Path, dest: Path, max_total_bytes: int) -> list[tuple[str, str]]:
    refused: list[tuple[str, str]] = []
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        declared_bytes = sum(info.file_size for info in infos)
        if declared_bytes > max_total_bytes:
            raise UserError(
                f"archive {archive} declares {_format_bytes(declared_bytes)} of content, more "
                f"than the {_format_bytes(max_total_bytes)} limit: refused as a possible zip bomb"
            )
        by_name = {"/".join(_relative_parts(info.filename)): info for info in infos}
        written_bytes = 0
        for info in infos:
            source, reason = _zip_member_source(bundle, info, by_name)
            if reason is not None:
                _refuse(refused, archive, info.filename, reason)
                continue
            path = dest.joinpath(*_relative_parts(info.filename))
            try:
                if info.is_dir():
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    written_bytes = _copy_limited(
                        bundle.open(source), path, written_bytes, max_total_bytes, archive
                    )
            except _NAME_CONFLICT_ERRORS:
                _refuse(refused, archive, info.filename, "name conflicts with another entry")
    return refused


def _zip_member_source(
    bundle: zipfile.ZipFile, info: zipfile.ZipInfo, by_name: Mapping[str, zipfile.ZipInfo]
) -> tuple[zipfile.ZipInfo, str | None]:
    """The entry whose bytes ``info`` stands for, or the reason it is refused.

    Zip files made on Unix keep the file type in the high 16 bits of ``external_attr``; a
    symbolic link stores its target as the entry's content.
    """
    reason = _unsafe_name_reason(info.filename)
    if reason is not None:
        return info, reason
    if info.flag_bits & 0x1:
        return info, "encrypted entry"
    mode = info.external_attr >> 16
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return info, "device file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return info, "FIFO or socket"
    if not stat.S_ISLNK(mode):
        return info, None
    if info.file_size > _MAX_ZIP_LINK_BYTES:
        return info, "symbolic link with an overlong target"
    link_name = bundle.read(info).decode("utf-8", errors="replace")
    target_name = _link_target_name(info.filename, link_name, symbolic=True)
    if target_name is None:
        return info, f"symbolic link to {link_name!r} outside the archive folder"
    target = by_name.get(target_name)
    if (
        target is None
        or target.is_dir()
        or target.flag_bits & 0x1
        or not stat.S_ISREG(target.external_attr >> 16 or stat.S_IFREG)
    ):
        return info, f"symbolic link to {link_name!r}, which is not a plain file in the archive"
    return target, None


def _format_bytes(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes:,} bytes"


def _short(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


# --------------------------------------------------------------------------- Kaggle


def kaggle_credentials_present(
    environ: Mapping[str, str] | None = None, home: Path | None = None
) -> bool:
    """Whether the installed kaggle package (2.x) would find credentials.

    It reads, in order: an access token (``KAGGLE_API_TOKEN``, holding the token or the path
    of a file with it, or ``~/.kaggle/access_token`` / ``access_token.txt``); a legacy API key
    (``username`` and ``key`` from ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR``, else
    ``~/.kaggle``, else on Linux ``$XDG_CONFIG_HOME/kaggle`` or ``~/.config/kaggle``, each
    overridden by ``KAGGLE_USERNAME`` / ``KAGGLE_KEY``); an OAuth login saved by
    ``kaggle auth login`` (``~/.kaggle/credentials.json``); and a Kaggle notebook's token file.
    Presence only: whether Kaggle accepts them is known at download time.

    Args:
        environ: environment variables; ``os.environ`` when None.
        home: home folder; ``$HOME`` of ``environ`` (or the user's home) when None.
    """
    env = os.environ if environ is None else environ
    home_dir = home if home is not None else Path(env["HOME"]) if env.get("HOME") else Path.home()
    return (
        _has_access_token(env, home_dir)
        or _has_api_key(env, home_dir)
        or bool(_read_json_object(home_dir / ".kaggle" / "credentials.json").get("refresh_token"))
        or _has_notebook_token(env)
    )


def _has_access_token(env: Mapping[str, str], home_dir: Path) -> bool:
    if env.get("KAGGLE_API_TOKEN", "").strip():
        return True
    token_files = (home_dir / ".kaggle" / "access_token", home_dir / ".kaggle" / "access_token.txt")
    return any(_file_has_text(path) for path in token_files)


def _has_api_key(env: Mapping[str, str], home_dir: Path) -> bool:
    config = _read_json_object(_kaggle_config_dir(env, home_dir) / "kaggle.json")
    username = env.get("KAGGLE_USERNAME") or config.get("username")
    key = env.get("KAGGLE_KEY") or config.get("key")
    return bool(username) and bool(key)


def _has_notebook_token(env: Mapping[str, str]) -> bool:
    inside_notebook = "KAGGLE_KERNEL_RUN_TYPE" in env and "KAGGLE_DATA_PROXY_URL" in env
    return inside_notebook and _file_has_text(Path(env.get("KAGGLE_API_V1_TOKEN", "")))


def _kaggle_config_dir(env: Mapping[str, str], home_dir: Path) -> Path:
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    legacy = home_dir / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(env.get("XDG_CONFIG_HOME") or home_dir / ".config") / "kaggle"
    return legacy


def _file_has_text(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_slug(slug: str) -> None:
    if not _KAGGLE_SLUG.fullmatch(slug):
        raise UserError(
            f"--kaggle-dataset must look like owner/dataset (as in the dataset's URL), got {slug!r}"
        )


def select_patient_files(names: Iterable[str], max_patients: int) -> tuple[list[str], int]:
    """Pick the files of the first ``max_patients`` patients of a dataset's file list.

    A file belongs to the last ``LIDC-IDRI-NNNN`` id in its path (batch folders such as
    ``LIDC-IDRI-0001-0200`` name none); patients are taken in id order. Files naming no
    patient are kept when they are readings or metadata (``.xml``, ``.csv``, ``.json``,
    ``.txt``, e.g. an ``LIDC-XML-only/`` tree) and dropped otherwise (they may be images or
    archives of any patient).

    Returns:
        The selected names, sorted, and the number of patients in the list (0 when no file
        names a patient, so the limit cannot be applied).
    """
    if max_patients < 1:
        raise ValueError(f"max_patients must be at least 1, got {max_patients}")
    by_patient: dict[str, list[str]] = {}
    shared: list[str] = []
    for name in names:
        patient_ids = _PATIENT_ID.findall(name)
        if patient_ids:
            by_patient.setdefault(patient_ids[-1], []).append(name)
        elif name.lower().endswith(_SHARED_FILE_SUFFIXES):
            shared.append(name)
    chosen = sorted(by_patient)[:max_patients]
    return sorted(shared + [name for patient in chosen for name in by_patient[patient]]), len(
        by_patient
    )


def download_kaggle(
    slug: str, download_dir: Path, extract_root: Path, max_patients: int | None
) -> Path:
    """Download a Kaggle dataset (or its first patients) and return the folder to scan.

    The whole dataset is Kaggle's zip in ``download_dir/all/``, extracted safely into
    ``extract_root/<dataset>/``. With ``max_patients``, the dataset's file list is read and
    the files of the first patients (:func:`select_patient_files`) are downloaded one by one
    into ``download_dir/first-<N>-patients/``, archives among them extracted beside
    themselves; when no file names a patient, or all are asked for, the whole dataset is
    downloaded instead. A completed download (marker beside its folder) is reused without
    contacting Kaggle; an interrupted one is resumed by the kaggle package.

    Args:
        slug: ``owner/dataset``.
        download_dir: this dataset's download folder (``work_dir/raw_kaggle/<owner>_<dataset>``).
        extract_root: where the whole dataset's zip is extracted.
        max_patients: patients to download, or None for the whole dataset.

    Raises:
        ValueError: ``max_patients`` < 1.
        UserError: a bad slug, or any failure of the kaggle package (one sentence naming
            ``--kaggle-dataset``).
    """
    _check_slug(slug)
    if max_patients is not None and max_patients < 1:
        raise ValueError(f"max_patients must be at least 1 or None, got {max_patients}")
    limited = download_dir / f"first-{max_patients}-patients"
    if max_patients is not None and _read_marker(limited).get("slug") == slug:
        LOG.info("reusing the Kaggle download in %s", limited)
        return limited
    reusable = _reusable_whole_dataset(slug, download_dir / "all", extract_root, max_patients)
    if reusable is not None:
        return reusable
    api = _kaggle_call(slug, _authenticated_kaggle_api)
    n_patients = None
    if max_patients is not None:
        names = _kaggle_call(slug, _list_dataset_files, api, slug)
        selected, n_patients = select_patient_files(names, max_patients)
        if max_patients < n_patients:
            LOG.info(
                "downloading %d files of the first %d of %d patients of Kaggle dataset %s",
                len(selected), max_patients, n_patients, slug,
            )  # fmt: skip
            return _download_files(api, slug, limited, selected)
        _log_whole_dataset_reason(slug, max_patients, n_patients)
    archive = _download_whole_dataset(api, slug, download_dir / "all", n_patients)
    return extract_archive(archive, extract_root)


def _log_whole_dataset_reason(slug: str, max_patients: int, n_patients: int) -> None:
    if n_patients == 0:
        LOG.warning(
            "--max-patients %d could not be applied: no file of Kaggle dataset %s names an "
            "LIDC-IDRI patient id, so the whole dataset is used", max_patients, slug,
        )  # fmt: skip
    else:
        LOG.info("--max-patients %d covers all %d patients of %s", max_patients, n_patients, slug)


def _reusable_whole_dataset(
    slug: str, folder: Path, extract_root: Path, max_patients: int | None
) -> Path | None:
    """The extracted whole dataset when a completed download serves this request, else None."""
    record = _read_marker(folder)
    if record.get("slug") != slug:
        return None
    n_patients = record.get("n_patients_listed")
    if max_patients is not None:
        if n_patients is None or max_patients < n_patients:
            return None
        _log_whole_dataset_reason(slug, max_patients, n_patients)
    archive = folder / f"{slug.split('/')[1]}.zip"
    if archive.is_file():
        LOG.info("reusing the Kaggle download %s", archive)
        return extract_archive(archive, extract_root)
    extracted = extract_root / archive.name.removesuffix(".zip")
    if _read_marker(extracted).get("archive", {}).get("name") == archive.name:
        LOG.info("reusing %s (its downloaded zip has been deleted)", extracted)
        return extracted
    return None


def _download_whole_dataset(api: Any, slug: str, folder: Path, n_patients: int | None) -> Path:
    """Kaggle's zip of the whole dataset in ``folder``, downloaded unless already complete."""
    archive = folder / f"{slug.split('/')[1]}.zip"
    if _read_marker(folder).get("slug") != slug or not archive.is_file():
        LOG.info("downloading the whole Kaggle dataset %s into %s", slug, folder)
        _kaggle_call(
            slug, api.dataset_download_files, slug, path=str(folder), force=False, quiet=False,
            unzip=False,
        )  # fmt: skip
    atomic_write_json(_marker_path(folder), {"slug": slug, "n_patients_listed": n_patients})
    return archive


def _download_files(api: Any, slug: str, folder: Path, names: list[str]) -> Path:
    for name in tqdm(names, desc=f"Kaggle {slug}", unit="file"):
        _kaggle_call(
            slug, api.dataset_download_file, slug, name, path=str(folder), force=False,
            quiet=True, unzip=True,
        )  # fmt: skip
    refused: list[list[str]] = []
    for name in names:
        if archive_suffix(Path(name)) is not None and (folder / name).is_file():
            archive = folder / name
            extracted = extract_archive(archive, archive.parent)
            refused += [[f"{name}!/{entry}", why] for entry, why in read_refused_entries(extracted)]
    atomic_write_json(
        _marker_path(folder), {"slug": slug, "files": names, "refused_entries": refused}
    )
    return folder


def _authenticated_kaggle_api() -> Any:
    # Imported here: ``import kaggle`` authenticates at import time and, in some versions,
    # raises or calls sys.exit when it finds no credentials.
    import kaggle

    kaggle.api.authenticate()
    return kaggle.api


def _list_dataset_files(api: Any, slug: str) -> list[str]:
    names: list[str] = []
    page_token = None
    while True:
        response = api.dataset_list_files(slug, page_token=page_token, page_size=_KAGGLE_PAGE_SIZE)
        if getattr(response, "error_message", ""):
            raise RuntimeError(response.error_message)
        files = list(response.files or [])
        names += [file.name for file in files]
        page_token = getattr(response, "next_page_token", "")
        if not page_token or not files:
            return names


def _kaggle_call(slug: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a kaggle package call; its prints go to the debug log, its failures to a UserError."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return function(*args, **kwargs)
    except (Exception, SystemExit) as error:
        LOG.debug("kaggle package failure: %r", error)
        raise _kaggle_error(slug, error) from error
    finally:
        if printed.getvalue().strip():
            LOG.debug("kaggle package: %s", printed.getvalue().strip())


def _kaggle_error(slug: str, error: BaseException) -> UserError:
    """One sentence saying what failed and how to fix it, naming --kaggle-dataset."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    network = type(error).__module__.split(".")[0] in ("requests", "urllib3") or isinstance(
        error, (ConnectionError, TimeoutError)
    )
    credentials_fix = (
        "renew your token at https://www.kaggle.com/settings/api and check ~/.kaggle/kaggle.json,"
        " KAGGLE_USERNAME/KAGGLE_KEY or KAGGLE_API_TOKEN"
    )
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("kaggle"):
        cause, fix = "the kaggle package is not installed", "pip install kaggle"
    elif isinstance(error, SystemExit):
        cause, fix = "the kaggle package rejected the credentials", credentials_fix
    elif status in (401, 403):
        cause, fix = f"HTTP {status}: access refused", credentials_fix
    elif status == 404:
        cause = "HTTP 404: no such dataset"
        fix = "check the slug given with --kaggle-dataset (owner/dataset, as in its URL)"
    elif network and status is None:
        cause = f"Kaggle could not be reached: {type(error).__name__}"
        fix = "check your network connection, or use --input DIR or --source synthetic"
    else:
        cause = f"HTTP {status}" if status is not None else _short(error)
        fix = "check the slug given with --kaggle-dataset, your credentials and network"
    if "--kaggle-dataset" not in fix:
        fix += " (dataset chosen with --kaggle-dataset)"
    return UserError(f"Kaggle download of {slug!r} failed ({cause}): {fix}")
