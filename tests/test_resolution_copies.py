"""scripts/resolution_copies.py on a real chest CT: grid, dtype, intensities, manifest, source untouched."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
LUNG = ROOT.parent / "shared" / "data" / "pyradiomics" / "lung1_image.nrrd"


def load_script():
    spec = importlib.util.spec_from_file_location("resolution_copies", ROOT / "scripts" / "resolution_copies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copies_have_the_coarser_grid_same_dtype_and_mean_and_are_listed(tmp_path: Path) -> None:
    script = load_script()
    manifest = tmp_path / "in.jsonl"
    manifest.write_text(json.dumps({"id": "lung1", "image": str(LUNG), "modality": "CT"}) + "\n")
    before = LUNG.stat().st_mtime_ns
    written = script.write_copies(manifest, [3.0], tmp_path / "out")
    assert LUNG.stat().st_mtime_ns == before
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["lung1", "lung1_3mm"] and rows[1]["modality"] == "CT"
    source = sitk.ReadImage(str(LUNG))
    copy = sitk.ReadImage(str(written.parent / rows[1]["image"]))
    assert copy.GetSpacing() == pytest.approx((3.0, 3.0, source.GetSpacing()[2]))
    expected = [round(n * s / 3.0) for n, s in zip(source.GetSize()[:2], source.GetSpacing()[:2])]
    assert list(copy.GetSize()) == [*expected, source.GetSize()[2]]
    assert copy.GetOrigin() == pytest.approx(source.GetOrigin()) and copy.GetDirection() == source.GetDirection()
    assert copy.GetPixelID() == source.GetPixelID()
    # smoothing and resampling keep the mean of the scan's interior (HU), and remove fine-scale variation
    src, out = sitk.GetArrayFromImage(source).astype(float), sitk.GetArrayFromImage(copy).astype(float)
    # the same 60 mm margin in both; the coarser grid keeps the origin, so its edges move by ~1.2 mm
    assert abs(src[:, 105:-105, 105:-105].mean() - out[:, 20:-20, 20:-20].mean()) < 10.0
    assert np.abs(np.diff(out, axis=2)).mean() > np.abs(np.diff(src, axis=2)).mean()  # 5x coarser steps
    with pytest.raises(ValueError, match="finer than"):
        script.coarser_copy(source, 0.1)
    manifest.write_text(json.dumps({"id": "two", "image": [str(LUNG), str(LUNG)], "modality": "MR"}) + "\n")
    with pytest.raises(ValueError, match="'two' needs one existing image file"):
        script.write_copies(manifest, [3.0], tmp_path / "out2")
