"""The 3D masked autoencoder: encode visible patches, decode all, score the masked ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock

from medmae.models.masking import MaskingConfig, split_indices
from medmae.models.patching import gather_patches, patchify, unpatchify
from medmae.models.pos_embed import sincos_3d
from medmae.models.vit import ViT3DEncoder, freeze_unused_cross_attention_norms


@dataclass
class MAEOutput:
    """Result of one MAE forward pass.

    Attributes:
        loss: scalar MSE over masked patches.
        pred: ``(B, N, C*pd*ph*pw)`` predicted patch vectors (in target space: normalised per patch
            when ``norm_pix_loss``).
        mask: ``(B, N)`` bool, True = masked.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


def normalise_patches(target: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch zero mean / unit variance. ``target``: ``(B, N, P)``; returns (normed, mean, std)."""
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()
    return (target - mean) / std, mean, std


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only. ``pred``/``target`` ``(B, N, P)``, ``mask`` ``(B, N)``."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


class MAEDecoder(nn.Module):
    """Lightweight transformer decoder: visible latents + mask tokens → a patch vector for every patch.

    Args:
        encoder_dim: width of the encoder tokens.
        patch_dim: values per patch ``C*pd*ph*pw``.
        dim: decoder width (sin-cos embedding: any width >= 6).
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``dim``.
        mlp_dim: MLP hidden width.
    """

    def __init__(
        self, encoder_dim: int, patch_dim: int, dim: int = 384, depth: int = 4, num_heads: int = 12, mlp_dim: int = 1536
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim {dim} must be divisible by decoder num_heads {num_heads}")
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, mlp_dim, num_heads, use_flash_attention=True) for _ in range(depth)]
        )
        freeze_unused_cross_attention_norms(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def forward(
        self,
        latent: torch.Tensor,
        visible: torch.Tensor,
        grid: tuple[int, int, int],
        predict: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            latent: ``(B, K, encoder_dim)`` encoded visible tokens.
            visible: ``(B, K)`` their grid indices.
            grid: patch grid ``(gd, gh, gw)``, ``N = gd*gh*gw``.
            predict: ``(B, M)`` grid indices of the patches to predict; None predicts all ``N``. Every
                patch token still passes through all blocks; only the final norm and head are restricted.

        Returns:
            ``(B, N, patch_dim)`` predictions for every patch, or ``(B, M, patch_dim)`` for ``predict``.
        """
        batch = latent.shape[0]
        num_patches = grid[0] * grid[1] * grid[2]
        tokens = self.embed(latent)
        full = self.mask_token.to(tokens.dtype).expand(batch, num_patches, -1)
        full = full.scatter(1, visible[..., None].expand(-1, -1, self.dim), tokens)
        key = (grid, tokens.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_3d(grid, self.dim).to(tokens.device)
        full = self.blocks(full + self._pos_cache[key].to(tokens.dtype))
        if predict is not None:
            full = torch.gather(full, 1, predict[..., None].expand(-1, -1, self.dim))
        return self.pred(self.norm(full))


class MaskedAutoencoder3D(nn.Module):
    """3D MAE: ``forward_encoder`` → ``forward_decoder`` → ``forward_loss``.

    Args:
        encoder: the ViT to pretrain (only visible patches pass through it).
        decoder: the lightweight decoder.
        masking: default masking used when ``forward`` is not given a mask.
        norm_pix_loss: regress per-patch normalised voxels (MAE's "norm-pix" targets).
    """

    def __init__(
        self,
        encoder: ViT3DEncoder,
        decoder: MAEDecoder,
        masking: MaskingConfig | None = None,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if decoder.pred.out_features != encoder.patch_dim:
            raise ValueError(
                f"decoder predicts {decoder.pred.out_features} values per patch, "
                f"encoder patches hold {encoder.patch_dim}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.masking = masking or MaskingConfig()
        self.norm_pix_loss = norm_pix_loss
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE initialisation: Xavier-uniform linears with zero bias, unit LayerNorms, small mask token."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def forward_encoder(
        self, volume: torch.Tensor, mask: torch.Tensor, masked_count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible patches only.

        Args:
            volume: ``(B, C, D, H, W)``.
            mask: ``(B, N)`` bool, True = masked; the same count per sample.
            masked_count: that count if known (skips a check that synchronises with the GPU).

        Returns:
            latent ``(B, K, D)`` and the visible patches' grid indices ``(B, K)``.
        """
        visible, _ = split_indices(mask, masked_count)
        return self.encode_visible(volume, visible), visible

    def encode_visible(self, volume: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Encoder latents ``(B, K, D)`` of the patches at grid indices ``visible`` ``(B, K)`` of ``volume``."""
        grid = self.encoder.check_input(volume)
        patches = gather_patches(volume, self.encoder.patch_size, visible)
        latent, _ = self.encoder.run_blocks(self.encoder.embed_patches(patches, visible, grid))
        return latent

    def forward_decoder(self, latent: torch.Tensor, visible: torch.Tensor, volume_shape: torch.Size) -> torch.Tensor:
        """Predict every patch ``(B, N, P)`` from the visible latents; ``volume_shape`` is the input's shape."""
        grid = self.encoder.check_input(torch.empty(volume_shape, device="meta"))
        return self.decoder(latent, visible, grid)

    def targets(self, volume: torch.Tensor) -> torch.Tensor:
        """Regression targets ``(B, N, P)``: the patch voxels, normalised per patch when ``norm_pix_loss``."""
        target = patchify(volume, self.encoder.patch_size)
        return normalise_patches(target)[0] if self.norm_pix_loss else target

    def forward_loss(self, volume: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on masked patches only (visible patches do not contribute)."""
        return masked_mse(pred, self.targets(volume), mask)

    def sample_mask(self, volume: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a ``(B, N)`` mask for ``volume`` with the default masking config, on its device."""
        grid = self.encoder.check_input(volume)
        return self.masking.sample(volume.shape[0], grid, generator, volume.device)

    def given_or_sampled_mask(
        self, volume: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, int | None]:
        """``mask`` with an unknown count (None), or a drawn one with its known count (no check needed)."""
        if mask is not None:
            return mask, None
        return self.sample_mask(volume, generator), self.masking.masked_count(self.encoder.check_input(volume))

    def forward(
        self, volume: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> MAEOutput:
        """Args:
        volume: ``(B, C, D, H, W)``.
        mask: ``(B, N)`` bool (True = masked); drawn with ``generator`` when None.
        """
        mask, masked_count = self.given_or_sampled_mask(volume, mask, generator)
        latent, visible = self.forward_encoder(volume, mask, masked_count)
        pred = self.forward_decoder(latent, visible, volume.shape)
        return MAEOutput(self.forward_loss(volume, pred, mask), pred, mask)

    def loss(
        self, volume: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The training loss, equal to ``forward(volume, mask, generator).loss`` but computing only what it
        needs: the decoder's norm and head run on the masked tokens alone, only the masked patches are cut
        out as targets, and the MSE is one fused op. Used by the training and validation steps.
        """
        grid = self.encoder.check_input(volume)
        visible, masked = split_indices(*self.given_or_sampled_mask(volume, mask, generator))
        if masked.shape[1] == 0:
            raise ValueError("the mask hides no patch, so there is nothing to reconstruct; use a ratio above 0")
        pred = self.decoder(self.encode_visible(volume, visible), visible, grid, predict=masked)
        target = gather_patches(volume, self.encoder.patch_size, masked)
        if self.norm_pix_loss:
            target = normalise_patches(target)[0]
        return F.mse_loss(pred.float(), target.float())

    def reconstruct(self, volume: torch.Tensor, output: MAEOutput) -> torch.Tensor:
        """Voxel-space reconstruction ``(B, C, D, H, W)`` with the visible patches pasted back.

        Normalised predictions are mapped back with each masked patch's own statistics, which the model
        never saw; use it for figures, and a non-norm-pix model for repair.
        """
        target = patchify(volume, self.encoder.patch_size)
        pred = output.pred.to(target.dtype)
        if self.norm_pix_loss:
            _, mean, std = normalise_patches(target)
            pred = pred * std + mean
        merged = torch.where(output.mask[..., None], pred, target)
        grid = self.encoder.check_input(volume)
        return unpatchify(merged, grid, self.encoder.patch_size, volume.shape[1])
