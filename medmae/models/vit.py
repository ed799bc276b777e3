"""The 3D Vision Transformer encoder, built from MONAI's transformer blocks.

Parameter names follow :class:`monai.networks.nets.ViT` (``blocks.i.attn.qkv``, ``blocks.i.mlp.linear1``,
``norm``, ...) so exported weights load into MONAI's ``ViT`` and ``UNETR(...).vit`` unchanged, apart from
the patch embedding, which is a linear layer here (cheaper than a strided convolution, the same maths).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from torch.utils.checkpoint import checkpoint

from medmae.models.patching import Size3, as_size3, grid_shape, patchify
from medmae.models.pos_embed import sincos_3d


def freeze_unused_cross_attention_norms(blocks: nn.Module) -> None:
    """MONAI's TransformerBlock always creates ``norm_cross_attn``, used only with cross-attention.

    It stays in the state dict (MONAI's ``ViT`` expects the key) but is frozen so that optimisers skip it.
    """
    for block in blocks.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)


class ViT3DEncoder(nn.Module):
    """A ViT over cube (or anisotropic) patches of a 3D volume with a fixed 3D sin-cos position embedding.

    Args:
        in_channels: input channels (e.g. MRI sequences).
        patch_size: ``(pd, ph, pw)`` voxels, or one int for cubes.
        hidden_size: token width ``D``.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``hidden_size``.
        mlp_dim: hidden width of each block's MLP.
        qkv_bias: bias on the query/key/value projection (MONAI's default is False).
        dropout_rate: dropout inside the blocks.
        grad_checkpointing: recompute block activations in the backward pass to save memory.
    """

    def __init__(
        self,
        in_channels: int = 1,
        patch_size: int | Sequence[int] = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        qkv_bias: bool = False,
        dropout_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.in_channels = in_channels
        self.patch_size: Size3 = as_size3(patch_size, "patch_size")
        self.hidden_size = hidden_size
        self.grad_checkpointing = grad_checkpointing
        patch_dim = in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, qkv_bias, use_flash_attention=True)
            for _ in range(depth)
        )
        freeze_unused_cross_attention_norms(self.blocks)
        self.norm = nn.LayerNorm(hidden_size)
        self._pos_cache: dict[tuple[Size3, torch.device], torch.Tensor] = {}

    @property
    def patch_dim(self) -> int:
        return self.patch_embed.in_features

    def pos_embed(self, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        """The fixed sin-cos embedding ``(1, N, D)`` for a patch grid (any grid: no resampling needed)."""
        key = (as_size3(grid, "grid"), device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(key[0], self.hidden_size).to(device)
        return self._pos_cache[key]

    def run_blocks(self, tokens: torch.Tensor, return_layers: Sequence[int] = ()) -> tuple[torch.Tensor, list]:
        """Apply the blocks to ``(B, T, D)`` tokens; also return the outputs of blocks in ``return_layers``
        (0-based, before the final norm). Returns ``(normed tokens, [hidden states])``."""
        hidden: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index in return_layers:
                hidden.append(tokens)
        return self.norm(tokens), hidden

    def embed_patches(self, patches: torch.Tensor, indices: torch.Tensor | None, grid: Sequence[int]) -> torch.Tensor:
        """Embed patch vectors and add their position embedding.

        Args:
            patches: ``(B, T, C*pd*ph*pw)`` patch vectors (all ``N`` patches, or a subset).
            indices: ``(B, T)`` grid index of each patch, or None when ``patches`` holds all ``N`` in order.
            grid: the patch grid ``(gd, gh, gw)``.

        Returns:
            ``(B, T, D)``.
        """
        if patches.shape[-1] != self.patch_dim:
            raise ValueError(
                f"patch vectors have {patches.shape[-1]} values, this encoder expects {self.patch_dim} "
                f"({self.in_channels} channel(s) x patch {self.patch_size})"
            )
        tokens = self.patch_embed(patches)
        pos = self.pos_embed(grid, tokens.device).to(tokens.dtype)
        if indices is None:
            return tokens + pos
        pos = pos.expand(tokens.shape[0], -1, -1)
        return tokens + torch.gather(pos, 1, indices[..., None].expand(-1, -1, tokens.shape[-1]))

    def check_input(self, volume: torch.Tensor) -> Size3:
        """Validate a ``(B, C, D, H, W)`` input and return its patch grid."""
        if volume.ndim != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, D, H, W) volume, got shape {tuple(volume.shape)}")
        return grid_shape(volume.shape[2:], self.patch_size)

    def forward_intermediates(
        self, volume: torch.Tensor, layers: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All-token features and the hidden states of selected blocks.

        Args:
            volume: ``(B, C, D, H, W)``, each spatial size a multiple of the patch size.
            layers: 0-based block indices whose outputs to return.

        Returns:
            ``(B, N, D)`` final normed tokens and a list of ``(B, N, D)`` hidden states.
        """
        grid = self.check_input(volume)
        bad = [i for i in layers if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"feature layers {bad} out of range for an encoder of depth {len(self.blocks)}")
        tokens = self.embed_patches(patchify(volume, self.patch_size), None, grid)
        return self.run_blocks(tokens, tuple(layers))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` → ``(B, N, D)`` normed tokens for every patch."""
        return self.forward_intermediates(volume, ())[0]
