"""No patient identifier from DICOM headers reaches the manifest, report, state, logs or cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from medmae.data.cache import PreprocessParams, preprocess_manifest
from medmae.data.privacy import contains_identifier, header_identifiers, load_or_create_salt, salted_hash
from medmae.data.scan import ScanOptions, scan_folder
from tests.corpus_ingest import DICOMDIR_TESTS, copy_files, identified_copy, real_series_files

IDENTITY = {
    "PatientName": "Lovelace^Augusta^Ada",
    "PatientID": "PID-88412077",
    "PatientBirthDate": "18151210",
    "AccessionNumber": "ACC93811",
    "InstitutionName": "Hospital Saint Bartholomew",
}


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_no_identifier_reaches_any_output(tmp_path: Path, capsys, caplog) -> None:
    archive = tmp_path / "archive"
    identified_copy(archive / "study" / "axial", IDENTITY)
    copy_files(real_series_files()[0].parent, archive / "ct")
    copy_files(DICOMDIR_TESTS / "98892003" / "MR2", archive / "mr")  # Doe^Peter, 98890234
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(archive.rglob("*")) if p.is_file()]
    identifiers = set().union(*(header_identifiers(h) for h in headers))
    assert {"lovelace", "pid-88412077", "18151210", "acc93811", "hospital saint bartholomew", "98890234"} <= identifiers
    uids = {str(h.SeriesInstanceUID) for h in headers if h.get("SeriesInstanceUID")}
    out = tmp_path / "out"
    with caplog.at_level(logging.DEBUG):
        scan_folder(archive, out / "m.jsonl", options=ScanOptions(min_slices=3), workers=2, progress=False)
        report = preprocess_manifest(out / "m.jsonl", out / "cache", PreprocessParams((2.0, 2.0, 2.0)), progress=False)
    assert report["built"] == 2  # the identified axial series and the real CT
    written = _all_bytes(out).lower() + capsys.readouterr().out.lower().encode() + caplog.text.lower().encode()
    for secret in identifiers | {u.lower() for u in uids}:
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
