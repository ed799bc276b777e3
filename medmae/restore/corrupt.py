"""Simulated corruption of real scans, with known ground truth: slice defects and acquisition noise.

Slice defects (``zero``, ``constant``, ``stripes``, ``shift``, ``intensity``) change whole slices
perpendicular to one axis; noise is Rician for MR magnitude images and Gaussian (in Hounsfield units)
for CT. Randomness comes only from the generator passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SLICE_DEFECTS = ("zero", "constant", "stripes", "shift", "intensity")


def robust_range(array: np.ndarray) -> float:
    """``p99.5 - p0.5`` of a volume (1.0 when it is flat): the scale of stripes and noise levels."""
    low, high = np.percentile(array, [0.5, 99.5])
    return float(high - low) if high > low else 1.0


def _slab(array: np.ndarray, axis: int, index: int) -> tuple[slice | int, ...]:
    where: list[slice | int] = [slice(None)] * array.ndim
    where[axis] = index
    return tuple(where)


def corrupt_slices(
    array: np.ndarray, axis: int, indices: Sequence[int], kind: str, rng: np.random.Generator
) -> np.ndarray:
    """A float64 copy of a ``(I, J, K)`` volume with the slices ``indices`` along ``axis`` damaged.

    Kinds:
        ``zero``: dropped slice stored as zeros. ``constant``: filled with the volume's minimum.
        ``stripes``: periodic stripes of 20-40% of the robust range added along one in-plane axis.
        ``shift``: motion; the slice content moves by 3-6 voxels in-plane.
        ``intensity``: the slice is scaled by 0.4-0.6 or 1.6-2.0 (gain jump).
    """
    if kind not in SLICE_DEFECTS:
        raise ValueError(f"unknown slice defect {kind!r}; choose one of {SLICE_DEFECTS}")
    out = array.astype(np.float64, copy=True)
    scale = robust_range(out)
    for index in indices:
        where = _slab(out, axis, int(index))
        plane = out[where]
        if kind == "zero":
            plane[...] = 0.0
        elif kind == "constant":
            plane[...] = out.min()
        elif kind == "stripes":
            in_plane = int(rng.integers(0, 2))
            period = int(rng.integers(2, 5))
            wave = np.sin(2 * np.pi * np.arange(plane.shape[in_plane]) / period + rng.uniform(0, np.pi))
            shape = [1, 1]
            shape[in_plane] = plane.shape[in_plane]
            plane += rng.uniform(0.2, 0.4) * scale * np.sign(wave).reshape(shape)
        elif kind == "shift":
            steps = rng.integers(3, 7, size=2) * rng.choice([-1, 1], size=2)
            plane[...] = np.roll(plane, tuple(int(s) for s in steps), axis=(0, 1))
        else:
            factor = rng.uniform(0.4, 0.6) if rng.random() < 0.5 else rng.uniform(1.6, 2.0)
            plane *= factor
    return out


def gap_indices(size: int, width: int, rng: np.random.Generator, margin: int = 2) -> list[int]:
    """``width`` adjacent slice indices at a random position, at least ``margin`` slices from either end."""
    if size < width + 2 * margin:
        raise ValueError(
            f"a {width}-slice gap with {margin} intact slices each side needs >= {width + 2 * margin} slices, "
            f"got {size}"
        )
    start = int(rng.integers(margin, size - margin - width + 1))
    return list(range(start, start + width))


def add_gaussian_noise(
    image: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``image + N(0, sigma^2)``: CT noise (``sigma`` in the image's units, e.g. HU). Any shape."""
    noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=torch.float32)
    return image + noise * torch.as_tensor(sigma, dtype=torch.float32, device=image.device)


def add_rician_noise(
    image: torch.Tensor,
    sigma: float | torch.Tensor,
    floor: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rician noise of a magnitude image: ``|x - floor + n1 + i*n2| + floor``, ``n1, n2 ~ N(0, sigma^2)``.

    ``floor`` is the intensity of zero signal (0 for raw magnitude data, the background level of a
    normalised image). Any shape; ``sigma``/``floor`` may be tensors broadcasting against ``image``.
    """
    signal = image - torch.as_tensor(floor, dtype=image.dtype, device=image.device)
    real = add_gaussian_noise(signal, sigma, generator)
    imaginary = add_gaussian_noise(torch.zeros_like(signal), sigma, generator)
    return torch.sqrt(real**2 + imaginary**2) + torch.as_tensor(floor, dtype=image.dtype, device=image.device)


def noise_sigma(array: np.ndarray, modality: str, level: float) -> float:
    """The Gaussian sigma :func:`noisy_volume` uses: ``level`` HU for CT, ``level * robust range`` for MR."""
    return float(level) if modality == "CT" else float(level) * robust_range(array)


def noisy_volume(array: np.ndarray, modality: str, level: float, seed: int = 0) -> np.ndarray:
    """A noisy float64 copy of a ``(I, J, K)`` scan.

    Args:
        array: clean scan in its own intensities.
        modality: ``"CT"``: Gaussian with ``sigma = level`` HU; otherwise Rician with
            ``sigma = level * robust range`` (the MR magnitude is taken to be 0 at zero signal).
        level: noise level (HU for CT, a fraction for MR, e.g. 0.05).
    """
    if level < 0:
        raise ValueError(f"noise level must be >= 0, got {level}")
    generator = torch.Generator().manual_seed(seed)
    image = torch.from_numpy(np.asarray(array, dtype=np.float64)).float()
    sigma = noise_sigma(array, modality, level)
    if modality == "CT":
        noisy = add_gaussian_noise(image, sigma, generator)
    else:
        noisy = add_rician_noise(image, sigma, 0.0, generator)
    return noisy.double().numpy()
