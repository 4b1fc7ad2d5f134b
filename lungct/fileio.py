"""Atomic writes: a file through a temp file, a folder of outputs through a staging folder;
and the one rule for CSV cells people open in spreadsheets (:func:`spreadsheet_safe`).

Files: a temp file beside the target, then ``os.replace``; an interrupted run leaves only a
stray ``*.tmp-*`` file that the next run ignores and overwrites. Folders: a stage builds its
outputs in ``<target>.partial/`` (marked as lungct's, so only a marked one is ever removed)
and swaps it into place with two renames, so readers see the old set or the new one, never a
mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from lungct.errors import UserError

__all__ = [
    "PARTIAL_SUFFIX",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fresh_staging",
    "spreadsheet_safe",
    "swap_into_place",
    "unsafe_relative",
]

PARTIAL_SUFFIX = ".partial"
_STAGING_MARKER = ".lungct-partial"

# mkstemp creates files readable by the owner only; outputs get the usual umask-based mode.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for equal content)."""
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def fresh_staging(target: Path) -> Path:
    """An empty ``<target>.partial/`` marked as lungct's; a leftover marked one is replaced.

    Raises:
        UserError: ``<target>.partial`` exists without the marker (not lungct's: left alone).
    """
    target = Path(target)
    staging = target.with_name(target.name + PARTIAL_SUFFIX)
    if staging.exists():
        if not (staging / _STAGING_MARKER).is_file():
            raise UserError(f"{staging} exists and was not made by lungct; move it away or "
                            "choose another output folder.")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / _STAGING_MARKER).touch()
    return staging


def swap_into_place(staging: Path, target: Path) -> None:
    """Replace the folder ``target`` by the finished ``staging`` folder (two renames).

    The previous ``target`` moves into a fresh folder this call creates, and only that folder
    is removed.
    """
    staging, target = Path(staging), Path(target)
    (staging / _STAGING_MARKER).unlink()
    if not target.exists():
        staging.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=target.parent))
    target.replace(old / target.name)
    staging.rename(target)
    shutil.rmtree(old)


def unsafe_relative(text: str) -> bool:
    """Whether ``text`` fails to name a path inside a folder (empty, absolute, ``..``, ``\\``)."""
    path = PurePosixPath(text)
    return text == "" or path.is_absolute() or ".." in path.parts or "\\" in text


#: A cell a spreadsheet would run as a formula (OWASP "CSV injection"), unless it is a number.
_FORMULA_START = ("=", "+", "-", "@")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: Any) -> Any:
    """``value``, with a ``'`` before a text that starts with ``=``, ``+``, ``-`` or ``@``
    and is not a number: text from input files (a file name, a Patient ID) that a spreadsheet
    would otherwise run as a formula. For CSVs people open and no stage reads back."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(
            value):
        return "'" + value
    return value
