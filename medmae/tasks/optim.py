"""AdamW parameter groups and the warm-up + cosine learning-rate schedule shared by every task."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType


def is_no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Norm weights, biases, embeddings and tokens are not weight-decayed."""
    lowered = name.lower()
    return parameter.ndim <= 1 or "token" in lowered or "pos_embed" in lowered or "position_embeddings" in lowered


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW groups: decayed vs not decayed, optionally split further by a per-name learning-rate scale.

    Args:
        named: ``module.named_parameters()``; frozen parameters are skipped.
        weight_decay: decay of the decayed group.
        lr_scale: multiplier of the base learning rate for a parameter name (layer-wise decay).

    Returns:
        Groups with ``params``, ``weight_decay`` and ``lr_scale`` keys.
    """
    groups: dict[tuple[bool, float], dict] = {}
    for name, parameter in named:
        if not parameter.requires_grad:
            continue
        no_decay = is_no_decay(name, parameter)
        scale = lr_scale(name) if lr_scale else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        groups[key]["params"].append(parameter)
    return list(groups.values())


def clips_scaled_gradients(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` clips gradients that a gradient scaler has scaled (``16-mixed``): Lightning must then
    unscale them before clipping, which it cannot do for an optimizer that unscales inside its step (fused)."""
    if trainer is None or not trainer.gradient_clip_val:
        return False
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def make_adamw(
    groups: list[dict], lr: float, betas: tuple[float, float], trainer: L.Trainer | None = None
) -> torch.optim.AdamW:
    """AdamW with each group's ``lr = lr * lr_scale``; the fused kernel where the parameters' device has one,
    unless ``trainer`` clips scaled fp16 gradients (:func:`clips_scaled_gradients`)."""
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    device = groups[0]["params"][0].device if groups and groups[0]["params"] else torch.device("cpu")
    fused = device.type in ("cuda", "cpu") and not clips_scaled_gradients(trainer)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def clip_gradients(
    module: L.LightningModule,
    optimizer: torch.optim.Optimizer,
    clip_val: float | None,
    algorithm: GradClipAlgorithmType | str | None,
) -> None:
    """A task's gradient clipping (its ``configure_gradient_clipping``), also for a fused optimizer under bf16.

    Lightning's mixed-precision plugin refuses to clip whenever the optimizer can unscale gradients itself (the
    fused AdamW), which stopped every bf16-mixed run with ``gradient_clip_val`` (the GPU default) at its first
    step. bf16 has no gradient scaler, so there is nothing to unscale and the gradients are clipped as in fp32
    training. With a scaler (fp16) Lightning's own path unscales first; :func:`make_adamw` then is not fused.
    """
    plugin = module.trainer.precision_plugin
    if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
        value = float(clip_val if clip_val is not None else module.trainer.gradient_clip_val or 0.0)
        how = algorithm if algorithm is not None else module.trainer.gradient_clip_algorithm or "norm"
        Precision.clip_gradients(plugin, optimizer, value, GradClipAlgorithmType(how))
        return
    module.clip_gradients(optimizer, clip_val, algorithm)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(total_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def step_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_ratio: float
) -> dict[str, object]:
    """Lightning's ``lr_scheduler`` entry: :func:`warmup_cosine` stepped every optimizer step."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_ratio))
    return {"scheduler": schedule, "interval": "step"}


class FusedClipping:
    """Mixin for a task's LightningModule: gradient clipping by :func:`clip_gradients` (bf16 with a fused AdamW)."""

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[arg-type]
