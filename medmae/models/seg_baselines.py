"""Convolutional baselines trained from scratch through the same segmentation task: MONAI UNet / SegResNet."""

from __future__ import annotations

import torch.nn as nn
from monai.networks.nets import SegResNet, UNet

CNN_KINDS = ("unet", "segresnet")


def build_cnn(kind: str, in_channels: int, out_channels: int, feature_size: int = 16) -> nn.Module:
    """A 3D CNN mapping ``(B, in_channels, D, H, W)`` to ``(B, out_channels, D, H, W)`` logits.

    Args:
        kind: ``"unet"`` (MONAI ``UNet``, 4 down-samplings, residual units) or ``"segresnet"``.
        in_channels: input channels.
        out_channels: classes including background.
        feature_size: channels of the first stage (doubled at each down-sampling).

    Inputs must be multiples of 16 voxels along each axis (the sliding-window ROI is).
    """
    if kind == "unet":
        channels = tuple(feature_size * 2**i for i in range(5))
        return UNet(3, in_channels, out_channels, channels, strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
    if kind == "segresnet":
        return SegResNet(3, feature_size, in_channels, out_channels, norm="instance")
    raise ValueError(f"unknown CNN baseline {kind!r}; choose one of {list(CNN_KINDS)}")
