"""The 3D sin-cos embedding against values worked out by hand, and resampling."""

from __future__ import annotations

import math

import pytest
import torch

from medmae.models.pos_embed import resample_pos_embed, sincos_1d, sincos_3d


def test_sincos_1d_hand_values() -> None:
    # width 4: omega = [1, 10000 ** -0.5] = [1, 0.01]
    out = sincos_1d(torch.tensor([0.0, 1.0, 2.0]), 4)
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
            [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected)


def test_sincos_3d_layout_and_padding() -> None:
    embed = sincos_3d((2, 3, 4), 14)  # 14 // 6 = 2 -> 4 channels per axis, 2 zero channels
    assert embed.shape == (1, 24, 14)
    token = 1 * 12 + 2 * 4 + 3  # grid position (1, 2, 3)
    row = embed[0, token]
    omega = [1.0, 0.01]
    for axis, position in enumerate((1, 2, 3)):
        part = row[axis * 4 : axis * 4 + 4]
        want = [math.sin(position * w) for w in omega] + [math.cos(position * w) for w in omega]
        torch.testing.assert_close(part, torch.tensor(want, dtype=torch.float32))
    assert torch.all(embed[..., 12:] == 0)


def test_matches_monai_where_monai_applies() -> None:
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    ours = sincos_3d((3, 4, 5), 48)
    theirs = build_sincos_position_embedding((3, 4, 5), 48, 3)
    # same frequencies per axis; MONAI orders (w, h, d) sin/cos blocks differently, so compare as sets of columns
    ours_cols = sorted(tuple(torch.round(c, decimals=5).tolist()) for c in ours[0].T)
    theirs_cols = sorted(tuple(torch.round(c, decimals=5).tolist()) for c in theirs[0].detach().T)
    assert ours_cols == theirs_cols


def test_resample_identity_and_size() -> None:
    embed = torch.randn(1, 2 * 3 * 4, 8)
    assert torch.equal(resample_pos_embed(embed, (2, 3, 4), (2, 3, 4)), embed)
    bigger = resample_pos_embed(embed, (2, 3, 4), (4, 6, 8))
    assert bigger.shape == (1, 4 * 6 * 8, 8)
    constant = torch.ones(1, 24, 8)
    torch.testing.assert_close(resample_pos_embed(constant, (2, 3, 4), (3, 3, 5)), torch.ones(1, 45, 8))
    with pytest.raises(ValueError, match="tokens"):
        resample_pos_embed(embed, (2, 2, 2), (4, 4, 4))
