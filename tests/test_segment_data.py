"""Labelled data for segmentation: fixed seeded splits, and clear errors for bad labels (real scans)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medmae.data.manifest import ScanRecord, read_manifest, write_manifest
from medmae.data.seg_datamodule import SegDataModule, preprocess_labelled, seg_splits
from medmae.data.transforms import IntensityConfig
from medmae.io import VolumeError, read_volume, write_volume

ROOT = Path(__file__).resolve().parents[1]
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus"

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
