"""The persistent header index: every input file's checked header, or why it is no slice.

Reading headers dominates a prepare of a large tree (LIDC-IDRI: 244,000 files), and a header
does not change while its file does not. The index is one Parquet file (pyarrow) in the work
folder, :data:`INDEX_NAME`, with one row per input file: its absolute path (bytes, so names
that are not UTF-8 survive), its ``os.stat`` when it was read (:data:`STAT_COLUMNS`), and
either every field of :class:`~lungct.prepare.dicom.SliceHeader` or the ``reason`` it is not
a usable CT slice (not DICOM, not CT, burned-in annotation, non-axial, a bad number...). A
later run, with any settings, takes a file's row as long as all of these are unchanged, so a
second prepare of the same tree reads no header again. Size, ``mtime_ns`` and inode alone are
not enough: ``cp -p``, ``rsync -t`` or an archive extraction can rewrite a file with the same
size and mtime into a reused inode, but never without a new ``ctime_ns`` (set by the kernel on
every write, not settable by ``os.utime``), and a copy on another file system has another
device. Rows are also dropped when the rules that made them change (the code of ``dicom.py``,
``dicom_files.py`` and ``decoders.py``, the pydicom version, the columns:
:func:`rules_digest`), and transient read errors are never remembered.

Beside identity and geometry, a row holds what decides decoding (transfer syntax, bits
allocated and stored, signedness, rescale, padding, the pixel data's file offset), so a
cluster can plan or audit a tree from the index alone.

The index holds original identifiers (PatientID, UIDs, paths): it is a private cache beside
the work folder's sources, written under prepare's lock of that folder, atomically; it is never
part of ``output_dataset/``, its listing or its hash. Without pyarrow (the ``lungct[dask]``
extra) prepare reads every header, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from lungct.fileio import atomic_path
from lungct.prepare import decoders, dicom, dicom_files
from lungct.prepare.executors import Executor

__all__ = ["INDEX_NAME", "MAX_FILES_PER_TASK", "STAT_COLUMNS", "header_or_reason", "index_path",
           "read_header_batch",
           "read_headers", "rules_digest"]

LOG = logging.getLogger(__name__)

INDEX_NAME = ".lungct-header-index.parquet"
INDEX_FORMAT = "3"  # 2: ctime_ns and device joined the stat key; 3: decoding fields
#: Files per indexing task: enough to make a task's overhead small (about 1 ms on Dask), few
#: enough that every worker gets several tasks.
MAX_FILES_PER_TASK = 256
TASKS_PER_WORKER = 8
#: The ``os.stat`` fields that must all be unchanged for a row to be reused (st_size,
#: st_mtime_ns, st_ctime_ns, st_ino, st_dev).
STAT_COLUMNS = ("size", "mtime_ns", "ctime_ns", "inode", "device")
#: Reasons of a failed read that may pass (permissions, a network file system's hiccup).
_TRANSIENT = frozenset(f"unreadable DICOM ({name})" for name in (
    "OSError", "PermissionError", "FileNotFoundError", "TimeoutError", "InterruptedError",
    "BlockingIOError", "ConnectionError"))

HeaderOrReason = dicom.SliceHeader | str
Stat = tuple[int, int, int, int, int]


def index_path(work_dir: Path) -> Path:
    """Where the index of a work folder lives."""
    return Path(work_dir) / INDEX_NAME


def _header_fields() -> list[tuple[str, Any]]:
    """``(name, type)`` of every SliceHeader field but ``path``."""
    hints = typing.get_type_hints(dicom.SliceHeader)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(dicom.SliceHeader)
            if f.name != "path"]


def _arrow_type(pa: Any, kind: Any) -> Any:
    """The Arrow type of a SliceHeader field type (every column is nullable: reason rows)."""
    if isinstance(kind, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    simple = {str: pa.string(), float: pa.float64(), int: pa.int64(), bool: pa.bool_()}
    if kind in simple:
        return simple[kind]
    if typing.get_origin(kind) is tuple:
        return pa.list_(pa.float64())
    raise TypeError(f"SliceHeader field type {kind} has no Parquet column type")


def _schema(pa: Any) -> Any:
    return pa.schema(
        [("path", pa.binary()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
         ("ctime_ns", pa.int64()), ("inode", pa.uint64()), ("device", pa.uint64()),
         ("reason", pa.string())]
        + [(name, _arrow_type(pa, kind)) for name, kind in _header_fields()])


def rules_digest() -> str:
    """SHA-256 of what decides a row: the header code, pydicom's version and the columns."""
    digest = hashlib.sha256(f"{INDEX_FORMAT}\0{pydicom.__version__}\0".encode())
    for module in (dicom, dicom_files, decoders):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(repr(_header_fields()).encode())
    return digest.hexdigest()


def header_or_reason(path: Path) -> HeaderOrReason:
    """The checked header of one file, or the reason it is not a usable CT slice."""
    try:
        return dicom.read_header(path)
    except dicom_files.UnusableFileError as skip:
        return str(skip)


def read_header_batch(paths: list[Path]) -> list[HeaderOrReason]:
    """One task: the header (or skip reason) of each file of a batch, in order."""
    return [header_or_reason(path) for path in paths]


def _stat(path: Path) -> Stat | str:
    try:
        stat = os.stat(path)
    except OSError as error:
        return f"unreadable file ({error.strerror})"
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev


def _pyarrow() -> tuple[Any, Any] | None:
    if importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow
    import pyarrow.parquet

    return pyarrow, pyarrow.parquet


def _load(path: Path, arrow: tuple[Any, Any]) -> dict[bytes, tuple[Stat, HeaderOrReason]]:
    """The rows of the index at ``path`` by path; empty when absent, stale or unreadable."""
    pa, pq = arrow
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        LOG.warning("header index %s is unreadable (%s): reading every header again",
                    path, type(error).__name__)
        return {}
    metadata = table.schema.metadata or {}
    if (metadata.get(b"lungct.rules") != rules_digest().encode()
            or not table.schema.equals(_schema(pa), check_metadata=False)):
        LOG.info("header index %s was made by other header rules: reading every header again",
                 path)
        return {}
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    names = [name for name, _ in _header_fields()]
    rows: dict[bytes, tuple[Stat, HeaderOrReason]] = {}
    for i, key in enumerate(columns["path"]):
        stat = typing.cast(Stat, tuple(columns[name][i] for name in STAT_COLUMNS))
        reason = columns["reason"][i]
        if reason is not None:
            rows[key] = (stat, reason)
            continue
        values = {name: tuple(columns[name][i]) if isinstance(columns[name][i], list)
                  else columns[name][i] for name in names}
        rows[key] = (stat, dicom.SliceHeader(path=Path(os.fsdecode(key)), **values))
    return rows


def _save(path: Path, rows: dict[bytes, tuple[Stat, HeaderOrReason]],
          arrow: tuple[Any, Any]) -> None:
    """Write ``rows`` (sorted by path) as the index, atomically."""
    pa, pq = arrow
    names = [name for name, _ in _header_fields()]
    records = []
    for key in sorted(rows):
        stat, value = rows[key]
        record: dict[str, Any] = {"path": key, **dict(zip(STAT_COLUMNS, stat, strict=True))}
        if isinstance(value, str):
            record["reason"] = value
        else:
            record.update({name: getattr(value, name) for name in names})
        records.append(record)
    schema = _schema(pa).with_metadata({"lungct.rules": rules_digest()})
    table = pa.Table.from_pylist(records, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _batches(count: int, workers: int) -> list[range]:
    """Consecutive index ranges of at most :data:`MAX_FILES_PER_TASK` files."""
    size = max(1, min(MAX_FILES_PER_TASK, math.ceil(count / (workers * TASKS_PER_WORKER))))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def read_headers(files: Sequence[Path], root: Path, executor: Executor,
                 index_file: Path | None) -> list[HeaderOrReason]:
    """The header, or the reason it is no usable CT slice, of every file, in order.

    Files whose ``size``, ``mtime_ns`` and inode match their row in ``index_file`` are not
    opened; the others are read by ``executor`` in batches, and the index is rewritten when
    a row changed: rows of ``files`` are replaced, rows of other files under ``root`` (gone
    from the tree) dropped, rows outside ``root`` (other inputs of this work folder) kept.

    Args:
        files: input files (absolute paths, so that every worker finds them).
        root: the input folder that ``files`` were listed from.
        executor: where the header reads run.
        index_file: the index (:func:`index_path`), or None to read every header.
    """
    arrow = _pyarrow() if index_file is not None else None
    if index_file is not None and arrow is None:
        LOG.info("no header index without pyarrow (pip install 'lungct[dask]'): reading "
                 "every header")
    keys = [os.fsencode(os.path.abspath(path)) for path in files]
    stats = [_stat(path) for path in files]
    rows = _load(index_file, arrow) if arrow is not None else {}
    results: list[HeaderOrReason | None] = [None] * len(files)
    to_read: list[int] = []
    for i, (key, stat) in enumerate(zip(keys, stats, strict=True)):
        row = rows.get(key)
        if isinstance(stat, str):
            results[i] = stat
        elif row is not None and row[0] == stat:
            results[i] = row[1]
        else:
            to_read.append(i)
    batches = _batches(len(to_read), executor.workers)
    tasks = [[Path(os.fsdecode(keys[to_read[j]])) for j in batch] for batch in batches]
    for batch, batch_results in zip(batches, executor.map(read_header_batch, tasks, "index"),
                                    strict=True):
        for j, result in zip(batch, batch_results, strict=True):
            results[to_read[j]] = result
    if arrow is not None:
        _update(index_file, rows, keys, stats, results, root, arrow)
    LOG.info("headers: %d of %d files from the index, %d read", len(files) - len(to_read),
             len(files), len(to_read))
    return typing.cast(list[HeaderOrReason], results)


def _update(index_file: Path, rows: dict[bytes, tuple[Stat, HeaderOrReason]],
            keys: list[bytes], stats: list[Stat | str], results: list[HeaderOrReason | None],
            root: Path, arrow: tuple[Any, Any]) -> None:
    """Rewrite the index when its rows for this tree differ from this run's."""
    prefix = os.fsencode(os.path.join(os.path.abspath(root), ""))
    current = set(keys)
    kept = {key: row for key, row in rows.items()
            if key not in current and not key.startswith(prefix)}
    for key, stat, result in zip(keys, stats, results, strict=True):
        if not isinstance(stat, str) and result not in _TRANSIENT:
            kept[key] = (stat, typing.cast(HeaderOrReason, result))
    if kept != rows:
        _save(index_file, kept, arrow)
