"""Patching, masking, position embeddings, the 3D ViT encoder, the MAE and model presets."""

from medmae.models.mae import MAEDecoder, MAEOutput, MaskedAutoencoder3D
from medmae.models.masking import MaskingConfig, block_mask, random_mask, slab_mask, split_indices
from medmae.models.patching import grid_shape, patchify, unpatchify
from medmae.models.presets import PRESETS, MAEConfig, build_mae, mae_config
from medmae.models.vit import ViT3DEncoder

__all__ = [
    "PRESETS",
    "MAEConfig",
    "MAEDecoder",
    "MAEOutput",
    "MaskedAutoencoder3D",
    "MaskingConfig",
    "ViT3DEncoder",
    "block_mask",
    "build_mae",
    "grid_shape",
    "mae_config",
    "patchify",
    "random_mask",
    "slab_mask",
    "split_indices",
    "unpatchify",
]
