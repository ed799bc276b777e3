"""A UNETR-style segmentation network on top of :class:`~medmae.models.vit.ViT3DEncoder`.

The decoder is built from MONAI's UNETR blocks. Unlike ``monai.networks.nets.UNETR`` it is not tied to
patch 16 and feature layers 3/6/9: for a cubic patch of edge ``p = 2**n`` the token grid is ``n`` halvings
below full resolution, so the network has

* one convolutional skip from the input volume (full resolution, ``UnetrBasicBlock``),
* ``n - 1`` skips from encoder hidden states (``feature_layers``), each brought by ``UnetrPrUpBlock`` to
  resolution ``1 / 2**s`` for ``s = 1 .. n-1``,
* ``n`` ``UnetrUpBlock`` stages from the final tokens back to full resolution, and a ``UnetOutBlock``.

Supported patch sizes: cubic powers of two from 2 to 32 (patch 16 gives exactly MONAI's UNETR layout with
3 feature layers; patch 8 needs 2, patch 4 needs 1, patch 2 none). Input channels and classes are free.
The sin-cos position embedding is computed for the input's patch grid, so any input size that is a
multiple of the patch size works without resampling.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from medmae.models.vit import ViT3DEncoder

SUPPORTED_PATCHES = (2, 4, 8, 16, 32)


def upsampling_stages(patch_size: Sequence[int]) -> int:
    """``log2`` of a cubic power-of-two patch edge: the number of 2x upsampling stages back to voxels.

    Raises:
        ValueError: the patch is not cubic or its edge is not one of :data:`SUPPORTED_PATCHES`.
    """
    edges = set(int(p) for p in patch_size)
    edge = next(iter(edges))
    if len(edges) != 1 or edge not in SUPPORTED_PATCHES:
        raise ValueError(
            f"the UNETR decoder needs a cubic patch with edge in {list(SUPPORTED_PATCHES)}, got "
            f"{tuple(patch_size)}; pretrain with such a patch size (e.g. --model.patch_size 8)"
        )
    return edge.bit_length() - 1


def default_feature_layers(depth: int, count: int) -> list[int]:
    """``count`` 0-based block indices spread evenly over ``depth`` (depth 12, count 3 → [3, 6, 9], like MONAI)."""
    return [depth * (i + 1) // (count + 1) for i in range(count)]


class UNETR3D(nn.Module):
    """ViT encoder + UNETR decoder.

    Args:
        encoder: the (pretrained or fresh) ViT; its patch size fixes the number of decoder stages.
        out_channels: segmentation classes including background.
        feature_layers: 0-based encoder blocks feeding the skips, from the finest skip (resolution 1/2) to
            the coarsest; ``log2(patch) - 1`` of them. None spreads them evenly over the encoder.
        feature_size: channels of the full-resolution stage; stage ``s`` has ``feature_size * 2**s``.
        norm_name: MONAI normalisation of the convolutional blocks (``"instance"``, ``"batch"``, ...).
        res_block: residual convolution blocks.
    """

    def __init__(
        self,
        encoder: ViT3DEncoder,
        out_channels: int,
        feature_layers: Sequence[int] | None = None,
        feature_size: int = 16,
        norm_name: str = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels (number of classes) must be >= 1, got {out_channels}")
        stages = upsampling_stages(encoder.patch_size)
        depth = len(encoder.blocks)
        layers = default_feature_layers(depth, stages - 1) if feature_layers is None else list(feature_layers)
        if len(layers) != stages - 1:
            raise ValueError(
                f"patch {encoder.patch_size[0]} needs {stages - 1} feature layer(s) (one per skip at 1/2 .. "
                f"1/{2 ** (stages - 1)} resolution), got {layers}"
            )
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"feature layers {bad} out of range for an encoder of depth {depth} (0 .. {depth - 1})")
        if any(a >= b for a, b in itertools.pairwise(layers)):
            raise ValueError(f"feature layers must increase (finest skip first, like MONAI's 3/6/9), got {layers}")
        self.encoder = encoder
        self.feature_layers = layers
        self.stages = stages
        hidden = encoder.hidden_size
        width = [feature_size * 2**s for s in range(stages)]
        self.input_skip = UnetrBasicBlock(3, encoder.in_channels, width[0], 3, 1, norm_name, res_block)
        # skip s (1 .. stages-1) is upsampled from the token grid (1/2**stages) by stages - s transposed convs
        self.token_skips = nn.ModuleList(
            UnetrPrUpBlock(3, hidden, width[s], stages - s - 1, 3, 1, 2, norm_name, True, res_block)
            for s in range(1, stages)
        )
        # up block s goes from resolution 1/2**(s+1) to 1/2**s and merges skip s
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(3, hidden if s == stages - 1 else width[s + 1], width[s], 3, 2, norm_name, res_block)
            for s in range(stages)
        )
        self.head = UnetOutBlock(3, width[0], out_channels)
        self.out_channels = out_channels

    def tokens_to_volume(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """``(B, N, D)`` tokens → ``(B, D, gd, gh, gw)`` feature volume."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` (each size a multiple of the patch) → ``(B, classes, D, H, W)`` logits."""
        grid = self.encoder.check_input(volume)
        tokens, hidden = self.encoder.forward_intermediates(volume, self.feature_layers)
        skips = [self.input_skip(volume)]
        skips += [block(self.tokens_to_volume(h, grid)) for block, h in zip(self.token_skips, hidden)]
        features = self.tokens_to_volume(tokens, grid)
        for s in reversed(range(self.stages)):
            features = self.up_blocks[s](features, skips[s])
        return self.head(features)
