"""patchify/unpatchify against a plain loop; voxel masks from patch masks."""

from __future__ import annotations

import pytest
import torch

from medmae.models.patching import gather_patches, grid_shape, patch_mask_to_voxels, patchify, unpatchify


def patchify_loop(volume: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    b, _c, d, h, w = volume.shape
    pd, ph, pw = patch
    rows = []
    for n in range(b):
        tokens = []
        for i in range(d // pd):
            for j in range(h // ph):
                for k in range(w // pw):
                    block = volume[n, :, i * pd : (i + 1) * pd, j * ph : (j + 1) * ph, k * pw : (k + 1) * pw]
                    tokens.append(block.reshape(-1))
        rows.append(torch.stack(tokens))
    return torch.stack(rows)


@pytest.mark.parametrize("patch", [(4, 4, 4), (4, 2, 8), (2, 4, 1)])
def test_patchify_matches_loop_and_round_trips(patch: tuple[int, int, int]) -> None:
    volume = torch.randn(2, 3, 8, 8, 8)
    patches = patchify(volume, patch)
    assert torch.equal(patches, patchify_loop(volume, patch))
    grid = grid_shape(volume.shape[2:], patch)
    assert torch.equal(unpatchify(patches, grid, patch, 3), volume)


@pytest.mark.parametrize("patch", [(4, 4, 4), (4, 2, 8), (2, 4, 1)])
def test_gather_patches_picks_the_rows_of_the_loop(patch: tuple[int, int, int]) -> None:
    volume = torch.randn(2, 3, 8, 8, 8)
    reference = patchify_loop(volume, patch)
    n = reference.shape[1]
    indices = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[: n // 3] for s in (0, 1)])
    picked = gather_patches(volume, patch, indices)
    assert torch.equal(picked, torch.stack([reference[b, indices[b]] for b in range(2)]))


def test_patch_mask_to_voxels_matches_patchified_mask() -> None:
    mask = torch.tensor([[True, False, False, True, False, True, True, False]])
    voxels = patch_mask_to_voxels(mask, (2, 2, 2), (2, 3, 1))
    assert voxels.shape == (1, 1, 4, 6, 2)
    per_patch = patchify(voxels.float(), (2, 3, 1))  # every voxel of a patch carries its patch's flag
    assert torch.equal(per_patch.amin(-1).bool(), mask) and torch.equal(per_patch.amax(-1).bool(), mask)


def test_bad_sizes_raise() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.zeros(1, 1, 10, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(torch.zeros(1, 7, 64), (2, 2, 2), (4, 4, 4), 1)
