"""One channel count per manifest: that of its first readable scan; scans with another count are skipped."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch

from medmae.data.cache_store import read_meta
from medmae.data.manifest import ScanRecord, read_manifest
from medmae.io.readers import read_volume

log = logging.getLogger(__name__)
Loaded = TypeVar("Loaded", bound=tuple)


def first_scan_channels(manifest: str, cache_dir: str | None = None, tries: int = 5) -> tuple[int, ScanRecord] | None:
    """The channel count of the manifest's first readable scan (all its image files together) and its record.

    With ``cache_dir`` (a ``medmae preprocess`` cache), the first cached scan's stored shape, so the original
    files need not be reachable. Otherwise a record's ``shape`` (written by ``medmae manifest scan``) or its
    files, trying up to ``tries`` records in manifest order. None when the manifest cannot be read or none of
    those scans can: the data module reports those with its own message.
    """
    try:
        records = read_manifest(manifest, check_files=False)
    except (ValueError, OSError):
        return None
    if cache_dir:
        for record in records:
            meta = read_meta(Path(cache_dir), record.id)
            if meta is not None:
                return int(meta["shape"][0]), record
        return None
    for record in records[:tries]:
        shape = record.info.get("shape")  # (C, X, Y, Z), written by `medmae manifest scan`: no need to read it
        if isinstance(shape, list) and len(shape) == 4:
            return int(shape[0]), record
        try:
            return sum(int(read_volume(path).array.shape[0]) for path in record.image), record
        except (ValueError, OSError):
            continue
    return None


def other_channels_reason(found: int, expected: int) -> str:
    """Why a scan with ``found`` channels is skipped from a manifest whose scans have ``expected``."""
    return f"{found} channel(s), but the manifest's scans have {expected}; every scan needs the same"


def keep_channel_count(volumes: Sequence[Loaded], channels: int | None) -> tuple[list[Loaded], list[tuple[str, str]]]:
    """Split loaded scans ``(id, (C, X, Y, Z) tensor, ...)`` into those with ``channels`` channels and the
    ``(id, reason)`` of the others, each logged as skipped. ``channels`` None keeps every scan."""
    kept: list[Loaded] = []
    skipped: list[tuple[str, str]] = []
    for volume in volumes:
        image: torch.Tensor = volume[1]
        if channels is None or image.shape[0] == channels:
            kept.append(volume)
            continue
        reason = other_channels_reason(image.shape[0], channels)
        log.warning("skipping scan %s: %s", volume[0], reason)
        skipped.append((volume[0], reason))
    return kept, skipped
