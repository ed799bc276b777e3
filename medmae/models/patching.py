"""Cutting volumes into patches and back.

One patch-vector layout is used everywhere (embedding, reconstruction targets, export to MONAI's
convolutional patch embedding): channels first, then the patch's voxels in ``(pd, ph, pw)`` order,
i.e. a flattened ``(C, pd, ph, pw)`` block. Patches are numbered in C order over the patch grid
``(D/pd, H/ph, W/pw)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Size3 = tuple[int, int, int]


def as_size3(value: int | Sequence[int], name: str = "size") -> Size3:
    """``16`` → ``(16, 16, 16)``; a 3-sequence is kept. Raises ValueError otherwise."""
    values = (value, value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value!r}")
    return values  # type: ignore[return-value]


def grid_shape(spatial: Sequence[int], patch: Sequence[int]) -> Size3:
    """Number of patches along each axis; the spatial size must be a multiple of the patch size."""
    spatial3, patch3 = as_size3(spatial, "spatial size"), as_size3(patch, "patch size")
    if any(s % p for s, p in zip(spatial3, patch3)):
        raise ValueError(f"spatial size {spatial3} is not a multiple of the patch size {patch3}")
    return tuple(s // p for s, p in zip(spatial3, patch3))  # type: ignore[return-value]


def patchify(volume: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Cut volumes into non-overlapping patches.

    Args:
        volume: ``(B, C, D, H, W)``.
        patch: ``(pd, ph, pw)``; ``D, H, W`` must be multiples.

    Returns:
        ``(B, N, C*pd*ph*pw)`` with ``N = (D/pd)*(H/ph)*(W/pw)``.
    """
    b, c = volume.shape[:2]
    gd, gh, gw = grid_shape(volume.shape[2:], patch)
    pd, ph, pw = as_size3(patch)
    x = volume.reshape(b, c, gd, pd, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, gd, gh, gw, C, pd, ph, pw)
    return x.reshape(b, gd * gh * gw, c * pd * ph * pw)


def gather_patches(volume: torch.Tensor, patch: Sequence[int], indices: torch.Tensor) -> torch.Tensor:
    """The patch vectors of selected patches only: ``patchify(volume, patch)`` gathered at ``indices``,
    copying just the selected voxels (no full patchified copy of the volume).

    Args:
        volume: ``(B, C, D, H, W)``.
        patch: ``(pd, ph, pw)``; ``D, H, W`` must be multiples.
        indices: ``(B, K)`` long, grid indices in the C-order numbering of :func:`patchify`.

    Returns:
        ``(B, K, C*pd*ph*pw)``.
    """
    b, c = volume.shape[:2]
    gd, gh, gw = grid_shape(volume.shape[2:], patch)
    pd, ph, pw = as_size3(patch)
    blocks = volume.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)  # a view
    rows = torch.arange(b, device=volume.device)[:, None]
    picked = blocks[rows, indices // (gh * gw), (indices // gw) % gh, indices % gw]  # (B, K, C, pd, ph, pw)
    return picked.reshape(b, indices.shape[1], c * pd * ph * pw)


def unpatchify(patches: torch.Tensor, grid: Sequence[int], patch: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``(B, N, C*pd*ph*pw)``.
        grid: ``(gd, gh, gw)`` with ``gd*gh*gw == N``.
        patch: ``(pd, ph, pw)``.
        channels: ``C``.

    Returns:
        ``(B, C, gd*pd, gh*ph, gw*pw)``.
    """
    gd, gh, gw = as_size3(grid, "grid")
    pd, ph, pw = as_size3(patch)
    b, n, p = patches.shape
    if n != gd * gh * gw or p != channels * pd * ph * pw:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not match grid {(gd, gh, gw)}, "
            f"patch {(pd, ph, pw)} and {channels} channel(s)"
        )
    x = patches.reshape(b, gd, gh, gw, channels, pd, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, gd, pd, gh, ph, gw, pw)
    return x.reshape(b, channels, gd * pd, gh * ph, gw * pw)


def patch_mask_to_voxels(mask: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """Expand a per-patch mask ``(B, N)`` to a voxel mask ``(B, 1, D, H, W)`` of the same dtype."""
    pd, ph, pw = as_size3(patch)
    gd, gh, gw = as_size3(grid, "grid")
    m = mask.reshape(mask.shape[0], 1, gd, 1, gh, 1, gw, 1)
    m = m.expand(-1, -1, -1, pd, -1, ph, -1, pw)
    return m.reshape(mask.shape[0], 1, gd * pd, gh * ph, gw * pw)
