"""Exported encoders load into MONAI's ViT and UNETR(...).vit with strict=True and compute the same features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR, ViT
from safetensors.torch import load_file

from medmae.models.checkpoint import (
    CheckpointError,
    encoder_to_monai,
    export_monai_vit,
    load_encoder,
    load_pretrained_mae,
)
from medmae.models.presets import build_mae, mae_config
from medmae.tasks.pretrain import MAEPretrainTask


def save_task_checkpoint(task: MAEPretrainTask, path: Path, roi: list[int]) -> Path:
    """A checkpoint with the same layout Lightning writes (state_dict + hyper_parameters)."""
    task.hparams["roi_size"] = roi
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def test_export_loads_into_unetr_vit_strict(tmp_path: Path) -> None:
    # UNETR fixes 12 blocks and 16^3 patches; keep the width tiny.
    task = MAEPretrainTask(preset="tiny", depth=12, hidden_size=48, num_heads=4, mlp_dim=96, patch_size=16)
    ckpt = save_task_checkpoint(task, tmp_path / "pretrain.ckpt", [32, 32, 32])
    paths = export_monai_vit(ckpt, tmp_path / "encoder.pt", img_size=[32, 48, 32])
    assert [p.name for p in paths] == ["encoder.pt", "encoder.safetensors", "encoder.json"]

    state = torch.load(paths[0], weights_only=True)
    unetr = UNETR(
        in_channels=1, out_channels=3, img_size=(32, 48, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4
    )
    unetr.vit.load_state_dict(state, strict=True)  # final LayerNorm included
    torch.testing.assert_close(unetr.vit.norm.weight, task.model.encoder.norm.weight)

    kwargs = json.loads(paths[2].read_text())["monai_vit_kwargs"]
    vit = ViT(**kwargs).eval()
    vit.load_state_dict(load_file(str(paths[1])), strict=True)
    volume = torch.randn(2, 1, 32, 48, 32)
    ours = task.model.encoder.eval()(volume)
    torch.testing.assert_close(vit(volume)[0], ours, atol=1e-5, rtol=1e-5)

    encoder, config = load_encoder(paths[1])
    torch.testing.assert_close(encoder.eval()(volume), ours)
    assert config.depth == 12


def test_anisotropic_multichannel_export_matches_conv_embedding() -> None:
    model = build_mae(mae_config("tiny", in_channels=2, patch_size=(8, 8, 4))).eval()
    state = encoder_to_monai(model.encoder, (16, 16, 8))
    vit = ViT(
        2, (16, 16, 8), (8, 8, 4), hidden_size=96, mlp_dim=384, num_layers=4, num_heads=4, pos_embed_type="sincos"
    ).eval()
    vit.load_state_dict(state, strict=True)
    volume = torch.randn(1, 2, 16, 16, 8)
    torch.testing.assert_close(vit(volume)[0], model.encoder(volume), atol=1e-5, rtol=1e-5)


def test_loading_refuses_pickled_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("executed!",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "mae-pretrain"}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pretrained_mae(path)


def test_other_task_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "seg.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"task": "segment"}}, path)
    with pytest.raises(CheckpointError, match="segment checkpoint"):
        load_pretrained_mae(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_mae(tmp_path / "missing.ckpt")
