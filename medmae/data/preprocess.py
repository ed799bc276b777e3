"""Preprocess one scan the way :func:`medmae.data.transforms.preprocessing_transforms` does, several times faster.

Same steps and the same output grid (MONAI's own grid arithmetic is called): reorient to RAS, resample to
the target spacing, normalise per modality, crop to the foreground. Two things make it fast: the resampling
is separable (three 1-D linear passes instead of a 3-D ``grid_sample``; for an axis-aligned grid the result is
the same trilinear interpolation), and the stored array stays in source units and, when nothing was
interpolated, in the source's integer dtype. The intensity normalisation is kept as per-channel constants
(:class:`Normalisation`) and applied to each crop, which gives the same values as normalising the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import compute_shape_offset, zoom_affine

from medmae.data.manifest import ScanRecord
from medmae.data.privacy import follow_positions, hide_names
from medmae.data.transforms import IntensityConfig, foreground, row_quantiles
from medmae.io.readers import Budget, check_series_budget, read_volume
from medmae.io.volume import Volume, VolumeError

SLAB_VOXELS = 1 << 18  # resampling works on slabs of this many output voxels (1 MB of float32), cache-resident


@dataclass(frozen=True)
class Normalisation:
    """Per-channel ``y = clip((clip(x, lower, upper) - shift) / scale, out_low, out_high)`` (float32).

    ``scale`` must be positive (``inf`` turns a constant channel into zeros).
    """

    lower: float
    upper: float
    shift: float
    scale: float
    out_low: float = -np.inf
    out_high: float = np.inf

    def __post_init__(self) -> None:
        if not self.scale > 0 or not self.lower <= self.upper or not self.out_low <= self.out_high:
            raise ValueError(
                f"invalid intensity normalisation {self}: scale must be > 0 (e.g. a CT window low < high), "
                "lower <= upper and out_low <= out_high"
            )

    def bounds(self) -> tuple[np.float32, np.float32]:
        """Where ``y`` is clipped once the shift and scaling are done: both clips of the formula in one.

        Float32 rounding is monotone, so ``fl(clip(x, l, u) - s) == clip(fl(x - s), fl(l - s), fl(u - s))``
        and likewise for the scaling: one clip after them gives exactly the two clips' float32 values.
        """
        f, inverse = np.float32, np.float32(1.0 / self.scale)
        low = f(-np.inf) if self.lower == -np.inf else (f(self.lower) - f(self.shift)) * inverse
        high = f(np.inf) if self.upper == np.inf else (f(self.upper) - f(self.shift)) * inverse
        out_low, out_high = f(self.out_low), f(self.out_high)
        return min(max(low, out_low), out_high), min(max(high, out_low), out_high)

    def apply(
        self, array: np.ndarray, out: np.ndarray | None = None, gain: float | None = None, offset: float | None = None
    ) -> np.ndarray:
        """``array`` (any shape, any dtype, any strides) → float32 ``y``, then ``y * gain + offset`` when given.

        Three passes over the data (copy-and-shift, scale, clip), in place in ``out`` when given. The division
        is a multiplication by the float32 reciprocal (within one float32 rounding of dividing; ~7x faster).
        ``gain`` and ``offset`` are the random intensity scale (``1 + factor``) and shift of
        ``augmentation_transforms()``, applied as MONAI does (float32 multiply, then add).
        """
        f = np.float32
        out = np.empty(np.shape(array), dtype=f) if out is None else out
        np.subtract(array, f(self.shift), out=out, dtype=f, casting="unsafe")
        np.multiply(out, f(1.0 / self.scale), out=out)
        low, high = self.bounds()
        if np.isfinite(low) or np.isfinite(high):
            np.clip(out, low, high, out=out)
        if gain is not None:
            np.multiply(out, f(gain), out=out)
        if offset is not None:
            np.add(out, f(offset), out=out)
        return out


def normalise(array: np.ndarray, norms: Sequence[Normalisation]) -> np.ndarray:
    """Apply one :class:`Normalisation` per channel; ``array`` is ``(C, ...)``, the result C-ordered float32."""
    if len(norms) != array.shape[0]:
        raise ValueError(f"{len(norms)} normalisations for {array.shape[0]} channels")
    out = np.empty(array.shape, dtype=np.float32)
    for norm, channel, target in zip(norms, array, out, strict=True):
        norm.apply(channel, out=target)
    return out


@dataclass
class PreprocessedScan:
    """A preprocessed scan as the cache stores it.

    Args:
        array: ``(C, I, J, K)`` in source units (RAS, target spacing, cropped); integer when not interpolated.
        affine: ``(4, 4)`` RAS affine of ``array``.
        norms: one :class:`Normalisation` per channel.
    """

    array: np.ndarray
    affine: np.ndarray
    norms: list[Normalisation]

    def normalised(self) -> np.ndarray:
        """The model's input, ``(C, I, J, K)`` float32: what ``preprocessing_transforms`` returns."""
        return normalise(self.array, self.norms)

    def background(self) -> list[float]:
        """Per-channel value for padding, in source units (the channel minimum)."""
        return [float(channel.min()) for channel in self.array]

    def norm_dicts(self) -> list[dict[str, float]]:
        return [asdict(norm) for norm in self.norms]


def load_record(record: ScanRecord, base: Path) -> Volume:
    """The volume of a manifest record: its channel files stacked, or its DICOM series (``source`` paths, or
    ``source_index`` positions in the record's folder where the names hold DICOM UIDs).

    A scan above the memory budget (``$MEDMAE_MAX_VOXELS``) is refused from its header, before any allocation.

    Args:
        record: a manifest record.
        base: folder the record's ``source`` paths are relative to (the manifest's folder).

    Raises:
        ManifestError: the files of a ``source_index`` record changed since the scan.
        VolumeError: the scan cannot be read (for a ``source_index`` record, without naming its files).
    """
    if record.info.get("series") and "source_index" in record.info:
        folder = Path(record.image[0])
        files = follow_positions(
            folder, record.info["source_index"], record.info.get("source_hash", ""), record.info["series"]
        )
        try:
            return _read_series(folder, [str(f) for f in files])
        except (ValueError, OSError) as error:  # messages may name the files: keep those names out
            raise VolumeError(hide_names(str(error), folder, files)) from None
    if record.info.get("series") and record.info.get("source"):
        return _read_series(Path(record.image[0]), [str((base / p).resolve()) for p in record.info["source"]])
    volumes = [read_volume(p) for p in record.image]
    for other in volumes[1:]:
        if not other.same_grid(volumes[0], atol=1e-3):
            raise VolumeError(f"{other.path}: channel is on another grid than {volumes[0].path}; co-register them")
    array = volumes[0].array if len(volumes) == 1 else np.concatenate([v.array for v in volumes])
    return volumes[0].with_array(array)


def _read_series(name: Path, files: list[str]) -> Volume:
    from medmae.data.dicom import read_series

    check_series_budget(name, files, Budget.of("env"))
    return read_series(files, name)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose ``(C, I, J, K)`` so its axes point to R, A, S (as MONAI's ``Orientationd``); views only."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[1:])
    flips = [axis + 1 for axis, flip in enumerate(ornt[:, 1]) if flip == -1]
    out = np.flip(array, axis=flips) if flips else array
    order = [0, *(int(a) + 1 for a in np.argsort(ornt[:, 0]))]
    return out.transpose(order), new_affine


def _linear_along(array: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` at fractional indices ``coords`` along ``axis`` (border clamped).

    Float32 ``below + (above - below) * weight``, computed in slabs of ~1 MB so no full-size temporary is made.
    """
    n = array.shape[axis]
    if n == 1:
        return np.repeat(array, len(coords), axis=axis).astype(np.float32)
    clamped = np.clip(coords, 0, n - 1)
    low = np.minimum(np.floor(clamped).astype(np.intp), n - 2)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = (clamped - low).astype(np.float32).reshape(shape)
    out_shape = list(array.shape)
    out_shape[axis] = len(coords)
    out = np.empty(out_shape, dtype=np.float32)
    outer = next((a for a in range(array.ndim) if a != axis and array.shape[a] > 1), 1 - min(axis, 1))
    rows = max(1, SLAB_VOXELS * array.shape[outer] // max(out.size, 1))
    for start in range(0, array.shape[outer], rows):
        index = [slice(None)] * array.ndim
        index[outer] = slice(start, start + rows)
        source, target = array[tuple(index)], out[tuple(index)]
        below = np.take(source, low, axis=axis)
        np.subtract(np.take(source, low + 1, axis=axis), below, out=target, dtype=np.float32)
        np.multiply(target, weight, out=target)
        np.add(target, below, out=target, dtype=np.float32)
    return out


def resample(array: np.ndarray, affine: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Resample a RAS ``(C, I, J, K)`` array to ``spacing`` mm on MONAI ``Spacingd``'s output grid (trilinear).

    Returns the array unchanged (same dtype) when the grid would not change.
    """
    target = zoom_affine(affine, np.asarray(spacing, dtype=np.float64), diagonal=False)
    shape, offset = compute_shape_offset(array.shape[1:], affine, target, False)
    target[:3, 3] = offset[:3]
    shape = tuple(int(s) for s in shape)
    xform = np.linalg.solve(affine, target)  # output voxel → input voxel
    if not np.allclose(xform[:3, :3], np.diag(np.diag(xform[:3, :3])), atol=1e-6):
        raise VolumeError("resampling needs an axis-aligned grid after reorientation to RAS")
    if shape == array.shape[1:] and np.allclose(xform, np.eye(4), atol=1e-6):
        return array, affine
    # Work on the axes in memory order (a Fortran-ordered NIfTI becomes a C-ordered view): every pass then
    # reads and writes contiguous rows, and the result is put back in (C, I, J, K) order as a view.
    memory_order = [int(a) for a in np.argsort([-abs(stride) for stride in array.strides[1:]], kind="stable")]
    out = array.transpose([0, *(a + 1 for a in memory_order)])
    for axis in np.argsort(np.diag(xform)[:3])[::-1]:  # the axis that shrinks most first
        coords = xform[axis, axis] * np.arange(shape[axis]) + xform[axis, 3]
        out = _linear_along(out, memory_order.index(int(axis)) + 1, coords)
    return out.transpose([0, *(memory_order.index(a) + 1 for a in range(3))]), target


def replace_nonfinite(array: np.ndarray, name: str) -> np.ndarray:
    """NaN/-Inf → finite minimum, +Inf → finite maximum (as ``LoadVolumed``)."""
    if array.dtype.kind != "f" or np.all(np.isfinite(array)):
        return array
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        raise VolumeError(f"{name}: every voxel is NaN or Inf")
    low, high = float(finite.min()), float(finite.max())
    return np.nan_to_num(array, nan=low, posinf=high, neginf=low)


def intensity_norms(array: np.ndarray, modality: str, intensity: IntensityConfig) -> list[Normalisation]:
    """CT: the Hounsfield window onto ``[0, 1]``; otherwise a robust z-score (as ``robust_zscore``)."""
    if modality == "CT":
        low, high = intensity.ct_window
        return [Normalisation(-np.inf, np.inf, low, high - low, 0.0, 1.0)] * array.shape[0]
    flat = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).reshape(array.shape[0], -1))
    lower, upper = intensity.mr_percentiles
    lows, highs = row_quantiles(flat, (lower / 100.0, upper / 100.0))
    clipped = torch.maximum(torch.minimum(flat, highs[:, None]), lows[:, None])
    means, stds = clipped.mean(dim=1), clipped.std(dim=1)
    return [
        Normalisation(float(lo), float(hi), float(mean), float(std) if std > 1e-8 else np.inf)
        for lo, hi, mean, std in zip(lows, highs, means, stds, strict=True)
    ]


def foreground_box(normalised: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of :func:`medmae.data.transforms.foreground` over all channels (whole volume if none)."""
    mask = foreground(torch.from_numpy(normalised)).any(dim=0).numpy()
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(None))
    return tuple(box)  # type: ignore[return-value]


def preprocess_volume(
    volume: Volume,
    modality: str,
    spacing: Sequence[float] | None,
    intensity: IntensityConfig | None = None,
    crop_foreground: bool = True,
) -> PreprocessedScan:
    """Reorient to RAS, resample to ``spacing`` (None keeps it), derive the normalisation, crop to foreground."""
    array = replace_nonfinite(volume.array, volume.name)
    array, affine = to_ras(array, volume.affine)
    if spacing is not None:
        array, affine = resample(array, affine, spacing)
    norms = intensity_norms(array, modality, intensity or IntensityConfig())
    if crop_foreground:
        box = foreground_box(normalise(array, norms))
        array = array[(slice(None), *box)]
        starts = [s.start or 0 for s in box]
        affine = affine.copy()
        affine[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return PreprocessedScan(np.ascontiguousarray(array), affine, norms)
