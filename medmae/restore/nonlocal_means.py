"""Non-local means and a noise-level estimate, in PyTorch, for batches of volumes.

Both feed the non-local-means input of a denoising refinement (:class:`~medmae.restore.net.RestorationNet`
with ``nlm_input``): training computes them on every noisy crop, repair once on the whole scan, on the CPU or
the GPU. scikit-image's 3D non-local means takes ~0.45 s for one 32³ crop on one core; this one processes a
whole batch of crops per search offset with tensor ops.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4): the std of a Gaussian from its median absolute deviation


def estimate_noise_sigma(volume: torch.Tensor) -> torch.Tensor:
    """Robust estimate of additive white noise's std in each volume of ``(B, C, D, H, W)``; returns ``(B,)``.

    Along each axis, the residual ``x[i] - (x[i-1] + x[i+1]) / 2`` of white noise of std ``s`` has std
    ``s * sqrt(1.5)``; its median absolute deviation gives ``s`` while edges, which touch few voxels, barely
    move it. Anatomy still adds to the residual, least along the most finely sampled axis, so the smallest
    of the three per-axis estimates is returned. Constant volumes give 0.
    """
    if volume.ndim != 5 or min(volume.shape[2:]) < 3:
        raise ValueError(
            f"noise estimation needs (B, C, D, H, W) with every spatial size >= 3, got {tuple(volume.shape)}"
        )
    flat = volume.float()
    estimates = []
    for dim in (2, 3, 4):
        size = flat.shape[dim]
        middle, before, after = (flat.narrow(dim, start, size - 2) for start in (1, 0, 2))
        residual = (middle - 0.5 * (before + after)).flatten(1)
        mad = (residual - residual.median(1, keepdim=True).values).abs().median(1).values
        estimates.append(MAD_TO_SIGMA * mad / 1.5**0.5)
    return torch.stack(estimates).min(0).values


def box_mean(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over each ``size``³ window of ``(N, C, D, H, W)`` that fits inside it (no padding): the output is
    ``size - 1`` voxels smaller along each axis. Three separable sums (~8x faster than ``avg_pool3d`` with
    stride 1 on the CPU)."""
    out = volume
    for dim in (2, 3, 4):
        length = out.shape[dim] - size + 1
        out = sum(out.narrow(dim, start, length) for start in range(size))
    return out / size**3


def nonlocal_means(
    volume: torch.Tensor,
    sigma: torch.Tensor,
    h_factor: float = 0.6,
    patch_size: int = 3,
    search_radius: int = 3,
) -> torch.Tensor:
    """3D non-local means of ``(B, 1, D, H, W)`` volumes, each with its own noise std ``sigma`` ``(B,)``.

    Every voxel becomes the weighted mean of the voxels within ``search_radius`` along each axis, weighted by
    ``exp(-max(d² - 2 sigma², 0) / h²)`` with ``h = h_factor * sigma`` and ``d²`` the mean squared difference
    of the ``patch_size``³ patches around the two voxels: scikit-image's ``fast_mode`` weighting. Volumes
    are extended by replication at their edges; a volume with ``sigma`` 0 is returned unchanged.
    """
    if volume.ndim != 5 or volume.shape[1] != 1:
        raise ValueError(f"non-local means needs (B, 1, D, H, W), got {tuple(volume.shape)}")
    if patch_size < 1 or patch_size % 2 == 0 or search_radius < 1 or h_factor <= 0:
        raise ValueError(
            "non-local means needs an odd patch_size >= 1, search_radius >= 1 and h_factor > 0, "
            f"got {patch_size}, {search_radius}, {h_factor}"
        )
    x = volume.float()
    sigma = sigma.float().reshape(-1, 1, 1, 1, 1).to(x.device)
    h2 = (h_factor * sigma).square().clamp_min(1e-20)
    floor = 2.0 * sigma.square()
    r, half = search_radius, patch_size // 2
    padded = F.pad(x, (r + half,) * 6, mode="replicate")
    depth, height, width = x.shape[2:]
    centre = padded[:, :, r : r + depth + 2 * half, r : r + height + 2 * half, r : r + width + 2 * half]
    total = torch.zeros_like(x)
    weights = torch.zeros_like(x)
    for dz, dy, dx in itertools.product(range(-r, r + 1), repeat=3):
        shifted = padded[
            :,
            :,
            r + dz : r + dz + depth + 2 * half,
            r + dy : r + dy + height + 2 * half,
            r + dx : r + dx + width + 2 * half,
        ]
        distance = box_mean((centre - shifted).square(), patch_size)
        weight = torch.exp(-(distance - floor).clamp_min(0.0) / h2)
        inner = shifted[:, :, half : half + depth, half : half + height, half : half + width]
        total += weight * inner
        weights += weight
    denoised = total / weights
    return torch.where(sigma > 0, denoised, x).to(volume.dtype)
