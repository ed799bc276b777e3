"""Slice gaps filled by an interpolation fitted to the scan itself (no training data, no checkpoint).

Every intact stretch of a scan is an example of what a gap hides. For each slice gap, gaps of the same width
are cut at up to ``MAX_POSITIONS`` other places along the same axis, where the gap's whole neighbourhood is
intact, and filled by motion-compensated interpolation (:mod:`medmae.restore.flow`). A ridge regression then
learns, separately for each slice of the gap, a correction of that fill from local features: the 3x3
in-plane neighbourhood of the two warped halves of the flow fill and of the four planes around the gap
(two on each side). The ridge strength is chosen by leave-one-position-out cross-validation; when no strength
predicts the held-out positions better than the flow fill, the gap keeps the flow fill. The fit is linear, so
it cannot memorise the scan, and it adapts to what the scan is: its slice spacing, its anatomy, its noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medmae.restore.flow import interpolate_between, plane_gaps
from medmae.restore.net import fill_scan

MAX_POSITIONS = 24  # example gaps per real gap: enough for a stable fit of the features below
RIDGE_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean diagonal of the normalised Gram matrix
NEIGHBOURHOOD = 3  # in-plane window of each feature map


@dataclass(frozen=True)
class GapFit:
    """How one slice gap was filled.

    ``positions``: example gaps fitted on; ``strengths``: the ridge strength chosen for each slice of the gap
    (None: the flow fill was kept); ``held_out_gain``: held-out squared error of the flow fill divided by
    that of the fitted fill, per slice (1.0 where the flow fill was kept).
    """

    axis: int
    first: int
    last: int
    positions: int
    strengths: tuple[float | None, ...]
    held_out_gain: tuple[float, ...]


def gap_features(planes: torch.Tensor, starts: list[int], width: int) -> torch.Tensor:
    """Features of the gaps ``[s, s + width)`` of a ``(D, P, Q)`` stack of planes, for each start ``s``.

    The maps per gap slice are the two halves of its flow fill (the bordering planes warped along the motion,
    each with its weight; they add up to the flow fill) and the planes ``s - 2, s - 1, s + width, s + width + 1``
    (clamped to the stack); each map contributes its ``NEIGHBOURHOOD``² in-plane neighbours (edges
    replicated), and a constant ends the list.

    Returns:
        ``(N, width, 2 + 6 * NEIGHBOURHOOD², P, Q)`` float32, the flow fill first.
    """
    depth = planes.shape[0]
    start = torch.tensor(starts)
    before, after = planes[start - 1, None], planes[start + width, None]  # (N, 1, P, Q)
    fractions = (torch.arange(1, width + 1, dtype=torch.float32) / (width + 1)).expand(len(starts), width)
    zeros = torch.zeros_like(before)
    halves = interpolate_between(
        before, after, fractions, values=(torch.cat((before, zeros), 1), torch.cat((zeros, after), 1))
    )  # (N, width, 2, P, Q)
    around = [(start - 2).clamp_min(0), start - 1, start + width, (start + width + 1).clamp_max(depth - 1)]
    context = planes[torch.stack(around, 1)]  # (N, 4, P, Q)
    maps = torch.cat((halves, context[:, None].expand(-1, width, -1, -1, -1)), 2)  # (N, width, 6, P, Q)
    n, _, count, height, breadth = maps.shape
    pad = NEIGHBOURHOOD // 2
    padded = F.pad(maps.reshape(n * width, count, height, breadth), (pad,) * 4, mode="replicate")
    shifted = [
        padded[:, :, dy : dy + height, dx : dx + breadth] for dy in range(NEIGHBOURHOOD) for dx in range(NEIGHBOURHOOD)
    ]
    neighbours = torch.stack(shifted, 2).reshape(n, width, count * NEIGHBOURHOOD**2, height, breadth)
    flow = halves.sum(2, keepdim=True)
    return torch.cat((flow, neighbours, torch.ones_like(flow)), 2)


@dataclass(frozen=True)
class RidgeFit:
    """The correction chosen for one gap slice: weights over the features (None: keep the flow fill)."""

    weights: np.ndarray | None
    strength: float | None
    held_out_gain: float


def loo_ridge(grams: np.ndarray, moments: np.ndarray, energies: np.ndarray) -> RidgeFit:
    """Ridge regression with its strength chosen by leave-one-group-out cross-validation, from sufficient
    statistics.

    For groups ``i`` with features ``A_i`` and targets ``r_i``: ``grams[i] = A_iᵀA_i`` ``(G, F, F)``,
    ``moments[i] = A_iᵀr_i`` ``(G, F)``, ``energies[i] = r_iᵀr_i`` ``(G,)``. Features are scaled to unit norm
    over all groups; each strength in ``RIDGE_STRENGTHS`` is relative to the mean diagonal of the scaled Gram matrix.
    The weights with no regression (all zero) are the reference: a strength is chosen only if its held-out
    error is lower.
    """
    gram, moment = grams.sum(0), moments.sum(0)
    scale = 1.0 / np.sqrt(np.maximum(np.diag(gram), 1e-30))
    grams_s, moments_s = grams * scale[:, None] * scale[None, :], moments * scale
    gram_s, moment_s = gram * scale[:, None] * scale[None, :], moment * scale
    identity = np.eye(gram.shape[0]) * np.trace(gram_s) / gram.shape[0]
    reference = float(energies.sum())
    best = (reference, None)
    for strength in RIDGE_STRENGTHS:
        error = 0.0
        for g, m, e in zip(grams_s, moments_s, energies):
            w = np.linalg.solve(gram_s - g + strength * identity, moment_s - m)
            error += float(e - 2.0 * w @ m + w @ g @ w)
        if error < best[0]:
            best = (error, strength)
    error, strength = best
    if strength is None:
        return RidgeFit(None, None, 1.0)
    weights = np.linalg.solve(gram_s + strength * identity, moment_s) * scale
    return RidgeFit(weights, strength, reference / max(error, 1e-30))


def example_starts(masked_planes: np.ndarray, width: int) -> list[int]:
    """Starts ``s`` of example gaps ``[s, s + width)`` whose planes ``s - 2 … s + width + 1`` (those inside the
    stack) are all intact, at most ``MAX_POSITIONS`` of them spread evenly. ``masked_planes``: ``(D,)`` bool."""
    depth = masked_planes.shape[0]
    valid = [s for s in range(1, depth - width) if not masked_planes[max(s - 2, 0) : min(s + width + 2, depth)].any()]
    if len(valid) <= MAX_POSITIONS:
        return valid
    return [valid[i] for i in np.linspace(0, len(valid) - 1, MAX_POSITIONS).round().astype(int)]


def _fit_gap(
    planes: torch.Tensor, masked_planes: np.ndarray, first: int, last: int, budget: float = 2.5e8
) -> tuple[list[RidgeFit], int]:
    """The ridge fit of each slice of the gap ``[first, last]`` of a ``(D, P, Q)`` stack, and the number of
    example gaps it used; features of at most ``budget`` bytes at a time (float32)."""
    width = last - first + 1
    starts = example_starts(masked_planes, width)
    if len(starts) < 2:
        return [RidgeFit(None, None, 1.0)] * width, len(starts)
    features = 2 + 6 * NEIGHBOURHOOD**2
    grams = np.zeros((width, len(starts), features, features))
    moments = np.zeros((width, len(starts), features))
    energies = np.zeros((width, len(starts)))
    chunk = max(1, int(budget // (4 * width * features * planes[0].numel())))
    for begin in range(0, len(starts), chunk):  # a few example gaps at a time: one registration call each
        batch = starts[begin : begin + chunk]
        values = gap_features(planes, batch, width)  # (n, width, F, P, Q)
        for row, start in enumerate(batch):
            for k in range(width):
                a = values[row, k].flatten(1).T.double()  # (P * Q, F)
                r = planes[start + k].double().flatten() - a[:, 0]
                grams[k, begin + row] = (a.T @ a).numpy()
                moments[k, begin + row] = (a.T @ r).numpy()
                energies[k, begin + row] = float(r @ r)
    return [loo_ridge(grams[k], moments[k], energies[k]) for k in range(width)], len(starts)


def fitted_fill_gaps(array: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[GapFit]]:
    """Fill the masked voxels of ``array`` ``(I, J, K)``: slice gaps by scan-fitted interpolation, the rest as
    ``fill_scan(..., "flow")`` fills them (linear interpolation between the nearest intact voxels).

    Args:
        array: the scan, any real dtype; ``mask``: ``(I, J, K)`` bool, True = fill.

    Returns:
        The filled array (float64; voxels outside ``mask`` equal ``array``) and how each slice gap was filled.
    """
    if array.shape != mask.shape or array.ndim != 3:
        raise ValueError(f"expected an (I, J, K) scan and a mask of its shape, got {array.shape} and {mask.shape}")
    base = fill_scan(array, mask, "flow")  # (I, J, K)
    voxel_mask = torch.from_numpy(np.asarray(mask, dtype=bool))
    out = base.double().clone()
    fits = []
    for axis, first, last in plane_gaps(voxel_mask):
        planes = base.movedim(axis, 0).contiguous()  # (D, P, Q)
        masked_planes = voxel_mask.movedim(axis, 0).flatten(1).any(1).numpy()
        ridge, positions = _fit_gap(planes, masked_planes, first, last)
        with torch.no_grad():
            values = gap_features(planes, [first], last - first + 1)[0]  # (width, F, P, Q)
        target = out.movedim(axis, 0)
        for k, fit in enumerate(ridge):
            if fit.weights is not None:
                correction = torch.einsum("fpq,f->pq", values[k].double(), torch.from_numpy(fit.weights))
                target[first + k] = values[k, 0].double() + correction
        fits.append(
            GapFit(
                axis,
                first,
                last,
                positions,
                tuple(f.strength for f in ridge),
                tuple(round(f.held_out_gain, 4) for f in ridge),
            )
        )
    result = out.numpy()
    return np.where(mask, result, np.asarray(array, dtype=np.float64)), fits
