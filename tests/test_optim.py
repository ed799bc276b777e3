"""AdamW groups (no decay on norms, biases, tokens) and the warm-up + cosine schedule against hand values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from medmae.models import build_mae, mae_config
from medmae.tasks.optim import make_adamw, param_groups, warmup_cosine


def test_no_decay_on_norms_biases_and_tokens() -> None:
    model = build_mae(mae_config("tiny", patch_size=8))
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "decoder.mask_token" in plain
    assert "encoder.norm.weight" in plain and "encoder.patch_embed.bias" in plain
    assert "encoder.patch_embed.weight" in decayed and "encoder.blocks.0.attn.qkv.weight" in decayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & (decayed | plain)


def test_layerwise_scale_sets_group_learning_rates() -> None:
    model = build_mae(mae_config("tiny", patch_size=8))
    groups = param_groups(model.encoder.named_parameters(), 0.05, lr_scale=lambda n: 0.5 if "blocks.0." in n else 1.0)
    optimizer = make_adamw(groups, lr=1e-3, betas=(0.9, 0.95))
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates == pytest.approx([5e-4, 1e-3])


def test_warmup_cosine_hand_values() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factor(4) == pytest.approx(1.0)
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(14) == pytest.approx(0.1) and factor(100) == pytest.approx(0.1)


def test_adamw_is_not_fused_only_when_scaled_fp16_gradients_are_clipped() -> None:
    """Lightning unscales fp16 gradients before clipping them, which an optimizer that unscales inside its step
    (fused) does not allow; bf16 and fp32 have no scaler and keep the fused kernel."""
    model = build_mae(mae_config("tiny", patch_size=8))

    def fused(clip: float, scaler: object | None) -> bool:
        trainer = SimpleNamespace(gradient_clip_val=clip, precision_plugin=SimpleNamespace(scaler=scaler))
        groups = param_groups(model.named_parameters(), 0.05)
        return bool(make_adamw(groups, 1e-3, (0.9, 0.95), trainer).defaults["fused"])

    assert not fused(1.0, scaler=object())
    assert fused(0.0, scaler=object()) and fused(1.0, scaler=None)
