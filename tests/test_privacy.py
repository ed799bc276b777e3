"""No patient identifier nor DICOM UID from the headers reaches the manifest, report, state, logs or cache."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from medmae.data.cache import PreprocessParams, preprocess_manifest
from medmae.data.datamodule import PretrainDataModule
from medmae.data.dicom import read_series
from medmae.data.manifest import ManifestError, read_manifest
from medmae.data.preprocess import load_record
from medmae.data.privacy import (
    contains_identifier,
    header_identifiers,
    holds_uid,
    load_or_create_salt,
    salted_hash,
    uid_depth,
)
from medmae.data.scan import ScanOptions, scan_folder
from medmae.data.transforms import IntensityConfig, preprocessing_transforms
from medmae.restore.evaluate import evaluation_scans
from tests.corpus_ingest import DICOMDIR_TESTS, SMALL_CT, copy_files, identified_copy, real_series_files

IDENTITY = {
    "PatientName": "Lovelace^Augusta^Ada",
    "PatientID": "PID-88412077",
    "PatientBirthDate": "18151210",
    "AccessionNumber": "ACC93811",
    "InstitutionName": "Hospital Saint Bartholomew",
}


STANDARD_UID_ROOT = "1.2.840.10008."  # the standard's own UIDs (SOP classes, transfer syntaxes) identify nobody


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _instance_uids(files: list[Path]) -> set[str]:
    """Every UID of the files' headers and file meta (SOP, Series, Study Instance, Frame of Reference, referenced
    instances...) but the standard's own, lower-cased."""
    found = set()
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        for element in [*header.file_meta, *header.iterall()]:
            values = element.value if element.VM > 1 else [element.value]
            found |= {str(v).lower() for v in values if element.VR == "UI" and v}
    return {uid for uid in found if not uid.startswith(STANDARD_UID_ROOT)}


def test_no_identifier_reaches_any_output(tmp_path: Path, capsys, caplog) -> None:
    archive = tmp_path / "archive"
    identified_copy(archive / "study" / "axial", IDENTITY)
    copy_files(real_series_files()[0].parent, archive / "ct")
    copy_files(DICOMDIR_TESTS / "98892003" / "MR2", archive / "mr")  # Doe^Peter, 98890234
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(archive.rglob("*")) if p.is_file()]
    identifiers = set().union(*(header_identifiers(h) for h in headers))
    assert {"lovelace", "pid-88412077", "18151210", "acc93811", "hospital saint bartholomew", "98890234"} <= identifiers
    uids = _instance_uids([p for p in archive.rglob("*") if p.is_file()])  # the real CT's files are named by them
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        scan_folder(archive, out / "m.jsonl", options=ScanOptions(min_slices=3), workers=2, progress=False)
        report = preprocess_manifest(out / "m.jsonl", out / "cache", PreprocessParams((2.0, 2.0, 2.0)), progress=False)
    assert report["built"] == 2  # the identified axial series and the real CT
    written = _all_bytes(out).lower() + capsys.readouterr().out.lower().encode() + caplog.text.lower().encode()
    for secret in identifiers | uids:
        assert secret.encode() not in written, secret


def test_a_path_holding_a_header_identifier_is_skipped_without_showing_it(tmp_path: Path, capsys) -> None:
    identified_copy(tmp_path / "archive" / "PID-88412077" / "ct", IDENTITY)
    scan_folder(tmp_path / "archive", tmp_path / "m.jsonl", options=ScanOptions(min_slices=3), progress=False)
    manifest = (tmp_path / "m.jsonl").read_text()
    report = (tmp_path / "m.report.json").read_text()
    assert "identifying-path" in report
    assert "88412077" not in manifest + report + capsys.readouterr().out


def test_salt_is_created_once_and_reused(tmp_path: Path) -> None:
    salt = load_or_create_salt(tmp_path / "s" / "salt")
    assert load_or_create_salt(tmp_path / "s" / "salt") == salt and len(salt) == 32
    assert (tmp_path / "s" / "salt").stat().st_mode & 0o077 == 0
    assert salted_hash("1.2.3", salt) == salted_hash("1.2.3", salt) != salted_hash("1.2.3", salt + "x")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_salt(tmp_path / "short")


def test_identifier_matching_ignores_case_and_short_values() -> None:
    dataset = pydicom.Dataset()
    dataset.PatientName = "Doe^Jo"
    dataset.PatientID = "12"
    assert header_identifiers(dataset) == {"doe^jo"}
    assert contains_identifier("/data/DOE^JO/ct", {"doe^jo"}) and not contains_identifier("/data/ct", {"doe^jo"})


def test_uid_shaped_names_are_recognised() -> None:
    assert holds_uid("CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573")
    assert holds_uid("2.25.271828182845904523536028747135") and holds_uid("s-1.2.3.4", {"1.2.3.4"})
    assert not any(holds_uid(name) for name in ("v1.2.3", "2023.01.15", "192.168.1.10", "slice_0001.dcm"))
    assert uid_depth("/data/1.2.840.113619.2.55.3/ct/slice1") == 3 and uid_depth("/data/ct/slice1") == 0


def _uid_named(files: list[Path], folder: Path, suffix: str = "", series: str = "") -> list[Path]:
    """Copies of real slices named ``CT.<SOP Instance UID>`` as the scanner names them; with ``suffix`` and
    ``series``, a new series: new SOP Instance UIDs (the original's + ``suffix``) and Study/Series UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        dataset = pydicom.dcmread(path)
        if series:
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = (
                dataset.file_meta.MediaStorageSOPInstanceUID + suffix
            )
            dataset.SeriesInstanceUID, dataset.StudyInstanceUID = series, series + ".1"
        out.append(folder / f"CT.{dataset.file_meta.MediaStorageSOPInstanceUID}")
        dataset.save_as(out[-1])
    return out


@pytest.fixture(scope="module")
def uid_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, list[Path]]]:
    """The real series under its own UID file names, sharing its folder with a 12-slice series of other UIDs
    (names interleaved, so positions matter), and a 10-slice series in folders named after its Study and
    Series UIDs beside a text file and a NIfTI file; scanned. Returns ``(archive, manifest, {slice count: files})``."""
    archive = tmp_path_factory.mktemp("uid_archive")
    real = real_series_files()
    nested = archive / "1.3.12.2.1107.5.1.4.60064.77.1" / "1.3.12.2.1107.5.1.4.60064.77"
    series = {
        20: copy_files(real[0].parent, archive / "mixed"),  # as exported: CT.<SOP Instance UID>
        12: _uid_named(real[:12], archive / "mixed", ".1", "1.3.12.2.1107.5.1.4.60064.66"),
        10: _uid_named(real[5:15], nested, ".2", "1.3.12.2.1107.5.1.4.60064.77"),
    }
    (nested / "notes.txt").write_text("exported by the PACS\n")
    shutil.copy2(SMALL_CT, nested / "converted.nii.gz")  # a volume file under a UID: skipped, not written
    manifest = tmp_path_factory.mktemp("out") / "m.jsonl"
    scan_folder(archive, manifest, progress=False)
    return archive, manifest, series


def test_uid_file_and_folder_names_never_reach_the_manifest_report_or_state(uid_archive, capsys) -> None:
    archive, manifest, series = uid_archive
    uids = _instance_uids([p for p in archive.rglob("CT.*")])
    assert {p.name[3:].lower() for files in series.values() for p in files} <= uids  # SOP Instance UIDs
    assert {"1.3.12.2.1107.5.1.4.60064.66", "1.3.12.2.1107.5.1.4.60064.77.1"} <= uids  # Series, Study
    first = manifest.read_text()
    scan_folder(archive, manifest, progress=False)  # again, to see the screen: nothing re-read, nothing changed
    report = json.loads(manifest.with_name("m.report.json").read_text())
    assert report["files"] == {"seen": 44, "read": 0, "reused": 44} and manifest.read_text() == first
    records = [json.loads(line) for line in first.splitlines()]
    assert sorted(r["shape"][3] for r in records if r["status"] == "ok") == [10, 12, 20]
    assert all("source_index" in r and "source" not in r for r in records)
    files = [i for i in report["issues"] if i["kind"] == "file"]
    assert sorted(i["code"] for i in files) == ["identifying-path", "not-image"]  # the NIfTI, notes.txt
    assert all(i["item"].startswith("file-") for i in files)
    written = _all_bytes(manifest.parent).lower() + capsys.readouterr().out.lower().encode()
    for secret in uids:
        assert secret.encode() not in written, secret


def test_preprocess_finds_the_files_named_by_their_positions(uid_archive, tmp_path: Path) -> None:
    archive, manifest, series = uid_archive
    plain = tmp_path / "plain.jsonl"  # the same records naming their files, as for files without UIDs in names
    with plain.open("w") as handle:
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            del record["source_index"], record["source_hash"]
            record["image"] = str((manifest.parent / record["image"]).resolve())
            record["source"] = [str(p) for p in series[record["shape"][3]]]
            handle.write(json.dumps(record) + "\n")
    params = PreprocessParams((2.0, 2.0, 4.0))
    assert preprocess_manifest(manifest, tmp_path / "by_position", params, progress=False)["built"] == 3
    assert preprocess_manifest(plain, tmp_path / "by_name", params, progress=False)["built"] == 3
    for record in read_manifest(manifest):
        cached = [np.load(tmp_path / cache / "scans" / f"{record.id}.npy") for cache in ("by_position", "by_name")]
        np.testing.assert_array_equal(cached[0], cached[1])
    written = _all_bytes(tmp_path / "by_position").lower()
    assert not any(uid.encode() in written for uid in _instance_uids([p for p in archive.rglob("CT.*")]))


def test_a_folder_changed_after_the_scan_is_refused_until_scanned_again(tmp_path: Path) -> None:
    files = _uid_named(real_series_files()[:10], tmp_path / "archive" / "ct")
    manifest = tmp_path / "out" / "m.jsonl"
    scan_folder(tmp_path / "archive", manifest, progress=False)
    (record,) = read_manifest(manifest)
    (tmp_path / "archive" / "ct" / "CT.0 readme.txt").write_text("sorted first: every position moves\n")
    with pytest.raises(ManifestError, match=r"archive/ct: the files of this series changed.*medmae manifest scan"):
        load_record(record, manifest.parent)
    report = preprocess_manifest(manifest, tmp_path / "cache", PreprocessParams((4.0, 4.0, 4.0)), progress=False)
    assert report["built"] == 0 and "changed since the manifest was written" in report["failed"][0]["reason"]
    scan_folder(tmp_path / "archive", manifest, progress=False)
    assert json.loads(manifest.with_name("m.report.json").read_text())["files"]["read"] == 1
    (record,) = read_manifest(manifest)
    expected = read_series([str(p) for p in files], Path("ct"))
    np.testing.assert_array_equal(load_record(record, manifest.parent).array, expected.array)


def test_evaluate_restore_reads_series_by_their_positions(uid_archive) -> None:
    """``medmae evaluate-restore --manifest`` reads each series from its listed files, not the whole folder
    (which holds two series here, and is the archive root for the one under UID folders)."""
    _, manifest, _ = uid_archive
    scans, skipped = evaluation_scans(manifest, False, [], manifest, "auto", None, 1024)
    assert not skipped and [s.name for s in scans] == [r.id for r in read_manifest(manifest)]
    for scan, record in zip(scans, read_manifest(manifest)):
        np.testing.assert_array_equal(scan.array, load_record(record, manifest.parent).array[0])


def test_a_manifest_written_into_the_archive_does_not_move_the_positions(tmp_path: Path) -> None:
    """The scan's own outputs (written after the positions were taken, and sorted before a lower-case UID
    folder here) and a hidden file added later (Finder's .DS_Store) do not count in the positions."""
    archive = tmp_path / "archive"
    files = _uid_named(real_series_files()[:10], archive / "series_1.3.12.2.1107.5.1.4.60064.55")
    manifest = archive / "archive.jsonl"
    scan_folder(archive, manifest, progress=False)
    (archive / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (record,) = read_manifest(manifest)
    assert record.image == [str(archive.resolve())] and "source_index" in record.info  # positions from the root
    expected = read_series([str(p) for p in files], Path("ct"))
    np.testing.assert_array_equal(load_record(record, manifest.parent).array, expected.array)


def test_in_memory_pretraining_reads_series_by_their_positions(uid_archive) -> None:
    """Without a cache, ``PretrainDataModule`` reads each series from its listed files, as ``preprocess`` does."""
    _, manifest, _ = uid_archive
    data = PretrainDataModule(str(manifest), roi_size=[16, 16, 16], spacing=None, val_fraction=0.0)
    data.setup("fit")
    assert not data.skipped and len(data.train_dataset.volumes) == 3
    pipeline = preprocessing_transforms("CT", None, IntensityConfig())
    for record, (scan_id, image) in zip(read_manifest(manifest), data.train_dataset.volumes):
        expected = pipeline({"image": load_record(record, manifest.parent)})["image"]
        assert scan_id == record.id
        torch.testing.assert_close(image, torch.as_tensor(expected, dtype=torch.float32))
