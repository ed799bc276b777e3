"""UNETR decoder on the medmae ViT: skip wiring, block arithmetic per patch size, MONAI parity, LLRD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNETR

from medmae.models.unetr import UNETR3D, default_feature_layers, upsampling_stages
from medmae.models.vit import ViT3DEncoder
from medmae.tasks.segment import SegmentTask, layer_id


def tiny_encoder(patch: int = 8, depth: int = 4, in_channels: int = 1) -> ViT3DEncoder:
    return ViT3DEncoder(in_channels, patch, hidden_size=48, depth=depth, num_heads=4, mlp_dim=96)


def test_decoder_receives_the_intended_layers() -> None:
    torch.manual_seed(0)
    model = UNETR3D(tiny_encoder(patch=16, depth=6), out_channels=3, feature_layers=[0, 2, 5], feature_size=4)
    block_outputs: dict[int, torch.Tensor] = {}
    skip_inputs: list[torch.Tensor] = []
    for index, block in enumerate(model.encoder.blocks):
        block.register_forward_hook(lambda _m, _i, out, index=index: block_outputs.__setitem__(index, out))
    for skip in model.token_skips:
        skip.register_forward_hook(lambda _m, inputs, _o: skip_inputs.append(inputs[0]))
    model(torch.randn(1, 1, 32, 32, 32))
    grid = (2, 2, 2)
    assert len(skip_inputs) == 3
    for layer, received in zip([0, 2, 5], skip_inputs):
        assert torch.equal(received, model.tokens_to_volume(block_outputs[layer], grid))


@pytest.mark.parametrize(("patch", "layers"), [(2, []), (4, [2]), (8, [1, 2]), (16, [1, 2, 3])])
def test_any_power_of_two_patch_segments_at_full_resolution(patch: int, layers: list[int]) -> None:
    model = UNETR3D(tiny_encoder(patch, in_channels=2), out_channels=5, feature_size=4)
    assert model.feature_layers == layers
    out = model(torch.randn(2, 2, 32, 32, 48))
    assert out.shape == (2, 5, 32, 32, 48)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient() -> None:
    model = UNETR3D(tiny_encoder(8), out_channels=3, feature_size=4)
    model(torch.randn(1, 1, 16, 16, 16)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_patch16_decoder_matches_monai_unetr() -> None:
    ours = UNETR3D(ViT3DEncoder(1, 16, 96, 12, 4, 384), out_channels=3, feature_size=16)
    monai = UNETR(1, 3, (32, 32, 32), feature_size=16, hidden_size=96, mlp_dim=384, num_heads=4, res_block=True)
    count = lambda model, skip: sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))  # noqa: E731
    assert ours.feature_layers == [3, 6, 9]  # MONAI's hard-coded hidden_states_out[3], [6], [9]
    assert count(ours, "encoder.") == count(monai, "vit.")


@pytest.mark.parametrize(
    ("patch", "layers", "message"),
    [
        ((16, 16, 4), None, "cubic patch"),
        (6, None, "cubic patch"),
        (8, [1], "needs 2 feature layer"),
        (8, [1, 7], "out of range"),
        (8, [2, 1], "must increase"),
    ],
)
def test_bad_decoder_settings_raise(patch: object, layers: list[int] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNETR3D(ViT3DEncoder(1, patch, 48, 4, 4, 96), 3, layers)


def test_default_feature_layers_and_stages() -> None:
    assert default_feature_layers(12, 3) == [3, 6, 9]
    assert default_feature_layers(4, 2) == [1, 2]
    assert [upsampling_stages((p, p, p)) for p in (2, 4, 8, 16, 32)] == [1, 2, 3, 4, 5]


def test_layerwise_lr_decay_groups() -> None:
    task = SegmentTask(3, preset="tiny", patch_size=8, feature_size=4, lr=1.0, layer_decay=0.5)
    depth = task.config.depth
    assert layer_id("encoder.patch_embed.weight", depth) == 0
    assert layer_id("encoder.blocks.2.mlp.linear1.weight", depth) == 3
    assert task.lr_scale("encoder.blocks.3.attn.qkv.weight") == 0.5  # last block: one step below the decoder
    assert task.lr_scale("encoder.patch_embed.weight") == 0.5**5
    assert task.lr_scale("up_blocks.0.conv_block.conv1.conv.weight") == 1.0
    lrs = {}
    for group in task.configure_optimizers()["optimizer"].param_groups:
        for parameter in group["params"]:
            lrs[id(parameter)] = group["initial_lr"]  # the peak lr, before the warm-up factor
    named = dict(task.model.named_parameters())
    assert lrs[id(named["encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5**4)
    assert lrs[id(named["head.conv.conv.weight"])] == pytest.approx(1.0)


def test_frozen_encoder_is_left_out_of_the_optimizer() -> None:
    task = SegmentTask(3, preset="tiny", patch_size=8, feature_size=4, freeze_encoder_steps=-1)
    optimised = {id(p) for g in task.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in task.model.encoder.parameters()}
    assert optimised


def test_bad_task_settings_raise() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        SegmentTask(3, arch="vnet")
    with pytest.raises(ValueError, match="needs arch 'vit'"):
        SegmentTask(3, arch="unet", pretrained="x.ckpt")
    with pytest.raises(ValueError, match="layer_decay"):
        SegmentTask(3, preset="tiny", layer_decay=0.0)


def test_segmentation_modality_note_only_for_clear_mismatches() -> None:
    from medmae.inference.segment import modality_note

    ct, mr = np.array([-1000.0, 40.0]), np.array([0.0, 900.0])
    assert "Hounsfield air" in modality_note("MR", ct, "a")
    assert "without its rescale" in modality_note("CT", mr, "b")
    assert modality_note("MR", mr, "c") is None and modality_note("CT", ct, "d") is None
    assert modality_note("CT", np.array([-100.0, 200.0]), "a crop inside the body") is None
