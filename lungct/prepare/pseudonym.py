"""Salted pseudonyms for patient ids and DICOM UIDs (``--pseudonymise``).

Hospital DICOM is identifiable; LIDC is already de-identified. Pseudonyms are
``P`` + the first 12 hex digits of SHA-256(salt:value); the salt is created once in the
working folder, so re-runs give the same pseudonyms and the salt never enters the dataset.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lungct.fileio import atomic_write_text
from lungct.prepare.candidates import Candidate

__all__ = ["SALT_FILE", "pseudonymise"]

SALT_FILE = ".lungct_salt"
_UID_PART = re.compile(r"^[0-9.]{16,}$")


def _pseudonymiser(work_dir: Path) -> Callable[[str], str]:
    """Salted SHA-256 pseudonyms; the salt lives in ``work_dir/.lungct_salt`` (keep it private)."""
    salt_file = work_dir / SALT_FILE
    if not salt_file.exists():
        atomic_write_text(salt_file, secrets.token_hex(16))
    salt = salt_file.read_text().strip()
    return lambda value: "P" + hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]


def pseudonymise(candidates: list[Candidate], skipped: dict[Path, str], work_dir: Path,
                 root: Path) -> tuple[list[Candidate], dict[str, str]]:
    """Replace patient ids and UIDs in candidates and in skipped-file paths.

    Path components that contain a patient id get the pseudonym in its place; components that
    look like DICOM UIDs (16+ digits and dots) are hashed whole.

    Returns:
        The renamed candidates, and the skipped files keyed by their masked relative path.
    """
    pseudo = _pseudonymiser(work_dir)
    aliases = {c.patient_id: pseudo(c.patient_id) for c in candidates if c.patient_id}

    def mask_path(relative: str) -> str:
        parts = []
        for part in relative.split("/"):
            for patient, alias in aliases.items():
                if patient in part:
                    part = part.replace(patient, alias)
            parts.append(pseudo(part) if _UID_PART.match(part) else part)
        return "/".join(parts)

    renamed = [
        replace(c, patient_id=aliases.get(c.patient_id, c.patient_id),
                source_file=mask_path(c.source_file),
                series_uid=pseudo(c.series_uid) if c.series_uid else "")
        for c in candidates
    ]
    masked_skips = {mask_path(p.relative_to(root).as_posix()): r for p, r in skipped.items()}
    return renamed, masked_skips
