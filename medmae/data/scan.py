"""``medmae manifest scan``: find every scan under a folder and write a validated manifest and report.

Files are read in worker processes (:mod:`medmae.data.scan_files`), their summaries kept in a state folder
beside the manifest (``NAME.state/``, files named there by a salted hash of their path only) so a re-run reads
only new or changed files, and ``--shard i/n`` runs let a cluster array job share the reading (a final run
without ``--shard`` assembles the manifest). DICOM files are grouped into series by SeriesInstanceUID wherever
they lie; see :mod:`medmae.data.dicom`. No name holding a DICOM UID is written (:class:`UidNames`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medmae.data.dicom import SeriesRejected, plan_series
from medmae.data.manifest import ScanRecord, normalise_modality, write_manifest
from medmae.data.parallel import robust_map
from medmae.data.privacy import UidNames, load_or_create_salt, positions, salted_hash, source_hash
from medmae.data.report import ScanReport
from medmae.data.scan_files import inspect_file, intensity_problem, skipped, summarise_stats
from medmae.data.scan_volumes import fingerprint, volume_records
from medmae.io.atomic import temporary_beside
from medmae.io.readers import BUDGET_REFUSAL, max_voxels_from_env

STATE_VERSION = 3  # 2: files named by a salted hash of their path; 3: label maps skipped


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


def link_problem(path: Path) -> tuple[str, str] | None:
    """``(code, reason)`` for a symbolic link the scan does not read; None for anything else.

    A link to a file is read as the file. A broken link (looping or dangling) and a link to a folder are not:
    folder links are not followed, which keeps the scan inside the archive and away from link loops such as a
    link to its own parent folder. Reasons never show the link's target (it may hold a name).
    """
    if not path.is_symlink():
        return None
    try:
        target = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink-loop", "a symbolic link loop (the link points back to itself); not read"
        if error.errno == errno.ENOENT:
            return "dangling-link", "a symbolic link whose target does not exist; not read"
        return "unreadable", f"a symbolic link that cannot be followed ({error.strerror}); not read"
    if not stat.S_ISDIR(target.st_mode):
        return None
    if Path(os.path.realpath(path.parent)).is_relative_to(os.path.realpath(path)):
        return "symlink-loop", "a symbolic link to a folder that contains it (a loop); not followed"
    return "folder-link", "a symbolic link to a folder; not followed (scan that folder itself, or copy it in)"


def list_files(root: Path, skip: set[Path]) -> tuple[list[Path], dict[Path, tuple[str, str]]]:
    """Every regular file under ``root`` (sorted), without hidden files and medmae's own outputs.

    Returns:
        ``(files, links)``: the files to read (links to files included), and ``{path: (code, reason)}`` for the
        symbolic links that are not read (:func:`link_problem`: broken links, links to folders), for the report.
    """
    found, links = [], {}
    for folder, dirs, names in os.walk(root):  # does not descend into linked folders
        for name in sorted([*dirs, *names]):
            path = Path(folder) / name
            problem = None if name.startswith(".") else link_problem(path)
            if problem is not None and _resolved(path) not in skip:
                links[path] = problem
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _resolved(Path(folder) / d) not in skip)
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or path in links or _resolved(path) in skip:
                continue
            if path.is_file():
                found.append(path)
    return found, links


def in_shard(relative: str, index: int, count: int) -> bool:
    return count == 1 or int(hashlib.sha1(relative.encode()).hexdigest()[:8], 16) % count == index


def load_state(folder: Path, key: str) -> dict[str, dict[str, Any]]:
    """Per-file summaries from earlier runs (all state files of the folder), by ``file``: the salted hash of the
    path relative to the root (paths are not kept: names may hold DICOM UIDs)."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        with path.open(encoding="utf-8") as handle:
            header = json.loads(handle.readline() or "{}")
            if header.get("key") != key:
                continue  # another salt or state version: re-read those files
            for line in handle:
                entry = json.loads(line)
                entries[entry["file"]] = entry
    return entries


def save_state(path: Path, key: str, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"key": key, "version": STATE_VERSION}) + "\n")
        for entry in entries:
            handle.write(json.dumps({k: v for k, v in entry.items() if k != "path"}) + "\n")
    os.replace(tmp, path)


def _file_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time; ``(-1, -1)`` for a file that vanished, which is then read (and reported)."""
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def read_files(
    root: Path, files: list[Path], state: dict[str, dict[str, Any]], salt: str, workers: int, progress: bool
) -> tuple[list[dict[str, Any]], int]:
    """Summaries for ``files``: reused from ``state`` when size and mtime match, else read. Returns the count read.

    Each summary holds ``path`` (relative to ``root``; never saved) and ``file``, its salted hash (the state's key).
    """
    entries, todo = [], []
    for path in files:
        relative = path.relative_to(root).as_posix()
        file = salted_hash(relative, salt)
        size, mtime = _file_stamp(path)
        old = state.get(file)
        # a file refused for its size is read again: the budget ($MEDMAE_MAX_VOXELS) may have changed since
        over_budget = old is not None and BUDGET_REFUSAL in old["result"].get("reason", "")
        if old is not None and old["size"] == size and old["mtime_ns"] == mtime and not over_budget:
            entries.append({**old, "path": relative})
        else:
            todo.append({"path": relative, "file": file, "size": size, "mtime_ns": mtime})
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


UID_IN_ROOT = "the scanned folder's own path holds a DICOM UID; rename it, or scan the folder above it"


def series_source(files: list[str], depths: dict[str, int], key: str, base: Path) -> tuple[str, dict[str, Any]]:
    """The folder of a series' record and how the record names its files.

    ``source``: the files' paths relative to ``base``. When a name on the way to a file holds a DICOM UID
    (``depths``: each file's ``uid_depth``), the folder is the deepest one above every such name and the files
    are given by position below it instead (``source_index``, ``source_hash`` keyed by ``key``; see
    :func:`medmae.data.privacy.positions`).

    Raises:
        ValueError, OSError: a file vanished during the scan.
    """
    folder = os.path.commonpath([Path(f).parents[max(depths[f], 1) - 1] for f in files])
    if not any(depths[f] for f in files):
        return folder, {"source": [os.path.relpath(f, base) for f in files]}
    anchor, paths = Path(folder), [Path(f) for f in files]
    return folder, {"source_index": positions(anchor, paths), "source_hash": source_hash(anchor, paths, key)}


def series_records(
    root: Path,
    series: dict[str, list[dict[str, Any]]],
    options: ScanOptions,
    report: ScanReport,
    base: Path,
    names: UidNames,
) -> list[ScanRecord]:
    """One record per DICOM image series (status ``ok`` or ``skipped`` with its reason)."""
    records = []
    for uid_hash, entries in sorted(series.items()):
        results = [e["result"] for e in entries]
        modality = normalise_modality(options.modality or results[0]["modality"])
        scan_id = f"{modality.lower()}-{uid_hash}"
        if names.in_root or any(r["identifying_path"] for r in results):
            reason = "its path contains a patient identifier from its DICOM header; rename the folders"
            report.add(scan_id, "series", "skipped", "identifying-path", UID_IN_ROOT if names.in_root else reason)
            report.counts["skipped"] += 1
            continue
        files = [str(root / e["path"]) for e in entries]
        depths = {f: e["result"].get("uid_depth", 0) for f, e in zip(files, entries)}
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
        try:
            folder, source = series_source(files, depths, uid_hash, base)
        except (ValueError, OSError):
            report.add(scan_id, "series", "skipped", "changed", "its files changed during the scan; scan again")
            report.counts["skipped"] += 1
            continue
        info.update(source)
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
    max_voxels_from_env()  # an invalid memory budget stops the scan here, not once per file
    options = options or ScanOptions()
    if modality:
        options = replace(options, modality=modality)
    index, count = parse_shard(shard)
    report_path, state_dir = output_paths(output)
    salt = load_or_create_salt(salt_file or state_dir / "salt")
    key = salted_hash(f"medmae-scan-state-{STATE_VERSION}", salt)
    skip = {p.resolve() for p in (output, report_path, state_dir)}
    files, links = list_files(root, skip)
    mine = [p for p in files if in_shard(p.relative_to(root).as_posix(), index, count)]
    entries, n_read = read_files(root, mine, load_state(state_dir, key), salt, workers, progress)
    if count > 1:
        save_state(state_dir / f"shard-{index}-of-{count}.jsonl", key, entries)
        print(f"shard {index}/{count}: {len(entries)} files ({n_read} read); run without --shard to write the manifest")
        return 0
    save_state(state_dir / "all.jsonl", key, entries)
    for old in state_dir.glob("shard-*.jsonl"):
        old.unlink()
    names = UidNames.of(entries, salt)
    report = ScanReport(
        "<the scanned folder: its path holds a DICOM UID>" if names.in_root else str(root),
        str(output),
        files={"seen": len(files), "read": n_read, "reused": len(entries) - n_read},
    )
    for path, (code, reason) in links.items():
        report.add(names.item(path.relative_to(root).as_posix()), "file", "skipped", code, reason)
        report.counts["skipped"] += 1
    records = assemble(root, entries, options, report, output.parent.resolve(), names)
    write_manifest(records, output)
    report.write(report_path)
    print(report.summary())
    print(f"wrote {len(records)} records to {output} and the report to {report_path}")
    return 0


def assemble(
    root: Path, entries: list[dict[str, Any]], options: ScanOptions, report: ScanReport, base: Path, names: UidNames
) -> list[ScanRecord]:
    """Records from per-file summaries: volume files (grouped into channels), then DICOM series.

    A volume file whose path holds a DICOM UID (``names``) is skipped and reported by the hash of its path.
    """
    volumes, series = [], defaultdict(list)
    for entry in entries:
        result = entry["result"]
        if result["kind"] == "skip":
            report.add(names.item(entry["path"]), "file", "skipped", result["code"], result["reason"])
            report.counts["skipped"] += 1
        elif result["kind"] == "dicom":
            series[result["series"]].append(entry)
        elif names.hides(entry["path"]):
            reason = UID_IN_ROOT if names.in_root else "its path holds a DICOM UID; rename the file or its folders"
            report.add(names.item(entry["path"]), "file", "skipped", "identifying-path", reason)
            report.counts["skipped"] += 1
        else:
            volumes.append(entry)
    records = volume_records(root, volumes, options, report)
    records += series_records(root, series, options, report, base, names)
    return sorted(records, key=lambda r: r.id)
