"""The preprocessing cache: same values as the MONAI pipeline, exact crops, resumable, failures skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from monai.transforms import Compose

from medmae.data.cache import CachedCropDataset, EpochSampler, PreprocessParams, list_cached_ids, preprocess_manifest
from medmae.data.cache_store import write_params
from medmae.data.datamodule import PretrainDataModule
from medmae.data.manifest import ScanRecord, write_manifest
from medmae.data.preprocess import load_record, preprocess_volume
from medmae.data.transforms import IntensityConfig, augmentation_transforms, preprocessing_transforms
from medmae.io import read_volume
from tests.corpus_ingest import DATA, SMALL_CT, SMALL_MR

HIPPO = sorted((DATA / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:3]
PARAMS = PreprocessParams(spacing=(3.0, 3.0, 3.0))


@pytest.mark.parametrize(("path", "modality"), [(SMALL_CT, "CT"), (SMALL_MR, "MR"), (HIPPO[0], "MR")])
def test_fast_preprocessing_equals_the_monai_pipeline(path: Path, modality: str) -> None:
    spacing = (2.5, 2.0, 3.5)
    reference = preprocessing_transforms(modality, spacing)({"image": str(path)})["image"].numpy()
    ours = preprocess_volume(read_volume(path), modality, spacing).normalised()
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_unresampled_integer_scans_are_stored_in_their_own_dtype() -> None:
    scan = preprocess_volume(read_volume(HIPPO[0]), "MR", None)
    assert scan.array.dtype == np.uint8


@pytest.fixture()
def manifest(tmp_path: Path) -> Path:
    records = [ScanRecord("ct", [str(SMALL_CT)], modality="CT"), ScanRecord("mr", [str(SMALL_MR)], modality="MR")]
    records += [ScanRecord(p.name.split(".")[0], [str(p)], modality="MR") for p in HIPPO]
    return write_manifest(records, tmp_path / "m.jsonl")


def test_cached_crops_equal_crops_of_the_directly_preprocessed_volume(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    report = preprocess_manifest(manifest, cache, PARAMS, workers=2, progress=False)
    assert report["built"] == 5 and report["failed"] == []
    dataset = CachedCropDataset(cache, (24, 24, 8), samples_per_epoch=10, ids=["ct", "mr"], seed=3)
    for index in range(4):
        sample = dataset[index]
        path = SMALL_CT if sample["id"] == "ct" else SMALL_MR
        direct = preprocess_volume(read_volume(path), sample["id"].upper(), PARAMS.spacing).normalised()
        x, y, z = sample["start"].tolist()
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (1, 24, 24, 8)
        np.testing.assert_array_equal(sample["image"].numpy(), direct[:, x : x + 24, y : y + 24, z : z + 8])
    assert [dataset[i]["start"].tolist() for i in range(3)] != [dataset[i + 2]["start"].tolist() for i in range(3)]


def test_small_scans_are_padded_with_their_background(manifest: Path, tmp_path: Path) -> None:
    preprocess_manifest(manifest, tmp_path / "cache", PARAMS, progress=False)
    hippo_id = HIPPO[0].name.split(".")[0]
    sample = CachedCropDataset(tmp_path / "cache", (32, 32, 32), ids=[hippo_id])[0]
    direct = preprocess_volume(read_volume(HIPPO[0]), "MR", PARAMS.spacing).normalised()
    shape = direct.shape[1:]
    before = [(32 - s) // 2 for s in shape]
    inner = sample["image"][0, before[0] : before[0] + shape[0], before[1] : before[1] + shape[1]]
    np.testing.assert_array_equal(inner[..., before[2] : before[2] + shape[2]].numpy(), direct[0])
    assert float(sample["image"][0, 0, 0, 0]) == pytest.approx(float(direct.min()))


def test_preprocess_resumes_and_rebuilds_when_parameters_change(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    preprocess_manifest(manifest, cache, PARAMS, progress=False)
    again = preprocess_manifest(manifest, cache, PARAMS, progress=False)
    assert (again["built"], again["reused"]) == (0, 5)
    other = PreprocessParams(spacing=(3.0, 3.0, 3.0), intensity=IntensityConfig(ct_window=(-500.0, 500.0)))
    assert other.fingerprint() != PARAMS.fingerprint()
    rebuilt = preprocess_manifest(manifest, cache, other, progress=False)
    assert (rebuilt["built"], rebuilt["reused"]) == (5, 0)
    assert json.loads((cache / "cache.json").read_text())["fingerprint"] == other.fingerprint()


def test_a_failing_scan_is_reported_and_the_others_are_cached(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + bytes(100))
    records = [ScanRecord("ct", [str(SMALL_CT)], modality="CT"), ScanRecord("broken", [str(broken)])]
    report = preprocess_manifest(write_manifest(records, tmp_path / "m.jsonl"), tmp_path / "c", PARAMS, progress=False)
    assert report["built"] == 1 and [f["id"] for f in report["failed"]] == ["broken"]
    assert list_cached_ids(tmp_path / "c") == ["ct"]


def test_an_unreadable_cached_scan_is_skipped_at_training_time(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    preprocess_manifest(manifest, cache, PARAMS, progress=False)
    (cache / "scans" / "mr.npy").write_bytes(b"garbage")
    dataset = CachedCropDataset(cache, (16, 16, 8), ids=["ct", "mr"])
    with pytest.warns(RuntimeWarning, match="skipping scan mr"):
        ids = [dataset[i]["id"] for i in range(2)]
    assert ids == ["ct", "ct"] and "mr" in dataset.skipped


def test_crops_are_reproducible_whatever_the_worker(manifest: Path, tmp_path: Path) -> None:
    preprocess_manifest(manifest, tmp_path / "cache", PARAMS, progress=False)
    augment = Compose(augmentation_transforms())
    dataset = CachedCropDataset(tmp_path / "cache", (16, 16, 8), 6, transform=augment, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, sampler=EpochSampler(6, seed=1))
    batches = torch.cat([batch["image"] for batch in loader])
    order = list(EpochSampler(6, seed=1))
    alone = CachedCropDataset(tmp_path / "cache", (16, 16, 8), 6, transform=augment, seed=1)
    torch.testing.assert_close(batches, torch.stack([alone[i]["image"] for i in order]))


def test_ddp_shards_cover_every_sample_once_per_epoch() -> None:
    for epoch in range(2):
        seen = []
        for rank in range(3):  # each rank holds its own sampler, as in a DDP process; Lightning sets the epoch
            wrapper = DistributedSamplerWrapper(EpochSampler(12, seed=0), num_replicas=3, rank=rank, shuffle=False)
            wrapper.set_epoch(epoch)
            seen.append(list(wrapper))
        flat = [i for part in seen for i in part]
        assert sorted(flat) == [epoch * 12 + i for i in range(12)]


def test_datamodule_reads_training_crops_from_the_cache(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    preprocess_manifest(manifest, cache, PARAMS, progress=False)
    shutil.rmtree(cache / "scans" / "mr.npy", ignore_errors=True)
    settings = {"roi_size": [16, 16, 16], "batch_size": 2, "val_fraction": 0.2, "cache_dir": str(cache)}
    with pytest.raises(ValueError, match=r"preprocessed with spacing \[3.0, 3.0, 3.0\], but data.spacing"):
        PretrainDataModule(str(manifest), spacing=[1.5, 1.5, 1.5], **settings).setup("fit")  # not silently 3 mm
    kept = tmp_path / "kept_spacing"  # `medmae preprocess --keep-spacing`: the fix is null, not "None"
    write_params(kept, PreprocessParams(spacing=None))
    with pytest.raises(
        ValueError, match=r"spacing null, but data.spacing is \[1.5, 1.5, 1.5\]; set --data.spacing to null or"
    ):
        PretrainDataModule(str(manifest), **{**settings, "cache_dir": str(kept)}).setup("fit")
    data = PretrainDataModule(str(manifest), spacing=None, **settings)
    data.setup("fit")
    assert data.hparams.spacing == [3.0, 3.0, 3.0]  # what checkpoints record, for repair and export
    assert isinstance(data.train_dataset, CachedCropDataset)
    assert len(data.train_dataset.ids) + len(data.val_dataset.ids) == 5
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["image"].dtype == torch.float32


def test_load_record_stacks_channels(tmp_path: Path) -> None:
    record = ScanRecord("two", [str(SMALL_MR), str(SMALL_MR)], modality="MR")
    assert load_record(record, tmp_path).array.shape == (2, 117, 91, 20)
