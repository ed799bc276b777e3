"""Manifest records for volume files (NIfTI, NRRD, MHA), grouping co-registered sequences into channels.

With channel names ``("t1", "t2", "flair")``, files ``<subject>_t1.nii.gz``, ``<subject>_t2.nii.gz`` and
``<subject>_flair.nii.gz`` in one folder become one record whose ``image`` lists them in that order. A subject
missing a channel, or whose channels are not on one grid, is recorded as skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medmae.data.manifest import ScanRecord, normalise_modality
from medmae.data.report import ScanReport
from medmae.io.readers import ITK_SUFFIXES, NIFTI_SUFFIXES

# Intensities this far below zero are Hounsfield units, not MR signal.
CT_MINIMUM_BELOW = -500.0


def strip_suffix(name: str) -> str:
    lowered = name.lower()
    for suffix in (*NIFTI_SUFFIXES, *ITK_SUFFIXES):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def scan_id(relative: str) -> str:
    """``"sub/a_t1.nii.gz"`` → ``"sub__a_t1"``: the path without its suffix, folders joined by ``__``."""
    return strip_suffix(relative).replace("/", "__")


def split_channel(relative: str, channels: tuple[str, ...]) -> tuple[str, str] | None:
    """``(subject, channel)`` when the file name ends with ``_<channel>`` or ``-<channel>``."""
    stem = strip_suffix(relative)
    for channel in channels:
        for sep in ("_", "-"):
            if stem.lower().endswith(f"{sep}{channel.lower()}"):
                return stem[: -len(channel) - 1], channel
    return None


def guess_modality(results: list[dict[str, Any]], given: str | None) -> tuple[str, list[str]]:
    """The given modality, else CT for Hounsfield-like intensities and MR otherwise (with a note)."""
    if given:
        return normalise_modality(given), []
    if all(r["intensity"]["min"] < CT_MINIMUM_BELOW for r in results):
        return "CT", ["modality guessed as CT from Hounsfield-like intensities (set it with --modality)"]
    return "MR", ["modality not given; assumed MR (set it with --modality)"]


def fingerprint(entries: list[dict[str, Any]]) -> str:
    """A hash of the files' paths, sizes and modification times: changes when any source changes."""
    text = json.dumps([(e["path"], e["size"], e["mtime_ns"]) for e in entries])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(
    record_id: str, root: Path, entries: list[dict[str, Any]], names: list[str], given: str | None
) -> ScanRecord:
    results = [e["result"] for e in entries]
    modality, notes = guess_modality(results, given)
    first = results[0]
    info: dict[str, Any] = {
        "shape": [sum(r["shape"][0] for r in results), *first["shape"][1:]],
        "spacing": first["spacing"],
        "orientation": first["orientation"],
        "dtype": first["dtype"],
        "intensity": first["intensity"] if len(results) == 1 else [r["intensity"] for r in results],
        "status": "ok",
        "fingerprint": fingerprint(entries),
    }
    if names:
        info["channels"] = names
    notes += [note for r in results for note in r["notes"]]
    if notes:
        info["notes"] = notes
    return ScanRecord(record_id, [str(root / e["path"]) for e in entries], None, modality, info)


def _grid_problem(entries: list[dict[str, Any]], names: list[str]) -> str | None:
    first = entries[0]["result"]
    for name, entry in zip(names[1:], entries[1:]):
        result = entry["result"]
        if result["shape"][1:] != first["shape"][1:] or not np.allclose(result["affine"], first["affine"], atol=1e-3):
            return (
                f"channel {name} is on another grid than {names[0]} (shape {result['shape'][1:]} vs "
                f"{first['shape'][1:]}, spacing {result['spacing']} vs {first['spacing']}); "
                "channels must be co-registered"
            )
    return None


def volume_records(root: Path, entries: list[dict[str, Any]], options: Any, report: ScanReport) -> list[ScanRecord]:
    """Records for readable volume files; subjects with channel problems are recorded as skipped."""
    records = []
    subjects: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for entry in entries:
        split = split_channel(entry["path"], options.channels)
        if split is None:
            records.append(_record(scan_id(entry["path"]), root, [entry], [], options.modality))
        else:
            subjects[split[0]][split[1]] = entry
    for subject, found in sorted(subjects.items()):
        names = [c for c in options.channels if c in found]
        chosen = [found[c] for c in names]
        record = _record(scan_id(subject), root, chosen, names, options.modality)
        missing = [c for c in options.channels if c not in found]
        problem = f"missing channel(s) {', '.join(missing)}" if missing else _grid_problem(chosen, names)
        if problem:
            record.info.update(status="skipped", reason=problem)
            report.add(subject, "subject", "skipped", "channels", problem)
        records.append(record)
    for record in records:
        report.counts[record.status] += 1
        for note in record.info.get("notes", []) if record.status == "ok" else []:
            if not note.startswith("modality"):
                report.add(record.id, "file", "ok", "note", note)
    return records
