"""MONAI dictionary-transform pipelines: load → RAS → spacing → per-modality normalisation → crops.

The deterministic part (:func:`preprocessing_transforms`) is what the preprocessing cache stores;
the random part (:func:`crop_transforms`, :func:`augmentation_transforms`) runs every time a sample is drawn.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)

from medmae.io.readers import read_volume
from medmae.io.volume import Volume, VolumeError, grid_text, reorder_axes


@dataclass(frozen=True)
class IntensityConfig:
    """Per-modality intensity normalisation.

    Args:
        ct_window: Hounsfield window mapped linearly onto ``[0, 1]`` (values outside are clipped).
        mr_percentiles: percentiles each MR channel is clipped to before its z-score.
    """

    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)


def row_quantiles(rows: torch.Tensor, levels: Sequence[float]) -> torch.Tensor:
    """Quantiles ``levels`` (fractions) of each row of ``(R, N)``, float32 ``(len(levels), R)``.

    ``torch.quantile`` refuses inputs of more than 2**24 elements: rows go one at a time, and rows longer
    than 4 M are strided (exact enough for intensity percentiles).
    """
    sample = rows[:, :: max(1, rows.shape[1] // 4_000_000)].float()
    fractions = torch.tensor(list(levels), dtype=sample.dtype, device=sample.device)
    return torch.stack([torch.quantile(row, fractions) for row in sample], dim=1)


def robust_zscore(image: torch.Tensor, lower: float = 0.5, upper: float = 99.5) -> torch.Tensor:
    """Clip each channel to its ``[lower, upper]`` percentiles, then z-score it.

    Args:
        image: ``(C, *spatial)``.

    Returns:
        float32 tensor of the same shape; a constant channel becomes all zeros.
    """
    flat = image.reshape(image.shape[0], -1).float()
    low, high = row_quantiles(flat, (lower / 100.0, upper / 100.0))
    clipped = torch.maximum(torch.minimum(flat, high[:, None]), low[:, None])
    mean = clipped.mean(dim=1, keepdim=True)
    std = clipped.std(dim=1, keepdim=True)
    normalised = torch.where(std > 1e-8, (clipped - mean) / std.clamp_min(1e-8), torch.zeros_like(clipped))
    return normalised.reshape(image.shape)


class RobustZScored(MapTransform):
    """Dictionary wrapper of :func:`robust_zscore` (MR normalisation)."""

    def __init__(self, keys: KeysCollection, lower: float = 0.5, upper: float = 99.5) -> None:
        super().__init__(keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            normalised = robust_zscore(torch.as_tensor(image), self.lower, self.upper)
            out[key] = MetaTensor(normalised, meta=image.meta) if isinstance(image, MetaTensor) else normalised
        return out


class LoadVolumed(MapTransform):
    """Load the paths under ``keys`` with :func:`medmae.io.read_volume` as channel-first MetaTensors.

    A :class:`~medmae.io.volume.Volume` already read (e.g. a DICOM series of a manifest) is used as it is.
    A list of paths is stacked as channels (they must share one grid). Label keys must be on the grid
    of ``reference_key``. Non-finite voxels are replaced by the volume's finite minimum.
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", dtype: torch.dtype = torch.float32):
        super().__init__(keys)
        self.reference_key = reference_key
        self.dtype = dtype

    def _load(self, paths: str | Sequence[str] | Volume) -> MetaTensor:
        if isinstance(paths, Volume):
            volumes, paths = [paths], [paths.name]
        else:
            paths = [paths] if isinstance(paths, str) else list(paths)
            volumes = [read_volume(p) for p in paths]
        for other in volumes[1:]:
            if not other.same_grid(volumes[0]):
                raise VolumeError(
                    f"{other.path}: channel is on another grid than {volumes[0].path} "
                    f"(shape {other.spatial_shape} vs {volumes[0].spatial_shape}); channels must be co-registered"
                )
        # one pass: float32 conversion and C order together (MONAI's resampling copies strided input again)
        if len(volumes) == 1:
            array = np.ascontiguousarray(volumes[0].array, dtype=np.float32)
        else:
            array = np.concatenate([v.array for v in volumes], axis=0, dtype=np.float32)
        if any(v.dtype.kind == "f" for v in volumes) and not np.all(np.isfinite(array)):
            finite = array[np.isfinite(array)]
            if finite.size == 0:
                raise VolumeError(f"{paths[0]}: every voxel is NaN or Inf")
            array = np.nan_to_num(
                array, nan=float(finite.min()), posinf=float(finite.max()), neginf=float(finite.min())
            )
        meta = {"filename_or_obj": paths[0], "original_affine": volumes[0].affine.copy()}
        return MetaTensor(torch.from_numpy(array).to(self.dtype), affine=torch.as_tensor(volumes[0].affine), meta=meta)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self._load(out[key])
        if self.reference_key in out:
            for key in self.key_iterator(out):
                if key != self.reference_key:
                    out[key] = self._on_grid(out[key], out[self.reference_key], key)
        return out

    @staticmethod
    def _on_grid(volume: MetaTensor, reference: MetaTensor, key: str) -> MetaTensor:
        """``volume`` in ``reference``'s voxel order: as it is, or with axes flipped/permuted when it covers the
        same voxels in another order (no interpolation); any other grid is an error naming both grids."""
        shape, affine, target = tuple(reference.shape[1:]), volume.affine.numpy(), reference.affine.numpy()
        if tuple(volume.shape[1:]) == shape and np.allclose(affine, target, atol=1e-3):
            return volume
        array, aligned = reorder_axes(volume.numpy(), affine, target)
        if tuple(array.shape[1:]) == shape and np.allclose(aligned, target, atol=1e-3):
            array = torch.from_numpy(np.ascontiguousarray(array))
            return MetaTensor(array, affine=torch.as_tensor(aligned), meta=dict(volume.meta))
        raise VolumeError(
            f"{volume.meta['filename_or_obj']}: {key} is on another grid than its image "
            f"{reference.meta['filename_or_obj']} ({grid_text(volume.shape[1:], affine)} vs "
            f"{grid_text(reference.shape[1:], target)}); resample it onto the image grid"
        )


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Foreground for cropping: voxels clearly above each channel's minimum. ``image``: ``(C, *spatial)``."""
    flat = image.reshape(image.shape[0], -1)
    low = flat.min(dim=1).values
    span = (flat.max(dim=1).values - low).clamp_min(1e-6)
    threshold = (low + 1e-3 * span).reshape(-1, *([1] * (image.ndim - 1)))
    return image > threshold


def normalisation_transform(keys: KeysCollection, modality: str, intensity: IntensityConfig) -> Transform:
    """CT: Hounsfield window to ``[0, 1]``; anything else: robust percentile clip + z-score."""
    if modality == "CT":
        low, high = intensity.ct_window
        return ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return RobustZScored(keys, *intensity.mr_percentiles)


def preprocessing_transforms(
    modality: str,
    spacing: Sequence[float] | None,
    intensity: IntensityConfig = IntensityConfig(),
    label_key: str | None = None,
    crop_foreground: bool = True,
) -> Compose:
    """Deterministic steps: load, reorient to RAS, resample, normalise, crop to foreground.

    Args:
        modality: ``"CT"`` or ``"MR"`` (anything not CT is normalised like MR).
        spacing: target voxel size in mm, or None to keep each scan's own spacing.
        intensity: normalisation parameters.
        label_key: also load/resample this key (nearest neighbour), e.g. ``"label"``.
        crop_foreground: crop to the bounding box of the foreground.
    """
    keys = ["image"] + ([label_key] if label_key else [])
    steps: list[Transform] = [
        LoadVolumed(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if spacing is not None:
        modes = ["bilinear"] + (["nearest"] if label_key else [])
        steps.append(Spacingd(keys, pixdim=tuple(spacing), mode=modes))
    steps.append(normalisation_transform("image", modality, intensity))
    if crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", select_fn=foreground, allow_smaller=True))
    steps.append(EnsureTyped(keys, track_meta=False))
    return Compose(steps)


class PadWithBackgroundd(MapTransform):
    """Pad ``(C, X, Y, Z)`` images symmetrically to at least ``spatial_size``, each channel with its own minimum.

    The minimum is the scan's background (air in CT, the dark surround in MR after normalisation), which is
    what the preprocessed cache pads with; MONAI's ``SpatialPadd`` would pad with 0, which is the *mean* of a
    z-scored MR scan.
    """

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int]) -> None:
        super().__init__(keys)
        self.spatial_size = tuple(spatial_size)
        self.pad = SpatialPadd("image", spatial_size=self.spatial_size, mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if all(size >= roi for size, roi in zip(image.shape[1:], self.spatial_size)):
                continue
            background = image.amin(dim=(1, 2, 3), keepdim=True)
            out[key] = self.pad({"image": image - background})["image"] + background
        return out


def crop_transforms(roi_size: Sequence[int], keys: Sequence[str] = ("image",)) -> list[Transform]:
    """Pad to at least ``roi_size`` with the background and take one random crop of exactly ``roi_size``."""
    return [
        PadWithBackgroundd(list(keys), roi_size),
        RandSpatialCropd(list(keys), roi_size=tuple(roi_size), random_size=False),
    ]


# The augmentation of training crops; :class:`medmae.data.cache_dataset.CropAugmentation` does the same in one pass.
FLIP_PROB = 0.5  # per spatial axis
INTENSITY_SCALE = 0.1  # x * (1 + U(-0.1, 0.1)) with probability INTENSITY_PROB
INTENSITY_SHIFT = 0.1  # x + U(-0.1, 0.1) with probability INTENSITY_PROB
INTENSITY_PROB = 0.5


def augmentation_transforms(keys: Sequence[str] = ("image",), image_key: str = "image") -> list[Transform]:
    """Light augmentation applied after cropping: flips and small intensity scale/shift."""
    return [
        RandFlipd(list(keys), prob=FLIP_PROB, spatial_axis=0),
        RandFlipd(list(keys), prob=FLIP_PROB, spatial_axis=1),
        RandFlipd(list(keys), prob=FLIP_PROB, spatial_axis=2),
        RandScaleIntensityd(image_key, factors=INTENSITY_SCALE, prob=INTENSITY_PROB),
        RandShiftIntensityd(image_key, offsets=INTENSITY_SHIFT, prob=INTENSITY_PROB),
    ]
