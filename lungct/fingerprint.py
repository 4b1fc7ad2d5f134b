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

__all__ = ["file_sha256", "fingerprint"]

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
