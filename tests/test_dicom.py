"""DICOM series: grouping, geometry checks, and resampling onto a regular grid, against real series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmae.data.dicom import SeriesRejected, plan_series, read_series
from medmae.data.preprocess import to_ras
from medmae.data.scan import ScanOptions, scan_folder
from medmae.io import read_volume
from tests.corpus_ingest import CT_SERIES_LABEL, DICOMDIR_TESTS, copy_files, real_series_files, tilted_copy


def _world(volume_affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (volume_affine @ np.append(index, 1.0))[:3]


def test_real_series_is_on_the_grid_of_its_label_map() -> None:
    image = read_series([str(p) for p in real_series_files()], Path("series"))
    label = read_volume(CT_SERIES_LABEL)
    image_ras, image_affine = to_ras(image.array, image.affine)
    label_ras, label_affine = to_ras(label.array, label.affine)
    assert image_ras.shape[1:] == label_ras.shape[1:] == (512, 512, 20)
    np.testing.assert_allclose(image_affine, label_affine, atol=1e-4)


def _scan(root: Path, tmp_path: Path, **options) -> tuple[list[dict], dict]:
    output = tmp_path / "m.jsonl"
    scan_folder(root, output, options=ScanOptions(**options), progress=False)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    report = json.loads((tmp_path / "m.report.json").read_text())
    return records, report


def test_irregular_gap_beyond_the_limit_is_skipped_with_its_reason(tmp_path: Path) -> None:
    copy_files(DICOMDIR_TESTS / "77654033" / "CT2", tmp_path / "archive" / "ct")  # gaps 202.5, 1.25, 1.25 mm
    records, report = _scan(tmp_path / "archive", tmp_path, min_slices=3)
    assert [r["status"] for r in records] == ["skipped"]
    assert "the largest is 162.0x the median 1.25 mm" in records[0]["reason"]
    assert report["reasons"] == {"irregular-spacing": 1}


def test_several_series_in_one_folder_are_split(tmp_path: Path) -> None:
    copy_files(DICOMDIR_TESTS / "98892003" / "MR2", tmp_path / "archive")  # 7 files of 3 series
    records, _ = _scan(tmp_path / "archive", tmp_path, min_slices=1)
    assert sorted(len(r["source"]) for r in records) == [1, 3, 3]
    assert len({r["series"] for r in records}) == 3


def test_missing_slice_is_resampled_and_keeps_the_real_slices(tmp_path: Path) -> None:
    files = real_series_files()
    kept = files[:7] + files[8:]  # a 4 mm gap in a 2 mm series
    copy_files(files[0].parent, tmp_path / "archive", [p.name for p in kept])
    records, report = _scan(tmp_path / "archive", tmp_path)
    assert records[0]["status"] == "ok" and records[0]["shape"] == [1, 512, 512, 20]
    assert "irregular slice spacing (2-4 mm) resampled to 2 mm" in records[0]["notes"][0]
    assert report["issues"][0]["code"] == "resampled"
    full = read_series([str(p) for p in files], Path("full"))
    gapped = read_series(sorted(str(tmp_path / "archive" / p.name) for p in kept), Path("gapped"))
    np.testing.assert_allclose(gapped.affine, full.affine, atol=1e-4)
    np.testing.assert_array_equal(gapped.array[..., :7], full.array[..., :7])
    np.testing.assert_array_equal(gapped.array[..., 8:], full.array[..., 8:])
    between = (full.array[..., 6].astype(np.float32) + full.array[..., 8]) / 2
    np.testing.assert_allclose(gapped.array[..., 7], between)


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    shift = 0.9765625  # one pixel per slice, so the tilted slices land on whole voxels
    tilted = tilted_copy(tmp_path / "archive", mm_per_slice=shift)
    records, _ = _scan(tmp_path / "archive", tmp_path)
    assert "gantry tilt of 26.0 degrees" in records[0]["notes"][0]
    assert records[0]["shape"] == [1, 512, 512 + 19, 20]
    volume = read_series([str(p) for p in tilted], Path("tilted"))
    original = read_series([str(p) for p in real_series_files()], Path("original"))
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [0.9765625, 0.9765625, 2.0], atol=1e-6)
    assert abs(np.dot(volume.affine[:3, 1], volume.affine[:3, 2])) < 1e-9  # orthogonal axes
    # slice 10 of the tilted series lies 10 pixels further along y; the same values sit at the same world point
    index_original = np.array([100.0, 200.0, 10.0])
    point = _world(original.affine, index_original) + np.array([0.0, -10 * shift, 0.0])  # RAS: +y in LPS is -y
    index_tilted = np.linalg.solve(volume.affine, np.append(point, 1.0))[:3]
    np.testing.assert_allclose(index_tilted, np.round(index_tilted), atol=1e-6)
    i, j, k = np.round(index_tilted).astype(int)
    assert volume.array[0, i, j, k] == original.array[0, 100, 200, 10]


def _geometry(z: list[float], iop: list[float] | None = None) -> list[dict]:
    iop = iop or [1, 0, 0, 0, 1, 0]
    return [{"rows": 4, "cols": 4, "pixel_spacing": [1.0, 1.0], "iop": iop, "ipp": [0, 0, v]} for v in z]


def test_plan_sorts_slices_along_the_normal() -> None:
    plan = plan_series(["c", "a", "b"], _geometry([4.0, 0.0, 2.0]), min_slices=3)
    assert plan.files == ["a", "b", "c"] and plan.shape == (4, 4, 3) and not plan.resample
    np.testing.assert_allclose(plan.affine[:3, 3], [0, 0, 0])
    np.testing.assert_allclose(np.diag(plan.affine)[:3], [-1, -1, 2])  # LPS → RAS


@pytest.mark.parametrize(
    ("geometry", "code"),
    [
        (_geometry([0, 1]), "too-few-slices"),
        (_geometry([0, 1, 1]), "duplicate-positions"),
        (_geometry([0, 1]) + _geometry([2], [1, 0, 0, 0, 0, -1]), "inconsistent-orientation"),
        ([*_geometry([0, 1]), {**_geometry([2])[0], "rows": 8}], "inconsistent-size"),
        ([*_geometry([0, 1]), {**_geometry([2])[0], "ipp": None}], "no-geometry"),
        (_geometry([0, 1, 2, 10]), "irregular-spacing"),
    ],
)
def test_plan_rejects_bad_geometry(geometry: list[dict], code: str) -> None:
    with pytest.raises(SeriesRejected) as error:
        plan_series([str(i) for i in range(len(geometry))], geometry, min_slices=3)
    assert error.value.code == code
