"""Non-local means and the noise-level estimate against a plain loop, Gaussian noise and a real CT."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.evaluation.restore_metrics import psnr_in_mask
from medmae.io import read_volume
from medmae.restore.nonlocal_means import box_mean, estimate_noise_sigma, nonlocal_means

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPPO = DATA / "hippocampus" / "imagesTr" / "hippocampus_367.nii.gz"
CT = DATA / "ct_mr_samples" / "example_ct_sm.nii.gz"


def loop_nonlocal_means(volume: np.ndarray, sigma: float, h: float, patch: int, radius: int) -> np.ndarray:
    """Voxel by voxel, with out-of-range indices clamped to the edge (replicated edges)."""
    half = patch // 2
    shape = volume.shape

    def at(index: tuple[int, ...]) -> float:
        return float(volume[tuple(min(max(i, 0), s - 1) for i, s in zip(index, shape))])

    out = np.zeros(shape)
    for voxel in itertools.product(*(range(s) for s in shape)):
        total = weights = 0.0
        for offset in itertools.product(range(-radius, radius + 1), repeat=3):
            other = tuple(v + o for v, o in zip(voxel, offset))
            distance = np.mean(
                [
                    (at(tuple(v + q for v, q in zip(voxel, step))) - at(tuple(v + q for v, q in zip(other, step)))) ** 2
                    for step in itertools.product(range(-half, half + 1), repeat=3)
                ]
            )
            weight = np.exp(-max(distance - 2 * sigma**2, 0.0) / h**2)
            total += weight * at(other)
            weights += weight
        out[voxel] = total / weights
    return out


def test_nonlocal_means_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(2, 1, 4, 5, 6, generator=generator)
    sigma = torch.tensor([0.1, 0.3])
    out = nonlocal_means(volume, sigma, h_factor=0.8, patch_size=3, search_radius=1)
    for index in range(2):
        level = float(sigma[index])
        expected = loop_nonlocal_means(volume[index, 0].double().numpy(), level, 0.8 * level, 3, 1)
        np.testing.assert_allclose(out[index, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nonlocal_means(volume, torch.zeros(2)), volume)  # no noise: unchanged
    with pytest.raises(ValueError, match="odd patch_size"):
        nonlocal_means(volume, sigma, patch_size=2)


def test_box_mean_matches_average_pooling():
    volume = torch.randn(2, 3, 7, 8, 9)
    torch.testing.assert_close(box_mean(volume, 3), torch.nn.functional.avg_pool3d(volume, 3, stride=1))


def test_noise_estimate_of_pure_noise_and_of_a_real_scan_with_noise():
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 1, 32, 32, 32, generator=generator) * torch.tensor([0.05, 0.2]).reshape(2, 1, 1, 1, 1)
    torch.testing.assert_close(estimate_noise_sigma(noise + 3.0), torch.tensor([0.05, 0.2]), rtol=0.03, atol=0.0)
    assert float(estimate_noise_sigma(torch.ones(1, 1, 5, 5, 5))) == 0.0
    scan = torch.from_numpy(read_volume(HIPPO).array[0].astype(np.float32))[None, None]
    sigma = 0.05 * float(scan.max() - scan.min())
    noisy = scan + sigma * torch.randn(scan.shape, generator=generator)
    assert float(estimate_noise_sigma(noisy)) == pytest.approx(sigma, rel=0.15)  # anatomy adds a little
    with pytest.raises(ValueError, match="every spatial size >= 3"):
        estimate_noise_sigma(torch.zeros(1, 1, 2, 8, 8))


def test_nonlocal_means_denoises_a_real_ct_with_its_estimated_noise_level():
    truth = read_volume(CT).array[0].astype(np.float32)  # HU
    generator = torch.Generator().manual_seed(2)
    noisy = torch.from_numpy(truth)[None, None] + 50.0 * torch.randn((1, 1, *truth.shape), generator=generator)
    sigma = estimate_noise_sigma(noisy)
    assert 45.0 < float(sigma) < 65.0
    denoised = nonlocal_means(noisy, sigma, 0.6)[0, 0].numpy()
    body = truth > -500
    assert psnr_in_mask(denoised, truth, body) > psnr_in_mask(noisy[0, 0].numpy(), truth, body) + 4.0
