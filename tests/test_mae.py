"""MAE behaviour: encoder sees only visible voxels, loss only masked patches, all parameters train."""

from __future__ import annotations

import pytest
import torch

from medmae.models import build_mae, mae_config, patchify
from medmae.models.masking import random_mask
from medmae.models.patching import patch_mask_to_voxels


def tiny(**overrides: object):
    torch.manual_seed(0)
    return build_mae(mae_config("tiny", **{"patch_size": 8, **overrides}))


def test_encoder_ignores_masked_voxels() -> None:
    model = tiny().eval()
    volume = torch.randn(2, 1, 32, 32, 24)
    mask = random_mask(2, (4, 4, 3), 0.75, torch.Generator().manual_seed(1))
    voxel_mask = patch_mask_to_voxels(mask, (4, 4, 3), (8, 8, 8))
    changed = torch.where(voxel_mask, torch.randn_like(volume) * 100, volume)
    latent_a, visible_a = model.forward_encoder(volume, mask)
    latent_b, visible_b = model.forward_encoder(changed, mask)
    assert torch.equal(visible_a, visible_b)
    torch.testing.assert_close(latent_a, latent_b)
    # and it does depend on visible voxels
    latent_c, _ = model.forward_encoder(torch.where(voxel_mask, volume, volume + 1), mask)
    assert not torch.allclose(latent_a, latent_c)


def test_loss_ignores_visible_patches() -> None:
    model = tiny()
    volume = torch.randn(2, 1, 32, 32, 32)
    out = model(volume, generator=torch.Generator().manual_seed(0))
    target = patchify(volume, (8, 8, 8))
    pred_visible_perfect = torch.where(out.mask[..., None], out.pred, target + 5.0)
    same = model.forward_loss(volume, pred_visible_perfect, out.mask)
    torch.testing.assert_close(same, out.loss)
    # a hand-computed reference
    reference = ((out.pred - target) ** 2).mean(-1)[out.mask].mean()
    torch.testing.assert_close(out.loss, reference)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_training_loss_equals_the_full_forward_loss_with_the_same_gradients(norm_pix: bool) -> None:
    """``loss()`` predicts and scores only the masked patches; value and every gradient must match
    ``forward().loss``, which predicts all patches and masks the MSE."""
    volume = torch.randn(2, 1, 32, 32, 24) * 3 + 1
    models = [build_mae(mae_config("tiny", patch_size=8), norm_pix_loss=norm_pix) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    full = models[0](volume, generator=torch.Generator().manual_seed(3)).loss
    fast = models[1].loss(volume, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast, full)
    full.backward()
    fast.backward()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, msg=name)
    nothing_hidden = torch.zeros(2, 48, dtype=torch.bool)
    with pytest.raises(ValueError, match="hides no patch"):
        models[1].loss(volume, nothing_hidden)


def test_norm_pix_targets_are_normalised_per_patch() -> None:
    model = build_mae(mae_config("tiny", patch_size=8), norm_pix_loss=True)
    volume = torch.randn(1, 1, 16, 16, 16) * 7 + 3
    targets = model.targets(volume)
    torch.testing.assert_close(targets.mean(-1), torch.zeros(1, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.std(-1, unbiased=False), torch.ones(1, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("channels", "patch", "shape"),
    [(1, (8, 8, 8), (32, 32, 32)), (3, (8, 8, 4), (16, 24, 16))],
)
def test_every_parameter_gets_a_gradient(channels: int, patch: tuple, shape: tuple) -> None:
    model = tiny(in_channels=channels, patch_size=patch)
    out = model(torch.randn(2, channels, *shape), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_model_runs_on_other_input_sizes() -> None:
    """Built (and trained) at one size, run at others: the sin-cos embedding is made for each grid."""
    model = build_mae(mae_config("tiny", patch_size=16)).eval()
    for shape in [(96, 96, 96), (128, 128, 128), (64, 96, 80)]:
        features = model.encoder(torch.randn(1, 1, *shape))
        grid = [s // 16 for s in shape]
        assert features.shape == (1, grid[0] * grid[1] * grid[2], 96)
        out = model(torch.randn(1, 1, *shape), generator=torch.Generator().manual_seed(0))
        assert out.pred.shape == (1, grid[0] * grid[1] * grid[2], 16**3)


def test_wrong_input_gives_clear_errors() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"expected a \(B, 1, D, H, W\)"):
        model(torch.randn(2, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(2, 1, 20, 16, 16))
    with pytest.raises(ValueError, match="unknown model preset"):
        mae_config("huge")
    with pytest.raises(ValueError, match="unknown model setting"):
        mae_config("tiny", widht=3)
