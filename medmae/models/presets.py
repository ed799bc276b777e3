"""Model sizes as small factory functions in an explicit registry.

``build_mae("base", patch_size=(16, 16, 4), in_channels=2)`` builds a ViT-B MAE for two-channel,
thick-slice input. Every field of :class:`MAEConfig` can be overridden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

from medmae.models.mae import MAEDecoder, MaskedAutoencoder3D
from medmae.models.masking import MaskingConfig
from medmae.models.vit import ViT3DEncoder


@dataclass(frozen=True)
class MAEConfig:
    """Sizes of an MAE: the encoder (``hidden_size`` ... ``qkv_bias``) and its decoder (``decoder_*``)."""

    in_channels: int = 1
    patch_size: tuple[int, int, int] = (16, 16, 16)
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = False
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 12
    decoder_mlp_dim: int = 1536

    def encoder_kwargs(self) -> dict:
        """Arguments of :class:`ViT3DEncoder` (without ``grad_checkpointing``)."""
        keys = ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_dim", "qkv_bias")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        return data


def vit_tiny() -> MAEConfig:
    """~0.5 M parameters: tests and CPU demos."""
    return MAEConfig(
        hidden_size=96,
        depth=4,
        num_heads=4,
        mlp_dim=384,
        decoder_dim=48,
        decoder_depth=1,
        decoder_heads=4,
        decoder_mlp_dim=192,
    )


def vit_small() -> MAEConfig:
    """ViT-S/16 encoder (22 M) with a 4-block 192-wide decoder."""
    return MAEConfig(
        hidden_size=384,
        depth=12,
        num_heads=6,
        mlp_dim=1536,
        decoder_dim=192,
        decoder_depth=4,
        decoder_heads=6,
        decoder_mlp_dim=768,
    )


def vit_base() -> MAEConfig:
    """ViT-B/16 encoder (86 M) with a 4-block 384-wide decoder."""
    return MAEConfig()


def vit_large() -> MAEConfig:
    """ViT-L/16 encoder (303 M) with an 8-block 512-wide decoder."""
    return MAEConfig(
        hidden_size=1024,
        depth=24,
        num_heads=16,
        mlp_dim=4096,
        decoder_dim=512,
        decoder_depth=8,
        decoder_heads=16,
        decoder_mlp_dim=2048,
    )


PRESETS: dict[str, Callable[[], MAEConfig]] = {
    "tiny": vit_tiny,
    "small": vit_small,
    "base": vit_base,
    "large": vit_large,
}


def mae_config(preset: str, **overrides: object) -> MAEConfig:
    """A preset's config with fields replaced; unknown presets or fields raise a ValueError naming them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(MAEConfig)}
    unknown = sorted(k for k, v in overrides.items() if k not in names and v is not None)
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown}; valid settings are {sorted(names)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "patch_size" in given:
        from medmae.models.patching import as_size3

        given["patch_size"] = as_size3(given["patch_size"], "patch_size")  # type: ignore[arg-type]
    return replace(PRESETS[preset](), **given)


def build_mae(
    config: MAEConfig,
    masking: MaskingConfig | None = None,
    norm_pix_loss: bool = False,
    grad_checkpointing: bool = False,
) -> MaskedAutoencoder3D:
    """Instantiate the MAE described by ``config``."""
    encoder = ViT3DEncoder(**config.encoder_kwargs(), grad_checkpointing=grad_checkpointing)
    decoder = MAEDecoder(
        config.hidden_size,
        encoder.patch_dim,
        config.decoder_dim,
        config.decoder_depth,
        config.decoder_heads,
        config.decoder_mlp_dim,
    )
    return MaskedAutoencoder3D(encoder, decoder, masking, norm_pix_loss)
