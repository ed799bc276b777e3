"""Fine-tuning for segmentation. Its typed ``__init__`` is the ``model:`` section of ``configs/segment/*.yaml``.

Three architectures share this code path, so baselines differ from the pretrained model only in weights:
``vit`` (the medmae ViT encoder + UNETR decoder, pretrained with ``pretrained=CKPT`` or from scratch) and
the CNNs ``unet`` / ``segresnet`` (from scratch).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from medmae.models.checkpoint import CheckpointError, load_encoder
from medmae.models.presets import MAEConfig, mae_config
from medmae.models.seg_baselines import CNN_KINDS, build_cnn
from medmae.models.unetr import UNETR3D
from medmae.models.vit import ViT3DEncoder
from medmae.tasks.callbacks import checkpoint_callbacks
from medmae.tasks.optim import FusedClipping, make_adamw, param_groups, step_schedule

log = logging.getLogger(__name__)

TASK_NAME = "segment"
ARCHS = ("vit", *CNN_KINDS)
# keys added to the hyper-parameters besides the __init__ arguments (read by `medmae segment`)
GEOMETRY_KEYS = ("roi_size", "spacing", "ct_window", "mr_percentiles", "modality")


def layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay: patch embedding 0, block ``i`` → ``i + 1``, the rest
    (final norm, decoder) ``depth + 1``."""
    if name.startswith("encoder.patch_embed."):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def load_pretrained_encoder(path: str, config: MAEConfig) -> ViT3DEncoder:
    """The encoder of a pretraining checkpoint / exported encoder; its architecture must match ``config``."""
    encoder, pretrained_config = load_encoder(path)
    mine, theirs = config.encoder_kwargs(), pretrained_config.encoder_kwargs()
    if mine != theirs:
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        raise CheckpointError(
            f"{path}: the pretrained encoder differs from the configured one (setting: (configured, "
            f"pretrained)) {diff}; set --model.preset and overrides to the pretraining's, or omit --model.pretrained"
        )
    return encoder


def transfer_encoder(model: UNETR3D, encoder: ViT3DEncoder) -> dict[str, list[str]]:
    """Copy a pretrained encoder's weights into ``model`` and check the exact key sets.

    Returns:
        ``{"missing": [...], "unexpected": [...]}``: the keys of ``model`` not in the pretrained weights
        (exactly the decoder's) and the pretrained keys ``model`` has no place for (none).

    Raises:
        CheckpointError: any other key is missing or unexpected.
    """
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    decoder = sorted(k for k in model.state_dict() if not k.startswith("encoder."))
    if sorted(result.missing_keys) != decoder or result.unexpected_keys:
        wrong = sorted(set(result.missing_keys) - set(decoder))
        raise CheckpointError(
            f"pretrained encoder does not fit the segmentation encoder: missing {wrong}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    return {"missing": decoder, "unexpected": []}


class SegmentTask(FusedClipping, L.LightningModule):
    """Supervised segmentation with DiceCE loss, sliding-window validation and best-by-Dice checkpoints.

    Args:
        num_classes: classes including background.
        arch: ``vit`` (UNETR on the medmae ViT), ``unet`` or ``segresnet`` (CNN baselines from scratch).
        pretrained: a ``medmae pretrain`` checkpoint or an exported ``encoder.pt``/``.safetensors`` (vit only).
        preset: ViT size (``tiny``, ``small``, ``base``, ``large``); the encoder settings of the pretraining.
        in_channels, patch_size, hidden_size, depth, num_heads, mlp_dim: encoder overrides (None: preset's).
        feature_layers: 0-based encoder blocks feeding the decoder skips (``log2(patch) - 1`` of them).
        feature_size: decoder/CNN channels at full resolution.
        lr: peak learning rate of the decoder (and of the CNN).
        layer_decay: layer-wise lr decay: block ``i`` of ``depth`` gets ``lr * layer_decay**(depth + 1 - (i + 1))``.
        weight_decay: AdamW decay (not on norms and biases).
        warmup_steps: linear warm-up in optimizer steps.
        min_lr_ratio: final lr as a fraction of the peak (cosine schedule).
        freeze_encoder_steps: keep the encoder frozen for this many steps (0: never; -1: always, linear probing
            of a segmentation decoder).
        sw_overlap: sliding-window overlap for validation and prediction.
        sw_batch_size: windows per forward pass in sliding-window inference.
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "vit",
        pretrained: str | None = None,
        preset: str = "base",
        in_channels: int | None = None,
        patch_size: int | list[int] | None = None,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        feature_layers: list[int] | None = None,
        feature_size: int = 16,
        lr: float = 1e-3,
        layer_decay: float = 0.75,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.01,
        freeze_encoder_steps: int = 0,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams["task"] = TASK_NAME
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
        if pretrained and arch != "vit":
            raise ValueError(f"--model.pretrained needs arch 'vit' (a ViT encoder); arch {arch!r} trains from scratch")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        self.config: MAEConfig = mae_config(
            preset,
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
        )
        self.hparams["model_config"] = self.config.to_dict()
        self.transfer_report: dict[str, list[str]] = {"missing": [], "unexpected": []}
        self.model = self.build_model()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        self._frozen: list[nn.Parameter] = []

    def build_model(self) -> nn.Module:
        hp = self.hparams
        if hp.arch != "vit":
            return build_cnn(hp.arch, self.config.in_channels, hp.num_classes, hp.feature_size)
        model = UNETR3D(
            ViT3DEncoder(**self.config.encoder_kwargs()), hp.num_classes, hp.feature_layers, hp.feature_size
        )
        if hp.pretrained:
            self.transfer_report = transfer_encoder(model, load_pretrained_encoder(hp.pretrained, self.config))
            log.info(
                "loaded %d pretrained encoder tensors from %s; %d decoder tensors start from scratch",
                len(model.encoder.state_dict()),
                hp.pretrained,
                len(self.transfer_report["missing"]),
            )
        return model

    @property
    def input_multiple(self) -> tuple[int, int, int]:
        """Input sizes must be multiples of this (the patch for the ViT, 16 for the CNNs)."""
        return tuple(self.config.patch_size) if self.hparams.arch == "vit" else (16, 16, 16)  # type: ignore[return-value]

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` → ``(B, classes, D, H, W)`` logits."""
        return self.model(volume)

    def on_fit_start(self) -> None:
        """Check the data against the model and record the preprocessing `medmae segment` must repeat."""
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            return
        if datamodule.num_classes != self.hparams.num_classes:
            raise ValueError(
                f"class-count mismatch: --data.num_classes {datamodule.num_classes} but --model.num_classes "
                f"{self.hparams.num_classes}; set both to the number of classes including background"
            )
        bad = [r for r, m in zip(datamodule.roi_size, self.input_multiple) if r % m]
        if bad:
            raise ValueError(f"roi_size {list(datamodule.roi_size)} must be a multiple of {list(self.input_multiple)}")
        self.hparams["roi_size"] = list(datamodule.roi_size)
        self.hparams["spacing"] = datamodule.hparams.get("spacing")
        self.hparams["ct_window"] = list(datamodule.intensity.ct_window)
        self.hparams["mr_percentiles"] = list(datamodule.intensity.mr_percentiles)
        self.hparams["modality"] = datamodule.modality

    def on_train_start(self) -> None:
        """Freeze the encoder when ``freeze_encoder_steps`` asks for it (frozen norms stay frozen after)."""
        if self.hparams.arch == "vit" and self.hparams.freeze_encoder_steps != 0 and self.global_step == 0:
            self._frozen = [p for p in self.model.encoder.parameters() if p.requires_grad]
            for parameter in self._frozen:
                parameter.requires_grad_(False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._frozen and 0 < self.hparams.freeze_encoder_steps <= self.global_step:
            for parameter in self._frozen:
                parameter.requires_grad_(True)
            self._frozen = []
            log.info("encoder unfrozen at step %d", self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def predict_logits(self, volume: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """Sliding-window logits ``(B, classes, *spatial)`` of a whole ``(B, C, *spatial)`` volume."""
        roi = self.hparams.get("roi_size") or [m * 4 for m in self.input_multiple]
        return sliding_window_inference(
            volume,
            tuple(roi),
            self.hparams.sw_batch_size,
            self,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
            progress=progress,
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.predict_logits(batch["image"])
        prediction = one_hot(logits.argmax(1, keepdim=True), self.hparams.num_classes)
        self.dice(prediction, one_hot(batch["label"], self.hparams.num_classes))

    def on_validation_epoch_end(self) -> None:
        per_class = self.dice.aggregate()
        self.dice.reset()
        self.log("val/dice", torch.nanmean(per_class), prog_bar=True, sync_dist=True)
        for index, value in enumerate(per_class, start=1):
            self.log(f"val/dice_{index}", value, sync_dist=True)

    def lr_scale(self, name: str) -> float:
        """Layer-wise lr decay for the ViT's parameter ``name`` (``model.`` prefix removed)."""
        if self.hparams.arch != "vit":
            return 1.0
        depth = self.config.depth
        return float(self.hparams.layer_decay ** (depth + 1 - layer_id(name, depth)))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = param_groups(self.model.named_parameters(), hp.weight_decay, self.lr_scale)
        if hp.freeze_encoder_steps < 0 and hp.arch == "vit":
            encoder = {id(p) for p in self.model.encoder.parameters()}
            groups = [
                g
                for g in ({**g, "params": [p for p in g["params"] if id(p) not in encoder]} for g in groups)
                if g["params"]
            ]
        optimizer = make_adamw(groups, hp.lr, (0.9, 0.999), self._trainer)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        schedule = step_schedule(optimizer, total, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_callbacks(self) -> list[L.Callback]:
        return checkpoint_callbacks(self._trainer, "val/dice", mode="max")
