"""``medmae manifest scan``: find every scan under a folder and write a validated manifest and report.

Files are read in worker processes (:mod:`medmae.data.scan_files`), their summaries kept in a state folder
beside the manifest (``NAME.state/``) so a re-run reads only new or changed files, and ``--shard i/n`` runs
let a cluster array job share the reading (a final run without ``--shard`` assembles the manifest).
DICOM files are grouped into series by SeriesInstanceUID wherever they lie; see :mod:`medmae.data.dicom`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medmae.data.dicom import SeriesRejected, plan_series
from medmae.data.manifest import ScanRecord, normalise_modality, write_manifest
from medmae.data.parallel import robust_map
from medmae.data.privacy import load_or_create_salt, salted_hash
from medmae.data.report import ScanReport
from medmae.data.scan_files import inspect_file, intensity_problem, skipped, summarise_stats
from medmae.data.scan_volumes import fingerprint, volume_records

STATE_VERSION = 1


@dataclass(frozen=True)
class ScanOptions:
    """Choices of one scan.

    Args:
        modality: modality for every record (default: DICOM's own; ``MR`` for files that do not say).
        min_slices: DICOM series with fewer slices are skipped.
        max_gap_ratio: irregular slice spacing is resampled while the largest gap is at most this many
            times the median; beyond it the series is skipped.
        channels: channel names, e.g. ``("t1", "t2", "flair")``: files named ``<subject>_<channel>.<ext>``
            in one folder become one multi-channel record.
    """

    modality: str | None = None
    min_slices: int = 10
    max_gap_ratio: float = 3.0
    channels: tuple[str, ...] = ()


def output_paths(output: Path) -> tuple[Path, Path]:
    """``(report, state folder)`` beside a manifest ``NAME.jsonl``."""
    stem = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.report.json"), output.with_name(f"{stem}.state")


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)`` with ``0 <= i < n``; None → ``(0, 1)``."""
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 3/16") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 3/16")
    return index, count


def _resolved(path: Path) -> Path | None:
    """``path.resolve()``, or None for a symlink loop or an unreadable link."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def list_files(root: Path, skip: set[Path]) -> list[Path]:
    """Every regular file under ``root`` (sorted), without hidden files and medmae's own outputs.

    Broken symbolic links (dangling or looping) are listed too, so that the report names them.
    """
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _resolved(Path(folder) / d) not in skip)
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or _resolved(path) in skip:
                continue
            if path.is_file() or path.is_symlink():
                found.append(path)
    return found


def in_shard(relative: str, index: int, count: int) -> bool:
    return count == 1 or int(hashlib.sha1(relative.encode()).hexdigest()[:8], 16) % count == index


def load_state(folder: Path, key: str) -> dict[str, dict[str, Any]]:
    """Per-file summaries from earlier runs (all state files of the folder), by path relative to the root."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        with path.open(encoding="utf-8") as handle:
            header = json.loads(handle.readline() or "{}")
            if header.get("key") != key:
                continue  # another salt or state version: re-read those files
            for line in handle:
                entry = json.loads(line)
                entries[entry["path"]] = entry
    return entries


def save_state(path: Path, key: str, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"key": key, "version": STATE_VERSION}) + "\n")
        for entry in entries:
            handle.write(json.dumps(entry) + "\n")
    os.replace(tmp, path)


def _file_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time; ``(-1, -1)`` for a broken link, which is then read (and reported)."""
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def read_files(
    root: Path, files: list[Path], state: dict[str, dict[str, Any]], salt: str, workers: int, progress: bool
) -> tuple[list[dict[str, Any]], int]:
    """Summaries for ``files``: reused from ``state`` when size and mtime match, else read. Returns the count read."""
    entries, todo = [], []
    for path in files:
        relative = path.relative_to(root).as_posix()
        size, mtime = _file_stamp(path)
        old = state.get(relative)
        if old is not None and old["size"] == size and old["mtime_ns"] == mtime:
            entries.append(old)
        else:
            todo.append({"path": relative, "size": size, "mtime_ns": mtime})
    tasks = [(str(root / entry["path"]), salt) for entry in todo]
    by_task = {task[0]: entry for task, entry in zip(tasks, todo)}
    crash = lambda task, message: skipped("crash", message)  # noqa: E731
    for task, result in robust_map(inspect_file, tasks, workers, crash, desc="reading files", progress=progress):
        entries.append({**by_task[task[0]], "result": result})
    return sorted(entries, key=lambda e: e["path"]), len(todo)


def _geometry_info(affine: np.ndarray, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
    return {
        "shape": [1, *shape],
        "spacing": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "dtype": dtype,
    }


def series_records(
    root: Path, series: dict[str, list[dict[str, Any]]], options: ScanOptions, report: ScanReport, base: Path
) -> list[ScanRecord]:
    """One record per DICOM image series (status ``ok`` or ``skipped`` with its reason)."""
    records = []
    for uid_hash, entries in sorted(series.items()):
        results = [e["result"] for e in entries]
        modality = normalise_modality(options.modality or results[0]["modality"])
        scan_id = f"{modality.lower()}-{uid_hash}"
        if any(r["identifying_path"] for r in results):
            report.add(
                scan_id,
                "series",
                "skipped",
                "identifying-path",
                "its path contains a patient identifier from its DICOM header; rename the folders",
            )
            report.counts["skipped"] += 1
            continue
        files = [str(root / e["path"]) for e in entries]
        info: dict[str, Any] = {"series": uid_hash, "fingerprint": fingerprint(entries)}
        try:
            flags = {r["flag"] for r in results} - {None}
            if flags:
                flag = sorted(flags)[0]
                raise SeriesRejected(flag, "localizer/scout series" if flag == "localizer" else "derived image series")
            plan = plan_series(files, results, options.min_slices, options.max_gap_ratio)
            if results[0].get("uid_missing"):
                plan.notes.append("no SeriesInstanceUID: slices grouped by folder, frame of reference and time")
            summary = summarise_stats([r["stats"] for r in results])
            problem = intensity_problem(summary)
            if problem:
                raise SeriesRejected(*problem)
            dtype = "float32" if plan.resample else results[0]["dtype"]
            info.update(_geometry_info(plan.affine, plan.shape, dtype), intensity=summary, status="ok")
            files = plan.files
            if plan.notes:
                info["notes"] = plan.notes
                report.add(scan_id, "series", "ok", "resampled", "; ".join(plan.notes))
        except SeriesRejected as error:
            info.update(status="skipped", reason=str(error))
            report.add(scan_id, "series", "skipped", error.code, f"{len(files)} file(s): {error}")
        info["source"] = [os.path.relpath(f, base) for f in files]
        folder = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        records.append(ScanRecord(scan_id, [folder], None, modality, info))
        report.counts[info["status"]] += 1
    return records


def scan_folder(
    root: Path,
    output: Path,
    modality: str | None = None,
    workers: int = 1,
    shard: str | None = None,
    options: ScanOptions | None = None,
    salt_file: Path | None = None,
    progress: bool = True,
) -> int:
    """Scan ``root`` and write the manifest ``output``, its report and state; returns the exit code.

    Args:
        root: folder to search recursively (never modified).
        output: manifest to write (``.jsonl``); ``NAME.report.json`` and ``NAME.state/`` go beside it.
        modality: overrides ``options.modality``.
        workers: reading processes.
        shard: ``"i/n"``: read only this shard's files into the state and write no manifest.
        options: scan choices (:class:`ScanOptions`).
        salt_file: salt for series ids (default ``NAME.state/salt``; created when missing).
        progress: show a progress bar.
    """
    root, output = Path(root), Path(output)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: folder not found; give the folder that holds the scans")
    options = options or ScanOptions()
    if modality:
        options = replace(options, modality=modality)
    index, count = parse_shard(shard)
    report_path, state_dir = output_paths(output)
    salt = load_or_create_salt(salt_file or state_dir / "salt")
    key = salted_hash(f"medmae-scan-state-{STATE_VERSION}", salt)
    skip = {p.resolve() for p in (output, report_path, state_dir)}
    files = list_files(root, skip)
    mine = [p for p in files if in_shard(p.relative_to(root).as_posix(), index, count)]
    entries, n_read = read_files(root, mine, load_state(state_dir, key), salt, workers, progress)
    if count > 1:
        save_state(state_dir / f"shard-{index}-of-{count}.jsonl", key, entries)
        print(f"shard {index}/{count}: {len(entries)} files ({n_read} read); run without --shard to write the manifest")
        return 0
    save_state(state_dir / "all.jsonl", key, entries)
    for old in state_dir.glob("shard-*.jsonl"):
        old.unlink()
    report = ScanReport(
        str(root), str(output), files={"seen": len(files), "read": n_read, "reused": len(entries) - n_read}
    )
    records = assemble(root, entries, options, report, output.parent.resolve())
    write_manifest(records, output)
    report.write(report_path)
    print(report.summary())
    print(f"wrote {len(records)} records to {output} and the report to {report_path}")
    return 0


def assemble(
    root: Path, entries: list[dict[str, Any]], options: ScanOptions, report: ScanReport, base: Path
) -> list[ScanRecord]:
    """Records from per-file summaries: volume files (grouped into channels), then DICOM series."""
    volumes, series = [], defaultdict(list)
    for entry in entries:
        result = entry["result"]
        if result["kind"] == "skip":
            report.add(entry["path"], "file", "skipped", result["code"], result["reason"])
            report.counts["skipped"] += 1
        elif result["kind"] == "dicom":
            series[result["series"]].append(entry)
        else:
            volumes.append(entry)
    records = volume_records(root, volumes, options, report)
    records += series_records(root, series, options, report, base)
    return sorted(records, key=lambda r: r.id)
