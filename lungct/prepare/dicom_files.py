"""Opening an untrusted DICOM file within caps: the file-level half of header checking.

Every input file is untrusted. Before pydicom parses one, its size and the size a deflated
data set inflates to are bounded (:data:`MAX_FILE_BYTES`); any failure becomes
:class:`UnusableFileError`, whose text goes to skipped.csv. The checks of the numbers inside
a header are :mod:`lungct.prepare.dicom`'s.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from lungct.prepare.decoders import DecodeRefusedError

__all__ = ["MAX_FILE_BYTES", "UnusableFileError", "refuse_unreadable",
           "read_dataset", "transfer_syntax"]

#: bytes of a file, and of a deflated data set inflated: twice the largest slice that
#: :data:`lungct.prepare.dicom.MAX_SLICE_BYTES` lets decode (4096 x 4096 px at 16 bits).
MAX_FILE_BYTES = 64 * 2**20

_SNIFF_BYTES = 4096
_INFLATE_CHUNK_BYTES = 1 << 20
# (0002,0010) Transfer Syntax UID = Deflated Explicit VR Little Endian, as the meta holds it.
_DEFLATED_ELEMENT = b"\x02\x00\x10\x00UI\x16\x00" + DeflatedExplicitVRLittleEndian.encode()


class UnusableFileError(Exception):
    """A file that is not a usable CT slice; ``str(error)`` is the reason for skipped.csv."""


_R = TypeVar("_R")


def refuse_unreadable(function: Callable[..., _R]) -> Callable[..., _R]:
    """Decorator: DecodeRefusedError becomes UnusableFileError with its reason, any other
    error UnusableFileError naming its type (pydicom converts values lazily and raises many
    types on corrupt input)."""

    @functools.wraps(function)
    def wrapper(*args: object, **kwargs: object) -> _R:
        try:
            return function(*args, **kwargs)
        except UnusableFileError:
            raise
        except DecodeRefusedError as error:  # lungct.prepare.decoders' reason
            raise UnusableFileError(str(error)) from None
        except Exception as error:
            raise UnusableFileError(f"unreadable DICOM ({type(error).__name__})") from None

    return wrapper


def transfer_syntax(ds: pydicom.Dataset) -> UID:
    """(0002,0010) Transfer Syntax UID; Implicit VR Little Endian when the meta lacks it."""
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if not syntax.is_transfer_syntax:
        raise UnusableFileError(f"unknown (0002,0010) Transfer Syntax UID {syntax[:64]!r}")
    return syntax


def _check_deflated(path: Path) -> None:
    """Refuse a deflated data set that would inflate beyond :data:`MAX_FILE_BYTES`.

    pydicom inflates a whole Deflated Explicit VR Little Endian data set on reading, even for
    a header; the file meta (group 0002, never deflated) names the syntax, and a zlib stream
    inflated 1 MiB at a time measures the inflated size first.
    """
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if head[128:132] != b"DICM":
        return  # pydicom refuses it: not DICOM
    # (0002,0000) File Meta Information Group Length (UL): the meta ends 144 + value bytes in.
    meta_end = (144 + int.from_bytes(head[140:144], "little")
                if head[132:138] == b"\x02\x00\x00\x00UL" else None)
    if meta_end is not None and meta_end <= len(head):
        deflated = _DEFLATED_ELEMENT in head[132:meta_end]
    else:  # an unusual or long meta: pydicom parses group 0002 alone
        try:
            syntax = read_file_meta_info(path).get("TransferSyntaxUID")
        except Exception as error:  # noqa: BLE001 - pydicom raises many types on bad meta
            # Refused here rather than left to dcmread: a meta that cannot be parsed alone
            # could hide a deflated data set, which dcmread would inflate without bound.
            raise UnusableFileError(f"unreadable file meta information "
                                    f"({type(error).__name__})") from None
        deflated = syntax == DeflatedExplicitVRLittleEndian
    if not deflated:
        return
    name = DeflatedExplicitVRLittleEndian.name
    if meta_end is None:
        raise UnusableFileError(f"{name} without (0002,0000) File Meta Information Group Length")
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with open(path, "rb") as handle:
        handle.seek(meta_end)
        while chunk := handle.read(_INFLATE_CHUNK_BYTES):
            while chunk:
                try:
                    inflated += len(inflater.decompress(chunk, _INFLATE_CHUNK_BYTES))
                except zlib.error:
                    raise UnusableFileError(f"{name} data set could not be inflated") from None
                if inflated > MAX_FILE_BYTES:
                    raise UnusableFileError(f"{name} data set inflates beyond {MAX_FILE_BYTES}")
                chunk = inflater.unconsumed_tail


def read_dataset(path: Path, **options: object) -> pydicom.Dataset:
    """``pydicom.dcmread(path, **options)`` after the file-level caps; UnusableFileError when
    the file exceeds (or inflates beyond) :data:`MAX_FILE_BYTES`, is not DICOM or unreadable."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise UnusableFileError(f"file of {size} bytes exceeds {MAX_FILE_BYTES}")
        _check_deflated(path)
        return pydicom.dcmread(path, **options)
    except UnusableFileError:
        raise
    except InvalidDicomError:
        raise UnusableFileError("not DICOM") from None
    except Exception as error:  # pydicom raises many types on corrupt input
        raise UnusableFileError(f"unreadable DICOM ({type(error).__name__})") from None
