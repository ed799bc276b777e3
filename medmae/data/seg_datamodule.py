"""The segmentation LightningDataModule: a labelled manifest → fixed test split, validation split, and a
seeded subset of ``num_labeled`` training scans → label-aware random crops and whole validation volumes.

Splits are made by scan. The test split depends only on ``split_seed`` (so it is the same for every
``num_labeled`` and every ``seed``); the validation split is drawn from the rest with ``split_seed`` too;
``seed`` picks which ``num_labeled`` scans of the remaining pool are labelled. A scan that cannot be loaded
(unreadable image, label map on another grid or with non-integer values...) is skipped and reported, and a
skipped training scan is replaced by another of the pool.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import DataLoader
from monai.transforms import Compose, RandAffined, RandCropByPosNegLabeld, SpatialPadd
from torch.utils.data import Dataset

from medmae.data.channels import first_scan_channels, keep_channel_count
from medmae.data.datamodule import split_records
from medmae.data.manifest import ScanRecord, read_manifest
from medmae.data.transforms import IntensityConfig, augmentation_transforms, preprocessing_transforms
from medmae.errors import SCAN_ERRORS, one_line
from medmae.io.volume import VolumeError

log = logging.getLogger(__name__)

KEYS = ("image", "label")


@dataclass(frozen=True)
class SegSplits:
    """Scans for training (the labelled subset), validation and the held-out test set."""

    train: list[ScanRecord]
    val: list[ScanRecord]
    test: list[ScanRecord]
    pool: list[ScanRecord]  # every non-test, non-validation scan the labelled subset is drawn from


def seg_splits(
    records: Sequence[ScanRecord],
    test_fraction: float,
    val_fraction: float,
    num_labeled: int | None,
    split_seed: int = 0,
    seed: int = 0,
) -> SegSplits:
    """Split labelled records into test / validation / pool and draw ``num_labeled`` training scans.

    Args:
        records: records with a ``label``.
        test_fraction: fraction of all scans held out for testing (fixed by ``split_seed``).
        val_fraction: fraction of the non-test scans used for validation (fixed by ``split_seed``).
        num_labeled: training scans drawn from the pool with ``seed``; None takes the whole pool.
    """
    rest, test = split_records(records, test_fraction, split_seed)
    pool, val = split_records(rest, val_fraction, split_seed + 1)
    if num_labeled is None:
        return SegSplits(list(pool), val, test, list(pool))
    if not 1 <= num_labeled <= len(pool):
        raise ValueError(
            f"num_labeled={num_labeled} but the training pool has {len(pool)} labelled scans "
            f"({len(test)} test, {len(val)} validation); use 1 .. {len(pool)} or null for all"
        )
    chosen = np.random.default_rng(seed).choice(len(pool), size=num_labeled, replace=False)
    return SegSplits([pool[i] for i in sorted(chosen)], val, test, list(pool))


def check_label(label: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    """Validate a ``(1, X, Y, Z)`` label map holds integers in ``[0, num_classes)``; returns it as int64."""
    rounded = torch.round(label)
    if not torch.allclose(rounded, label, atol=1e-3):
        raise VolumeError(f"{where}: label map has non-integer values; labels must be integer class ids")
    values = torch.unique(rounded).long()
    bad = [int(v) for v in values if not 0 <= v < num_classes]
    if bad:
        hint = (
            f"at least {bad[-1] + 1} for label values up to {bad[-1]}"
            if bad[0] >= 0
            else "negative values are not class ids"
        )
        raise VolumeError(
            f"{where}: label values {short_list(bad)} are outside 0 .. {num_classes - 1} (num_classes={num_classes}); "
            f"set --data.num_classes and --model.num_classes to the number of classes including background "
            f"({hint}; values are class ids, gaps allowed)"
        )
    return rounded.to(torch.int64)


def run_pipeline(pipeline: Compose, data: dict[str, Any], where: str) -> dict[str, Any]:
    """Apply a MONAI pipeline, re-raising the medmae error MONAI wraps in a RuntimeError as itself."""
    try:
        return pipeline(data)
    except RuntimeError as error:
        cause = error.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        raise VolumeError(f"{where}: preprocessing failed ({str(cause or error).splitlines()[0]})") from None


def load_labelled(
    records: Sequence[ScanRecord],
    spacing: Sequence[float] | None,
    intensity: IntensityConfig,
    num_classes: int,
    workers: int = 1,
) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], list[tuple[str, str]]]:
    """Load, reorient, resample and normalise image + label in memory; a scan that fails is skipped.

    Returns:
        ``[(id, (C, X, Y, Z) float32 image, (1, X, Y, Z) int64 label)]`` for the scans that worked, and
        ``[(id, reason)]`` for the others (image unreadable or without signal, label unreadable, on another
        grid, with non-integer values or values outside the classes: the reason names the file).

    Raises:
        VolumeError: a record has no label.
    """
    unlabelled = [r.id for r in records if r.label is None]
    if unlabelled:
        raise VolumeError(f"scans without a 'label' in the manifest: {unlabelled[:5]}; segmentation needs labels")
    pipelines = {
        m: preprocessing_transforms(m, spacing, intensity, label_key="label") for m in {r.modality for r in records}
    }

    def one(record: ScanRecord) -> tuple[str, torch.Tensor | None, torch.Tensor | str]:
        try:
            sample = run_pipeline(
                pipelines[record.modality], {"image": record.image, "label": record.label}, record.image[0]
            )
            label = check_label(torch.as_tensor(sample["label"]), num_classes, str(record.label))
        except SCAN_ERRORS as error:
            return record.id, None, one_line(error)
        return record.id, torch.as_tensor(sample["image"], dtype=torch.float32).contiguous(), label.contiguous()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, records))
    skipped = [(scan_id, reason) for scan_id, image, reason in results if image is None]
    for scan_id, reason in skipped:
        log.warning("skipping scan %s: %s", scan_id, reason)
    return [(scan_id, image, label) for scan_id, image, label in results if image is not None], skipped


def preprocess_labelled(
    records: Sequence[ScanRecord],
    spacing: Sequence[float] | None,
    intensity: IntensityConfig,
    num_classes: int,
    workers: int = 1,
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """:func:`load_labelled` for scans that must all load.

    Raises:
        VolumeError: a scan has no label, cannot be read, its label is on another grid, or has values outside
            the classes (the first failure's reason).
    """
    volumes, skipped = load_labelled(records, spacing, intensity, num_classes, workers)
    if skipped:
        raise VolumeError(skipped[0][1])
    return volumes


def report_classes(volumes: Sequence[tuple[str, torch.Tensor, torch.Tensor]], num_classes: int) -> list[int]:
    """Log the label values of the training volumes; warn about classes ``1 .. num_classes-1`` none of them has.

    Returns:
        The absent classes (a too large ``num_classes``, or classes these few scans do not show).
    """
    found = sorted({int(v) for _, _, label in volumes for v in torch.unique(label)})
    absent = sorted(set(range(1, num_classes)) - set(found))
    log.info("label values in the %d training scans: %s (num_classes=%d)", len(volumes), found, num_classes)
    if absent:
        hint = (
            f"; num_classes={num_classes} but the largest label value is {found[-1]}"
            if found[-1] + 1 < num_classes
            else ""
        )
        log.warning(
            "%d of the %d foreground classes occur in no training label (%s): they cannot be learned%s",
            len(absent),
            num_classes - 1,
            short_list(absent),
            hint,
        )
    return absent


def short_list(values: Sequence[int], limit: int = 10) -> str:
    """``[1, 2, 3]`` or, past ``limit`` values, ``[1, 2, ..., 117] (42 values)``."""
    if len(values) <= limit:
        return str(list(values))
    return f"[{', '.join(map(str, values[: limit - 1]))}, ..., {values[-1]}] ({len(values)} values)"


class LabelledVolumes(Dataset):
    """Labelled volumes, each passed through ``transform`` (random crops) or returned whole (validation).

    Args:
        volumes: ``[(id, (C, X, Y, Z) image, (1, X, Y, Z) label)]``.
        transform: MONAI transform on ``{"image", "label"}``, or None to return whole volumes.
        length: samples per epoch (default one per volume); sample ``i`` uses volume ``i % n``.
    """

    def __init__(
        self,
        volumes: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
        transform: Compose | None,
        length: int | None = None,
    ):
        if not volumes:
            raise ValueError("no labelled volumes to sample from")
        self.volumes = list(volumes)
        self.transform = transform
        self.length = length or len(self.volumes)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan_id, image, label = self.volumes[index % len(self.volumes)]
        sample: Any = {"image": image, "label": label}
        if self.transform is not None:
            sample = self.transform(sample)
            sample = sample[0] if isinstance(sample, list) else sample
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        return {
            "image": image.as_tensor() if hasattr(image, "as_tensor") else image,
            "label": torch.as_tensor(sample["label"]).long(),
            "id": scan_id,
        }


def training_crops(roi_size: Sequence[int], pos_fraction: float, affine_prob: float) -> Compose:
    """Pad to the ROI, crop around a foreground (``pos_fraction`` of the time) or background voxel, augment."""
    roi = tuple(int(s) for s in roi_size)
    steps: list[Any] = [
        SpatialPadd(KEYS, spatial_size=roi, mode="constant"),
        RandCropByPosNegLabeld(KEYS, "label", roi, pos=pos_fraction, neg=1.0 - pos_fraction, num_samples=1),
    ]
    if affine_prob > 0:
        steps.append(
            RandAffined(
                KEYS,
                prob=affine_prob,
                rotate_range=(0.26, 0.26, 0.26),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    return Compose(steps + augmentation_transforms(KEYS))


class SegDataModule(L.LightningDataModule):
    """Labelled scans for fine-tuning a segmentation model.

    Args:
        manifest: JSON Lines manifest whose records have ``label`` (see ``medmae manifest``).
        num_classes: classes including background; every label value must be in ``0 .. num_classes-1``.
        num_labeled: labelled training scans drawn with ``seed`` (None: every non-test, non-validation scan).
        roi_size: training crop and sliding-window size ``[X, Y, Z]``; a multiple of the model's patch size.
        spacing: target voxel size in mm, or None to keep each scan's spacing.
        batch_size: crops per training batch.
        samples_per_epoch: training crops per epoch (default: 8 per labelled scan, at least one batch).
        pos_fraction: fraction of crops centred on a foreground voxel.
        affine_prob: probability of a small random rotation/scaling of a crop.
        test_fraction: scans held out for testing, fixed by ``split_seed``; never used for training.
        val_fraction: fraction of the non-test scans used for validation (best checkpoint by Dice).
        split_seed: seed of the test and validation splits.
        seed: seed of the labelled subset and of the augmentation.
        num_workers: DataLoader worker processes.
        ct_window: Hounsfield window mapped to ``[0, 1]`` for CT.
        mr_percentiles: percentile clip before the MR z-score.
        preprocess_workers: threads used to preprocess scans at setup.
    """

    def __init__(
        self,
        manifest: str,
        num_classes: int,
        num_labeled: int | None = None,
        roi_size: list[int] = [96, 96, 96],  # noqa: B006 - LightningCLI needs a literal default
        spacing: list[float] | None = [1.5, 1.5, 1.5],  # noqa: B006
        batch_size: int = 2,
        samples_per_epoch: int | None = None,
        pos_fraction: float = 0.67,
        affine_prob: float = 0.2,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        preprocess_workers: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if len(roi_size) != 3 or any(int(s) <= 0 for s in roi_size):
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one structure), got {num_classes}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {pos_fraction}")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.num_classes = num_classes
        self.intensity = IntensityConfig(tuple(ct_window), tuple(mr_percentiles))
        self.splits: SegSplits | None = None
        self.skipped: list[tuple[str, str]] = []  # (scan id, reason) of the scans that could not be loaded
        self._channels: int | None = None  # channels of the manifest's first readable scan (None: keep every scan)
        self.modality = "MR"
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        records = [r for r in read_manifest(hp.manifest) if r.label is not None]
        if not records:
            raise ValueError(f"{hp.manifest}: no record has a 'label'; segmentation fine-tuning needs labelled scans")
        self.splits = seg_splits(records, hp.test_fraction, hp.val_fraction, hp.num_labeled, hp.split_seed, hp.seed)
        found = first_scan_channels(hp.manifest)
        self._channels = found[0] if found else None
        train, val = self._load_splits(self.splits)
        self.modality = Counter(r.modality for r in self.splits.train).most_common(1)[0][0]
        log.info(
            "segmentation splits: %d labelled training, %d validation, %d test scans",
            len(self.splits.train),
            len(self.splits.val),
            len(self.splits.test),
        )
        length = max(hp.samples_per_epoch or 8 * len(train), hp.batch_size)
        transform = training_crops(self.roi_size, hp.pos_fraction, hp.affine_prob)
        transform.set_random_state(seed=hp.seed)
        self.train_dataset = LabelledVolumes(train, transform, length)
        self.val_dataset = LabelledVolumes(val, None) if val else None

    def _load(self, records: Sequence[ScanRecord]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        hp = self.hparams
        volumes, skipped = load_labelled(records, hp.spacing, self.intensity, self.num_classes, hp.preprocess_workers)
        volumes, other_channels = keep_channel_count(volumes, self._channels)
        self.skipped += skipped + other_channels
        return volumes

    def _load_splits(self, splits: SegSplits) -> tuple[list, list]:
        """The training and validation volumes of ``splits``; a scan that fails is skipped and reported.

        A failed training scan is replaced by another scan of the pool (in an order fixed by ``seed``), so that
        ``num_labeled`` scans are trained on while the pool allows; ``self.splits`` becomes the scans loaded.
        """
        hp = self.hparams
        volumes = self._load(splits.train + splits.val)
        loaded = {volume[0]: volume for volume in volumes}
        train = [loaded[r.id] for r in splits.train if r.id in loaded]
        val = [loaded[r.id] for r in splits.val if r.id in loaded]
        chosen = {r.id for r in splits.train}
        spares = [splits.pool[i] for i in np.random.default_rng(hp.seed).permutation(len(splits.pool))]
        for record in (r for r in spares if r.id not in chosen):
            if len(train) >= len(splits.train):
                break
            train += self._load([record])
        if self.skipped:
            log.warning(
                "%d scan(s) skipped (reasons above); training on %d labelled scans", len(self.skipped), len(train)
            )
        if not train:
            raise ValueError(f"{hp.manifest}: no labelled training scan could be loaded: {self.skipped[0][1]}")
        report_classes(train, self.num_classes)
        by_id = {r.id: r for r in splits.pool}
        self.splits = replace(splits, train=[by_id[v[0]] for v in train], val=[r for r in splits.val if r.id in loaded])
        return train, val

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            self.train_dataset,
            batch_size=hp.batch_size,
            shuffle=True,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=1, num_workers=self.hparams.num_workers)
