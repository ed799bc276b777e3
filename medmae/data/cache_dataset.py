"""Random ROI crops read from the preprocessing cache through memory maps (augmentation after the crop).

A crop is sliced from the memory map in the cache's compact dtype and normalised in one vectorised step; with
:class:`CropAugmentation` the flips are views of that window and the intensity scale/shift join the same
pass, so an augmented crop costs about as much as a plain one (MONAI's transforms copy it up to five times).

Sample ``index`` of epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e, index])``, so the same crop
comes out whichever worker process or GPU rank draws it. :class:`EpochSampler` tells the dataset the epoch
by encoding it in the indices it yields; Lightning shards it across DDP ranks like any sampler.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Randomizable
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, Sampler

from medmae.data.cache_store import list_cached_ids, open_entry, read_meta
from medmae.data.preprocess import Normalisation
from medmae.data.transforms import FLIP_PROB, INTENSITY_PROB, INTENSITY_SCALE, INTENSITY_SHIFT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for one crop: flip each spatial axis, intensity gain ``1 + factor``, offset."""

    flips: tuple[bool, bool, bool]
    gain: float | None
    offset: float | None


@dataclass(frozen=True)
class CropAugmentation:
    """:func:`~medmae.data.transforms.augmentation_transforms` fused with the crop's normalisation.

    Flip each spatial axis with ``flip_prob``; with ``intensity_prob`` multiply by ``1 + U(-scale, scale)``;
    with ``intensity_prob`` add ``U(-shift, shift)``. Random numbers are drawn in the MONAI transforms' order
    (each array transform's own draw included): from the same ``numpy.random.RandomState`` both give the
    same crop, bit for bit (tested).
    """

    flip_prob: float = FLIP_PROB
    scale: float = INTENSITY_SCALE
    shift: float = INTENSITY_SHIFT
    intensity_prob: float = INTENSITY_PROB

    def __post_init__(self) -> None:
        if not (0.0 <= self.flip_prob <= 1.0 and 0.0 <= self.intensity_prob <= 1.0):
            raise ValueError(f"probabilities must lie in [0, 1], got {self.flip_prob} and {self.intensity_prob}")
        if not (0.0 <= self.scale < 1.0 and self.shift >= 0.0):
            raise ValueError(f"scale must lie in [0, 1) and shift be >= 0, got {self.scale} and {self.shift}")

    def draw(self, rng: np.random.Generator | np.random.RandomState) -> AugmentDraw:
        """The choices for one crop (``rng.uniform`` only, so a Generator and a RandomState both work)."""
        flips = tuple(bool(rng.uniform(0.0, 1.0) < self.flip_prob) for _ in range(3))
        gain = offset = None
        if rng.uniform(0.0, 1.0) < self.intensity_prob:
            rng.uniform(0.0, 1.0)  # MONAI's inner RandScaleIntensity (prob 1) draws once more
            gain = 1.0 + float(rng.uniform(-self.scale, self.scale))
        if rng.uniform(0.0, 1.0) < self.intensity_prob:
            rng.uniform(0.0, 1.0)
            offset = float(rng.uniform(-self.shift, self.shift))
        return AugmentDraw(flips, gain, offset)  # type: ignore[arg-type]


def render_crop(
    window: np.ndarray,
    roi_size: Sequence[int],
    norms: Sequence[Normalisation],
    background: Sequence[float],
    draw: AugmentDraw | None = None,
) -> np.ndarray:
    """A ``(C, *roi_size)`` C-ordered float32 crop from a window in source units, reading the window once.

    Args:
        window: ``(C, X, Y, Z)`` source units (any dtype or strides, e.g. a memory-map view), at most ``roi_size``.
        roi_size: crop size; the window is padded symmetrically with ``background`` where smaller.
        norms: per-channel normalisation.
        background: per-channel padding value in source units.
        draw: flips (views of the window) and intensity gain/offset; None for a plain crop.

    Returns:
        The same values as normalising the padded window, then flipping, scaling and shifting it.
    """
    if len(norms) != window.shape[0]:
        raise ValueError(f"{len(norms)} normalisations for {window.shape[0]} channels")
    flips = draw.flips if draw is not None else (False, False, False)
    gain, offset = (draw.gain, draw.offset) if draw is not None else (None, None)
    out = np.empty((window.shape[0], *roi_size), dtype=np.float32)
    region = []
    for size, roi, flip in zip(window.shape[1:], roi_size, flips, strict=True):
        before = (roi - size) // 2 if not flip else roi - size - (roi - size) // 2
        region.append(slice(before, before + size))
    flipped = window[(slice(None), *(slice(None, None, -1) if flip else slice(None) for flip in flips))]
    for channel, norm in enumerate(norms):
        if tuple(window.shape[1:]) != tuple(roi_size):
            pad = np.array([background[channel]]).astype(window.dtype)  # as np.pad stores it in the window
            out[channel].fill(norm.apply(pad, gain=gain, offset=offset)[0])
        norm.apply(flipped[channel], out=out[channel][tuple(region)], gain=gain, offset=offset)
    return out


class CachedCropDataset(Dataset):
    """Random crops of cached scans.

    Args:
        cache_dir: a cache made by ``medmae preprocess``.
        roi_size: crop size ``(X, Y, Z)`` in voxels; smaller scans are padded with their background value.
        samples_per_epoch: crops per epoch (default: one per scan); sample ``i`` starts at scan ``i % n``.
        ids: scans to use (default: every scan cached with the cache's current parameters).
        transform: applied to ``{"image": (C, X, Y, Z) float32 tensor, "id": str, "start": (3,) tensor}``
            after the crop (and ``augment``), without MONAI meta tracking; MONAI random transforms are
            reseeded per sample.
        seed: base seed of the crop positions and the augmentation.
        augment: augmentation fused with reading the crop; ``CropAugmentation()`` does what
            ``Compose(augmentation_transforms())`` as ``transform`` does, several times faster.

    ``__getitem__`` returns that dict after ``transform``. A scan that cannot be read is skipped (the next
    scan is used instead), warned about once and listed in :attr:`skipped`.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        roi_size: Sequence[int],
        samples_per_epoch: int | None = None,
        ids: Sequence[str] | None = None,
        transform: Callable | None = None,
        seed: int = 0,
        augment: CropAugmentation | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) <= 0:
            raise ValueError(f"roi_size must be three positive ints, got {tuple(roi_size)}")
        if samples_per_epoch is not None and samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive or None, got {samples_per_epoch}")
        cached = list_cached_ids(self.cache_dir)
        self.skipped: dict[str, str] = {}
        if ids is not None:
            available = set(cached)
            for scan_id in ids:
                if scan_id not in available:
                    self._skip(scan_id, "not in the cache (run `medmae preprocess` for it)")
            cached = [i for i in ids if i in available]
        if not cached:
            raise ValueError(f"{self.cache_dir}: no cached scans to crop from; run `medmae preprocess` first")
        self.ids = list(cached)
        self.metas = {scan_id: read_meta(self.cache_dir, scan_id) for scan_id in self.ids}
        self.samples_per_epoch = samples_per_epoch or len(self.ids)
        self.transform = transform
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._open: dict[str, tuple[np.ndarray, list]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in each worker, never pickled as arrays
        return state

    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Base epoch of the crop positions (:class:`EpochSampler` encodes the epoch in indices instead)."""
        self.epoch = int(epoch)

    def _skip(self, scan_id: str, reason: str) -> None:
        if scan_id not in self.skipped:
            self.skipped[scan_id] = reason
            warnings.warn(f"{self.cache_dir}: skipping scan {scan_id}: {reason}", RuntimeWarning, stacklevel=3)
            log.warning("skipping cached scan %s: %s", scan_id, reason)

    def window(self, scan_id: str, rng: np.random.Generator) -> tuple[np.ndarray, list[Normalisation], list[int]]:
        """A random window of one scan: ``(C, *roi_size)`` or smaller where the scan is, in source units
        (a memory-map view), its per-channel normalisation and its start voxel."""
        meta = self.metas[scan_id]
        if meta is None:
            raise ValueError("its cache entry is incomplete")
        if scan_id not in self._open:  # kept mapped: pages already touched are not faulted in again
            self._open[scan_id] = open_entry(self.cache_dir, meta)
        array, norms = self._open[scan_id]
        shape = array.shape[1:]
        starts = [int(rng.integers(0, max(size - roi, 0) + 1)) for size, roi in zip(shape, self.roi_size, strict=True)]
        window = array[(slice(None), *(slice(s, s + r) for s, r in zip(starts, self.roi_size, strict=True)))]
        return np.asarray(window), norms, starts

    def crop(self, scan_id: str, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """A random ``(C, *roi_size)`` float32 crop of one scan (normalised, padded with its background,
        augmented by ``augment``) and its start voxel."""
        window, norms, starts = self.window(scan_id, rng)
        draw = self.augment.draw(rng) if self.augment is not None else None
        return render_crop(window, self.roi_size, norms, self.metas[scan_id]["background"], draw), starts

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, item = divmod(int(index), len(self))
        rng = np.random.default_rng([self.seed, self.epoch + epoch, item])
        for attempt in range(len(self.ids)):
            scan_id = self.ids[(item + attempt) % len(self.ids)]
            if scan_id in self.skipped:
                continue
            try:
                image, starts = self.crop(scan_id, rng)
            except (OSError, ValueError, KeyError, EOFError) as error:
                self._skip(scan_id, str(error).splitlines()[0] if str(error) else type(error).__name__)
                continue
            sample: dict[str, Any] = {
                "image": torch.from_numpy(image),
                "id": scan_id,
                "start": torch.tensor(starts),
            }
            if self.transform is not None:
                _reseed(self.transform, np.random.RandomState(int(rng.integers(2**31))))
                with _without_meta_tracking():
                    sample = dict(self.transform(sample))
                sample["image"] = convert_to_tensor(sample["image"], dtype=torch.float32, track_meta=False)
            return sample
        raise RuntimeError(f"{self.cache_dir}: none of the {len(self.ids)} cached scans can be read: {self.skipped}")


@contextmanager
def _without_meta_tracking() -> Iterator[None]:
    """MONAI transforms on plain tensors (no MetaTensor bookkeeping), restoring the previous setting."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def _reseed(transform: Any, state: np.random.RandomState) -> None:
    """Give every random MONAI transform inside ``transform`` the same per-sample random state."""
    for child in getattr(transform, "transforms", ()):
        _reseed(child, state)
    if isinstance(transform, Randomizable):
        transform.set_random_state(state=state)


class EpochSampler(Sampler[int]):
    """Indices ``epoch * n + i`` (shuffled per epoch when ``shuffle``) for a :class:`CachedCropDataset`.

    Lightning calls :meth:`set_epoch`; when nobody does (e.g. under a wrapping distributed sampler), the
    epoch advances by one after each pass.
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0) -> None:
        self.length, self.shuffle, self.seed = int(length), shuffle, int(seed)
        self.epoch, self._epoch_given = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_given = int(epoch), True

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self._epoch_given:
            self.epoch += 1
        self._epoch_given = False
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.length) if self.shuffle else range(self.length)
        )
        return iter([epoch * self.length + int(i) for i in order])
