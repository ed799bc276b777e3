"""Manifests: JSON Lines files with one record per scan.

A record (one JSON object per line)::

    {"id": "hippocampus_001", "image": "imagesTr/hippocampus_001.nii.gz",
     "label": "labelsTr/hippocampus_001.nii.gz", "modality": "MR"}

``image`` is a path or a list of co-registered channel paths (e.g. T1, T2, FLAIR). Relative paths are
relative to the manifest file's folder. Optional descriptive keys written by ``medmae manifest scan``
(``shape``, ``spacing``, ``orientation``, ``dtype``, ``intensity``, ``status``, ``reason``, ``source``,
``series``; ``source_index`` and ``source_hash`` in place of ``source`` where the file names hold DICOM UIDs)
are kept as they are. Records whose ``status`` is not ``"ok"`` are skipped by training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmae.io.atomic import temporary_beside

REQUIRED_KEYS = ("id", "image")
CORE_KEYS = ("id", "image", "label", "modality")
DESCRIPTIVE_KEYS = (
    "shape",
    "spacing",
    "orientation",
    "dtype",
    "intensity",
    "status",
    "reason",
    "source",
    "source_index",
    "source_hash",
    "series",
    "channels",
    "notes",
    "fingerprint",
)
MODALITIES = ("CT", "MR", "PT", "US", "OTHER")


class ManifestError(ValueError):
    """A manifest file or record is invalid; the message names the file, the line and the problem."""


def normalise_modality(value: str | None) -> str:
    """Map DICOM/MSD spellings (``"MRI"``, ``"T1"``, ``"ct"``) onto one of :data:`MODALITIES`."""
    if value is None:
        return "OTHER"
    text = str(value).strip().upper()
    if text in ("CT", "CTA", "CBCT"):
        return "CT"
    if text in ("MR", "MRI") or text.startswith(("T1", "T2", "FLAIR", "DWI", "ADC", "PD")):
        return "MR"
    if text in ("PT", "PET"):
        return "PT"
    if text == "US":
        return "US"
    return "OTHER"


@dataclass
class ScanRecord:
    """One scan: its id, channel image paths (absolute), optional label and modality."""

    id: str
    image: list[str]
    label: str | None = None
    modality: str = "MR"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "ok"))

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        def rel(p: str) -> str:
            if relative_to is None:
                return p
            try:
                return os.path.relpath(p, relative_to)
            except ValueError:  # another drive on Windows
                return p

        images = [rel(p) for p in self.image]
        record: dict[str, Any] = {"id": self.id, "image": images[0] if len(images) == 1 else images}
        if self.label is not None:
            record["label"] = rel(self.label)
        record["modality"] = self.modality
        record.update(self.info)
        return record


def parse_record(raw: Any, base: Path, where: str, check_files: bool = True) -> ScanRecord:
    """Validate one decoded JSON object and resolve its paths against ``base``.

    Args:
        raw: the decoded JSON value of one line.
        base: folder relative paths are resolved against.
        where: ``"file:line"`` used in error messages.
        check_files: raise when an image or label path does not exist.
    """
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: each line must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ManifestError(f"{where}: missing required key(s) {missing}; a record needs 'id' and 'image'")
    unknown = sorted(set(raw) - set(CORE_KEYS) - set(DESCRIPTIVE_KEYS))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(CORE_KEYS + DESCRIPTIVE_KEYS)}")
    images = raw["image"] if isinstance(raw["image"], list) else [raw["image"]]
    if not images or not all(isinstance(p, str) and p for p in images):
        raise ManifestError(f"{where}: 'image' must be a path or a non-empty list of paths, got {raw['image']!r}")
    label = raw.get("label")
    if label is not None and not isinstance(label, str):
        raise ManifestError(f"{where}: 'label' must be a path string, got {label!r}")

    def resolve(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    resolved = [resolve(p) for p in images]
    resolved_label = resolve(label) if label else None
    info = {k: v for k, v in raw.items() if k in DESCRIPTIVE_KEYS}
    if check_files and info.get("status", "ok") == "ok":
        for p in [*resolved, *([resolved_label] if resolved_label else [])]:
            if not Path(p).exists():
                raise ManifestError(f"{where}: file not found: {p}")
    return ScanRecord(
        id=str(raw["id"]),
        image=resolved,
        label=resolved_label,
        modality=normalise_modality(raw.get("modality", "MR")),
        info=info,
    )


def read_manifest(path: str | Path, check_files: bool = True, only_ok: bool = True) -> list[ScanRecord]:
    """Read a ``.jsonl`` manifest.

    Args:
        path: the manifest file.
        check_files: raise when a referenced file is missing.
        only_ok: drop records whose ``status`` is not ``"ok"`` (skipped scans in a scan report).

    Raises:
        ManifestError: the file is missing, a line is not JSON, a record is invalid, or ids repeat.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (create one with `medmae manifest scan DIR -o {path}`)")
    records: list[ScanRecord] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ManifestError(
                    f"{where}: not valid JSON ({error.msg}); each line must be one JSON object"
                ) from None
            record = parse_record(raw, path.parent.resolve(), where, check_files)
            if record.id in seen:
                raise ManifestError(f"{where}: duplicate id {record.id!r}; ids must be unique")
            seen.add(record.id)
            if not only_ok or record.status == "ok":
                records.append(record)
    if not records:
        raise ManifestError(f"{path}: no usable records (status 'ok'); nothing to train on")
    return records


def write_manifest(records: Iterable[ScanRecord], path: str | Path, relative: bool = True) -> Path:
    """Write records as JSON Lines atomically; paths relative to the manifest's folder when ``relative``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve() if relative else None
    fd, tmp = temporary_beside(path)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(base)) + "\n")
    os.replace(tmp, path)
    return path
