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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medmae.io.atomic import temporary_beside
from medmae.models.mae import MaskedAutoencoder3D
from medmae.models.patching import grid_shape
from medmae.models.pos_embed import sincos_3d
from medmae.models.presets import MAEConfig, build_mae
from medmae.models.vit import ViT3DEncoder


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, or of another kind than expected; the message names the file."""


# how a torch.save file starts: a zip archive (PyTorch >= 1.6, Lightning) or a pickle (the legacy format)
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
# what a file that is not a checkpoint often is, by its first bytes
LOOKS_LIKE = {
    b"\x1f\x8b": "gzip data, e.g. a .nii.gz scan",
    b"PK": "a zip archive",
    b"\x5c\x01\x00\x00": "a NIfTI image",
}


def _not_a_checkpoint(path: Path, head: bytes) -> CheckpointError:
    """The error for a file whose first bytes are not those of a ``torch.save`` file."""
    known = next((what for magic, what in LOOKS_LIKE.items() if head.startswith(magic)), None)
    if known is None and head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        known = "text"
    return CheckpointError(
        f"{path}: not a PyTorch checkpoint (it starts with {head[:8]!r}{f', {known}' if known else ''}); "
        "expected a .ckpt written by medmae pretrain / finetune / finetune-restore"
    )


def _torch_reason(error: BaseException) -> str:
    """The informative sentence of a ``torch.load`` error (its messages run to several paragraphs)."""
    text = str(error).strip()
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:")[1].strip().split(". ")[0]
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, never code.

    Raises:
        CheckpointError: the file is missing, empty, not a ``torch.save`` file, damaged (truncated), would run
            code when unpickled, or holds something other than a dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found" + (" (it is a folder)" if path.is_dir() else ""))
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes); the run that wrote it did not finish")
    if not head.startswith(TORCH_MAGIC):
        raise _not_a_checkpoint(path, head)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: it contains objects other than tensors and plain data, which could "
            f"execute code ({_torch_reason(error)})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: the checkpoint is damaged: truncated or corrupted ({_torch_reason(error)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint (a dictionary)")
    return checkpoint


def load_task_checkpoint(path: str | Path, tasks: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``state_dict`` and ``hyper_parameters`` of a Lightning checkpoint written for one of ``tasks``.

    Raises:
        CheckpointError: see :func:`load_checkpoint`; or the file is not a Lightning checkpoint (a bare state
            dict such as an exported ``encoder.pt``), is another task's, or has no weights.
    """
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(
            f"{path}: no 'hyper_parameters': not a checkpoint written by a medmae run (a bare state dict such "
            "as an exported encoder.pt is used with --model.pretrained, not here)"
        )
    task = checkpoint_task(checkpoint)
    if task not in tasks:
        wanted = f"a {tasks[0]!r} one" if len(tasks) == 1 else f"one of {list(tasks)}"
        raise CheckpointError(f"{path}: this is a {task or 'non-medmae'} checkpoint; expected {wanted}")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: no weights ('state_dict' is missing or empty); the file is incomplete")
    return state, hparams


def load_weights(module: torch.nn.Module, state: dict[str, Any], path: str | Path, what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, or a :class:`CheckpointError` naming what differs.

    Args:
        what: the part loaded, for the message (``"MAE"``, ``"segmentation model"``).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} {tuple(getattr(value, 'shape', ()))} instead of {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and getattr(value, "shape", None) != expected[key].shape
    ]
    problems = [
        f"{len(items)} {kind} (e.g. {', '.join(items[:2])})"
        for kind, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("wrong shape(s)", shapes))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path}: the {what} weights do not match the model its hyper-parameters describe: "
            f"{'; '.join(problems)}; the file is damaged or was edited"
        )
    module.load_state_dict(state, strict=True)


def config_from_dict(data: dict[str, Any]) -> MAEConfig:
    """Rebuild an :class:`MAEConfig` from its ``to_dict`` form."""
    values = dict(data)
    values["patch_size"] = tuple(values["patch_size"])
    return MAEConfig(**values)


def checkpoint_config(hparams: dict[str, Any], path: str | Path) -> MAEConfig:
    """The :class:`MAEConfig` a checkpoint's hyper-parameters record (CheckpointError when absent or invalid)."""
    if not isinstance(hparams.get("model_config"), dict):
        raise CheckpointError(f"{path}: no 'model_config' in its hyper-parameters; the model cannot be rebuilt")
    try:
        return config_from_dict(hparams["model_config"])
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: invalid 'model_config' in its hyper-parameters ({error})") from None


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under the submodule ``prefix`` (e.g. ``"model"``), with ``prefix.`` removed."""
    start = f"{prefix}."
    return {key.removeprefix(start): value for key, value in state.items() if key.startswith(start)}


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
    state, hparams = load_task_checkpoint(path, tasks)
    model = build_mae(checkpoint_config(hparams, path), norm_pix_loss=bool(hparams.get("norm_pix_loss")))
    load_weights(model, sub_state(state, "model"), path, "MAE")
    return model.eval(), dict(hparams)


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
    fd, tmp = temporary_beside(path)
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
    output = Path(output)
    paths = [output, output.with_suffix(".safetensors"), output.with_suffix(".json")]
    if any(path.resolve() == Path(checkpoint).resolve() for path in paths):
        raise CheckpointError(f"{output}: refusing to overwrite the checkpoint being exported; choose another -o")
    model, hparams = load_pretrained_mae(checkpoint, tasks=("mae-pretrain", "mae-restore"))
    config = config_from_dict(hparams["model_config"])
    if img_size is None:
        img_size = hparams.get("roi_size") or [s * 6 for s in config.patch_size]
    state = encoder_to_monai(model.encoder, img_size)
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
