"""The preprocessing cache: ``medmae preprocess`` fills it once, training reads random crops from it.

:func:`preprocess_manifest` preprocesses every ``ok`` record of a manifest (in worker processes, resumable,
rebuilding what changed) into the layout of :mod:`medmae.data.cache_store`; :class:`CachedCropDataset`
takes random crops through memory maps. This module is the one place to import them from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medmae.data.cache_dataset import CachedCropDataset, EpochSampler
from medmae.data.cache_store import (
    PreprocessParams,
    atomic_write,
    list_cached_ids,
    read_meta,
    remove_temporaries,
    write_entry,
    write_params,
)
from medmae.data.manifest import ScanRecord, parse_record, read_manifest
from medmae.data.parallel import robust_map
from medmae.data.preprocess import load_record, preprocess_volume
from medmae.io.readers import max_voxels_from_env

__all__ = [
    "CachedCropDataset",
    "EpochSampler",
    "PreprocessParams",
    "list_cached_ids",
    "preprocess_manifest",
    "source_fingerprint",
]


def source_fingerprint(record: ScanRecord) -> str:
    """Changes when the record's files, modality or scan fingerprint change."""
    stamps: Any = record.info.get("fingerprint")
    if stamps is None:
        stamps = [(p, *_stamp(p)) for p in record.image]
    text = json.dumps([record.image, record.modality, stamps])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stamp(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def _build(task: tuple[dict[str, Any], str, str, PreprocessParams]) -> tuple[str, str]:
    """Worker: preprocess and store one record; returns ``(status, reason)``."""
    raw, base, cache_dir, params = task
    record = parse_record(raw, Path(base), raw["id"], check_files=False)
    try:
        volume = load_record(record, Path(base))
        scan = preprocess_volume(volume, record.modality, params.spacing, params.intensity, params.crop_foreground)
        write_entry(
            Path(cache_dir),
            record.id,
            scan,
            record.modality,
            params.fingerprint(),
            source_fingerprint(record),
        )
    except (ValueError, OSError, RuntimeError, MemoryError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return "failed", text
    return "built", ""


def preprocess_manifest(
    manifest: Path, cache_dir: Path, params: PreprocessParams, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Preprocess every ``ok`` record of ``manifest`` into ``cache_dir``; scans already current are reused.

    Args:
        manifest: a ``.jsonl`` manifest.
        cache_dir: cache folder (created when missing).
        params: preprocessing parameters; scans cached with others are rebuilt.
        workers: processes.
        progress: show a progress bar.

    Returns:
        The report also written to ``cache_dir/preprocess_report.json``: ``{"params", "built", "reused",
        "failed": [{"id", "reason"}], "removed_temporaries"}``. A scan that fails (unreadable, above the memory
        budget ``$MEDMAE_MAX_VOXELS``...) is reported and skipped. A run that was killed leaves only complete
        entries (reused by the next run) and hidden temporary files (removed by the next run).

    Raises:
        ValueError: the manifest or ``$MEDMAE_MAX_VOXELS`` is invalid.
    """
    manifest, cache_dir = Path(manifest), Path(cache_dir)
    records = read_manifest(manifest, check_files=False)
    max_voxels_from_env()  # an invalid budget stops the run here, not once per scan
    write_params(cache_dir, params)
    leftovers = remove_temporaries(cache_dir)
    fingerprint = params.fingerprint()
    base = str(manifest.parent.resolve())
    todo, reused = [], 0
    for record in records:
        meta = read_meta(cache_dir, record.id)
        if meta and meta["params"] == fingerprint and meta["source"] == source_fingerprint(record):
            reused += 1
        else:
            todo.append((record.to_json(), base, str(cache_dir), params))
    built, failed = 0, []
    crash = lambda task, message: ("failed", message)  # noqa: E731
    for task, (status, reason) in robust_map(_build, todo, workers, crash, desc="preprocessing", progress=progress):
        if status == "built":
            built += 1
        else:
            failed.append({"id": task[0]["id"], "reason": reason})
    report = {
        "params": params.to_json(),
        "fingerprint": fingerprint,
        "built": built,
        "reused": reused,
        "failed": sorted(failed, key=lambda f: f["id"]),
        "removed_temporaries": len(leftovers),
    }
    atomic_write(cache_dir / "preprocess_report.json", lambda h: h.write(json.dumps(report, indent=1)), "w")
    return report
