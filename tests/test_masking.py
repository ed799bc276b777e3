"""Masking: exact counts, per-sample variety, seeded reproducibility, whole planes for slabs."""

from __future__ import annotations

import pytest
import torch

from medmae.models.masking import MaskingConfig, block_mask, num_masked, random_mask, slab_mask, split_indices

GRID = (4, 6, 5)
N = 4 * 6 * 5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
def test_random_mask_exact_count_and_variety(ratio: float) -> None:
    mask = random_mask(8, GRID, ratio, gen())
    assert mask.dtype == torch.bool and mask.shape == (8, N)
    assert mask.sum(1).tolist() == [round(ratio * N)] * 8
    assert len({tuple(row.tolist()) for row in mask}) == 8  # different per sample


@pytest.mark.parametrize("kind", ["random", "block", "slab"])
def test_reproducible_with_a_seed(kind: str) -> None:
    config = MaskingConfig(kind=kind)
    assert torch.equal(config.sample(4, GRID, gen(3)), config.sample(4, GRID, gen(3)))
    assert not torch.equal(config.sample(4, GRID, gen(3)), config.sample(4, GRID, gen(4)))


def test_block_mask_count_and_contiguity() -> None:
    mask = block_mask(16, GRID, 0.5, 2, gen())
    assert mask.sum(1).tolist() == [num_masked(N, 0.5)] * 16
    # blocks: a masked patch usually has a masked neighbour (random masking would give ~50 %)
    volume = mask.reshape(16, *GRID)
    neighbour = torch.zeros_like(volume)
    for axis in (1, 2, 3):
        neighbour |= torch.roll(volume, 1, axis) | torch.roll(volume, -1, axis)
    assert (volume & neighbour).sum() / volume.sum() > 0.9


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("thickness", [1, 2])
def test_slab_masks_cover_whole_planes(axis: int, thickness: int) -> None:
    mask = slab_mask(6, GRID, 0.5, axis, thickness, gen(axis))
    volume = mask.reshape(6, *GRID).movedim(axis + 1, 1)  # (B, planes, ...)
    per_plane = volume.flatten(2)
    assert torch.all(per_plane.all(-1) | ~per_plane.any(-1))  # each plane fully masked or fully visible
    assert per_plane.all(-1).sum(1).tolist() == [round(0.5 * GRID[axis])] * 6


def test_split_indices_partition() -> None:
    mask = random_mask(3, GRID, 0.75, gen())
    visible, masked = split_indices(mask)
    assert visible.shape == (3, N - round(0.75 * N)) and masked.shape == (3, round(0.75 * N))
    for b in range(3):
        assert not mask[b, visible[b]].any() and mask[b, masked[b]].all()
        assert torch.equal(torch.sort(torch.cat([visible[b], masked[b]])).values, torch.arange(N))
    with pytest.raises(ValueError, match="same number"):
        split_indices(torch.tensor([[True, False], [True, True]]))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        MaskingConfig(ratio=1.0)
    with pytest.raises(ValueError, match="mask kind"):
        MaskingConfig(kind="checkerboard")
    with pytest.raises(ValueError, match="axis"):
        slab_mask(1, GRID, 0.5, axis=3)


@pytest.mark.parametrize("kind", ["random", "block", "slab"])
def test_masked_count_matches_sample(kind: str) -> None:
    for grid in [(4, 6, 5), (2, 2, 3), (6, 6, 6)]:
        config = MaskingConfig(kind=kind, ratio=0.6)
        mask = config.sample(3, grid, gen())
        assert mask.sum(1).tolist() == [config.masked_count(grid)] * 3
        visible, _masked = split_indices(mask, config.masked_count(grid))
        assert torch.equal(torch.stack(split_indices(mask)[0:1]), torch.stack([visible]))
