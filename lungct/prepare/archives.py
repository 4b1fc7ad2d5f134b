"""Safe extraction of archives (zip and tar) and the bookkeeping beside produced folders.

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

import gzip
import json
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from lungct.errors import UserError
from lungct.fileio import atomic_write_json

__all__ = [
    "ARCHIVE_SUFFIXES",
    "MARKER_SUFFIX",
    "MAX_EXTRACTED_BYTES",
    "archive_suffix",
    "describe_error",
    "extract_archive",
    "marker_path",
    "read_marker",
    "read_refused_entries",
]

LOG = logging.getLogger(__name__)

MAX_EXTRACTED_BYTES = 200 * 2**30
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")
MARKER_SUFFIX = ".lungct.json"
_COPY_CHUNK_BYTES = 1 << 20
_MAX_ZIP_LINK_BYTES = 4096
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


# --------------------------------------------------------------------------- bookkeeping


def marker_path(folder: Path) -> Path:
    """The bookkeeping file beside ``folder``: ``<folder>.lungct.json``."""
    return folder.with_name(folder.name + MARKER_SUFFIX)


def read_marker(folder: Path) -> dict[str, Any]:
    """The completeness record of ``folder``; empty if absent, unreadable or the folder is gone."""
    try:
        record = json.loads(marker_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and folder.is_dir() else {}


def read_refused_entries(folder: Path) -> list[tuple[str, str]]:
    """Archive entries refused while producing ``folder``, as ``(entry name, reason)``.

    Empty for a folder that no archive produced. The prepare stage lists them in skipped.csv
    with the reason ``unsafe archive entry: <reason>``.
    """
    entries = read_marker(folder).get("refused_entries", [])
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
    if read_marker(target).get("archive") == identity:
        LOG.info("reusing %s, extracted earlier from %s", target, archive)
        return target
    partial = target.with_name(f".{stem}.partial")
    marker_path(target).unlink(missing_ok=True)
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
        marker_path(target),
        {"archive": identity, "refused_entries": [list(entry) for entry in refused]},
    )
    return target


def _extract_members(archive: Path, dest: Path, max_total_bytes: int) -> list[tuple[str, str]]:
    try:
        if archive.name.lower().endswith(".zip"):
            return _extract_zip(archive, dest, max_total_bytes)
        return _extract_tar(archive, dest, max_total_bytes)
    except _CORRUPT_ARCHIVE_ERRORS as error:
        raise UserError(
            f"archive {archive} is corrupt or unreadable ({describe_error(error)})"
        ) from error


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


def describe_error(error: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for one-sentence errors."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
