"""Safe extraction of archives (zip and tar) and the bookkeeping beside produced folders.

Archives and their names are hostile input. Entries with absolute paths, ``..`` components
or drive letters, links leaving the archive folder, device files and FIFOs are refused,
logged and recorded; links inside the archive become plain copies (no link is ever made). An
archive expanding beyond ``MAX_EXTRACTED_BYTES`` or the free disk space is refused. The
extraction folder is one safe path component inside the extraction root, whatever the
archive is called (:func:`extraction_folder`); only folders lungct made for the same archive
are ever removed. ``<folder>.lungct.json``, beside the folder so that it holds only data,
names the archive while extraction is in progress (written before anything is created or
removed), then marks the folder complete and lists the refused entries
(:func:`read_refused_entries`).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
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
from typing import IO, Any, NamedTuple

from lungct.errors import UserError
from lungct.fileio import atomic_write_json

__all__ = [
    "ARCHIVE_SUFFIXES", "FREE_DISK_RESERVE_BYTES", "MARKER_SUFFIX", "MAX_EXTRACTED_BYTES",
    "MAX_FOLDER_NAME_BYTES", "NAME_HASH_CHARS", "archive_suffix", "describe_error",
    "extract_archive", "extraction_folder", "marker_path", "read_marker", "read_refused_entries",
    "unsafe_name_reason",
]  # fmt: skip

LOG = logging.getLogger(__name__)

#: Bytes one archive may expand to at most (refused beyond: a possible zip bomb).
MAX_EXTRACTED_BYTES = 200 * 2**30
#: Bytes left free on the extraction disk; the expansion is capped to the free space less this.
FREE_DISK_RESERVE_BYTES = 256 * 2**20
#: Bytes (UTF-8) of the longest archive-derived folder name used as is.
MAX_FOLDER_NAME_BYTES = 120
#: Hex digits of SHA-256(resolved archive path) in a derived extraction folder name.
NAME_HASH_CHARS = 12
#: Characters that never enter an extraction folder name (separators and shell-hostile ones).
_UNSAFE_NAME_CHARACTERS = frozenset('/\\:*?"<>|')
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar", ".zip")
_DRIVE_LETTER = re.compile(r"[A-Za-z]:")
MARKER_SUFFIX = ".lungct.json"
_COPY_CHUNK_BYTES = 1 << 20
_MAX_ZIP_LINK_BYTES = 4096
# NotImplementedError: unknown zip compression; UnicodeDecodeError: bad names flagged UTF-8.
_CORRUPT_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error,
                           lzma.LZMAError, gzip.BadGzipFile, NotImplementedError,
                           UnicodeDecodeError)  # fmt: skip
_NAME_CONFLICT_ERRORS = (FileExistsError, IsADirectoryError, NotADirectoryError)
_NAME_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL})


def marker_path(folder: Path) -> Path:
    """The bookkeeping file beside ``folder``: ``<folder>.lungct.json``."""
    return folder.with_name(folder.name + MARKER_SUFFIX)


def read_marker(folder: Path) -> dict[str, Any]:
    """The completeness record of ``folder``; empty if absent, unreadable or the folder is gone."""
    return _record(folder) if folder.is_dir() else {}


def _record(folder: Path) -> dict[str, Any]:
    """The bookkeeping record beside ``folder`` whether or not the folder exists; {} if none."""
    try:
        record = json.loads(marker_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_refused_entries(folder: Path) -> list[tuple[str, str]]:
    """Archive entries refused while producing ``folder``, as ``(entry name, reason)``.

    Empty for a folder that no archive produced. The prepare stage lists them in skipped.csv
    with the reason ``unsafe archive entry: <reason>``.
    """
    entries = read_marker(folder).get("refused_entries", [])
    return [(str(name), str(reason)) for name, reason in entries]


def archive_suffix(path: Path) -> str | None:
    """The archive suffix of ``path`` (case-insensitive, e.g. ``.tar.gz``), or None."""
    name = path.name.lower()
    return next((suffix for suffix in ARCHIVE_SUFFIXES if name.endswith(suffix)), None)


def extract_archive(
    archive: Path, extract_root: Path, *, max_total_bytes: int = MAX_EXTRACTED_BYTES
) -> Path:
    """Extract ``archive`` safely into :func:`extraction_folder`, strictly inside ``extract_root``.

    A completed extraction of the same archive (resolved path, name, size, mtime) is reused.
    Otherwise a record naming the archive "in progress" is written beside the folder first;
    only then is an interrupted or outdated extraction of this same archive removed. The
    archive is unpacked into ``.<folder>.partial``, renamed into place when done, and the
    record becomes the completeness marker. Returns the folder.

    Args:
        archive: a ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2`` or ``.tar.xz`` file.
        extract_root: parent of the extracted folder (created when missing).
        max_total_bytes: refuse an archive expanding to more than this many bytes, or to more
            than the free space of ``extract_root``'s disk less :data:`FREE_DISK_RESERVE_BYTES`.

    Raises:
        ValueError: ``archive`` has no archive suffix, or ``max_total_bytes`` < 1.
        UserError: the archive is missing, corrupt or too large once expanded; the folder is
            taken by something lungct did not make; ``extract_root`` is not writable.
    """
    if archive_suffix(archive) is None:
        raise ValueError(f"archive name must end with one of {ARCHIVE_SUFFIXES}, got {archive}")
    if max_total_bytes < 1:
        raise ValueError(f"max_total_bytes must be at least 1, got {max_total_bytes}")
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist or is not a file")
    status = archive.stat()
    identity = {"name": archive.name, "size_bytes": status.st_size,
                "mtime_ns": status.st_mtime_ns, "path": str(archive.resolve())}  # fmt: skip
    try:
        extract_root.mkdir(parents=True, exist_ok=True)
        target = extraction_folder(archive, extract_root)
        partial = target.with_name(f".{target.name}.partial")
        if _record(target).get("archive") == identity and _is_folder(target):
            LOG.info("reusing %s, extracted earlier from %s", target, archive)
            return target
        for folder in (target, partial):
            _check_removable(folder, extract_root, archive)
        atomic_write_json(marker_path(target), {"in_progress": identity})
    except OSError as error:
        raise UserError(f"cannot write in {extract_root} ({error.strerror or error}): choose a "
                        "writable --work-dir") from None  # fmt: skip
    for folder in (target, partial):
        if _is_folder(folder):
            LOG.info("removing the incomplete or outdated extraction %s", folder)
            shutil.rmtree(folder)
    partial.mkdir()
    LOG.info("extracting %s into %s", archive, target)
    try:
        refused = _extract_members(archive, partial, _expansion_limit(partial, max_total_bytes))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        marker_path(target).unlink(missing_ok=True)  # ours, and nothing it names is left
        raise
    os.replace(partial, target)
    entries = [list(entry) for entry in refused]
    atomic_write_json(marker_path(target), {"archive": identity, "refused_entries": entries})
    return target


def extraction_folder(archive: Path, extract_root: Path) -> Path:
    """The folder :func:`extract_archive` uses for ``archive``: one component in ``extract_root``.

    The archive's name less its suffix; or, when that name is unusable (empty, dots only,
    hidden, holding a separator or an unprintable character, ending like lungct's bookkeeping,
    over :data:`MAX_FOLDER_NAME_BYTES`) or taken by another archive's extraction,
    ``<name>-<hash>`` (``archive-<hash>`` for an unusable name), ``<hash>`` being the first
    :data:`NAME_HASH_CHARS` hex digits of SHA-256 of the archive's resolved path: stable from
    run to run. ``archive`` need not exist any more (a deleted download, its extraction kept).

    Raises:
        UserError: the folder (or its ``.partial`` or record name) is taken by something
            lungct did not make for this archive; it is left untouched.
    """
    key = str(archive.resolve())  # the owner an extraction record names
    stem = archive.name[: len(archive.name) - len(archive_suffix(archive) or "")]
    plain = _plain_folder_name(stem)
    digest = hashlib.sha256(os.fsencode(key)).hexdigest()[:NAME_HASH_CHARS]
    names = [name for name in (plain, f"{plain or 'archive'}-{digest}") if name]
    owners = {name: _extraction_owner(_record(extract_root / name)) for name in names}
    if key in owners.values():
        return extract_root / next(name for name in names if owners[name] == key)
    for name in names:
        folder = extract_root / name
        taken = (folder, folder.with_name(f".{name}.partial"), marker_path(folder))
        if owners[name] is None and any(os.path.lexists(path) for path in taken):
            raise UserError(f"{folder} (or its .partial folder or {MARKER_SUFFIX} record) exists "
                            f"and was not made by lungct for {archive}: it is left untouched; "
                            "move it away or choose another --work-dir")  # fmt: skip
        if owners[name] is None:
            return folder
    raise UserError(f"{extract_root / names[-1]} holds the extraction of another archive")


def _plain_folder_name(stem: str) -> str | None:
    """``stem`` when it is a safe, readable folder name of its own, else None."""
    safe = (stem.isprintable() and not _UNSAFE_NAME_CHARACTERS.intersection(stem)
            and not stem.startswith(".") and not stem.lower().endswith((MARKER_SUFFIX, ".partial"))
            and 0 < len(stem.encode("utf-8")) <= MAX_FOLDER_NAME_BYTES)  # fmt: skip
    return stem if safe else None


def _extraction_owner(record: Mapping[str, Any]) -> str | None:
    """The resolved archive path an extraction record names ("" in an older record naming
    none: another archive's, for safety); None when there is no extraction record."""
    for key in ("in_progress", "archive"):
        if isinstance(record.get(key), dict):
            return str(record[key].get("path", ""))
    return None


def _is_folder(path: Path) -> bool:  # a real folder, not a link to one
    return path.is_dir() and not path.is_symlink()


def _check_removable(folder: Path, extract_root: Path, archive: Path) -> None:
    """Refuse, leaving it untouched, a folder that extraction could not safely replace."""
    if not os.path.lexists(folder):
        return
    if not _is_folder(folder) or folder.resolve().parent != extract_root.resolve():
        raise UserError(f"{folder} is a link or a file, which lungct never makes: it is left "
                        "untouched; move it away or choose another --work-dir")  # fmt: skip
    if archive.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"archive {archive} lies inside {folder}, the folder its extraction "
                        "replaces: move the archive elsewhere")  # fmt: skip


class _Limit(NamedTuple):
    max_bytes: int  # an archive may expand to this many bytes
    why: str  # the end of the sentence refusing more


def _expansion_limit(dest: Path, max_total_bytes: int) -> _Limit:
    """The smaller of ``max_total_bytes`` and the free space of ``dest``'s disk (less a reserve)."""
    free_bytes = max(shutil.disk_usage(dest).free - FREE_DISK_RESERVE_BYTES, 0)
    if free_bytes < max_total_bytes:
        return _Limit(free_bytes, (
            f"the {_format_bytes(free_bytes)} free on the disk of {dest.parent} (keeping "
            f"{_format_bytes(FREE_DISK_RESERVE_BYTES)} spare): free some space or choose "
            "another --work-dir"))  # fmt: skip
    return _Limit(max_total_bytes, f"{_format_bytes(max_total_bytes)} (the limit): refused as "
                  "a possible zip bomb")  # fmt: skip


def _extract_members(archive: Path, dest: Path, limit: _Limit) -> list[tuple[str, str]]:
    try:
        if archive.name.lower().endswith(".zip"):
            return _extract_zip(archive, dest, limit)
        return _extract_tar(archive, dest, limit)
    except _CORRUPT_ARCHIVE_ERRORS as error:
        detail = describe_error(error)
        raise UserError(f"archive {archive} is corrupt or unreadable ({detail})") from error


def _relative_parts(name: str) -> list[str]:
    return [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]


def unsafe_name_reason(name: str) -> str | None:
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
    """The archive-relative name a link points to, or None when it leaves the archive folder
    (a symbolic link is relative to its own folder, a tar hard link to the archive root)."""
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


def _write_entry(dest: Path, name: str, source: IO[bytes] | None, written_bytes: int,
                 limit: _Limit, archive: Path, refused: list[tuple[str, str]]) -> int:
    """Write one safe entry (a folder when ``source`` is None) under ``dest``; return the
    running total of bytes written, refusing past the limit. An entry whose name the file
    system cannot hold (taken by another entry, too long) is refused and recorded."""
    path = dest.joinpath(*_relative_parts(name))
    try:
        with source or contextlib.nullcontext():
            if source is None:
                path.mkdir(parents=True, exist_ok=True)
                return written_bytes
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as target:
                while chunk := source.read(_COPY_CHUNK_BYTES):
                    written_bytes += len(chunk)
                    if written_bytes > limit.max_bytes:
                        raise UserError(f"archive {archive} expands to more than {limit.why}")
                    target.write(chunk)
    except _NAME_CONFLICT_ERRORS:
        _refuse(refused, archive, name, "name conflicts with another entry")
    except OSError as error:
        if error.errno not in _NAME_ERRNOS:
            raise
        _refuse(refused, archive, name, f"name the file system refuses ({error.strerror})")
    return written_bytes


def _extract_tar(archive: Path, dest: Path, limit: _Limit) -> list[tuple[str, str]]:
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
            data = None if member.isdir() else tar.extractfile(source)
            if data is None and not member.isdir():
                raise tarfile.ReadError(f"no data for {member.name!r}")
            written_bytes = _write_entry(dest, member.name, data, written_bytes, limit, archive,
                                         refused)  # fmt: skip
    return refused


def _tar_member_refusal(member: tarfile.TarInfo) -> str | None:
    reason = unsafe_name_reason(member.name)
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


def _extract_zip(archive: Path, dest: Path, limit: _Limit) -> list[tuple[str, str]]:
    refused: list[tuple[str, str]] = []
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        declared_bytes = sum(info.file_size for info in infos)
        if declared_bytes > limit.max_bytes:
            raise UserError(f"archive {archive} declares {_format_bytes(declared_bytes)} of "
                            f"content, more than {limit.why}")  # fmt: skip
        by_name = {"/".join(_relative_parts(info.filename)): info for info in infos}
        written_bytes = 0
        for info in infos:
            source, reason = _zip_member_source(bundle, info, by_name)
            if reason is not None:
                _refuse(refused, archive, info.filename, reason)
                continue
            data = None if info.is_dir() else bundle.open(source)
            written_bytes = _write_entry(dest, info.filename, data, written_bytes, limit, archive,
                                         refused)  # fmt: skip
    return refused


def _zip_member_source(
    bundle: zipfile.ZipFile, info: zipfile.ZipInfo, by_name: Mapping[str, zipfile.ZipInfo]
) -> tuple[zipfile.ZipInfo, str | None]:
    """The entry whose bytes ``info`` stands for, or the reason it is refused. Zips made on
    Unix keep the file type in ``external_attr >> 16``; a symbolic link's content is its target."""
    reason = unsafe_name_reason(info.filename)
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
    mode = stat.S_IFREG if target is None else target.external_attr >> 16 or stat.S_IFREG
    if target is None or target.is_dir() or target.flag_bits & 0x1 or not stat.S_ISREG(mode):
        return info, f"symbolic link to {link_name!r}, which is not a plain file in the archive"
    return target, None


def _format_bytes(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes:,} bytes"


def describe_error(error: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), for one-sentence errors."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
