"""Classical baselines for restoration: interpolation across slice gaps; Gaussian and non-local-means denoising.

Denoiser parameters are chosen per scan by the best PSNR against the ground truth (an oracle), so the
baselines are as strong as they can be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.interpolate import interp1d, make_interp_spline
from scipy.ndimage import gaussian_filter
from skimage.restoration import denoise_nl_means

from medmae.restore.net import fill_scan
from medmae.restore.nonlocal_means import nonlocal_means


def interpolate_slices(array: np.ndarray, axis: int, missing: Sequence[int], kind: str = "linear") -> np.ndarray:
    """A float64 copy of ``array`` ``(I, J, K)`` with the ``missing`` slices along ``axis`` interpolated
    from the intact ones (``linear`` or ``cubic`` spline along the axis)."""
    size = array.shape[axis]
    known = np.array([k for k in range(size) if k not in set(missing)])
    if kind not in ("linear", "cubic"):
        raise ValueError(f"interpolation must be linear or cubic, got {kind!r}")
    values = np.take(array.astype(np.float64), known, axis=axis)
    if kind == "linear" or len(known) < 4:
        function = interp1d(known, values, axis=axis, kind="linear", fill_value="extrapolate", assume_sorted=True)
    else:
        function = make_interp_spline(known, values, k=3, axis=axis)
    out = array.astype(np.float64, copy=True)
    index: list[slice | list[int]] = [slice(None)] * array.ndim
    index[axis] = list(missing)
    out[tuple(index)] = function(np.asarray(missing, dtype=np.float64))
    return out


def flow_interpolation(corrupted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Motion-compensated interpolation (:func:`~medmae.restore.net.fill_masked` ``flow``) of the masked slices of
    ``(I, J, K)`` ``corrupted``, on its own intensities; float64."""
    return fill_scan(corrupted, mask, "flow").double().numpy()


def best_of(
    candidates: dict[str, Callable[[], np.ndarray]], score: Callable[[np.ndarray], float]
) -> tuple[str, np.ndarray]:
    """The candidate (name, result) with the highest ``score``."""
    results = {name: make() for name, make in candidates.items()}
    best = max(results, key=lambda name: score(results[name]))
    return best, results[best]


def gaussian_denoise(
    noisy: np.ndarray, score: Callable[[np.ndarray], float], sigmas: Sequence[float] = (0.5, 0.75, 1.0, 1.5, 2.0)
) -> tuple[str, np.ndarray]:
    """Gaussian smoothing with the best ``sigma`` (voxels)."""
    noisy = noisy.astype(np.float64)
    return best_of({f"sigma={s}": (lambda s=s: gaussian_filter(noisy, s)) for s in sigmas}, score)


def nlm_denoise(
    noisy: np.ndarray,
    score: Callable[[np.ndarray], float],
    sigma: float,
    factors: Sequence[float] = (0.4, 0.6, 0.8, 1.0, 1.2),
    backend: str = "scikit-image",
) -> tuple[str, np.ndarray]:
    """3D non-local means with ``h = factor * sigma``, the best factor.

    ``backend``: ``"scikit-image"`` (fast mode, patch 3, search distance 4) or ``"medmae"``
    (:func:`~medmae.restore.nonlocal_means.nonlocal_means`, the filter an ``nlm_input`` denoiser sees, so such a
    model is compared with the best that it gives). ``sigma`` is the true noise level (the evaluation adds the
    noise itself), so the baseline is an oracle.
    """
    if sigma <= 0:
        raise ValueError(f"non-local means needs the noise sigma > 0, got {sigma}")
    if backend not in ("scikit-image", "medmae"):
        raise ValueError(f"non-local means backend must be scikit-image or medmae, got {backend!r}")
    noisy = noisy.astype(np.float64)
    volume = torch.from_numpy(noisy.astype(np.float32))[None, None] if backend == "medmae" else None

    def run(factor: float) -> np.ndarray:
        if volume is not None:
            return nonlocal_means(volume, torch.tensor([float(sigma)]), factor)[0, 0].double().numpy()
        return denoise_nl_means(noisy, patch_size=3, patch_distance=4, h=factor * sigma, sigma=sigma, fast_mode=True)

    return best_of({f"h={f}sigma": (lambda f=f: run(f)) for f in factors}, score)
