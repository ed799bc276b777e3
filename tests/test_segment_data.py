"""Labelled data for segmentation: fixed seeded splits, and clear errors for bad labels (real scans)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from medmae.data.manifest import ScanRecord, read_manifest, write_manifest
from medmae.data.seg_datamodule import SegDataModule, preprocess_labelled, report_classes, seg_splits
from medmae.data.transforms import IntensityConfig, preprocessing_transforms
from medmae.io import Volume, VolumeError, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus"
SAMPLES = DATA / "ct_mr_samples"
DICOM = DATA / "ct_dicom_series"
RADIOMICS = DATA / "pyradiomics"

pytestmark = pytest.mark.real_data


def records(n: int) -> list[ScanRecord]:
    return [ScanRecord(f"s{i:03d}", [f"/x/{i}.nii.gz"], f"/x/{i}_seg.nii.gz") for i in range(n)]


def test_test_split_is_fixed_and_disjoint() -> None:
    scans = records(50)
    reference = seg_splits(scans, 0.2, 0.1, None, split_seed=0)
    assert len(reference.test) == 10 and len(reference.val) == 4 and len(reference.pool) == 36
    for k in (1, 5, 36):
        for seed in (0, 1):
            splits = seg_splits(scans, 0.2, 0.1, k, split_seed=0, seed=seed)
            assert [r.id for r in splits.test] == [r.id for r in reference.test]
            assert [r.id for r in splits.val] == [r.id for r in reference.val]
            train = {r.id for r in splits.train}
            assert len(train) == k and train <= {r.id for r in reference.pool}
    assert {r.id for r in seg_splits(scans, 0.2, 0.1, 5, seed=0).train} != {
        r.id for r in seg_splits(scans, 0.2, 0.1, 5, seed=1).train
    }
    with pytest.raises(ValueError, match="num_labeled=37 but the training pool has 36"):
        seg_splits(scans, 0.2, 0.1, 37)


def test_labels_are_loaded_on_the_image_grid_and_checked() -> None:
    (scan,) = [r for r in read_manifest(ROOT / "data_manifests" / "hippocampus.jsonl")[:1]]
    ((scan_id, image, label),) = preprocess_labelled([scan], None, IntensityConfig(), num_classes=3)
    truth = read_volume(scan.label).array
    assert scan_id == scan.id and image.shape[1:] == label.shape[1:]
    assert sorted(np.unique(label.numpy())) == sorted(np.unique(truth))
    assert int((label > 0).sum()) == int((truth > 0).sum())  # the foreground crop keeps every labelled voxel


def test_label_on_another_grid_names_the_file(tmp_path: Path) -> None:
    image = HIPPO / "imagesTr" / "hippocampus_001.nii.gz"
    label = read_volume(HIPPO / "labelsTr" / "hippocampus_001.nii.gz")
    shifted = tmp_path / "shifted_seg.nii.gz"
    write_volume(label.with_array(label.array[:, :-3]), shifted)  # three slices fewer than its image
    with pytest.raises(VolumeError, match=r"shifted_seg\.nii\.gz: label is on another grid than its image"):
        preprocess_labelled([ScanRecord("a", [str(image)], str(shifted))], None, IntensityConfig(), 3)


def test_class_count_mismatch_names_the_file_and_values(tmp_path: Path) -> None:
    scan = ScanRecord(
        "a", [str(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")], str(HIPPO / "labelsTr" / "hippocampus_001.nii.gz")
    )
    with pytest.raises(VolumeError, match=r"hippocampus_001\.nii\.gz: label values \[2\] are outside 0 \.\. 1"):
        preprocess_labelled([scan], None, IntensityConfig(), num_classes=2)
    manifest = write_manifest([scan], tmp_path / "one.jsonl")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SegDataModule(str(manifest), num_classes=1)


def test_unlabelled_manifest_is_rejected(tmp_path: Path) -> None:
    scan = ScanRecord("a", [str(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")])
    manifest = write_manifest([scan], tmp_path / "nolabel.jsonl")
    with pytest.raises(ValueError, match="no record has a 'label'"):
        SegDataModule(str(manifest), num_classes=3, roi_size=[32, 32, 32], spacing=None).setup()


def test_training_crops_hold_foreground(hippo_manifest: Path) -> None:
    data = SegDataModule(
        str(hippo_manifest),
        3,
        num_labeled=3,
        roi_size=[32, 32, 32],
        spacing=None,
        pos_fraction=1.0,
        test_fraction=0.25,
        val_fraction=0.1,
        samples_per_epoch=6,
    )
    data.setup()
    assert len(data.splits.train) == 3 and len(data.splits.test) == 4
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and batch["label"].shape == (2, 1, 32, 32, 32)
    assert all(int((label > 0).sum()) > 0 for label in batch["label"])


def test_label_stored_in_another_axis_order_is_used_on_the_image_grid(tmp_path: Path) -> None:
    """The DICOM series' label map covers the same voxels with the y axis flipped: same result as in image order."""
    series, stored = DICOM / "series", DICOM / "example_seg_dicom.nii.gz"
    image, label = read_volume(series), read_volume(stored)
    assert not label.same_grid(image, atol=1e-3)
    aligned = label.aligned_to(image)
    assert aligned is not None and aligned.same_grid(image, atol=1e-3)
    np.testing.assert_array_equal(aligned.array, label.array[:, :, ::-1])  # reference: the flip by hand
    in_image_order = write_volume(Volume(label.array[:, :, ::-1].copy(), image.affine), tmp_path / "seg.nii.gz")
    pipeline = preprocessing_transforms("CT", None, IntensityConfig(), "label", crop_foreground=False)
    expected = pipeline({"image": str(series), "label": str(in_image_order)})["label"]
    np.testing.assert_array_equal(pipeline({"image": str(series), "label": str(stored)})["label"], expected)
    assert label.aligned_to(read_volume(SAMPLES / "example_ct_sm.nii.gz")) is None  # another grid stays an error


def test_gapped_117_class_label_map_names_the_class_count_it_needs(caplog: pytest.LogCaptureFixture) -> None:
    """A TotalSegmentator map (ids up to 117, 41 present): the error says 118; with 118 the ids are kept as they
    are (no remapping) and the classes no training scan has are reported."""
    scan = ScanRecord("ct", [str(SAMPLES / "example_ct_sm.nii.gz")], str(SAMPLES / "example_seg.nii.gz"), "CT")
    with pytest.raises(VolumeError, match=r"at least 118 for label values up to 117"):
        preprocess_labelled([scan], None, IntensityConfig(), num_classes=3)
    volumes = preprocess_labelled([scan], None, IntensityConfig(), num_classes=118)
    truth = np.unique(read_volume(scan.label).array)
    np.testing.assert_array_equal(np.unique(volumes[0][2].numpy()), truth)
    with caplog.at_level(logging.WARNING):
        absent = report_classes(volumes, 118)
    assert absent == sorted(set(range(1, 118)) - set(truth.tolist())) and "76 of the 117 foreground" in caplog.text
    lesion = ScanRecord("b", [str(RADIOMICS / "breast1_image.nrrd")], str(RADIOMICS / "breast1_label.nrrd"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert report_classes(preprocess_labelled([lesion], None, IntensityConfig(), 3), 3) == [2]
    assert "num_classes=3 but the largest label value is 1" in caplog.text
