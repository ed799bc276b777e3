"""Scan a folder for volumes and write a manifest (first version: NIfTI, NRRD, MHA/MHD files)."""

from __future__ import annotations

from pathlib import Path

from medmae.data.manifest import ScanRecord, normalise_modality, write_manifest
from medmae.io.readers import NIFTI_SUFFIXES, ITK_SUFFIXES


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(NIFTI_SUFFIXES) or path.suffix.lower() in ITK_SUFFIXES)


def scan_folder(root: Path, output: Path, modality: str | None = None) -> int:
    """Write one record per volume file under ``root``; returns the exit code."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found")
    files = sorted(p for p in root.rglob("*") if _is_volume_file(p))
    records = []
    for path in files:
        stem = str(path.relative_to(root)).split(".")[0].replace("/", "__")
        records.append(ScanRecord(stem, [str(path.resolve())], None, normalise_modality(modality or "MR")))
    write_manifest(records, output)
    print(f"wrote {len(records)} records to {output}")
    return 0
