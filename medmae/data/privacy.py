"""Keep patient identifiers out of everything medmae writes.

The scan never writes a DICOM header value that identifies a person. Series are named by a salted hash of
their SeriesInstanceUID; the salt lives in a private file beside the manifest, so the same archive scanned
again gets the same ids while the UID cannot be recovered from the manifest alone. Paths are written as they
are on disk, so each series' path is checked against its own header identifiers first (archives often
name folders after the patient ID).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Header keywords whose values identify a patient, an examination or a site.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "StudyID",
)
# Shorter values ("1", "M", "AB") match everywhere and identify nobody on their own.
MIN_IDENTIFIER_LENGTH = 4


def load_or_create_salt(path: Path) -> str:
    """The salt stored at ``path``, created (owner-readable only) when missing; safe when shards race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        salt = path.read_text(encoding="ascii").strip()
        if len(salt) < 16:
            raise ValueError(f"{path}: salt file is empty or too short; delete it to create a new one") from None
        return salt
    salt = secrets.token_hex(16)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(salt + "\n")
    return salt


def salted_hash(value: str, salt: str, length: int = 16) -> str:
    """A stable pseudonym for ``value``: the first ``length`` hex digits of SHA-256(salt + value)."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:length]


def _values(element: Any) -> Iterable[str]:
    if element is None:
        return []
    if isinstance(element, (list, tuple)) or type(element).__name__ == "MultiValue":
        return [str(v) for v in element]
    return [str(element)]


def header_identifiers(dataset: Any) -> set[str]:
    """Identifying strings of a pydicom dataset, lower-cased: whole values and the parts of person names."""
    found: set[str] = set()
    for keyword in IDENTIFYING_KEYWORDS:
        for value in _values(dataset.get(keyword)):
            value = value.strip()
            found.add(value)
            found.update(part for part in re.split(r"[\^=\s,]+", value) if part)
    return {v.lower() for v in found if len(v) >= MIN_IDENTIFIER_LENGTH}


def contains_identifier(text: str, identifiers: Iterable[str]) -> bool:
    """True when any identifier (lower-case) occurs in ``text`` (case-insensitive)."""
    lowered = text.lower()
    return any(identifier in lowered for identifier in identifiers)
