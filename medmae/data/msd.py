"""Build manifest records from a Medical Segmentation Decathlon style ``dataset.json``."""

from __future__ import annotations

import json
from pathlib import Path

from medmae.data.manifest import ManifestError, ScanRecord, normalise_modality


def _scan_id(image: str) -> str:
    name = Path(image).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def records_from_msd(dataset_json: str | Path, include_test: bool = False) -> list[ScanRecord]:
    """Records for every ``training`` entry (and ``test`` entries when asked) of an MSD dataset.

    Args:
        dataset_json: path to ``dataset.json``; image paths in it are relative to its folder.
        include_test: also add the unlabelled ``test`` images.

    Raises:
        ManifestError: the file is missing, not JSON, or lacks a ``training`` list.
    """
    path = Path(dataset_json)
    if not path.is_file():
        raise ManifestError(f"{path}: dataset.json not found")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list):
        raise ManifestError(f"{path}: expected an MSD dataset.json with a 'training' list")
    modalities = spec.get("modality", {"0": "MR"})
    modality = normalise_modality(modalities.get("0") if isinstance(modalities, dict) else None)
    base = path.parent.resolve()
    records = []
    entries = [(e["image"], e.get("label")) for e in spec["training"]]
    if include_test:
        entries += [(e if isinstance(e, str) else e["image"], None) for e in spec.get("test", [])]
    for image, label in entries:
        image_path = (base / image).resolve()
        if not image_path.exists():
            raise ManifestError(f"{path}: listed image not found: {image_path}")
        label_path = str((base / label).resolve()) if label else None
        if label_path and not Path(label_path).exists():
            raise ManifestError(f"{path}: listed label not found: {label_path}")
        records.append(ScanRecord(_scan_id(image), [str(image_path)], label_path, modality))
    return records
