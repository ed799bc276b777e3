"""Whole-volume repair on the scan's own grid: inpaint masked voxels or denoise, with sliding windows.

The model sees voxel-index space: no reorientation or resampling, so the output is on the input grid by
construction. Intensities are normalised like pretraining (CT: the checkpoint's HU window onto [0, 1];
MR: percentile clip + z-score computed on the intact voxels), the network runs on overlapping windows of
the training ROI blended with Gaussian weights (MONAI ``sliding_window_inference``), and predictions are
mapped back to the input's intensity scale. Inpainting then writes *only* the masked voxels into a copy
of the original array, cast to the input's dtype (rounded and clipped for integers), so every other voxel
is bit-identical. The model works inside the normalisation window (CT: default -1000..1000 HU; MR: the
0.5-99.5th percentiles); what lies beyond it (bone above +1000 HU, the brightest MR voxels) is carried
around the model: interpolated across the mask (inpainting) or passed through (denoising). Without a checkpoint,
:func:`interpolate_volume` fills the mask by interpolation alone (``linear``, ``flow`` or ``fitted``), with the
same guarantees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medmae.data.transforms import robust_zscore
from medmae.io.volume import Volume, VolumeError
from medmae.io.writers import cast_to_dtype
from medmae.restore.fitted import GapFit, fitted_fill_gaps
from medmae.restore.net import RestorationNet, fill_masked, fill_scan

MODALITIES = ("auto", "CT", "MR")
INTERPOLATIONS = ("linear", "flow", "fitted")  # repair without a checkpoint: medmae inpaint --interpolation


@dataclass(frozen=True)
class IntensityMap:
    """``normalised = (clip(x, low, high) - offset) / scale`` and its inverse ``x = normalised * scale + offset``."""

    low: float
    high: float
    offset: float
    scale: float

    def forward(self, array: np.ndarray) -> np.ndarray:
        return ((np.clip(np.nan_to_num(array), self.low, self.high) - self.offset) / self.scale).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float64) * self.scale + self.offset

    def excess(self, array: np.ndarray) -> np.ndarray:
        """What :meth:`forward`'s clipping removes from ``array`` (float64, 0 inside the window)."""
        values = np.nan_to_num(np.asarray(array, dtype=np.float64))
        return values - np.clip(values, self.low, self.high)


def ct_intensity_map(window: Sequence[float]) -> IntensityMap:
    """The CT window ``(low, high)`` HU mapped onto ``[0, 1]``, as in pretraining."""
    low, high = float(window[0]), float(window[1])
    return IntensityMap(low, high, low, high - low)


def mr_intensity_map(values: np.ndarray, percentiles: Sequence[float]) -> IntensityMap:
    """The affine map :func:`~medmae.data.transforms.robust_zscore` applies to ``values`` (any shape), made explicit.

    It is read off robust_zscore's own output: two unclipped voxels give scale and offset, the clipped
    extremes give the clip bounds (none for the 0th and 100th percentiles, so such a map clips nothing).
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel())
    normalised = robust_zscore(torch.from_numpy(values)[None], *percentiles)[0].double().numpy()
    low_n, high_n = normalised.min(), normalised.max()
    inside = np.flatnonzero((normalised > low_n) & (normalised < high_n))
    if inside.size < 2 or values[inside].max() == values[inside].min():
        centre = float(np.median(values)) if values.size else 0.0
        return IntensityMap(centre, centre, centre, 1.0)
    a, b = inside[np.argmin(values[inside])], inside[np.argmax(values[inside])]
    scale = (values[b] - values[a]) / (normalised[b] - normalised[a])
    offset = values[a] - normalised[a] * scale
    low = -np.inf if percentiles[0] <= 0 else low_n * scale + offset  # the 0th / 100th percentile clips nothing
    high = np.inf if percentiles[1] >= 100 else high_n * scale + offset
    return IntensityMap(low, high, offset, scale)


def guess_modality(array: np.ndarray) -> str:
    """``CT`` for integer scans reaching below -500 (Hounsfield air), ``MR`` otherwise."""
    return "CT" if np.issubdtype(array.dtype, np.integer) and float(array.min()) <= -500 else "MR"


def intensity_map(values: np.ndarray, modality: str, hparams: dict) -> IntensityMap:
    """The normalisation of a checkpoint (its ``ct_window`` / ``mr_percentiles``) for ``values``."""
    if modality == "CT":
        return ct_intensity_map(hparams.get("ct_window") or (-1000.0, 1000.0))
    return mr_intensity_map(values, hparams.get("mr_percentiles") or (0.5, 99.5))


@dataclass(frozen=True)
class RepairSettings:
    """How windows run.

    Args:
        overlap: fraction of overlap between adjacent windows.
        batch_size: windows per forward pass.
        device: ``"cpu"``, ``"cuda"``, ... (``"auto"``: a GPU when there is one).
        progress: show a progress bar.
        rounds: blind-spot rounds of plain-checkpoint denoising.
        mirror: test-time augmentation as in nnU-Net: average the predictions over all 8 combinations of
            flipping the three axes (8x the compute).
        noise_sigma: denoising with an ``nlm_input`` checkpoint: the std of the noise to remove, in the scan's
            intensity units (HU for CT); None estimates it from the scan.
    """

    overlap: float = 0.5
    batch_size: int = 1
    device: str = "auto"
    progress: bool = False
    rounds: int = 4
    mirror: bool = False
    noise_sigma: float | None = None

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def roi_of(net: RestorationNet, hparams: dict) -> tuple[int, int, int]:
    """The training ROI (or 4 patches per axis), rounded to whole patches."""
    patch = net.patch_size
    roi = hparams.get("roi_size") or [p * 4 for p in patch]
    return tuple(max(p, int(r) // p * p) for r, p in zip(roi, patch))  # type: ignore[return-value]


@torch.no_grad()
def run_windows(
    net: RestorationNet,
    image: np.ndarray,
    mask: np.ndarray | None,
    roi: Sequence[int],
    settings: RepairSettings,
    noise_sigma: float | None = None,
) -> np.ndarray:
    """Inpaint (``mask`` given) or denoise a normalised ``(I, J, K)`` float32 array with blended windows.

    ``noise_sigma``: the noise std in normalised units an ``nlm_input`` network is told (None: estimated).

    A guided network's classical estimate (interpolation across the mask, or smoothing) and an ``nlm_input``
    network's non-local means and noise level are computed once on the whole array, so windows that cut
    through a gap still interpolate from both of its sides and the noise is estimated from the whole scan. An
    array thinner than ``roi`` along an axis is mirrored up to the window size (and cropped back), so the
    model never sees an artificial zero slab.
    """
    device = settings.torch_device()
    net = net.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(0)
    shape = image.shape
    padding = [(0, 0) if s >= r else ((r - s) // 2, r - s - (r - s) // 2) for s, r in zip(shape, roi)]
    if any(p != (0, 0) for p in padding):  # thinner than a window: mirror the scan, not a zero slab
        image = np.pad(image, padding, mode="symmetric")
        mask = None if mask is None else np.pad(mask, padding, mode="symmetric")
    volume = torch.from_numpy(image)[None, None]
    voxel_mask = None if mask is None else torch.from_numpy(mask)[None, None]
    guide = net.guide(volume, voxel_mask)
    sigma = None if noise_sigma is None else torch.tensor([float(noise_sigma)])
    context = None if mask is not None else net.denoise_context(volume.to(device), sigma)  # (1, 2, I, J, K) or None
    context = None if context is None else context.cpu()
    channels = [volume] + [c.float() for c in (voxel_mask, guide, context) if c is not None]
    inputs = torch.cat(channels, dim=1)  # (1, 1 + mask + guide + context, I, J, K)
    guide_channel = 1 + (voxel_mask is not None)

    def predictor(window: torch.Tensor) -> torch.Tensor:
        volume = window[:, :1]
        window_guide = window[:, guide_channel : guide_channel + 1] if guide is not None else None
        if mask is None:
            window_context = window[:, guide_channel + 1 :] if context is not None else None
            return net.denoise(volume, settings.rounds, generator, window_guide, window_context)
        window_mask = window[:, 1:2] > 0.5
        if not bool(window_mask.any()):
            return volume
        return net.inpaint(volume, window_mask, window_guide)[0]

    output = torch.zeros_like(volume)
    flips = mirror_flips() if settings.mirror else [()]
    for dims in flips:
        flipped = inputs.flip(dims) if dims else inputs
        prediction = sliding_window_inference(
            flipped,
            tuple(roi),
            settings.batch_size,
            predictor,
            settings.overlap,
            mode="gaussian",
            progress=settings.progress,
            sw_device=device,
            device=torch.device("cpu"),
        )
        output += (prediction.flip(dims) if dims else prediction).float()
    output /= len(flips)
    crop = tuple(slice(before, before + size) for (before, _), size in zip(padding, shape))
    return output[0, 0].numpy()[crop]


def mirror_flips() -> list[tuple[int, ...]]:
    """The 8 subsets of the spatial dims ``(2, 3, 4)`` of a ``(B, C, I, J, K)`` tensor, ``()`` first."""
    return [tuple(d for bit, d in enumerate((2, 3, 4)) if code >> bit & 1) for code in range(8)]


def _bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """The mask's bounding box grown by ``margin`` voxels per axis, inside the array."""
    where = np.nonzero(mask)
    return tuple(
        slice(max(0, int(w.min()) - m), min(s, int(w.max()) + m + 1)) for w, m, s in zip(where, margin, mask.shape)
    )


def inpaint_array(
    net: RestorationNet, hparams: dict, array: np.ndarray, mask: np.ndarray, modality: str, settings: RepairSettings
) -> np.ndarray:
    """A copy of ``array`` ``(I, J, K)`` (same dtype): ``mask`` voxels filled by the model, others untouched."""
    out = array.copy()
    if not mask.any():
        return out
    imap = intensity_map(array[~mask], modality, hparams)
    roi = roi_of(net, hparams)
    box = _bounding_box(mask, roi)
    prediction = imap.inverse(run_windows(net, imap.forward(array[box]), mask[box], roi, settings))
    excess = imap.excess(array[box])
    if excess.any():  # beyond the window: interpolated across the mask as the guide is, added to the model's fill
        masked = torch.from_numpy(mask[box])[None, None]
        scan = torch.from_numpy(np.nan_to_num(array[box].astype(np.float32)))[None, None]
        excess_tensor = torch.from_numpy(excess)[None, None]
        prediction += fill_masked(excess_tensor, masked, net.gap_interp, motion_from=scan)[0, 0].numpy()
    region = out[box]
    region[mask[box]] = cast_to_dtype(prediction[mask[box]], array.dtype)
    return out


def interpolate_array(array: np.ndarray, mask: np.ndarray, method: str) -> tuple[np.ndarray, list[GapFit]]:
    """A copy of ``array`` ``(I, J, K)`` (same dtype) with the ``mask`` voxels interpolated, others untouched.

    ``method``: ``linear`` (between the nearest intact voxels along each axis), ``flow`` (slice gaps along the
    scan's motion, :mod:`medmae.restore.flow`) or ``fitted`` (that, corrected by a regression fitted to the
    scan's own intact slices, :mod:`medmae.restore.fitted`). Returns the copy and, for ``fitted``, how each
    slice gap was filled.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {method!r}")
    out = array.copy()
    if not mask.any():
        return out, []
    fits: list[GapFit] = []
    if method == "fitted":
        filled, fits = fitted_fill_gaps(array, mask)
    else:
        filled = fill_scan(array, mask, method).double().numpy()
    out[mask] = cast_to_dtype(filled[mask], array.dtype)
    return out, fits


def denoise_array(
    net: RestorationNet, hparams: dict, array: np.ndarray, modality: str, settings: RepairSettings
) -> np.ndarray:
    """The denoised ``array`` ``(I, J, K)`` in its own dtype (values beyond the window pass through)."""
    imap = intensity_map(array, modality, hparams)
    if settings.noise_sigma is not None and settings.noise_sigma <= 0:
        raise ValueError(f"the noise sigma must be > 0 (in the scan's intensity units), got {settings.noise_sigma}")
    sigma = None if settings.noise_sigma is None else settings.noise_sigma / imap.scale
    prediction = run_windows(net, imap.forward(array), None, roi_of(net, hparams), settings, sigma)
    return cast_to_dtype(imap.inverse(prediction) + imap.excess(array), array.dtype)


def unseen_modality_note(hparams: dict, modality: str, name: str) -> str | None:
    """A note when the checkpoint never trained on ``modality`` scans (its recorded ``modalities``), else None.

    A model trained on MR z-scores applied to CT (or the reverse) fills gaps with values thousands of HU off.
    Checkpoints written before the ``modalities`` record give no note.
    """
    trained = hparams.get("modalities")
    if not trained or modality in trained:
        return None
    return (
        f"note: the checkpoint was trained on {', '.join(trained)} scans only and {name} is repaired as {modality} "
        f"(--modality sets it); expect poor results unless the model is fine-tuned on {modality} scans"
    )


def resolve_modality(volume: Volume, modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return guess_modality(volume.array) if modality == "auto" else modality


def require_mask_shape(volume: Volume, mask: np.ndarray) -> None:
    """Raise VolumeError, naming the scan, unless ``mask`` has the scan's spatial shape."""
    if mask.shape != volume.spatial_shape:
        raise VolumeError(
            f"{volume.name}: the mask has shape {mask.shape}, the scan {volume.spatial_shape}; they must match"
        )


def inpaint_volume(
    net: RestorationNet,
    hparams: dict,
    volume: Volume,
    mask: np.ndarray,
    modality: str = "auto",
    settings: RepairSettings = RepairSettings(),
) -> Volume:
    """Repair every channel of ``volume`` inside ``mask`` ``(I, J, K)`` bool; a new Volume, same grid and dtype."""
    require_mask_shape(volume, mask)
    modality = resolve_modality(volume, modality)
    channels = [inpaint_array(net, hparams, channel, mask, modality, settings) for channel in volume.array]
    return volume.with_array(np.stack(channels))


def interpolate_volume(volume: Volume, mask: np.ndarray, method: str) -> tuple[Volume, list[GapFit]]:
    """Interpolate every channel of ``volume`` inside ``mask`` (:func:`interpolate_array`); a new Volume, same grid
    and dtype, and how the first channel's slice gaps were filled."""
    require_mask_shape(volume, mask)
    results = [interpolate_array(channel, mask, method) for channel in volume.array]
    return volume.with_array(np.stack([array for array, _ in results])), results[0][1]


def denoise_volume(
    net: RestorationNet,
    hparams: dict,
    volume: Volume,
    modality: str = "auto",
    settings: RepairSettings = RepairSettings(),
) -> Volume:
    """Denoise every channel of ``volume``; a new Volume on the same grid and dtype."""
    modality = resolve_modality(volume, modality)
    return volume.with_array(np.stack([denoise_array(net, hparams, c, modality, settings) for c in volume.array]))
