"""Salted pseudonyms for patient ids and DICOM UIDs (``--pseudonymise``).

Hospital DICOM is identifiable; LIDC is already de-identified. A pseudonym is ``P`` + the first
12 hex digits of SHA-256(salt:value); the salt is created once in the working folder
(``.lungct_salt``, private: it never enters the dataset), so re-runs give the same pseudonyms.

One masking rule serves every output and every log line of a pseudonymised run: the patient
ids read from the DICOM headers and the candidates, every match of ``--patient-regex``, and
every run of digits and dots that looks like a DICOM UID (PS3.5 9.1: components of digits
separated by dots; here at least three components and 10 characters) are replaced wherever
they occur: in path components, file names (``<uid>.dcm``), skip reasons and messages.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from lungct.fileio import atomic_write_text
from lungct.prepare.candidates import Candidate

__all__ = ["SALT_FILE", "Pseudonymiser", "masked_logging", "pseudonymise"]

SALT_FILE = ".lungct_salt"
_UID_RUN = re.compile(r"(?<![\d.])\d+(?:\.\d+){2,}(?!\.?\d)")
_MIN_UID_CHARS = 10


class Pseudonymiser:
    """Masks identifiers in text: known patient ids, ``--patient-regex`` matches, UIDs.

    Args:
        work_dir: where the salt file lives (created on first use).
        patient_pattern: the ``--patient-regex`` that finds patient ids in paths.
        patient_ids: patient ids known from the headers (hospital ids need not match the
            pattern).
    """

    def __init__(self, work_dir: Path, patient_pattern: str,
                 patient_ids: Iterable[str] = ()) -> None:
        salt_file = Path(work_dir) / SALT_FILE
        if not salt_file.exists():
            atomic_write_text(salt_file, secrets.token_hex(16))
        self._salt = salt_file.read_text().strip()
        self._pattern = re.compile(patient_pattern)
        self._known: list[str] = []
        self.add_patients(patient_ids)

    def add_patients(self, patient_ids: Iterable[str]) -> None:
        """Mask these ids too (longest first, so an id that contains another wins)."""
        known = set(self._known) | {p for p in patient_ids if p and p.strip()}
        self._known = sorted(known, key=len, reverse=True)

    def alias(self, value: str) -> str:
        """The pseudonym of one identifier; empty stays empty."""
        if not value:
            return value
        return "P" + hashlib.sha256(f"{self._salt}:{value}".encode()).hexdigest()[:12]

    def text(self, text: str) -> str:
        """``text`` with every identifier replaced by its pseudonym."""
        for patient in self._known:
            if patient in text:
                text = text.replace(patient, self.alias(patient))
        text = self._pattern.sub(lambda m: self.alias(m.group(0)) if m.group(0) else "", text)
        return _UID_RUN.sub(
            lambda m: self.alias(m.group(0)) if len(m.group(0)) >= _MIN_UID_CHARS
            else m.group(0), text)


class _MaskingFilter(logging.Filter):
    def __init__(self, masker: Pseudonymiser) -> None:
        super().__init__()
        self.masker = masker

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.masker.text(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.masker.text(logging.Formatter().formatException(
                record.exc_info))
            record.exc_info = None
        return True


@contextmanager
def masked_logging(masker: Pseudonymiser) -> Iterator[None]:
    """Mask every log record (``--verbose`` included) while the block runs."""
    mask = _MaskingFilter(masker)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(mask)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(mask)


def pseudonymise(candidates: list[Candidate], skipped: dict[str, str],
                 masker: Pseudonymiser) -> tuple[list[Candidate], dict[str, str]]:
    """Replace patient ids and UIDs in the candidates and in the skipped files and reasons.

    Returns:
        The renamed candidates, and the skipped files keyed by their masked relative path.
    """
    masker.add_patients(c.patient_id for c in candidates)
    renamed = [
        replace(c, patient_id=masker.alias(c.patient_id),
                source_file=masker.text(c.source_file),
                series_uid=masker.alias(c.series_uid))
        for c in candidates
    ]
    masked = {masker.text(name): masker.text(reason) for name, reason in skipped.items()}
    return renamed, masked
