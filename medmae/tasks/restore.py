"""Fine-tuning a pretrained MAE for restoration: inpainting of slices/slabs/regions and denoising.

Training works on the normalised crops of :class:`~medmae.data.datamodule.PretrainDataModule` and corrupts
them on the fly: a voxel mask (slice gaps of 1-5 slices along a random axis, or a random box) to fill, or
noise to remove (Rician for MR magnitude, Gaussian in Hounsfield units for CT). The loss (L1 or MSE) is
taken on the masked voxels (inpainting) or on every voxel (denoising). Checkpoints hold the MAE under
``model.*`` (so every MAE loader reads them) and the refinement under ``refiner.*``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from medmae.data.transforms import row_quantiles
from medmae.models.checkpoint import CheckpointError, load_checkpoint, load_pretrained_mae, sub_state
from medmae.models.mae import MaskedAutoencoder3D
from medmae.restore.corrupt import add_gaussian_noise, add_rician_noise
from medmae.restore.net import AnyRefiner, DualRefiner, Refiner, RestorationNet, UNetRefiner
from medmae.tasks.callbacks import checkpoint_callbacks
from medmae.tasks.optim import FusedClipping, make_adamw, param_groups, step_schedule

TASK_NAME = "mae-restore"
MAE_TASKS = ("mae-pretrain", TASK_NAME)
MODES = ("inpaint", "denoise", "both")
REFINER_ARCHS = ("convs", "unet", "convs+unet")
MR_NOISE_SCALES = ("span", "robust")
# the hparams that shape the refinement, with their values in older checkpoints
REFINER_KEYS = {
    "refine_channels": 0,
    "refine_depth": 3,
    "guided": False,
    "nlm_input": False,
    "refine_arch": "convs",
    "unet_channels": 0,
}


def unet_width(settings: dict) -> int:
    """The first-level width of the U-Net of a refinement's ``settings`` (0 for a ``convs`` refinement)."""
    if settings.get("refine_arch", "convs") == "convs":
        return 0
    return int(settings.get("unet_channels") or 0) or int(settings["refine_channels"])


def make_refiner(hparams: dict) -> AnyRefiner | None:
    """The (untrained) refinement a restoration checkpoint's ``hparams`` describe; None without one."""
    settings = {key: hparams.get(key, default) for key, default in REFINER_KEYS.items()}
    if settings["refine_arch"] not in REFINER_ARCHS:
        raise ValueError(f"refine_arch must be one of {REFINER_ARCHS}, got {settings['refine_arch']!r}")
    if int(settings["refine_channels"]) <= 0:
        if settings["guided"]:
            raise ValueError("guided restoration needs a refinement: set refine_channels > 0 or guided: false")
        return None
    if settings["nlm_input"] and not settings["guided"]:
        raise ValueError("nlm_input needs a guided refinement: set guided: true")
    inputs = (4 if settings["guided"] else 3) + (2 if settings["nlm_input"] else 0)
    channels, depth = int(settings["refine_channels"]), int(settings["refine_depth"])
    if int(settings["unet_channels"]) < 0:
        raise ValueError(f"unet_channels must be >= 0 (0: refine_channels), got {settings['unet_channels']}")
    if settings["refine_arch"] == "unet":
        return UNetRefiner(unet_width(settings), inputs)
    if settings["refine_arch"] == "convs+unet":
        return DualRefiner(channels, inputs, depth, unet_width(settings))
    return Refiner(channels, inputs, depth)


def refiner_state(path: str) -> dict[str, torch.Tensor]:
    """The ``refiner.*`` weights of the checkpoint ``path``, without their prefix."""
    state = load_checkpoint(path)["state_dict"]
    return sub_state(state, "refiner")


def load_refiner_state(path: str, refiner: AnyRefiner, widen_unet: bool = False) -> None:
    """Load the ``refiner.*`` weights of the checkpoint ``path`` into ``refiner`` (CheckpointError if they differ).

    ``widen_unet``: ``refiner``'s U-Net may be wider than the checkpoint's (:meth:`UNetRefiner.load_narrower`).
    """
    state = refiner_state(path)
    try:
        if not widen_unet:
            refiner.load_state_dict(state, strict=True)
        elif isinstance(refiner, DualRefiner):
            refiner.convs.load_state_dict(sub_state(state, "convs"), strict=True)
            refiner.unet.load_narrower(sub_state(state, "unet"))
        elif isinstance(refiner, UNetRefiner):
            refiner.load_narrower(state)
        else:
            raise ValueError(f"a {type(refiner).__name__} has no U-Net to widen")
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: refinement weights do not match its settings ({str(error).splitlines()[0]})"
        ) from None


def start_refiner(path: str, pre_hparams: dict, hparams: dict, refiner: AnyRefiner) -> None:
    """Start ``refiner`` from the restoration checkpoint ``path`` when it has a compatible refinement.

    Same settings: its weights are loaded. Same depth and guidance of a convolution stack but fewer channels,
    or no non-local-means input where ``hparams`` ask for one: they are widened (:meth:`Refiner.load_narrower`),
    so training continues from what the narrower refinement computed. A ``convs+unet`` stage after a ``convs`` one
    loads (or widens) the stack into its ``convs`` part and starts the U-Net at zero. A stage that only asks for a
    wider U-Net (``unet_channels``) loads the rest and widens the U-Net (:meth:`UNetRefiner.load_narrower`). When
    the residual's base changes (``nlm_guide``, or ``gap_interp`` when inpainting), the loaded refinement's last
    convolution restarts at zero, so the stage starts at the new base.
    Otherwise (e.g. another ``refine_arch``) the refinement starts untrained (its last convolution at zero).
    """
    old = {key: pre_hparams.get(key, default) for key, default in REFINER_KEYS.items()}
    new = {key: hparams[key] for key in REFINER_KEYS}
    old["unet_channels"], new["unet_channels"] = unet_width(old), unet_width(new)
    if old["refine_arch"] == new["refine_arch"] == "unet":
        old["refine_depth"] = new["refine_depth"]  # unused by a U-Net
        old["refine_channels"] = new["refine_channels"]  # unet_channels, compared above, is its width
    if old == new:
        load_refiner_state(path, refiner)
    elif (
        old["refine_arch"] != "convs"
        and old == {**new, "unet_channels": old["unet_channels"]}
        and old["unet_channels"] <= new["unet_channels"]
    ):
        load_refiner_state(path, refiner, widen_unet=True)
    elif (
        old["refine_arch"] == "convs"
        and new["refine_arch"] in ("convs", "convs+unet")
        and old["refine_depth"] == new["refine_depth"]
        and old["guided"] == new["guided"]
        and 0 < int(old["refine_channels"]) <= int(new["refine_channels"])
        and int(old["nlm_input"]) <= int(new["nlm_input"])
    ):
        (refiner.convs if isinstance(refiner, DualRefiner) else refiner).load_narrower(refiner_state(path))
    else:
        return
    new_gap_guide = pre_hparams.get("gap_interp", "linear") != hparams.get("gap_interp", "linear")
    if bool(pre_hparams.get("nlm_guide", False)) != bool(hparams.get("nlm_guide", False)) or (
        new_gap_guide and hparams.get("mode") != "denoise"
    ):
        refiner.reset_output()


def noise_reference(flat: torch.Tensor, scale: str) -> torch.Tensor:
    """The intensity range each of ``(B, N)`` flattened crops' MR noise level is a fraction of, ``(B,)``:
    ``span`` max - min, ``robust`` the 0.5-99.5th percentile range (:func:`~medmae.restore.corrupt.robust_range`,
    the evaluation's definition)."""
    if scale == "span":
        return flat.max(1).values - flat.min(1).values
    low, high = row_quantiles(flat, (0.005, 0.995))
    return (high - low).to(flat.dtype)


def corruption_mask(
    shape: tuple[int, ...], widths: tuple[int, int], axes: list[int], region_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """A voxel mask ``(1, 1, D, H, W)`` for a crop of spatial ``shape``: a gap of adjacent slices along a
    random axis of ``axes`` (width drawn in ``widths``), or, with probability ``region_prob``, a box of
    1/8 to 1/4 of each edge."""

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    mask = torch.zeros((1, 1, *shape), dtype=torch.bool)
    if torch.rand(1, generator=generator).item() < region_prob:
        box = [slice(None), slice(None)]
        for size in shape:
            width = draw(max(1, size // 8), max(1, size // 4))
            start = draw(0, size - width)
            box.append(slice(start, start + width))
        mask[tuple(box)] = True
        return mask
    axis = axes[draw(0, len(axes) - 1)]
    width = draw(*widths)
    start = draw(1, shape[axis] - width - 1)
    index = [slice(None)] * 5
    index[2 + axis] = slice(start, start + width)
    mask[tuple(index)] = True
    return mask


class MAERestoreTask(FusedClipping, L.LightningModule):
    """Restoration fine-tuning of a pretrained MAE (encoder + decoder + optional refinement).

    Args:
        pretrained: a ``medmae pretrain`` (or restoration) checkpoint to start from.
        mode: ``inpaint``, ``denoise``, or ``both`` (alternating batches).
        modality: ``MR`` (Rician noise) or ``CT`` (Gaussian noise in HU); the data's normalisation must match.
        refine_channels: width of the voxel-level refinement; 0 trains the MAE alone.
        refine_depth: number of 3x3x3 convolutions of a ``convs`` refinement.
        refine_arch: ``convs`` (a stack of ``refine_depth`` 3x3x3 convolutions, :class:`Refiner`), ``unet``
            (a U-Net, :class:`UNetRefiner`, ``unet_channels`` wide at its first level; ``refine_depth`` unused)
            or ``convs+unet`` (both, residuals summed, :class:`DualRefiner`; after a ``convs`` stage the stack
            continues from its weights and the U-Net starts at zero).
        unet_channels: first-level width of the U-Net of a ``unet`` or ``convs+unet`` refinement (0: the
            ``refine_channels``). Continuing a checkpoint with a wider U-Net widens it (Net2Net-style), so the stage
            starts from what the narrower one computed.
        guided: the refinement learns a residual over a classical estimate (linear interpolation across
            the masked voxels, Gaussian smoothing of noisy input) instead of over the MAE's prediction; an
            untrained guided network equals the classical estimate. Needs ``refine_channels > 0``.
        smooth_sigma: Gaussian width (voxels) of the denoising guide (0: the noisy input itself).
        nlm_input: denoising only: the refinement also sees 3D non-local means of the noisy input and the
            noise level estimated from it (:meth:`RestorationNet.denoise_context`). Needs ``guided``.
        nlm_h: non-local-means strength as a multiple of the estimated noise std.
        known_noise: with ``nlm_input``, training gives the network the noise level it added instead of
            the level estimated from the noisy crop: the network learns to remove as much noise as it is told,
            which ``medmae denoise --noise-sigma`` (or, without it, the level estimated from the scan) sets.
        nlm_guide: with ``nlm_input``, learn the denoising residual over the non-local means (an untrained
            refinement returns them) instead of over the ``smooth_sigma`` guide. Starting from a checkpoint
            whose residual had another base, the refinement keeps its weights but its last convolution restarts
            at zero.
        gap_interp: the inpainting guide across slice gaps (with ``guided``): ``flow``, motion-compensated
            interpolation between the slices bordering the gap (:func:`~medmae.restore.flow.flow_fill_gaps`), or
            ``linear``. Boxes and other masks are linearly interpolated either way. Checkpoints from before this
            option load as ``linear``. Continuing a checkpoint with another ``gap_interp`` restarts the
            refinement's last convolution at zero, so the stage starts at the new guide.
        gap_widths: range of slice-gap widths (inclusive).
        gap_axes: axes along which slice gaps are cut (0, 1, 2).
        region_prob: probability of masking a random box instead of a slice gap.
        mr_noise: range of Rician sigma as a fraction of the crop's intensity range (``mr_noise_scale``).
        mr_noise_scale: what ``mr_noise`` is a fraction of: ``span`` (the crop's max - min) or ``robust`` (its
            0.5-99.5th percentile range, as ``medmae evaluate-restore --mr-noise`` defines its levels). The two
            agree on data clipped to those percentiles; on unclipped data (``mr_percentiles: [0, 100]``) a few
            bright voxels can double the span, so ``robust`` keeps the levels meaning the same.
        ct_noise_hu: range of Gaussian sigma in HU.
        loss: ``l1`` or ``mse``.
        mae_loss_weight: weight of the same loss on the MAE's own prediction (keeps it useful alone).
        lr, min_lr_ratio, weight_decay, betas, warmup_steps: AdamW and warm-up + cosine schedule.
        noise_seed: seed of the corruption generator (the data's ``seed`` splits and shuffles the scans).
    """

    def __init__(
        self,
        pretrained: str,
        mode: str = "inpaint",
        modality: str = "MR",
        refine_channels: int = 16,
        refine_depth: int = 3,
        refine_arch: str = "convs",
        unet_channels: int = 0,
        guided: bool = True,
        smooth_sigma: float = 1.0,
        nlm_input: bool = False,
        nlm_h: float = 0.6,
        nlm_guide: bool = False,
        gap_interp: str = "flow",
        known_noise: bool = False,
        gap_widths: tuple[int, int] = (1, 5),
        gap_axes: list[int] = [0, 1, 2],  # noqa: B006 - LightningCLI needs a literal default
        region_prob: float = 0.25,
        mr_noise: tuple[float, float] = (0.02, 0.1),
        mr_noise_scale: str = "span",
        ct_noise_hu: tuple[float, float] = (10.0, 60.0),
        loss: str = "l1",
        mae_loss_weight: float = 0.5,
        lr: float = 3e-4,
        min_lr_ratio: float = 0.01,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        noise_seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"restoration mode must be one of {MODES}, got {mode!r}")
        if modality not in ("MR", "CT"):
            raise ValueError(f"modality must be MR or CT, got {modality!r}")
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be l1 or mse, got {loss!r}")
        if not 1 <= gap_widths[0] <= gap_widths[1] or any(a not in (0, 1, 2) for a in gap_axes) or not gap_axes:
            raise ValueError(
                f"gap_widths must be 1 <= low <= high and gap_axes a list of 0/1/2, got {gap_widths}, {gap_axes}"
            )
        if mr_noise_scale not in MR_NOISE_SCALES:
            raise ValueError(f"mr_noise_scale must be one of {MR_NOISE_SCALES}, got {mr_noise_scale!r}")
        if known_noise and not nlm_input:
            raise ValueError("known_noise is the noise-level input of nlm_input: set nlm_input: true")
        self.save_hyperparameters()
        mae, pre_hparams = load_pretrained_mae(pretrained, tasks=MAE_TASKS)
        require_single_channel(mae, pretrained)
        mae.train().norm_pix_loss = False  # restoration regresses normalised intensities directly
        refiner = make_refiner(self.hparams)
        if refiner is not None and pre_hparams.get("task") == TASK_NAME:
            start_refiner(pretrained, pre_hparams, self.hparams, refiner)
        self.model = mae
        self.refiner = refiner
        net = RestorationNet(mae, refiner, guided, smooth_sigma, nlm_input, nlm_h, nlm_guide, gap_interp)
        object.__setattr__(self, "net", net)  # a view sharing the parameters above
        self.hparams["task"] = TASK_NAME
        self.hparams["model_config"] = pre_hparams["model_config"]
        self.hparams["norm_pix_loss"] = False
        self.hparams["ct_window"] = list(pre_hparams.get("ct_window", (-1000.0, 1000.0)))
        for key in ("roi_size", "spacing", "mr_percentiles"):
            if key in pre_hparams:
                self.hparams[key] = pre_hparams[key]
        self._generator: torch.Generator | None = None

    def on_fit_start(self) -> None:
        """Record the data geometry and normalisation in the checkpoint (repair reads them)."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "intensity"):
            self.hparams.update(
                roi_size=list(datamodule.roi_size),
                spacing=datamodule.hparams.get("spacing"),
                ct_window=list(datamodule.intensity.ct_window),
                mr_percentiles=list(datamodule.intensity.mr_percentiles),
                modalities=list(getattr(datamodule, "modalities", [])),
            )

    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.hparams.noise_seed + self.global_rank)
        return self._generator

    def _distance(self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        error = (output - target).abs() if self.hparams.loss == "l1" else (output - target) ** 2
        if weight is None:
            return error.mean()
        return (error * weight).sum() / weight.sum().clamp_min(1.0)

    def inpaint_loss(self, volume: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Loss of filling a random gap/box in ``volume`` ``(B, 1, D, H, W)`` (one mask for the batch)."""
        hp = self.hparams
        mask = corruption_mask(
            tuple(volume.shape[2:]), tuple(hp.gap_widths), list(hp.gap_axes), hp.region_prob, generator
        )
        mask = mask.to(volume.device).expand_as(volume)
        repaired, prediction = self.net.inpaint(volume, mask)
        weight = mask.float()
        return self._distance(repaired, volume, weight) + hp.mae_loss_weight * self._distance(
            prediction, volume, weight
        )

    def add_noise(self, volume: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy copy of normalised crops ``(B, 1, D, H, W)`` at a random level per crop, and that level's
        Gaussian std in normalised units ``(B,)``."""
        hp = self.hparams
        batch = volume.shape[0]
        shape = (batch, 1, 1, 1, 1)
        if hp.modality == "CT":
            low, high = hp.ct_noise_hu
            sigma = (low + (high - low) * torch.rand(shape, generator=generator)) / (hp.ct_window[1] - hp.ct_window[0])
            return add_gaussian_noise(volume, sigma.to(volume.device)), sigma.flatten()
        low, high = hp.mr_noise
        flat = volume.flatten(1)
        floor = flat.min(1).values.reshape(shape)
        reference = noise_reference(flat, hp.mr_noise_scale).reshape(shape).clamp_min(1e-3)
        sigma = (low + (high - low) * torch.rand(shape, generator=generator)) * reference.cpu()
        cpu = add_rician_noise(volume.cpu().float(), sigma, floor.cpu(), generator)
        return cpu.to(volume.device, volume.dtype), sigma.flatten()

    def denoise_loss(self, volume: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noisy, sigma = self.add_noise(volume, generator)
        context = self.net.denoise_context(noisy, sigma if self.hparams.known_noise else None)
        return self._distance(self.net.denoise(noisy, context=context), volume)

    def step_loss(self, volume: torch.Tensor, generator: torch.Generator, step: int) -> torch.Tensor:
        mode = self.hparams.mode
        if mode == "inpaint" or (mode == "both" and step % 2 == 0):
            return self.inpaint_loss(volume, generator)
        return self.denoise_loss(volume, generator)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch["image"], self.generator(), self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10_000 + batch_idx)  # the same corruption every validation
        loss = self.step_loss(batch["image"], generator, batch_idx)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = make_adamw(
            param_groups(self.named_parameters(), hp.weight_decay), hp.lr, tuple(hp.betas), self._trainer
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        schedule = step_schedule(optimizer, total, hp.warmup_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def configure_callbacks(self) -> list[L.Callback]:
        return checkpoint_callbacks(self._trainer, "val/loss")


def require_single_channel(mae: MaskedAutoencoder3D, path: str) -> None:
    """Restoration runs on one channel at a time: refuse the MAE of a multi-channel pretraining, naming ``path``."""
    channels = mae.encoder.in_channels
    if channels != 1:
        raise CheckpointError(
            f"{path}: the model was pretrained on {channels} channels; restoration (finetune-restore, inpaint, "
            "denoise) needs a single-channel model. Pretrain one on a manifest that lists each sequence as its own "
            "record; inpaint and denoise then repair every channel of a multi-channel scan in turn"
        )


def load_restoration_net(path: str) -> tuple[RestorationNet, dict]:
    """The :class:`RestorationNet` of a pretraining or restoration checkpoint (eval mode) and its hparams."""
    mae, hparams = load_pretrained_mae(path, tasks=MAE_TASKS)
    require_single_channel(mae, path)
    refiner = make_refiner(hparams) if hparams.get("task") == TASK_NAME else None
    if refiner is not None:
        load_refiner_state(path, refiner)
    guided = refiner is not None and bool(hparams.get("guided", False))
    net = RestorationNet(
        mae,
        refiner,
        guided,
        float(hparams.get("smooth_sigma", 1.0)),
        guided and bool(hparams.get("nlm_input", False)),
        float(hparams.get("nlm_h", 0.6)),
        guided and bool(hparams.get("nlm_guide", False)),
        str(hparams.get("gap_interp", "linear" if refiner is not None else "flow")),  # trained refinements: linear
    )
    return net.eval(), hparams
