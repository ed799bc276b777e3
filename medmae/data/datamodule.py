"""The pretraining LightningDataModule: manifest → preprocessed volumes → random ROI crops.

Without a cache, each scan is preprocessed once in memory when the DataModule is set up (fine for
hundreds of scans). For archives, run ``medmae preprocess`` and pass ``cache_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from medmae.data.channels import first_scan_channels, keep_channel_count, other_channels_reason
from medmae.data.manifest import ScanRecord, read_manifest
from medmae.data.preprocess import load_record
from medmae.data.transforms import (
    IntensityConfig,
    PadWithBackgroundd,
    augmentation_transforms,
    crop_transforms,
    preprocessing_transforms,
)
from medmae.errors import one_line
from medmae.io.volume import VolumeError

log = logging.getLogger(__name__)


def split_records(records: Sequence[ScanRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split by scan: ``round(val_fraction * n)`` scans (at least 1 when n > 1 and fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = round(val_fraction * len(records))
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def preprocess_records(
    records: Sequence[ScanRecord],
    spacing: Sequence[float] | None,
    intensity: IntensityConfig,
    workers: int = 1,
    base: Path | None = None,
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, str]]]:
    """Preprocess scans in memory; a scan that fails is skipped and reported, never fatal.

    DICOM series records of ``medmae manifest scan`` are read from their listed files (``source`` names or
    positions, relative to ``base``, the manifest's folder), as ``medmae preprocess`` reads them.

    Returns:
        ``[(id, (C, X, Y, Z) float32 tensor)]`` for the scans that worked and ``[(id, reason)]`` for the others.
    """
    pipelines: dict[str, Compose] = {}

    def one(record: ScanRecord) -> tuple[str, torch.Tensor | None, str]:
        if record.modality not in pipelines:
            pipelines[record.modality] = preprocessing_transforms(record.modality, spacing, intensity)
        try:
            source = load_record(record, base) if base is not None and record.info.get("series") else record.image
            image = pipelines[record.modality]({"image": source})["image"]
        except (VolumeError, RuntimeError, ValueError, OSError) as error:
            return record.id, None, one_line(error)
        return record.id, torch.as_tensor(image, dtype=torch.float32).contiguous(), ""

    for record in records:  # build the pipelines once, before threads share them
        if record.modality not in pipelines:
            pipelines[record.modality] = preprocessing_transforms(record.modality, spacing, intensity)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, records))
    volumes = [(scan_id, image) for scan_id, image, _ in results if image is not None]
    skipped = [(scan_id, reason) for scan_id, image, reason in results if image is None]
    for scan_id, reason in skipped:
        log.warning("skipping scan %s: %s", scan_id, reason)
    return volumes, skipped


class CropDataset(Dataset):
    """Random (training) or centred (validation) ROI crops of in-memory preprocessed volumes.

    Args:
        volumes: ``[(id, (C, X, Y, Z) tensor)]``.
        transform: MONAI transform applied to ``{"image": tensor}`` (pad + crop + augmentation).
        length: samples per epoch (default: one per volume); sample ``i`` uses volume ``i % n``.
    """

    def __init__(self, volumes: Sequence[tuple[str, torch.Tensor]], transform: Callable, length: int | None = None):
        if not volumes:
            raise ValueError("no volumes to sample crops from")
        self.volumes = list(volumes)
        self.transform = transform
        self.length = length or len(self.volumes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan_id, image = self.volumes[index % len(self.volumes)]
        sample = self.transform({"image": image})
        image = convert_to_tensor(sample["image"], dtype=torch.float32, track_meta=False)
        return {"image": image, "id": scan_id}


def centre_crop_transform(roi_size: Sequence[int]) -> Compose:
    from monai.transforms import CenterSpatialCropd

    return Compose([PadWithBackgroundd("image", roi_size), CenterSpatialCropd("image", tuple(roi_size))])


class PretrainDataModule(L.LightningDataModule):
    """Crops for MAE pretraining from a manifest, split into train/validation by scan.

    Args:
        manifest: JSON Lines manifest (see ``medmae manifest``).
        roi_size: crop size in voxels ``[X, Y, Z]``; must be a multiple of the model's patch size.
        spacing: target voxel size in mm, or None to keep each scan's spacing.
        batch_size: crops per batch (per device).
        num_workers: DataLoader worker processes.
        samples_per_epoch: training crops per epoch (default: one per training scan, at least one batch).
        val_fraction: fraction of scans held out for validation.
        seed: split seed.
        ct_window: Hounsfield window mapped to ``[0, 1]`` for CT.
        mr_percentiles: percentile clip before the MR z-score.
        preprocess_workers: threads used to preprocess scans at setup.
        cache_dir: a ``medmae preprocess`` cache to read crops from instead of preprocessing in memory. Its
            spacing and normalisation are used (and recorded in checkpoints): ``spacing`` None takes the
            cache's; a ``spacing``, ``ct_window`` or ``mr_percentiles`` other than the cache's is an error.
    """

    def __init__(
        self,
        manifest: str,
        roi_size: list[int] = [96, 96, 96],  # noqa: B006 - LightningCLI needs a literal default
        spacing: list[float] | None = [1.5, 1.5, 1.5],  # noqa: B006
        batch_size: int = 2,
        num_workers: int = 0,
        samples_per_epoch: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        preprocess_workers: int = 2,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if len(roi_size) != 3 or any(int(s) <= 0 for s in roi_size):
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.intensity = IntensityConfig(tuple(ct_window), tuple(mr_percentiles))
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.skipped: list[tuple[str, str]] = []
        self.modalities: list[str] = []  # of the training scans, once set up

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        if hp.cache_dir:
            self._setup_from_cache()
            return
        records = read_manifest(hp.manifest)
        train_records, val_records = split_records(records, hp.val_fraction, hp.seed)
        volumes, self.skipped = preprocess_records(
            records, hp.spacing, self.intensity, hp.preprocess_workers, base=Path(hp.manifest).parent
        )
        found = first_scan_channels(hp.manifest)
        volumes, other_channels = keep_channel_count(volumes, found[0] if found else None)
        self.skipped += other_channels
        if self.skipped:
            log.warning("%d of %d scans skipped; see the warnings above", len(self.skipped), len(records))
        by_id = dict(volumes)
        train = [(r.id, by_id[r.id]) for r in train_records if r.id in by_id]
        self.modalities = sorted({r.modality for r in train_records if r.id in by_id})
        val = [(r.id, by_id[r.id]) for r in val_records if r.id in by_id]
        if not train:
            raise ValueError(f"{hp.manifest}: no training scan could be loaded ({len(self.skipped)} skipped)")
        length = max(hp.samples_per_epoch or len(train), hp.batch_size)
        augment = Compose(crop_transforms(self.roi_size) + augmentation_transforms())
        augment.set_random_state(seed=hp.seed)  # workers are re-seeded by MONAI's DataLoader
        self.train_dataset = CropDataset(train, augment, length)
        self.val_dataset = CropDataset(val, centre_crop_transform(self.roi_size)) if val else None

    def _setup_from_cache(self) -> None:
        """Train/validation crops read from a ``medmae preprocess`` cache, split by scan like the manifest."""
        from medmae.data.cache import CachedCropDataset, list_cached_ids
        from medmae.data.cache_dataset import CropAugmentation
        from medmae.data.cache_store import read_meta

        hp = self.hparams
        self._use_cache_params()
        records = read_manifest(hp.manifest, check_files=False)
        cached = set(list_cached_ids(hp.cache_dir))
        self.skipped = [(r.id, "not in the cache; run `medmae preprocess`") for r in records if r.id not in cached]
        if self.skipped:
            log.warning("%d of %d scans are not in %s and are skipped", len(self.skipped), len(records), hp.cache_dir)
        found = first_scan_channels(hp.manifest, hp.cache_dir)
        for record in records if found else []:
            meta = read_meta(Path(hp.cache_dir), record.id) if record.id in cached else None
            if meta is not None and meta["shape"][0] != found[0]:
                reason = other_channels_reason(meta["shape"][0], found[0])
                log.warning("skipping scan %s: %s", record.id, reason)
                self.skipped.append((record.id, reason))
                cached.discard(record.id)
        train_records, val_records = split_records(records, hp.val_fraction, hp.seed)
        train = [r.id for r in train_records if r.id in cached]
        self.modalities = sorted({r.modality for r in train_records if r.id in cached})
        val = [r.id for r in val_records if r.id in cached]
        if not train:
            raise ValueError(f"{hp.cache_dir}: no training scan of {hp.manifest} is cached; run `medmae preprocess`")
        length = max(hp.samples_per_epoch or len(train), hp.batch_size)
        self.train_dataset = CachedCropDataset(
            hp.cache_dir, self.roi_size, length, train, seed=hp.seed, augment=CropAugmentation()
        )
        self.val_dataset = CachedCropDataset(hp.cache_dir, self.roi_size, None, val, seed=hp.seed) if val else None

    def _use_cache_params(self) -> None:
        """Take the spacing and normalisation the cache was made with, so checkpoints record them.

        Raises:
            ValueError: ``spacing`` (unless None), ``ct_window`` or ``mr_percentiles`` differs from the cache's;
                the cache cannot honour it, so training would silently use another value.
        """
        from medmae.data.cache_store import read_params

        hp = self.hparams
        params = read_params(Path(hp.cache_dir))
        cached = {
            "spacing": params.spacing,
            "ct_window": params.intensity.ct_window,
            "mr_percentiles": params.intensity.mr_percentiles,
        }
        for key, value in cached.items():
            given = hp[key]
            if given is None and key == "spacing":
                continue
            if value is None or not np.allclose(np.asarray(given, float), np.asarray(value, float)):
                shown = [float(v) for v in value] if value is not None else "null"  # --keep-spacing
                raise ValueError(
                    f"{hp.cache_dir}: preprocessed with {key} {shown}, but data.{key} is {list(given)}; "
                    f"set --data.{key} to {shown}{' (or null)' if key == 'spacing' and value is not None else ''} "
                    f"or run `medmae preprocess` again with the value you want"
                )
        hp.spacing = [float(v) for v in params.spacing] if params.spacing is not None else None
        self.intensity = params.intensity

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle and self.hparams.cache_dir:  # encodes the epoch so cached crops differ per epoch
            from medmae.data.cache import EpochSampler

            sampler, shuffle = EpochSampler(len(dataset), shuffle=True, seed=self.hparams.seed), False
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.hparams.num_workers > 0,
            drop_last=shuffle and len(dataset) >= self.hparams.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset is not None else []
