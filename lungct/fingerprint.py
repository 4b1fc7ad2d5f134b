"""Fingerprints that decide whether a stage may reuse what it wrote before.

One rule for every stage: SHA-256 over the settings as canonical JSON, then the bytes of the
files whose content matters, then ``name, size, mtime_ns`` of the files whose listing matters
(too many or too large to read on every run). A stage stores the hex digest beside its
outputs and reuses them only when the digest of the new run is the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lungct.errors import UserError
from lungct.fileio import unsafe_relative

__all__ = ["file_set_sha256", "file_sha256", "fingerprint", "verify_file_set"]

_CHUNK_BYTES = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of one file's bytes, read in 1 MiB chunks.

    Raises:
        OSError: the file is missing or unreadable.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(settings: Mapping[str, Any], *, contents: Iterable[Path] = (),
                listing: Iterable[tuple[str, Path]] = ()) -> str:
    """Hex SHA-256 of ``settings``, the bytes of ``contents`` and the stat of ``listing``.

    Args:
        settings: JSON-able values (other values are hashed as their ``str``).
        contents: files hashed byte for byte, in the order given.
        listing: ``(name recorded, path)`` pairs hashed as name, size and modification time.

    Raises:
        UserError: a file is missing or unreadable.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    try:
        for path in contents:
            digest.update(f"\0content\0{file_sha256(path)}".encode())
        for name, path in listing:
            stat = Path(path).stat()
            digest.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    except OSError as error:
        raise UserError(f"cannot read {error.filename} ({error.strerror}).") from error
    return digest.hexdigest()


def file_set_sha256(base: Path, relatives: Iterable[str]) -> dict[str, str]:
    """``{relative path: SHA-256}`` of files under ``base``: a stage's outputs as one set."""
    return {relative: file_sha256(Path(base) / relative) for relative in sorted(relatives)}


def verify_file_set(recorded: Any, base: Path, where: str, producer: str) -> None:
    """Check that the files ``where`` lists under ``base`` are the ones it was written with.

    Raises:
        UserError: the record is malformed, a path leaves ``base``, a file is missing, or its
            SHA-256 differs (outputs of two runs mixed).
    """
    if not isinstance(recorded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise UserError(f"{where} does not list its files with their SHA-256; re-run {producer}.")
    for relative, expected in recorded.items():
        if unsafe_relative(relative):
            raise UserError(f"{where} lists {relative!r}, which is not a relative path inside "
                            f"{base}.")
        path = Path(base) / relative
        if not path.is_file():
            raise UserError(f"{path}, listed in {where}, is missing; re-run {producer}.")
        if file_sha256(path) != expected:
            raise UserError(f"{path} changed after {where} was written (files of two runs "
                            f"mixed?); re-run {producer}.")
