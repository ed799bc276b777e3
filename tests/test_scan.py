"""``medmae manifest scan``: bad inputs get reasons, re-runs are incremental, shards add up, channels group."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medmae.cli import main
from medmae.data.manifest import read_manifest
from medmae.data.parallel import robust_map
from medmae.data.scan import ScanOptions, parse_shard, scan_folder
from medmae.data.scan_files import label_map_problem, pixel_stats, summarise_stats
from medmae.io.readers import read_volume
from tests.corpus_ingest import DATA, SMALL_CT, SMALL_MR, bad_corpus, copy_files, nan_volume


def _report(manifest: Path) -> dict:
    return json.loads(manifest.with_name(manifest.stem + ".report.json").read_text())


def _lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


@pytest.fixture(scope="module")
def bad_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("archive")
    expected = bad_corpus(root / "bad")
    shutil.copy2(SMALL_CT, root / "good_ct.nii.gz")
    nan_volume(root / "some_nan.nii.gz")
    output = tmp_path_factory.mktemp("out") / "archive.jsonl"
    assert scan_folder(root, output, options=ScanOptions(min_slices=3), progress=False) == 0
    return root, output, expected


def test_every_bad_input_gets_its_reason_and_the_scan_completes(bad_scan) -> None:
    _, output, expected = bad_scan
    issues = {issue["item"]: issue for issue in _report(output)["issues"]}
    for name, code in expected.items():
        assert issues[f"bad/{name}"]["code"] == code, issues.get(f"bad/{name}")
        assert issues[f"bad/{name}"]["reason"]
    series = [i for i in issues.values() if i["kind"] == "series"]
    assert [i["code"] for i in series] == ["localizer"]  # the mixed folder: localizer split from the axial series
    ok = {r.id for r in read_manifest(output)}
    assert "good_ct" in ok and "some_nan" in ok
    assert any(i.startswith("ct-") for i in ok)  # the 5-slice axial series of the mixed folder
    assert "NaN/Inf" in issues["some_nan"]["reason"] and issues["some_nan"]["status"] == "ok"


def test_report_counts_match_the_manifest_and_issues(bad_scan) -> None:
    _, output, _ = bad_scan
    report = _report(output)
    records = _lines(output)
    file_skips = [i for i in report["issues"] if i["kind"] == "file" and i["status"] == "skipped"]
    assert report["counts"]["ok"] == sum(r["status"] == "ok" for r in records)
    assert report["counts"]["skipped"] == sum(r["status"] == "skipped" for r in records) + len(file_skips)
    good = next(r for r in records if r["id"] == "good_ct")
    assert good["shape"] == [1, 122, 101, 30] and good["spacing"] == [3.0, 3.0, 3.0]
    assert good["modality"] == "CT" and good["dtype"] == "int16" and good["orientation"] == "RAS"
    assert good["intensity"]["min"] == -1100.0 and good["intensity"]["max"] == 1207.0


def test_rerun_is_incremental(tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_files(SMALL_CT.parent, root, [SMALL_CT.name, SMALL_MR.name])
    output = tmp_path / "m.jsonl"
    scan_folder(root, output, progress=False)
    first = output.read_text()
    scan_folder(root, output, progress=False)
    assert _report(output)["files"] == {"seen": 2, "read": 0, "reused": 2}
    assert output.read_text() == first
    os.utime(root / SMALL_MR.name, ns=(1, 1))
    scan_folder(root, output, progress=False)
    assert _report(output)["files"]["read"] == 1


def test_label_maps_beside_their_images_are_skipped_not_trained_on(tmp_path: Path) -> None:
    """Archives keep segmentations next to the scans (MSD labelsTr, NRRD lesion masks, a 117-class map)."""
    root = tmp_path / "root"
    copy_files(SMALL_CT.parent, root, [SMALL_CT.name, SMALL_MR.name, "example_seg.nii.gz", "example_seg_mr.nii.gz"])
    copy_files(DATA / "pyradiomics", root, ["breast1_image.nrrd", "breast1_label.nrrd"])
    for folder in ("imagesTr", "labelsTr"):  # hippocampus_003's label is stored as float32
        copy_files(DATA / "hippocampus" / folder, root / folder, ["hippocampus_003.nii.gz"])
    output = tmp_path / "m.jsonl"
    scan_folder(root, output, progress=False)
    kept = sorted(record.id for record in read_manifest(output, check_files=False))
    assert kept == ["breast1_image", "example_ct_sm", "example_mr_sm", "imagesTr__hippocampus_003"]
    assert _report(output)["reasons"] == {"label-map": 4}


def test_integer_images_with_a_zero_minimum_are_not_taken_for_label_maps() -> None:
    """Real scans stored as small integers from 0 keep being read as images: CT mapped to uint8 over its full
    Hounsfield range, MR quantised to uint8 with a zero (masked) background, MR upsampled x2 by nearest
    neighbour; the smallest real lesion mask is still a label map."""

    def problem(array: np.ndarray) -> tuple[str, str] | None:
        return label_map_problem(array, summarise_stats([pixel_stats(array)]))

    hounsfield = read_volume(DATA / "pyradiomics" / "lung1_image.nrrd").array.astype(np.float32)
    brain = read_volume(DATA / "pyradiomics" / "brain1_image.nrrd").array.astype(np.float32)
    breast = read_volume(DATA / "pyradiomics" / "breast1_image.nrrd").array
    brain_uint8 = np.round(brain / brain.max() * 255).astype(np.uint8)
    images = {
        "CT as uint8 over -1024..3071 HU": np.round((hounsfield + 1024).clip(0, 4095) / 4095 * 255).astype(np.uint8),
        "MR as uint8, background masked to 0": np.where(brain > np.percentile(brain, 30), brain_uint8, 0),
        "MR upsampled x2 (nearest)": (breast - breast.min()).repeat(2, 1).repeat(2, 2).repeat(2, 3),
    }
    for name, array in images.items():
        assert problem(array) is None, name
    assert problem(read_volume(DATA / "pyradiomics" / "breast1_label.nrrd").array)[0] == "label-map"


def test_shards_then_assembly_equal_one_scan(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bad_corpus(root)
    salt = tmp_path / "salt"
    whole, sharded = tmp_path / "whole.jsonl", tmp_path / "sharded.jsonl"
    options = ScanOptions(min_slices=3)
    scan_folder(root, whole, options=options, salt_file=salt, progress=False, workers=2)
    for index in range(3):
        scan_folder(root, sharded, options=options, salt_file=salt, progress=False, shard=f"{index}/3")
    assert not sharded.exists()
    scan_folder(root, sharded, options=options, salt_file=salt, progress=False)
    assert _report(sharded)["files"]["read"] == 0
    assert _lines(sharded) == _lines(whole)


@pytest.mark.parametrize("text", ["3/3", "a/b", "1", "-1/2"])
def test_bad_shard_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="i/n"):
        parse_shard(text)


def test_channels_group_and_grid_mismatch_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy2(SMALL_MR, root / "s1_t1.nii.gz")
    shutil.copy2(SMALL_MR, root / "s1_t2.nii.gz")
    shutil.copy2(SMALL_MR, root / "s2_t1.nii.gz")
    shutil.copy2(SMALL_CT, root / "s2_t2.nii.gz")  # another grid
    shutil.copy2(SMALL_MR, root / "s3_t1.nii.gz")  # t2 missing
    output = tmp_path / "m.jsonl"
    scan_folder(root, output, options=ScanOptions(modality="MR", channels=("t1", "t2")), progress=False)
    records = {r["id"]: r for r in _lines(output)}
    assert records["s1"]["status"] == "ok" and records["s1"]["channels"] == ["t1", "t2"]
    assert records["s1"]["image"] == ["root/s1_t1.nii.gz", "root/s1_t2.nii.gz"] and records["s1"]["shape"][0] == 2
    assert records["s2"]["status"] == "skipped" and "another grid" in records["s2"]["reason"]
    assert records["s3"]["status"] == "skipped" and "missing channel(s) t2" in records["s3"]["reason"]


def test_cli_scan_prints_a_summary_and_help_has_an_example(tmp_path: Path, capsys) -> None:
    root = tmp_path / "root"
    bad_corpus(root)
    assert (
        main(["manifest", "scan", str(root), "-o", str(tmp_path / "m.jsonl"), "--workers", "2", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "skipped by reason" in out and "constant image" in out
    with pytest.raises(SystemExit):
        main(["manifest", "scan", "--help"])
    assert "example" in capsys.readouterr().out


def _crash_on_three(item: int) -> int:
    if item == 3:
        os._exit(1)  # a decoder segfault, as far as the pool can tell
    return item * 10


def test_robust_map_survives_a_crashing_worker() -> None:
    results = dict(robust_map(_crash_on_three, list(range(8)), 2, lambda item, msg: -1, progress=False))
    assert results == {0: 0, 1: 10, 2: 20, 3: -1, 4: 40, 5: 50, 6: 60, 7: 70}
