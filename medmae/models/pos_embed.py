"""Fixed 3D sine-cosine position embeddings, and resampling of any embedding to a new patch grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medmae.models.patching import as_size3


def sincos_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = temperature ** (-i / (dim/2))``.

    Args:
        positions: ``(N,)`` float positions.
        dim: even output width.

    Returns:
        ``(N, dim)``: the ``dim/2`` sines, then the ``dim/2`` cosines.
    """
    if dim % 2:
        raise ValueError(f"a 1D sin-cos embedding needs an even width, got {dim}")
    half = dim // 2
    omega = temperature ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """3D sin-cos embedding for a ``(gd, gh, gw)`` patch grid.

    Each axis gets ``2 * (dim // 6)`` channels (depth, then height, then width); when ``dim`` is not a
    multiple of 6 the remaining channels are zero, so any width works (MONAI's version needs ``dim % 6 == 0``).

    Returns:
        float32 ``(1, gd*gh*gw, dim)``, tokens in C order over the grid.
    """
    gd, gh, gw = as_size3(grid, "grid")
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ValueError(f"embedding width must be at least 6, got {dim}")
    coords = torch.stack(
        torch.meshgrid(torch.arange(gd), torch.arange(gh), torch.arange(gw), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    parts = [sincos_1d(coords[:, axis].double(), per_axis, temperature) for axis in range(3)]
    embed = torch.cat(parts, dim=1)
    embed = F.pad(embed, (0, dim - embed.shape[1]))
    return embed.float()[None]


def resample_pos_embed(embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Trilinearly resample a (learned) ``(1, N_old, D)`` embedding to ``new_grid``; returns ``(1, N_new, D)``."""
    old3, new3 = as_size3(old_grid, "grid"), as_size3(new_grid, "grid")
    if embed.shape[1] != old3[0] * old3[1] * old3[2]:
        raise ValueError(f"embedding has {embed.shape[1]} tokens, grid {old3} needs {old3[0] * old3[1] * old3[2]}")
    if old3 == new3:
        return embed
    volume = embed.reshape(1, *old3, -1).permute(0, 4, 1, 2, 3)
    volume = F.interpolate(volume.float(), size=new3, mode="trilinear", align_corners=False)
    return volume.permute(0, 2, 3, 4, 1).reshape(1, new3[0] * new3[1] * new3[2], -1).to(embed.dtype)
