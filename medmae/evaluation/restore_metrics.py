"""Restoration metrics: PSNR, SSIM and MAE inside a mask, BraTS local-inpainting style.

Both volumes are normalised with the ground truth inside the mask: ``(x - lo) / (max - lo)`` where
``max`` is the ground-truth maximum in the mask and ``lo = min(0, ground-truth minimum)``. For
non-negative MR this is exactly the BraTS convention (divide by the ground-truth maximum); for CT, whose
Hounsfield units go negative, it is the min-max normalisation inside the mask. PSNR uses a data range of 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity


@dataclass(frozen=True)
class RestoreScores:
    """PSNR (dB), SSIM and MAE (normalised units) of a prediction inside a region."""

    psnr: float
    ssim: float
    mae: float


def _normalise(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inside = truth[mask].astype(np.float64)
    low = min(0.0, float(inside.min()))
    span = max(float(inside.max()) - low, 1e-12)
    return (prediction.astype(np.float64) - low) / span, (truth.astype(np.float64) - low) / span


def psnr_in_mask(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB) over the voxels of ``mask``; all arrays ``(I, J, K)``."""
    pred, true = _normalise(prediction, truth, mask)
    mse = float(np.mean((pred[mask] - true[mask]) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def restore_scores(prediction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> RestoreScores:
    """PSNR, SSIM (the 3D SSIM map averaged inside ``mask``) and MAE inside ``mask``. Arrays ``(I, J, K)``."""
    if prediction.shape != truth.shape or mask.shape != truth.shape:
        raise ValueError(f"shapes differ: prediction {prediction.shape}, truth {truth.shape}, mask {mask.shape}")
    if not mask.any():
        raise ValueError("the evaluation mask is empty")
    pred, true = _normalise(prediction, truth, mask)
    win = min(7, *(s if s % 2 else s - 1 for s in truth.shape))
    _, ssim_map = structural_similarity(
        true, np.clip(pred, true.min() - 1, true.max() + 1), data_range=1.0, full=True, win_size=win
    )
    return RestoreScores(
        psnr_in_mask(prediction, truth, mask),
        float(ssim_map[mask].mean()),
        float(np.abs(pred[mask] - true[mask]).mean()),
    )


def foreground_mask(truth: np.ndarray) -> np.ndarray:
    """Foreground of a clean scan for denoising scores: voxels above its Otsu threshold."""
    return truth > threshold_otsu(truth.astype(np.float64))
