"""Motion-compensated interpolation across slice gaps: 2D demons registration between the slices that border
a gap, and each missing slice blended from both of them warped part of the way along the motion.

Linear interpolation across a gap averages the two bordering slices, so an edge that moves between them shows
up twice at half contrast. Registering the two slices (symmetric-forces demons: Thirion's demons with the
mean of both images' gradients, the update capped at half a voxel, the field Gaussian-smoothed after each
iteration; coarse to fine) estimates where each structure moves, and every missing slice takes the two
slices moved to where the structure lies at its position between them, so edges come back once, in place.
Where the slices do not move, the result is linear interpolation.

Conventions: planes are ``(N, 1, H, W)``; a displacement field is ``(N, 2, H, W)`` in voxels, (row, column),
and ``warp(image, field)(x) = image(x + field(x))`` (bilinear, border values outside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers.simplelayers import gaussian_1d, separable_filtering

ROUNDOFF_FRACTION = 1e-5  # smaller differences are resampling round-off (ITK's demons threshold them too)
FLAT_FRACTION = 1e-3  # differences and gradients below this fraction of a plane's range count as flat
CONFIDENCE_SIGMA = 2.0  # voxels: how widely the warped / unwarped disagreement is averaged


def warp(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``image`` ``(N, C, H, W)`` sampled at ``x + field(x)`` (``field`` ``(N, 2, H, W)``, rows then columns)."""
    height, width = image.shape[2:]
    rows = torch.arange(height, device=image.device, dtype=image.dtype).view(1, height, 1)
    cols = torch.arange(width, device=image.device, dtype=image.dtype).view(1, 1, width)
    y = (rows + field[:, 0]) * (2.0 / max(height - 1, 1)) - 1.0
    x = (cols + field[:, 1]) * (2.0 / max(width - 1, 1)) - 1.0
    grid = torch.stack((x, y), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _gradient(image: torch.Tensor) -> torch.Tensor:
    """Central differences of ``(N, 1, H, W)`` (one-sided at the border): ``(N, 2, H, W)``, rows then columns."""
    if min(image.shape[2:]) < 2:
        return torch.zeros(image.shape[0], 2, *image.shape[2:], device=image.device, dtype=image.dtype)
    return torch.cat(torch.gradient(image, dim=(2, 3)), dim=1)


def _smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=3.0, approx="sampled").to(field)
    kernel = kernel / kernel.sum()
    return separable_filtering(field, [kernel] * 2, mode="replicate")


def demons_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    iterations: int = 50,
    sigma: float = 1.5,
    levels: int = 2,
) -> torch.Tensor:
    """Displacement field ``u`` ``(N, 2, H, W)`` with ``moving(x + u(x)) ≈ fixed(x)`` (symmetric-forces demons).

    Each iteration moves every voxel by ``-(m - f) g / (|g|² + (m - f)²)``, with ``m`` the warped moving image,
    ``f`` the fixed one and ``g`` the mean of their gradients (at most half a voxel; invariant to the
    intensity scale; differences and gradients far below ``FLAT_FRACTION`` of the planes' range move
    nothing), then smooths the field with a Gaussian of ``sigma`` voxels. ``levels`` halvings, coarse
    to fine; a level is skipped when a plane side would fall under 8 voxels.

    Args:
        fixed, moving: ``(N, 1, H, W)`` planes of the same size.
    """
    if fixed.shape != moving.shape or fixed.ndim != 4 or fixed.shape[1] != 1:
        shapes = f"{tuple(fixed.shape)}, {tuple(moving.shape)}"
        raise ValueError(f"expected two (N, 1, H, W) planes of one size, got {shapes}")
    fixed, moving = fixed.float(), moving.float()
    scales = [2**k for k in reversed(range(levels)) if min(fixed.shape[2:]) // 2**k >= 8] or [1]
    field = None
    for scale in scales:
        f = F.avg_pool2d(fixed, scale, ceil_mode=True) if scale > 1 else fixed
        m = F.avg_pool2d(moving, scale, ceil_mode=True) if scale > 1 else moving
        if field is None:
            field = torch.zeros(f.shape[0], 2, *f.shape[2:], device=f.device, dtype=f.dtype)
        else:
            ratio = torch.tensor([f.shape[2] / field.shape[2], f.shape[3] / field.shape[3]]).to(field)
            field = F.interpolate(field, size=f.shape[2:], mode="bilinear", align_corners=True) * ratio.view(1, 2, 1, 1)
        grad_fixed = _gradient(f)
        both = torch.cat((f, m), dim=1).flatten(1)
        span = (both.max(1).values - both.min(1).values).view(-1, 1, 1, 1)
        floor = (FLAT_FRACTION * span) ** 2  # no motion from rounding noise where both images are flat
        for _ in range(iterations):
            warped = warp(m, field)
            difference = warped - f
            difference = difference.masked_fill(difference.abs() <= ROUNDOFF_FRACTION * span, 0.0)
            grad = 0.5 * (grad_fixed + _gradient(warped))
            denominator = (grad**2).sum(1, keepdim=True) + difference**2 + floor
            update = -difference * grad / denominator.clamp_min(1e-30)
            field = _smooth(field + update, sigma)
    assert field is not None
    return field


def interpolate_between(
    before: torch.Tensor,
    after: torch.Tensor,
    fractions: torch.Tensor,
    values: tuple[torch.Tensor, torch.Tensor] | None = None,
    **demons: float,
) -> torch.Tensor:
    """Planes at ``fractions`` of the way from ``before`` to ``after``, each moved along the estimated motion.

    With ``u`` the field from ``before`` to ``after`` (``after(x + u) ≈ before(x)``) and ``v`` the reverse, the
    motion-compensated plane at ``t`` is the mean of ``(1-t) before(y - t u) + t after(y + (1-t) u)`` and
    ``(1-t) before(y + t v) + t after(y - (1-t) v)`` (each field read at ``y``; exact for a uniform motion).
    Where registration did not bring the two slices closer, that estimate is not trusted: each voxel blends it
    with linear interpolation, weighted by how much the warped pair disagrees (Gaussian-averaged squared
    difference ``e_w``) against the unwarped pair (``e_l``): ``e_l / (e_l + e_w)`` for the warped estimate.
    The motion is estimated on the mean over channels and moves every channel.

    Args:
        before, after: ``(N, C, H, W)``, the planes the motion and the trust are estimated on.
        fractions: ``(N, T)``, each in (0, 1): the positions of the planes to make for each pair.
        values: other ``(N, C, H, W)`` planes to interpolate with that motion and trust instead of
            ``before, after`` (the result is then linear in them).

    Returns:
        ``(N, T, C, H, W)`` in ``before``'s dtype (``values``' when given).
    """
    first, last = before.float(), after.float()
    n = first.shape[0]
    guide_first, guide_last = first.mean(1, keepdim=True), last.mean(1, keepdim=True)
    fields = demons_field(torch.cat((guide_first, guide_last)), torch.cat((guide_last, guide_first)), **demons)  # type: ignore[arg-type]
    forward, backward = fields[:n], fields[n:]
    unwarped_error = _smooth((guide_first - guide_last) ** 2, CONFIDENCE_SIGMA)
    value_first, value_last = (first, last) if values is None else (values[0].float(), values[1].float())
    planes = []
    for t in fractions.to(first).unbind(1):
        t = t.view(n, 1, 1, 1)
        shifts = (-t * forward, (1 - t) * forward, t * backward, -(1 - t) * backward)
        first_a, last_a, first_b, last_b = (
            warp(guide, shift) for guide, shift in zip((guide_first, guide_last, guide_first, guide_last), shifts)
        )
        warped_error = _smooth(0.5 * ((first_a - last_a) ** 2 + (first_b - last_b) ** 2), CONFIDENCE_SIGMA)
        trust = unwarped_error / (unwarped_error + warped_error).clamp_min(1e-12)
        first_a, last_a, first_b, last_b = (
            warp(plane, shift) for plane, shift in zip((value_first, value_last, value_first, value_last), shifts)
        )
        warped = 0.5 * ((1 - t) * (first_a + first_b) + t * (last_a + last_b))
        linear = (1 - t) * value_first + t * value_last
        planes.append(trust * warped + (1 - trust) * linear)
    return torch.stack(planes, dim=1).to(before.dtype if values is None else values[0].dtype)


def plane_gaps(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(axis, first, last)`` of each run of fully masked planes of a ``(D, H, W)`` mask with an intact-side
    plane on both sides (the axis with the most fully masked planes first; one axis per mask)."""
    full = [mask.movedim(axis, 0).flatten(1).all(1) for axis in range(3)]
    counts = [int(planes.sum()) for planes in full]
    axes = [axis for axis in range(3) if 0 < counts[axis] < mask.shape[axis]]
    if not axes:
        return []
    axis = max(axes, key=lambda a: counts[a])
    flags = full[axis].tolist()
    runs, start = [], None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            if start > 0 and index < len(flags):  # a plane on both sides
                runs.append((axis, start, index - 1))
            start = None
    return runs


def _bordering(stacks: list[torch.Tensor], gaps: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The planes before and after each ``(sample, axis, first, last)`` gap of its ``(S, C, P, Q)`` stack,
    stacked: two ``(G, C, P, Q)``."""
    before = torch.stack([stack[first - 1] for stack, (_, _, first, _) in zip(stacks, gaps)])
    return before, torch.stack([stack[last + 1] for stack, (_, _, _, last) in zip(stacks, gaps)])


def flow_fill_gaps(filled: torch.Tensor, mask: torch.Tensor, motion_from: torch.Tensor | None = None) -> torch.Tensor:
    """Replace the fill of each slice gap in ``filled`` by motion-compensated interpolation.

    A slice gap is a run of planes that ``mask`` covers completely, along the axis with the most such planes,
    with a plane on each side. Every other masked voxel keeps its value in ``filled`` (e.g. the linear
    interpolation of :func:`~medmae.restore.net.interpolate_masked`); voxels outside ``mask`` are untouched.
    The motion across each gap is estimated between its bordering planes in ``motion_from`` (``filled`` itself
    when None) and moves the bordering planes of ``filled``: with another ``motion_from`` (a scan, while
    ``filled`` holds a residual), the result is linear in ``filled``. Channels move together: the motion is
    estimated on their mean.

    Args:
        filled: ``(B, C, D, H, W)`` with the masked voxels filled (a partly masked border plane contributes
            its fill).
        mask: ``(B, 1 or C, D, H, W)`` bool, True = fill.
        motion_from: ``(B, C', D, H, W)`` filled the same way, or None.

    Returns:
        ``(B, C, D, H, W)``.
    """
    with torch.autocast(filled.device.type, enabled=False):  # registration needs fp32, also in bf16 training
        return _flow_fill_gaps(filled, mask, motion_from)


def _flow_fill_gaps(filled: torch.Tensor, mask: torch.Tensor, motion_from: torch.Tensor | None) -> torch.Tensor:
    source = filled if motion_from is None else motion_from
    out = filled.clone()
    jobs: dict[tuple[int, ...], list[tuple[int, int, int, int]]] = {}
    for sample in range(filled.shape[0]):
        for axis, first, last in plane_gaps(mask[sample].any(0)):
            plane_shape = tuple(s for d, s in enumerate(out.shape[2:]) if d != axis)
            jobs.setdefault(plane_shape, []).append((sample, axis, first, last))
    for group in jobs.values():  # gaps whose planes have one shape: one registration call
        planes = [out[sample].movedim(axis + 1, 0) for sample, axis, _, _ in group]  # (S, C, P, Q) views of out
        motion_planes = [source[sample].movedim(axis + 1, 0) for sample, axis, _, _ in group]
        widths = [last - first + 1 for _, _, first, last in group]
        fractions = torch.full((len(group), max(widths)), 0.5)  # padding for narrower gaps, discarded
        for row, width in enumerate(widths):
            fractions[row, :width] = torch.arange(1, width + 1) / (width + 1)
        values = None if motion_from is None else _bordering(planes, group)
        fills = interpolate_between(*_bordering(motion_planes, group), fractions, values)
        for p, (_, _, first, last), fill, width in zip(planes, group, fills, widths):
            p[first : last + 1] = fill[:width]
    return torch.where(mask.expand_as(out), out, filled)
