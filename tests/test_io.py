"""Reading and writing volumes with their geometry; manifests; clear errors for bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import DATA, HIPPO, ROOT

from medmae.data.manifest import ManifestError, read_manifest
from medmae.io import VolumeError, read_volume, write_volume

pytestmark = pytest.mark.real_data

SAMPLES = [
    (DATA / "ct_mr_samples/example_ct_sm.nii.gz", (1, 122, 101, 30), np.int16, "RAS"),
    (DATA / "ct_mr_samples/example_mr_sm.nii.gz", (1, 117, 91, 20), np.int16, "LPS"),
    (DATA / "pyradiomics/breast1_image.nrrd", (1, 45, 120, 21), None, None),
    (DATA / "ct_dicom_series/series", (1, 512, 512, 20), np.int16, "LPS"),
]


@pytest.mark.parametrize(("path", "shape", "dtype", "orientation"), SAMPLES, ids=lambda v: getattr(v, "name", None))
def test_read_real_formats(path: Path, shape: tuple, dtype: type | None, orientation: str | None) -> None:
    volume = read_volume(path)
    assert volume.array.shape == shape
    if dtype is not None:
        assert volume.dtype == dtype
    if orientation is not None:
        assert volume.orientation == orientation


def test_nifti_and_itk_readers_agree_on_geometry() -> None:
    import SimpleITK as sitk

    from medmae.io.readers import itk_affine

    path = DATA / "ct_mr_samples/example_mr_sm.nii.gz"
    volume = read_volume(path)
    np.testing.assert_allclose(volume.affine, nib.load(path).affine)
    image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(itk_affine(image), volume.affine, atol=1e-4)
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(image)), volume.array[0])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_round_trip_keeps_grid_and_dtype(tmp_path: Path, suffix: str) -> None:
    source = read_volume(DATA / "ct_mr_samples/example_mr_sm.nii.gz")
    written = read_volume(write_volume(source, tmp_path / f"out{suffix}"))
    assert np.array_equal(written.array, source.array) and written.dtype == source.dtype
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)


def test_write_keeps_nifti_header_fields_and_casts(tmp_path: Path) -> None:
    source = read_volume(DATA / "ct_mr_samples/example_ct_sm.nii.gz")
    floats = source.with_array(source.array.astype(np.float32) + 0.6)
    floats.array[0, 0, 0, 0] = 1e9
    out = read_volume(write_volume(floats, tmp_path / "ct.nii.gz", dtype=np.int16))
    assert out.dtype == np.int16
    assert out.array[0, 0, 0, 0] == np.iinfo(np.int16).max  # clipped, not wrapped
    assert np.array_equal(out.array[0, 1:3, 1:3, 1:3], np.rint(floats.array[0, 1:3, 1:3, 1:3]).astype(np.int16))
    for field in ("qform_code", "sform_code", "xyzt_units", "descrip"):
        assert out.header[field] == source.header[field]


def test_refuses_to_overwrite_input(tmp_path: Path) -> None:
    copy = tmp_path / "scan.nii.gz"
    copy.write_bytes((HIPPO / "imagesTr/hippocampus_001.nii.gz").read_bytes())
    before = copy.read_bytes()
    with pytest.raises(VolumeError, match="refusing to overwrite"):
        write_volume(read_volume(copy), copy)
    assert copy.read_bytes() == before


def test_bad_input_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"missing\.nii\.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz: image is 2D"):
        read_volume(flat)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match=r"junk\.nii\.gz: cannot read"):
        read_volume(junk)
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(Path(__file__))


def test_manifest_row_with_wrong_path_names_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    good = {"id": "a", "image": str(HIPPO / "imagesTr/hippocampus_001.nii.gz"), "modality": "MR"}
    bad = {"id": "b", "image": "nowhere/scan.nii.gz"}
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: file not found: .*nowhere/scan\.nii\.gz"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({**good, "imgae": "x"}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: unknown key\(s\) \['imgae'\]"):
        read_manifest(manifest)
    manifest.write_text("{not json\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: not valid JSON"):
        read_manifest(manifest)


def test_manifest_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    from medmae.data.manifest import write_manifest
    from medmae.data.msd import records_from_msd

    records = records_from_msd(HIPPO / "dataset.json")[:3]
    path = write_manifest(records, tmp_path / "sub" / "m.jsonl")
    assert not json.loads(path.read_text().splitlines()[0])["image"].startswith("/")
    again = read_manifest(path)
    assert [r.image for r in again] == [r.image for r in records]
    assert again[0].modality == "MR" and again[0].label.endswith("hippocampus_001.nii.gz")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_of_the_umask(tmp_path: Path, umask: int) -> None:
    """Atomic writers go through a temporary file; the result has ``0o666 & ~umask``, as ``open`` gives,
    not mkstemp's owner-only 0600 (colleagues on a cluster must be able to read a shared cache or results)."""
    from medmae.data.cache_store import atomic_write
    from medmae.data.manifest import write_manifest

    previous = os.umask(umask)
    try:
        volume = read_volume(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
        outputs = [
            write_volume(volume, tmp_path / "out.nii.gz"),
            write_volume(volume, tmp_path / "out.nrrd"),
            write_manifest(read_manifest(ROOT / "data_manifests" / "hippocampus.jsonl")[:2], tmp_path / "m.jsonl"),
        ]
        atomic_write(tmp_path / "entry.json", lambda handle: handle.write(b"{}"))
        outputs.append(tmp_path / "entry.json")
    finally:
        os.umask(previous)
    for path in outputs:
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o666 & ~umask, path
