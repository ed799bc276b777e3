"""The MAE pretraining LightningModule. Its typed ``__init__`` is the ``model:`` section of the configs."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from medmae.models.mae import MAEOutput, MaskedAutoencoder3D
from medmae.models.masking import MaskingConfig
from medmae.models.presets import MAEConfig, build_mae, mae_config
from medmae.tasks.callbacks import checkpoint_callbacks
from medmae.tasks.optim import FusedClipping, make_adamw, param_groups, step_schedule

TASK_NAME = "mae-pretrain"


class MAEPretrainTask(FusedClipping, L.LightningModule):
    """Masked-autoencoder pretraining of a 3D ViT.

    Args:
        preset: model size, one of ``tiny``, ``small``, ``base``, ``large``.
        in_channels: input channels; None takes the preset's (1).
        patch_size: patch edge(s) in voxels, e.g. ``16`` or ``[16, 16, 4]`` for thick slices.
        hidden_size, depth, num_heads, mlp_dim: encoder overrides (None keeps the preset's).
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim: decoder overrides.
        mask_kind: ``random``, ``block`` or ``slab``.
        mask_ratio: fraction of patches hidden.
        mask_block_size: block edge in patches for ``block`` masking.
        mask_axis: plane normal for ``slab`` masking (2 = slice axis of RAS volumes).
        mask_thickness: adjacent planes per slab.
        norm_pix_loss: regress per-patch normalised voxels.
        lr: peak learning rate (after warm-up).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        weight_decay: AdamW decay (not applied to norms, biases, tokens).
        betas: AdamW betas.
        warmup_steps: linear warm-up length in optimizer steps.
        grad_checkpointing: trade compute for memory in the encoder.
        mask_seed: seed of the masking generator (offset by the global rank; the data's ``seed`` splits and
            shuffles the scans).
        figure_every_n_steps: save a reconstruction figure this often (0: only at the end).
        compile: ``torch.compile`` every transformer block (GPU runs; the state dict keys are unchanged).
    """

    def __init__(
        self,
        preset: str = "base",
        in_channels: int | None = None,
        patch_size: int | list[int] | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        decoder_dim: int | None = None,
        decoder_depth: int | None = None,
        decoder_heads: int | None = None,
        decoder_mlp_dim: int | None = None,
        mask_kind: str = "random",
        mask_ratio: float = 0.75,
        mask_block_size: int = 2,
        mask_axis: int = 2,
        mask_thickness: int = 1,
        norm_pix_loss: bool = True,
        lr: float = 1.5e-4,
        min_lr_ratio: float = 0.01,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        grad_checkpointing: bool = False,
        mask_seed: int = 0,
        figure_every_n_steps: int = 200,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams["task"] = TASK_NAME
        self.config: MAEConfig = mae_config(
            preset,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            decoder_mlp_dim=decoder_mlp_dim,
        )
        self.hparams["model_config"] = self.config.to_dict()
        masking = MaskingConfig(mask_kind, mask_ratio, mask_block_size, mask_axis, mask_thickness)
        self.model: MaskedAutoencoder3D = build_mae(self.config, masking, norm_pix_loss, grad_checkpointing)
        self._generator: torch.Generator | None = None

    def on_fit_start(self) -> None:
        """Compile blocks if asked; record the data geometry in the checkpoint, so export and repair use the
        training ROI and spacing."""
        if self.hparams.compile:
            for block in [*self.model.encoder.blocks, *self.model.decoder.blocks]:
                block.compile()
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "roi_size"):
            self.hparams["roi_size"] = list(datamodule.roi_size)
            self.hparams["spacing"] = datamodule.hparams.get("spacing")
            self.hparams["ct_window"] = list(datamodule.intensity.ct_window)
            self.hparams["mr_percentiles"] = list(datamodule.intensity.mr_percentiles)
            self.hparams["modalities"] = list(getattr(datamodule, "modalities", []))

    def mask_generator(self) -> torch.Generator:
        """The masking generator on this module's device, seeded with ``mask_seed + global_rank``."""
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.hparams.mask_seed + self.global_rank)
        return self._generator

    def forward(self, volume: torch.Tensor, mask: torch.Tensor | None = None) -> MAEOutput:
        """``volume``: ``(B, C, D, H, W)``; see :meth:`MaskedAutoencoder3D.forward`."""
        return self.model(volume, mask, self.mask_generator())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(batch["image"], None, self.mask_generator())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        volume = batch["image"]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(10_000 + batch_idx)  # the same masks every validation: comparable losses
        loss = self.model.loss(volume, None, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=volume.shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = make_adamw(
            param_groups(self.model.named_parameters(), hp.weight_decay), hp.lr, tuple(hp.betas), self._trainer
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        schedule = step_schedule(optimizer, total, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_callbacks(self) -> list[L.Callback]:
        from medmae.tasks.figures import ReconstructionFigures

        figures = ReconstructionFigures(self.hparams.figure_every_n_steps)
        return [*checkpoint_callbacks(self._trainer, "val/loss"), figures]
