"""Test inputs for archive ingestion: real DICOM/NIfTI copied into neutral folders, and a bad-input corpus.

Real data comes from ``../shared/data`` and pydicom's bundled test files (offline). Synthetic files are made
only for properties real data lacks (corrupt, truncated, empty, 2D, 4D, NaN/Inf, constant, gantry tilt).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
CT_SERIES = DATA / "ct_dicom_series" / "series"
CT_SERIES_LABEL = DATA / "ct_dicom_series" / "example_seg_dicom.nii.gz"
SMALL_CT = DATA / "ct_mr_samples" / "example_ct_sm.nii.gz"
SMALL_MR = DATA / "ct_mr_samples" / "example_mr_sm.nii.gz"
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
DICOMDIR_TESTS = PYDICOM_FILES / "dicomdirtests"


def copy_files(source: Path, target: Path, names: list[str] | None = None) -> list[Path]:
    """Copy the files of ``source`` (or the ``names`` among them) into ``target``; returns the copies."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in source.iterdir() if p.is_file() and (names is None or p.name in names))
    return [Path(shutil.copy2(p, target / p.name)) for p in files]


def real_series_files() -> list[Path]:
    """The real CT series' files sorted from inferior to superior."""
    files = [p for p in CT_SERIES.iterdir() if p.is_file()]
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def tilted_copy(target: Path, mm_per_slice: float = 0.5) -> list[Path]:
    """The real series with each slice shifted along y by ``mm_per_slice`` per slice (a gantry tilt)."""
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for index, path in enumerate(real_series_files()):
        dataset = pydicom.dcmread(path)
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y + index * mm_per_slice, z]
        dataset.save_as(target / path.name)
        out.append(target / path.name)
    return out


def identified_copy(target: Path, names: dict[str, str]) -> list[Path]:
    """pydicom's 5-slice CT series with identifying header values set to ``names`` (keyword → value)."""
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted((DICOMDIR_TESTS / "98892001" / "CT5N").iterdir()):
        dataset = pydicom.dcmread(path)
        for keyword, value in names.items():
            setattr(dataset, keyword, value)
        dataset.save_as(target / f"slice{len(out)}")
        out.append(target / f"slice{len(out)}")
    return out


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def bad_corpus(root: Path) -> dict[str, str]:
    """Write one file per kind of bad input under ``root``; returns ``{relative path: expected reason code}``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = rng.normal(100, 20, (12, 12, 12)).astype(np.float32)
    expected = {}
    raw = gzip.compress(nib.Nifti1Image(good, np.eye(4)).to_bytes())
    (root / "corrupt.nii.gz").write_bytes(raw[:40] + bytes(200) + raw[240:])
    expected["corrupt.nii.gz"] = "unreadable"
    (root / "truncated.nii").write_bytes(nib.Nifti1Image(good, np.eye(4)).to_bytes()[:2000])
    expected["truncated.nii"] = "unreadable"
    (root / "empty.nii.gz").write_bytes(b"")
    expected["empty.nii.gz"] = "empty"
    _nifti(root / "flat2d.nii.gz", good[:, :, 0])
    expected["flat2d.nii.gz"] = "unreadable"
    _nifti(root / "timeseries4d.nii.gz", rng.normal(0, 1, (8, 8, 8, 6)).astype(np.float32))
    expected["timeseries4d.nii.gz"] = "4d"
    _nifti(root / "allnan.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    expected["allnan.nii.gz"] = "non-finite"
    _nifti(root / "constant.nii.gz", np.full((8, 8, 8), 7, np.int16))
    expected["constant.nii.gz"] = "constant"
    (root / "notes.txt").write_text("not an image\n")
    expected["notes.txt"] = "not-image"
    copy_files(PYDICOM_FILES, root / "objects", ["rtstruct.dcm", "test-SR.dcm"])
    expected["objects/rtstruct.dcm"] = expected["objects/test-SR.dcm"] = "derived-object"
    # a folder mixing a 5-slice axial series with its 2-slice localizer, and a CR radiograph
    copy_files(DICOMDIR_TESTS / "98892001" / "CT5N", root / "mixed")
    copy_files(DICOMDIR_TESTS / "98892001" / "CT2N", root / "mixed")
    shutil.copy2(next((DICOMDIR_TESTS / "77654033" / "CR1").iterdir()), root / "mixed" / "radiograph")
    expected["mixed/radiograph"] = "not-volumetric"
    return expected


def nan_volume(path: Path) -> Path:
    """A usable volume with a few NaN and Inf voxels (kept, with a note)."""
    array = np.random.default_rng(1).normal(100, 20, (10, 10, 10)).astype(np.float32)
    array[0, 0, :3] = [np.nan, np.inf, -np.inf]
    return _nifti(path, array)
