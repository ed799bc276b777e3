"""The fast data path gives the reference values: strided reads, slab resampling, fused normalisation and crops."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medmae.data.preprocess as preprocess
from medmae.data.cache import CachedCropDataset, PreprocessParams, preprocess_manifest
from medmae.data.cache_dataset import AugmentDraw, CropAugmentation, _without_meta_tracking, render_crop
from medmae.data.datamodule import centre_crop_transform
from medmae.data.manifest import ScanRecord, write_manifest
from medmae.data.preprocess import Normalisation, normalise, preprocess_volume
from medmae.data.transforms import augmentation_transforms, preprocessing_transforms
from medmae.io import read_volume, write_volume
from tests.corpus_ingest import DATA, SMALL_CT, SMALL_MR

LUNG = DATA / "pyradiomics" / "lung1_image.nrrd"
HIPPO = DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"


def test_nifti_is_read_as_a_view_with_the_files_values(tmp_path: Path) -> None:
    volume = read_volume(SMALL_MR)
    assert not volume.array.flags.c_contiguous and volume.array.flags.writeable
    np.testing.assert_array_equal(volume.array[0], np.asanyarray(nib.load(SMALL_MR).dataobj))
    written = write_volume(volume, tmp_path / "copy.nii")  # uncompressed: read into memory, not mapped
    again = read_volume(written)
    assert not isinstance(again.array, np.memmap)
    np.testing.assert_array_equal(again.array, volume.array)


def test_itk_volumes_are_read_as_views_in_xyz_order(tmp_path: Path) -> None:
    volume = read_volume(LUNG)
    zyx = sitk.GetArrayFromImage(sitk.ReadImage(str(LUNG)))
    np.testing.assert_array_equal(volume.array[0], zyx.transpose(2, 1, 0))
    assert volume.array.flags.f_contiguous
    again = read_volume(write_volume(volume, tmp_path / "lung.mha"))
    np.testing.assert_array_equal(again.array, volume.array)


def plain_normalisation(array: np.ndarray, norm: Normalisation) -> np.ndarray:
    """The formula step by step, as the MONAI transforms apply it (two clips)."""
    f = np.float32
    out = np.clip(array.astype(f), f(norm.lower), f(norm.upper))
    out = (out - f(norm.shift)) * f(1.0 / norm.scale)
    return np.clip(out, f(norm.out_low), f(norm.out_high))


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_one_clip_normalisation_equals_the_two_clip_formula(dtype: type) -> None:
    array = read_volume(HIPPO if dtype is np.uint8 else SMALL_CT).array[0]
    if dtype is np.float32:
        array = array.astype(np.float32) * np.float32(1.37)
    low, high = np.percentile(array, [0.5, 99.5])
    norms = [
        Normalisation(-np.inf, np.inf, -1000.0, 2000.0, 0.0, 1.0),  # CT window
        Normalisation(float(low), float(high), float(array.mean()), float(array.std())),  # MR z-score
        Normalisation(float(low), float(high), float(array.mean()), 0.5 * float(array.std()), -1.0, 0.25),
        Normalisation(float(low), float(low), float(low), np.inf),  # constant channel
    ]
    for norm in norms:
        np.testing.assert_array_equal(norm.apply(array.astype(dtype, copy=False)), plain_normalisation(array, norm))


def test_normalisation_rejects_a_reversed_window() -> None:
    with pytest.raises(ValueError, match="scale must be > 0"):
        Normalisation(-np.inf, np.inf, 1000.0, -2000.0, 0.0, 1.0)


def test_slab_resampling_equals_the_monai_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "SLAB_VOXELS", 777)  # many uneven slabs
    spacing = (2.5, 2.0, 3.5)
    reference = preprocessing_transforms("MR", spacing)({"image": str(SMALL_MR)})["image"].numpy()
    np.testing.assert_allclose(
        preprocess_volume(read_volume(SMALL_MR), "MR", spacing).normalised(), reference, atol=1e-5
    )


def monai_augmented(image: np.ndarray, seed: int) -> np.ndarray:
    """``augmentation_transforms()`` on ``image``, every transform drawing from one RandomState."""
    state = np.random.RandomState(seed)
    sample = {"image": torch.from_numpy(image)}
    with _without_meta_tracking():
        for transform in augmentation_transforms():
            transform.set_random_state(state=state)
            sample = transform(sample)
    return np.asarray(sample["image"])


@pytest.mark.parametrize("roi", [(24, 20, 16), (40, 64, 48)])  # inside the scan; larger, so padded
def test_fused_crop_augmentation_equals_the_monai_transforms(roi: tuple[int, int, int]) -> None:
    scan = preprocess_volume(read_volume(SMALL_CT), "CT", None)
    window = scan.array[:, 30 : 30 + roi[0], 20 : 20 + roi[1], 5 : 5 + roi[2]]
    background = scan.background()
    widths = [(0, 0)] + [((r - s) // 2, r - s - (r - s) // 2) for s, r in zip(window.shape[1:], roi, strict=True)]
    padded = np.pad(window, widths, constant_values=background[0])  # the reference: pad, normalise, augment
    augment, seen = CropAugmentation(), set()
    for seed in range(24):
        draw = augment.draw(np.random.RandomState(seed))
        seen.add((draw.flips, draw.gain is None, draw.offset is None))
        ours = render_crop(window, roi, scan.norms, background, draw)
        np.testing.assert_array_equal(ours, monai_augmented(normalise(padded, scan.norms), seed))
    assert len(seen) >= 12  # flips on each axis, with and without scale and shift


def test_crop_augmentation_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        CropAugmentation(flip_prob=1.5)
    with pytest.raises(ValueError, match="scale"):
        CropAugmentation(scale=1.0)


def test_dataset_crops_are_flipped_scaled_and_shifted_copies_of_the_plain_crop(tmp_path: Path) -> None:
    manifest = write_manifest([ScanRecord("mr", [str(SMALL_MR)], modality="MR")], tmp_path / "m.jsonl")
    preprocess_manifest(manifest, tmp_path / "cache", PreprocessParams((3.0, 3.0, 3.0)), progress=False)
    plain = CachedCropDataset(tmp_path / "cache", (16, 16, 8), 8, seed=5)
    augmented = CachedCropDataset(tmp_path / "cache", (16, 16, 8), 8, seed=5, augment=CropAugmentation())
    for index in range(8):
        sample, reference = augmented[index], plain[index]
        assert sample["start"].tolist() == reference["start"].tolist()
        rng = np.random.default_rng([5, 0, index])
        augmented.window("mr", rng)  # the start voxel's draws come first
        draw: AugmentDraw = CropAugmentation().draw(rng)
        expected = reference["image"].numpy()
        expected = np.flip(expected, [axis + 1 for axis, flip in enumerate(draw.flips) if flip])
        expected = expected * np.float32(draw.gain or 1.0) + np.float32(draw.offset or 0.0)
        np.testing.assert_allclose(sample["image"].numpy(), expected, atol=1e-6)
        assert sample["image"].is_contiguous() and sample["image"].dtype == torch.float32


def test_in_memory_crops_are_padded_with_the_background_as_the_cache_pads_them() -> None:
    """A scan smaller than the ROI: the in-memory path pads each channel with its minimum (MR: the dark
    surround after z-scoring, not 0 = the mean), exactly as :func:`render_crop` pads cached scans."""
    scan = preprocess_volume(read_volume(HIPPO), "MR", None)
    roi = tuple(s + extra for s, extra in zip(scan.array.shape[1:], (5, 2, 7)))
    image = torch.from_numpy(scan.normalised())
    assert float(image.min()) < -0.5  # 0 would be the scan's mean, not its background
    ours = centre_crop_transform(roi)({"image": image})["image"]
    cached = render_crop(scan.array, roi, scan.norms, scan.background(), AugmentDraw((False, False, False), None, None))
    np.testing.assert_allclose(np.asarray(ours), cached, atol=1e-6)
