"""Keep patient identifiers out of everything medmae writes.

The scan never writes a DICOM header value that identifies a person. Series are named by a salted hash of
their SeriesInstanceUID; the salt lives in a private file beside the manifest, so the same archive scanned
again gets the same ids while the UID cannot be recovered from the manifest alone. Paths are written as they
are on disk, so each series' path is checked against its own header identifiers first (archives often
name folders after the patient ID).

Archives also name files and folders after DICOM UIDs (``CT.1.3.12.2...``), which de-identification treats as
identifying. Where any name of a series holds one (:func:`uid_depth`), the manifest names no file: it gives
the deepest folder above those names and each file's positions in sorted folder listings from there
(:func:`positions`), with a hash of the files' names and sizes (:func:`source_hash`) that
:func:`follow_positions` checks when the files are read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from medmae.data.manifest import ManifestError

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
# The standard's own UIDs (SOP classes, transfer syntaxes) identify nobody.
STANDARD_UID_ROOT = "1.2.840.10008."
# Text shaped like a DICOM UID ("1.2.840.113619.2.55...", "2.25.3141..."): a root arc 0-2 and at least two more.
UID_PATTERN = re.compile(r"(?<![0-9])[0-2](?:\.[0-9]+){2,}")
MIN_UID_LENGTH = 12
# A file's place below a folder: its index in the folder's sorted listing, or one index per folder level.
Position = int | list[int]
# names of ``medmae manifest scan``'s outputs (manifest, report, state folder), left out of :func:`listing`
SCAN_OUTPUT_SUFFIXES = (".jsonl", ".report.json", ".state")


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


def header_uids(dataset: Any) -> set[str]:
    """Every UID value of a pydicom header and its file meta (SOP, Series, Study Instance, Frame of Reference,
    referenced instances...) but the standard's own, lower-cased."""
    meta = list(getattr(dataset, "file_meta", None) or [])
    try:
        elements = [*meta, *dataset.iterall()]
    except Exception:  # a malformed sequence deep in the header: its top-level UIDs still count
        elements = [*meta, *(e for e in dataset if e.VR == "UI")]
    values = {v.strip() for e in elements if e.VR == "UI" for v in _values(e.value)}
    return {v.lower() for v in values if len(v) >= MIN_IDENTIFIER_LENGTH and not v.startswith(STANDARD_UID_ROOT)}


def holds_uid(name: str, uids: Iterable[str] = ()) -> bool:
    """True when ``name`` contains one of ``uids`` or anything shaped like a DICOM UID (:data:`UID_PATTERN`)."""
    shaped = any(len(m.group()) >= MIN_UID_LENGTH for m in UID_PATTERN.finditer(name))
    return shaped or contains_identifier(name, uids)


def uid_depth(path: str, uids: Iterable[str] = ()) -> int:
    """How many trailing parts of ``path`` (its file name is 1) reach down from its first part holding a UID
    (:func:`holds_uid`); 0 when no part holds one."""
    parts = Path(os.path.abspath(path)).parts
    return next((len(parts) - i for i, part in enumerate(parts) if holds_uid(part, uids)), 0)


@dataclass
class UidNames:
    """Which scanned paths (relative to the root) hold a DICOM UID in a name, so that none is written.

    A DICOM file's summary says how many trailing parts of its path reach down from the first part holding
    one of its header's UIDs (``uid_depth``, see :func:`medmae.data.privacy.uid_depth`): that part and all
    below it are hidden, as is any path holding text shaped like a UID. ``in_root``: the scanned folder's own
    path holds one, so every path written would.
    """

    salt: str
    hidden: set[PurePosixPath] = field(default_factory=set)
    in_root: bool = False

    @classmethod
    def of(cls, entries: list[dict[str, Any]], salt: str) -> UidNames:
        names = cls(salt)
        for entry in entries:
            depth, parts = entry["result"].get("uid_depth", 0), PurePosixPath(entry["path"]).parts
            if depth > len(parts):
                names.in_root = True
            elif depth:
                names.hidden.add(PurePosixPath(*parts[: len(parts) - depth + 1]))
        return names

    def below_root(self, relative: str) -> bool:
        """True when a part of ``relative`` (a path below the root) holds a UID."""
        path = PurePosixPath(relative)
        return holds_uid(relative) or any(p in self.hidden for p in (path, *path.parents))

    def hides(self, relative: str) -> bool:
        """True when the file's path, written from anywhere, would show a UID."""
        return self.in_root or self.below_root(relative)

    def item(self, relative: str) -> str:
        """How the report names a file (relative to the root): its path, or ``file-<salted hash of the path>``."""
        return f"file-{salted_hash(relative, self.salt)}" if self.below_root(relative) else relative


def listing(folder: Path) -> list[str]:
    """The sorted names of ``folder`` that positions count: not hidden names (never scanned: ``.DS_Store``,
    temporary files), nor the scan's own outputs (``NAME.jsonl``, ``NAME.report.json``, ``NAME.state``), which
    appear only after the scan that computed the positions when the manifest is written into the archive."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and not n.endswith(SCAN_OUTPUT_SUFFIXES))


def positions(anchor: Path, files: Sequence[Path]) -> list[Position]:
    """Each of ``files`` (all below ``anchor``) as its index in the :func:`listing` of its folder, or, below a
    sub-folder, as the indices of every level from ``anchor`` down. Raises ``ValueError`` for a file not found."""
    listings: dict[Path, dict[str, int]] = {}
    out: list[Position] = []
    for file in files:
        route, folder = [], anchor
        for name in file.relative_to(anchor).parts:
            if folder not in listings:
                listings[folder] = {n: i for i, n in enumerate(listing(folder))}
            if name not in listings[folder]:
                raise ValueError(f"{name} vanished from its folder during the scan")
            route.append(listings[folder][name])
            folder = folder / name
        out.append(route[0] if len(route) == 1 else route)
    return out


def source_hash(anchor: Path, files: Sequence[Path], key: str) -> str:
    """16 hex digits of SHA-256 over ``key`` and the files' paths below ``anchor`` and sizes (the files must exist).

    It hides the names (a guess must get every name and size right) and changes when the files found change.
    """
    text = json.dumps([key, [(f.relative_to(anchor).as_posix(), f.stat().st_size) for f in files]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def follow_positions(anchor: Path, places: Sequence[Position], expected: str, key: str) -> list[Path]:
    """The files at ``places`` below ``anchor`` (see :func:`positions`), checked against their :func:`source_hash`.

    Raises:
        ManifestError: files were added, removed, renamed or resized below ``anchor`` since the scan, so the
            positions may point at other files; the message says to scan again.
    """
    listings: dict[Path, list[str]] = {}
    files = []
    try:
        for place in places:
            path = anchor
            for index in [place] if isinstance(place, int) else place:
                if path not in listings:
                    listings[path] = listing(path)
                path = path / listings[path][index]
            files.append(path)
        found = source_hash(anchor, files, key)
    except (OSError, IndexError, TypeError):
        found = None
    if found != expected:
        raise ManifestError(
            f"{anchor}: the files of this series changed since the manifest was written (files were added, removed "
            "or renamed here, and the manifest gives their positions in this folder since their names hold DICOM "
            "UIDs); run `medmae manifest scan` again to update it (it re-reads only new or changed files)"
        )
    return files


def hide_names(text: str, anchor: Path, files: Sequence[Path]) -> str:
    """``text`` (an error message) with every name below ``anchor`` on the way to ``files`` replaced."""
    names = {part for f in files for part in f.relative_to(anchor).parts}
    for name in sorted(names, key=len, reverse=True):
        text = text.replace(name, "<name>")
    return text
