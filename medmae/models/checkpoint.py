"""Loading pretrained weights safely, and exporting the encoder for MONAI.

Everything is loaded with ``torch.load(weights_only=True)`` or from safetensors: a checkpoint can
never execute code. A pretraining checkpoint is a Lightning ``.ckpt`` whose hyper-parameters hold
``task`` and ``model_config``; an exported encoder is ``encoder.pt`` (or ``.safetensors``) with an
``encoder.json`` sidecar describing the MONAI ``ViT`` it loads into.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medmae.models.mae import MaskedAutoencoder3D
from medmae.models.patching import grid_shape
from medmae.models.pos_embed import sincos_3d
from medmae.models.presets import MAEConfig, build_mae
from medmae.models.vit import ViT3DEncoder


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, or of another kind than expected; the message names the file."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it contains objects other than tensors and plain data, which could "
            f"execute code ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]})") from None


def config_from_dict(data: dict[str, Any]) -> MAEConfig:
    """Rebuild an :class:`MAEConfig` from its ``to_dict`` form."""
    values = dict(data)
    values["patch_size"] = tuple(values["patch_size"])
    return MAEConfig(**values)


def checkpoint_task(checkpoint: dict[str, Any]) -> str:
    """The task name stored in a Lightning checkpoint's hyper-parameters (``""`` when absent)."""
    return str(checkpoint.get("hyper_parameters", {}).get("task", ""))


def load_pretrained_mae(path: str | Path, tasks: Sequence[str] = ("mae-pretrain",)) -> tuple[MaskedAutoencoder3D, dict]:
    """Rebuild the MAE of a pretraining (or restoration) checkpoint.

    Args:
        path: a Lightning ``.ckpt`` written by ``medmae pretrain``.
        tasks: task names accepted; another task's checkpoint raises a clear error.

    Returns:
        The model in eval mode and the checkpoint's hyper-parameters.
    """
    checkpoint = load_checkpoint(path)
    task = checkpoint_task(checkpoint)
    if task not in tasks:
        raise CheckpointError(f"{path}: this is a {task or 'non-medmae'} checkpoint; expected one of {list(tasks)}")
    hparams = dict(checkpoint["hyper_parameters"])
    model = build_mae(config_from_dict(hparams["model_config"]), norm_pix_loss=bool(hparams.get("norm_pix_loss")))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval(), hparams


def encoder_to_monai(encoder: ViT3DEncoder, img_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """The encoder's weights as a state dict for ``monai.networks.nets.ViT`` (``classification=False``).

    The linear patch embedding becomes the equivalent convolution kernel, and the fixed sin-cos
    position embedding is written out for the patch grid of ``img_size``.
    """
    grid = grid_shape(img_size, encoder.patch_size)
    state: dict[str, torch.Tensor] = {}
    for key, value in encoder.state_dict().items():
        if key.startswith("patch_embed."):
            continue
        state[key] = value.detach().clone()
    weight = encoder.patch_embed.weight.detach()
    state["patch_embedding.patch_embeddings.weight"] = weight.reshape(
        encoder.hidden_size, encoder.in_channels, *encoder.patch_size
    ).clone()
    state["patch_embedding.patch_embeddings.bias"] = encoder.patch_embed.bias.detach().clone()
    state["patch_embedding.position_embeddings"] = sincos_3d(grid, encoder.hidden_size)
    return {k: v.contiguous() for k, v in state.items()}


def monai_vit_kwargs(config: MAEConfig, img_size: Sequence[int]) -> dict[str, Any]:
    """Arguments that build the MONAI ``ViT`` matching an exported encoder."""
    return {
        "in_channels": config.in_channels,
        "img_size": [int(s) for s in img_size],
        "patch_size": list(config.patch_size),
        "hidden_size": config.hidden_size,
        "mlp_dim": config.mlp_dim,
        "num_layers": config.depth,
        "num_heads": config.num_heads,
        "qkv_bias": config.qkv_bias,
        "classification": False,
        "proj_type": "conv",
        "pos_embed_type": "sincos",
    }


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export_monai_vit(checkpoint: str | Path, output: str | Path, img_size: Sequence[int] | None = None) -> list[Path]:
    """Export a pretraining checkpoint's encoder for MONAI's ``ViT`` / ``UNETR(...).vit``.

    Writes ``output`` (a ``torch.save`` state dict), the same weights as ``.safetensors`` beside it, and a
    ``.json`` sidecar with the ``ViT`` arguments and the medmae model config.

    Args:
        checkpoint: ``.ckpt`` from ``medmae pretrain``.
        output: path of the ``.pt`` file.
        img_size: input size the position embedding is written for (default: the training ROI).

    Returns:
        The files written.
    """
    model, hparams = load_pretrained_mae(checkpoint, tasks=("mae-pretrain", "mae-restore"))
    config = config_from_dict(hparams["model_config"])
    if img_size is None:
        img_size = hparams.get("roi_size") or [s * 6 for s in config.patch_size]
    state = encoder_to_monai(model.encoder, img_size)
    output = Path(output)
    paths = [output, output.with_suffix(".safetensors"), output.with_suffix(".json")]
    _atomic_write(paths[0], lambda tmp: torch.save(state, tmp))
    _atomic_write(paths[1], lambda tmp: save_file(state, tmp))
    sidecar = {
        "format": "monai-vit",
        "monai_vit_kwargs": monai_vit_kwargs(config, img_size),
        "model_config": config.to_dict(),
        "source_checkpoint": Path(checkpoint).name,
    }
    _atomic_write(paths[2], lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2)))
    return paths


def monai_to_encoder_state(state: dict[str, torch.Tensor], config: MAEConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encoder_to_monai` (the position embedding is dropped: medmae's is fixed)."""
    out = {k: v for k, v in state.items() if not k.startswith("patch_embedding.")}
    conv = state["patch_embedding.patch_embeddings.weight"]
    out["patch_embed.weight"] = conv.reshape(config.hidden_size, -1)
    out["patch_embed.bias"] = state["patch_embedding.patch_embeddings.bias"]
    return out


def load_encoder(path: str | Path) -> tuple[ViT3DEncoder, MAEConfig]:
    """A pretrained :class:`ViT3DEncoder` from a pretraining checkpoint or an exported encoder file."""
    path = Path(path)
    if path.suffix in (".pt", ".safetensors"):
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise CheckpointError(f"{path}: exported encoder without its {sidecar.name} sidecar")
        config = config_from_dict(json.loads(sidecar.read_text())["model_config"])
        state = load_file(str(path)) if path.suffix == ".safetensors" else load_checkpoint(path)
        encoder = ViT3DEncoder(**config.encoder_kwargs())
        encoder.load_state_dict(monai_to_encoder_state(state, config), strict=True)
        return encoder, config
    model, hparams = load_pretrained_mae(path, tasks=("mae-pretrain", "mae-restore"))
    return model.encoder, config_from_dict(hparams["model_config"])
