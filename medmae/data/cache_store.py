"""The preprocessing cache on disk: one ``.npy`` array and one ``.json`` description per scan.

Layout::

    CACHE/cache.json              {"params": {...}, "fingerprint": "3f9a..."}   (the preprocessing parameters)
    CACHE/scans/<id>.npy          (C, I, J, K) source units, RAS, target spacing, cropped; memory-mappable
    CACHE/scans/<id>.json         id, shape, dtype, affine, per-channel normalisation, params and source
                                  fingerprints: written last, so a scan counts as cached only once complete
    CACHE/preprocess_report.json  what the last ``medmae preprocess`` built, reused and skipped
    CACHE/scans/.<id>.npy.<random>  a temporary file of an interrupted write: never read, removed by the next
                                  ``medmae preprocess``; every file is renamed into place once complete

Nothing identifying is stored: ids come from the manifest (salted hashes for DICOM series), paths are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medmae.data.preprocess import Normalisation, PreprocessedScan
from medmae.data.transforms import IntensityConfig
from medmae.io.atomic import temporary_beside

CACHE_VERSION = 1
# the name of :func:`atomic_write`'s temporary file of a .npy or .json (``tempfile.mkstemp``'s 8 random characters)
TEMPORARY = re.compile(r"\..+\.(npy|json)\.[a-z0-9_]{8}")


@dataclass(frozen=True)
class PreprocessParams:
    """What the cache's arrays depend on; a change rebuilds every scan.

    Args:
        spacing: target voxel size in mm, or None to keep each scan's spacing.
        intensity: per-modality normalisation.
        crop_foreground: crop each scan to its foreground bounding box.
        version: bump to invalidate caches made by an older preprocessing implementation.
    """

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    crop_foreground: bool = True
    version: int = CACHE_VERSION

    def __post_init__(self) -> None:
        if self.spacing is not None and (len(self.spacing) != 3 or any(s <= 0 for s in self.spacing)):
            raise ValueError(f"spacing must be three positive numbers in mm or None, got {self.spacing}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spacing"] = [float(s) for s in self.spacing] if self.spacing is not None else None
        data["intensity"] = {k: [float(v) for v in vals] for k, vals in data["intensity"].items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessParams:
        intensity = IntensityConfig(**{k: tuple(v) for k, v in data["intensity"].items()})
        spacing = tuple(data["spacing"]) if data["spacing"] is not None else None
        return cls(spacing, intensity, bool(data["crop_foreground"]), int(data["version"]))  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """16 hex digits that change whenever any parameter changes."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def entry_name(scan_id: str) -> str:
    """A file name for ``scan_id``: itself when safe, else a cleaned form plus a short hash."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", scan_id)
    if clean == scan_id and not scan_id.startswith("."):
        return scan_id
    return f"{clean.lstrip('.')}-{hashlib.sha256(scan_id.encode()).hexdigest()[:8]}"


def atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    """``write(handle)`` into a temporary file beside ``path`` (``.NAME.<8 random characters>``), then rename it
    over ``path``.

    The data reach the disk before the rename, so even a power cut leaves either the old or the new file.
    """
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temporaries(cache_dir: Path) -> list[str]:
    """Delete what an interrupted writer left (:func:`atomic_write`'s hidden temporary files); returns their names.

    Run it only when no other process writes into this cache.
    """
    leftovers = []
    for folder in (Path(cache_dir), Path(cache_dir) / "scans"):
        for path in sorted(folder.glob(".*")) if folder.is_dir() else []:
            if TEMPORARY.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                leftovers.append(path.name)
    return leftovers


def write_params(cache_dir: Path, params: PreprocessParams) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "scans").mkdir(exist_ok=True)
    text = json.dumps({"params": params.to_json(), "fingerprint": params.fingerprint()}, indent=1)
    atomic_write(cache_dir / "cache.json", lambda h: h.write(text), "w")


def read_params(cache_dir: Path) -> PreprocessParams:
    path = Path(cache_dir) / "cache.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a medmae cache (create one with `medmae preprocess MANIFEST --cache DIR`)"
        )
    return PreprocessParams.from_json(json.loads(path.read_text(encoding="utf-8"))["params"])


def read_meta(cache_dir: Path, scan_id: str) -> dict[str, Any] | None:
    """The description of a complete entry, or None when the scan is not (completely) cached."""
    path = Path(cache_dir) / "scans" / f"{entry_name(scan_id)}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_entry(
    cache_dir: Path, scan_id: str, scan: PreprocessedScan, modality: str, params_fp: str, source_fp: str
) -> dict[str, Any]:
    """Store one scan: drop the old description, write the array, then the new description (atomically)."""
    name = entry_name(scan_id)
    folder = Path(cache_dir) / "scans"
    (folder / f"{name}.json").unlink(missing_ok=True)
    atomic_write(folder / f"{name}.npy", lambda h: np.save(h, scan.array, allow_pickle=False))
    meta = {
        "id": scan_id,
        "file": f"{name}.npy",
        "shape": list(scan.array.shape),
        "dtype": str(scan.array.dtype),
        "affine": scan.affine.tolist(),
        "modality": modality,
        "norms": scan.norm_dicts(),
        "background": scan.background(),
        "params": params_fp,
        "source": source_fp,
    }
    atomic_write(folder / f"{name}.json", lambda h: h.write(json.dumps(meta)), "w")
    return meta


def open_entry(cache_dir: Path, meta: dict[str, Any]) -> tuple[np.ndarray, list[Normalisation]]:
    """``(memory-mapped (C, I, J, K) array, per-channel normalisation)`` of a cached scan."""
    array = np.load(Path(cache_dir) / "scans" / meta["file"], mmap_mode="r", allow_pickle=False)
    if list(array.shape) != meta["shape"]:
        raise ValueError(f"{meta['file']}: shape {array.shape} differs from its description {meta['shape']}")
    return array, [Normalisation(**norm) for norm in meta["norms"]]


def list_cached_ids(cache_dir: str | Path) -> list[str]:
    """Ids of the scans completely cached with the cache's current parameters (sorted)."""
    cache_dir = Path(cache_dir)
    current = read_params(cache_dir).fingerprint()
    ids = []
    for path in sorted((cache_dir / "scans").glob("*.json")):
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("params") == current and (cache_dir / "scans" / meta["file"]).is_file():
            ids.append(meta["id"])
    return sorted(ids)
