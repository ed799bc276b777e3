"""Patch masking as pure, device-side functions.

The one mask convention: a ``bool`` tensor of shape ``(B, N)`` over the patch grid (C order), where
``True`` means *masked* (hidden from the encoder, to be reconstructed). Every sample of a batch has the
same number of masked patches, so visible tokens stack into a dense ``(B, K, D)`` tensor.

All functions draw randomness only from the ``generator`` they are given (which must live on
``device``), never from global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medmae.models.patching import as_size3

MASK_KINDS = ("random", "block", "slab")


def num_masked(num_patches: int, ratio: float) -> int:
    """``round(ratio * N)``, kept within ``[1, N - 1]`` so both sides are non-empty."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    return min(max(round(ratio * num_patches), 1), num_patches - 1)


def mask_from_scores(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask the ``count`` highest-scoring patches of each row. ``scores``: ``(B, N)`` → bool ``(B, N)``."""
    top = torch.topk(scores, count, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None):
    return torch.rand(tuple(shape), generator=generator, device=device)


def random_mask(
    batch_size: int,
    grid: Sequence[int],
    ratio: float = 0.75,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Independent uniform masking: exactly ``round(ratio * N)`` patches per sample. Returns ``(B, N)``."""
    n = int(torch.tensor(as_size3(grid, "grid")).prod())
    return mask_from_scores(_rand((batch_size, n), generator, device), num_masked(n, ratio))


def _grid_coords(grid: Sequence[int], device: torch.device | str | None) -> torch.Tensor:
    """``(N, 3)`` integer coordinates of every patch, C order."""
    axes = [torch.arange(g, device=device) for g in as_size3(grid, "grid")]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def block_mask(
    batch_size: int,
    grid: Sequence[int],
    ratio: float = 0.75,
    block_size: int | Sequence[int] = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask contiguous blocks of ``block_size`` patches (a random block tiling per sample).

    Whole blocks are taken in random order until ``round(ratio * N)`` patches are masked; only the
    last block may be partial, so the count stays exact. Returns ``(B, N)``.
    """
    grid3, block3 = as_size3(grid, "grid"), as_size3(block_size, "block_size")
    coords = _grid_coords(grid3, device)  # (N, 3)
    n = coords.shape[0]
    blocks_per_axis = torch.tensor([g // b + 1 for g, b in zip(grid3, block3)], device=device)
    offsets = (_rand((batch_size, 3), generator, device) * torch.tensor(block3, device=device)).long()
    block_coords = (coords[None] + offsets[:, None]) // torch.tensor(block3, device=device)  # (B, N, 3)
    strides = torch.stack([blocks_per_axis[1] * blocks_per_axis[2], blocks_per_axis[2], blocks_per_axis[2] * 0 + 1])
    block_ids = (block_coords * strides).sum(-1)  # (B, N)
    block_noise = _rand((batch_size, int(blocks_per_axis.prod())), generator, device)
    scores = torch.gather(block_noise, 1, block_ids) + 1e-6 * _rand((batch_size, n), generator, device)
    return mask_from_scores(scores, num_masked(n, ratio))


def slab_mask(
    batch_size: int,
    grid: Sequence[int],
    ratio: float = 0.75,
    axis: int = 2,
    thickness: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask whole planes of patches perpendicular to ``axis`` (what corrupted slices look like).

    ``round(ratio * G)`` of the ``G`` planes along ``axis`` are masked, taken in random slabs of
    ``thickness`` adjacent planes; every masked plane is masked completely. Returns ``(B, N)``.
    """
    grid3 = as_size3(grid, "grid")
    if axis not in (0, 1, 2):
        raise ValueError(f"slab axis must be 0, 1 or 2, got {axis}")
    if thickness < 1:
        raise ValueError(f"slab thickness must be >= 1, got {thickness}")
    planes = grid3[axis]
    if planes < 2:
        raise ValueError(f"slab masking needs at least 2 patch planes along axis {axis}, grid is {grid3}")
    count = num_masked(planes, ratio)
    offsets = (_rand((batch_size, 1), generator, device) * thickness).long()
    slab_ids = (torch.arange(planes, device=device)[None] + offsets) // thickness  # (B, G)
    slab_noise = _rand((batch_size, planes // thickness + 2), generator, device)
    plane_scores = torch.gather(slab_noise, 1, slab_ids) + 1e-6 * _rand((batch_size, planes), generator, device)
    plane_mask = mask_from_scores(plane_scores, count)  # (B, G)
    coords = _grid_coords(grid3, device)[:, axis]  # (N,)
    return plane_mask[:, coords]


@dataclass(frozen=True)
class MaskingConfig:
    """How patches are hidden during pretraining.

    Args:
        kind: ``"random"``, ``"block"`` or ``"slab"``.
        ratio: fraction of patches masked (of planes, for ``"slab"``).
        block_size: block edge in patches (``"block"``).
        axis: plane normal (``"slab"``); 2 is the slice axis of RAS volumes.
        thickness: adjacent planes per slab (``"slab"``).
    """

    kind: str = "random"
    ratio: float = 0.75
    block_size: int = 2
    axis: int = 2
    thickness: int = 1

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {self.kind!r}")
        num_masked(100, self.ratio)  # validates the ratio

    def masked_count(self, grid: Sequence[int]) -> int:
        """How many patches :meth:`sample` masks per sample on ``grid``."""
        grid3 = as_size3(grid, "grid")
        total = grid3[0] * grid3[1] * grid3[2]
        if self.kind == "slab":
            return num_masked(grid3[self.axis], self.ratio) * (total // grid3[self.axis])
        return num_masked(total, self.ratio)

    def sample(
        self,
        batch_size: int,
        grid: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw a ``(B, N)`` bool mask for this configuration."""
        if self.kind == "random":
            return random_mask(batch_size, grid, self.ratio, generator, device)
        if self.kind == "block":
            return block_mask(batch_size, grid, self.ratio, self.block_size, generator, device)
        return slab_mask(batch_size, grid, self.ratio, self.axis, self.thickness, generator, device)


def split_indices(mask: torch.Tensor, masked_count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of visible and of masked patches, ascending within each sample.

    Args:
        mask: ``(B, N)`` bool, the same number of ``True`` in every row.
        masked_count: that number, when the caller knows it (masks from :class:`MaskingConfig`): the
            mask is then not checked, which avoids a device-to-host synchronisation on GPUs.

    Returns:
        ``visible`` ``(B, K)`` and ``masked`` ``(B, N - K)`` long tensors.
    """
    if masked_count is None:
        counts = mask.sum(dim=1)
        if mask.shape[0] and bool((counts != counts[0]).any()):
            raise ValueError(f"every sample must mask the same number of patches, got counts {counts.tolist()}")
        masked_count = int(counts[0]) if mask.shape[0] else 0
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    keep = mask.shape[1] - masked_count
    return order[:, :keep], order[:, keep:]
