"""The restoration network: the MAE fills masked patches, an optional convolution refines at voxel level.

Mask convention: a voxel mask ``(B, 1, D, H, W)`` bool, True = corrupted (to be filled). The MAE hides
every patch that touches a masked voxel; the refinement sees the MAE's prediction, the intact voxels and
the mask, so it can use the intact part of partly masked patches (a 1-slice gap hides a whole plane of
8-voxel patches from the MAE, but the refinement still sees the 7 good slices).

A *guided* network (restoration checkpoints since the second pass of issue 4) also gives the refinement
a classical estimate and learns a residual over it: linear interpolation across the masked voxels
(inpainting) or Gaussian smoothing (denoising). Its last convolution starts at zero, so an untrained
guided network is exactly the classical method, and training can only move away from it where that helps.

The refinement is a plain stack of 3x3x3 convolutions (:class:`Refiner`, a receptive field of
``2 * depth + 1`` voxels), a small U-Net (:class:`UNetRefiner`, four poolings: it sees the whole window), or
both with their residuals summed (:class:`DualRefiner`, which can start from a trained stack).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.simplelayers import gaussian_1d, separable_filtering
from monai.networks.nets import BasicUNet

from medmae.models.mae import MaskedAutoencoder3D
from medmae.models.patching import patch_mask_to_voxels, patchify, unpatchify
from medmae.restore.flow import flow_fill_gaps
from medmae.restore.nonlocal_means import estimate_noise_sigma, nonlocal_means

GAP_INTERPOLATIONS = ("linear", "flow")
NOISE_MAP_SCALE = 10.0  # the noise-level input is 10x the estimated std (CT: 0.1 at 20 HU in a 2000 HU window)


def stack_inputs(channels: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The refinement's inputs, each ``(B, 1, D, H, W)``, as one ``(B, C, D, H, W)`` in the first one's dtype."""
    dtype = channels[0].dtype
    return torch.cat([c.to(dtype) for c in channels], dim=1)


class Refiner(nn.Module):
    """3x3x3 convolutions predicting a voxel-level residual from stacked input channels.

    The last convolution starts at zero, so an untrained refiner leaves its base estimate unchanged.

    Args:
        channels: hidden width.
        inputs: number of input channels (3: prediction, intact voxels, mask; 4: and a classical estimate;
            6: and a non-local-means estimate and a noise-level map).
        depth: number of convolutions (>= 2).
    """

    def __init__(self, channels: int = 16, inputs: int = 3, depth: int = 3) -> None:
        super().__init__()
        if channels < 1 or inputs < 1 or depth < 2:
            raise ValueError(
                f"refinement needs channels >= 1, inputs >= 1 and depth >= 2, got {channels}, {inputs}, {depth}"
            )
        layers: list[nn.Module] = [nn.Conv3d(inputs, channels, 3, padding=1), nn.GELU()]
        for _ in range(depth - 2):
            layers += [nn.Conv3d(channels, channels, 3, padding=1), nn.GELU()]
        layers.append(nn.Conv3d(channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_output()

    def forward(self, *channels: torch.Tensor) -> torch.Tensor:
        """Each input ``(B, 1, D, H, W)`` (bool masks are cast); returns the residual ``(B, 1, D, H, W)``."""
        return self.layers(stack_inputs(channels))

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last convolution: the refinement then adds nothing to its base until trained again."""
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    @torch.no_grad()
    def load_narrower(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a trained refinement with fewer channels and/or inputs (same depth), computing the same output.

        Net2Net-style widening: the old channels keep their weights, the new ones keep their random
        incoming weights, and every weight *from* a new channel or a new input starts at zero, so the widened
        refinement returns exactly what the narrow one did and training grows the new channels from there.

        Raises:
            ValueError: ``state`` is not a refinement of the same depth with at most as many channels and inputs.
        """
        convs = [layer for layer in self.layers if isinstance(layer, nn.Conv3d)]
        expected_keys = {f"layers.{2 * i}.{name}" for i in range(len(convs)) for name in ("weight", "bias")}
        if set(state) != expected_keys or state["layers.0.weight"].shape[1] > convs[0].in_channels:
            raise ValueError(
                f"not a refinement of depth {len(convs)} with at most {convs[0].in_channels} inputs: "
                f"{sorted(state)[:4]}"
            )
        old = [(state[f"layers.{2 * i}.weight"], state[f"layers.{2 * i}.bias"]) for i in range(len(convs))]
        narrow = old[0][0].shape[0]
        if narrow > convs[0].out_channels:
            raise ValueError(f"cannot narrow a refinement from {narrow} to {convs[0].out_channels} channels")
        for conv, (weight, bias) in zip(convs, old):
            out_old, in_old = weight.shape[:2]
            conv.weight[:out_old, in_old:] = 0.0  # inputs from new channels or new input maps start at zero
            conv.weight[:out_old, :in_old] = weight
            conv.bias[:out_old] = bias


class UNetRefiner(nn.Module):
    """A U-Net (MONAI's ``BasicUNet``: four 2x poolings, GELU, no normalisation) predicting the voxel-level residual.

    Same interface as :class:`Refiner`, with a receptive field that spans a whole 32³ window, for residuals that
    need more context than a few voxels (denoising at high noise). Widths ``(c, c, 2c, 4c, 8c)``
    down and ``c`` at the top; its last (1x1x1) convolution starts at zero. Any window size works (odd edges
    are padded where the U-Net upsamples).

    Args:
        channels: width ``c`` of the first level.
        inputs: number of input channels (as for :class:`Refiner`).
    """

    def __init__(self, channels: int = 16, inputs: int = 3) -> None:
        super().__init__()
        if channels < 1 or inputs < 1:
            raise ValueError(f"U-Net refinement needs channels >= 1 and inputs >= 1, got {channels}, {inputs}")
        widths = (channels, channels, 2 * channels, 4 * channels, 8 * channels, channels)
        self.unet = BasicUNet(3, inputs, 1, features=widths, act="gelu", norm=None)
        self.reset_output()

    def forward(self, *channels: torch.Tensor) -> torch.Tensor:
        """Each input ``(B, 1, D, H, W)`` (bool masks are cast); returns the residual ``(B, 1, D, H, W)``."""
        return self.unet(stack_inputs(channels))

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last convolution: the refinement then adds nothing to its base until trained again."""
        nn.init.zeros_(self.unet.final_conv.weight)
        nn.init.zeros_(self.unet.final_conv.bias)

    @torch.no_grad()
    def load_narrower(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a trained U-Net refinement with fewer channels and/or inputs, computing the same output.

        Net2Net-style widening as in :meth:`Refiner.load_narrower`: every old channel keeps its weights, new
        channels keep their random incoming weights, and every weight *from* a new channel (or a new input map)
        *to* an old channel starts at zero, so old channels, and the output, are what the narrow U-Net computed.
        An up-sampling level's first convolution reads ``cat([skip, upsampled])``: its old inputs are the first
        channels of each of the two parts.

        Args:
            state: the narrow U-Net's ``state_dict`` (keys ``unet.*``).

        Raises:
            ValueError: ``state`` is not a U-Net refinement with at most as many channels and inputs.
        """
        params = dict(self.named_parameters())
        if set(state) != set(params):
            raise ValueError(f"not a U-Net refinement: {sorted(set(state) ^ set(params))[:4]}")
        for name, weight in params.items():
            narrow = state[name]
            if narrow.ndim != weight.ndim or any(o > n for o, n in zip(narrow.shape, weight.shape)):
                raise ValueError(
                    f"cannot load {name} {tuple(narrow.shape)} into {tuple(weight.shape)}: the checkpoint's U-Net "
                    "is wider or has more inputs"
                )
        for name, weight in params.items():
            narrow = state[name]
            if name.endswith("bias"):
                weight[: narrow.shape[0]] = narrow
                continue
            transposed = ".upsample.deconv." in name  # ConvTranspose3d weights are (in, out, ...)
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            old_inputs = torch.arange(narrow.shape[in_dim])
            if name.startswith("unet.upcat_") and ".convs.conv_0." in name:  # reads cat([skip, upsampled])
                upsampled = name.split(".convs.")[0] + ".upsample.deconv.weight"  # (in, out, ...): out = its width
                skip_wide = weight.shape[in_dim] - params[upsampled].shape[1]
                skip_narrow = narrow.shape[in_dim] - state[upsampled].shape[1]
                upsampled_narrow = torch.arange(state[upsampled].shape[1])
                old_inputs = torch.cat([torch.arange(skip_narrow), skip_wide + upsampled_narrow])
            old_outputs = torch.arange(narrow.shape[out_dim])
            weight.index_fill_(out_dim, old_outputs, 0.0)  # new inputs start at zero for the old channels
            target = weight.index_select(out_dim, old_outputs)
            target.index_copy_(in_dim, old_inputs, narrow)
            weight.index_copy_(out_dim, old_outputs, target)


class DualRefiner(nn.Module):
    """A convolution stack and a U-Net side by side; the residual is the sum of theirs.

    Built to continue a trained :class:`Refiner`: its weights go into ``convs`` and the U-Net starts at zero,
    so the network starts by computing exactly what the stack did and the U-Net adds the wider context.

    Args:
        channels: width of the stack (and of the U-Net's first level unless ``unet_channels``).
        inputs: number of input channels (as for :class:`Refiner`).
        depth: number of convolutions of the stack.
        unet_channels: width of the U-Net's first level; 0: ``channels``.
    """

    def __init__(self, channels: int = 16, inputs: int = 3, depth: int = 3, unet_channels: int = 0) -> None:
        super().__init__()
        self.convs = Refiner(channels, inputs, depth)
        self.unet = UNetRefiner(unet_channels or channels, inputs)

    def forward(self, *channels: torch.Tensor) -> torch.Tensor:
        """Each input ``(B, 1, D, H, W)``; returns the summed residual ``(B, 1, D, H, W)``."""
        return self.convs(*channels) + self.unet(*channels)

    def reset_output(self) -> None:
        """Zero the last convolution of both parts."""
        self.convs.reset_output()
        self.unet.reset_output()


AnyRefiner = Refiner | UNetRefiner | DualRefiner


def interpolate_masked(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of the masked voxels from the nearest intact voxels along each axis.

    Along each axis a masked voxel between two intact voxels ``a < x < b`` gets
    ``v[a] + (x - a) / (b - a) * (v[b] - v[a])``; the three axes are averaged with weights ``1 / (b - a)^2``
    (the shortest crossing dominates). A voxel with intact voxels on one side only takes the nearest one's
    value with a negligible weight; a slice gap is therefore filled exactly like linear interpolation
    along the gap axis, since its in-plane lines hold no intact voxel. Voxels with no intact voxel on any
    of their three lines get the mean of the intact voxels (0 when there are none).

    Args:
        volume: ``(B, C, D, H, W)``; masked voxels are ignored.
        mask: ``(B, 1 or C, D, H, W)`` bool, True = fill.

    Returns:
        ``(B, C, D, H, W)``: ``volume`` outside the mask, the interpolation inside.
    """
    mask = mask.expand_as(volume)
    intact = ~mask
    total = torch.zeros_like(volume)
    weights = torch.zeros_like(volume)
    for dim in (2, 3, 4):
        size = volume.shape[dim]
        shape = [1] * volume.ndim
        shape[dim] = size
        position = torch.arange(size, device=volume.device).reshape(shape).expand_as(volume)
        before = torch.where(intact, position, -1).cummax(dim).values
        after = torch.where(intact, position, size).flip(dim).cummin(dim).values.flip(dim)
        value_before = volume.gather(dim, before.clamp(0, size - 1))
        value_after = volume.gather(dim, after.clamp(0, size - 1))
        has_before, has_after = before >= 0, after < size
        span = (after - before).clamp_min(1).to(volume.dtype)
        fraction = (position - before).to(volume.dtype) / span
        both = value_before + fraction * (value_after - value_before)
        value = torch.where(has_before & has_after, both, torch.where(has_before, value_before, value_after))
        weight = torch.where(has_before & has_after, span.reciprocal() ** 2, (has_before | has_after) * 1e-6 / size**2)
        total = total + weight * value
        weights = weights + weight
    counts = intact.sum((2, 3, 4), keepdim=True).clamp_min(1)
    mean = (volume * intact).sum((2, 3, 4), keepdim=True) / counts
    filled = torch.where(weights > 0, total / weights.clamp_min(1e-30), mean)
    return torch.where(mask, filled, volume)


def fill_masked(
    volume: torch.Tensor, mask: torch.Tensor, gap_interp: str = "linear", motion_from: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`interpolate_masked`, then with ``gap_interp`` ``flow`` each slice gap filled by motion-compensated
    interpolation (:func:`~medmae.restore.flow.flow_fill_gaps`), the motion estimated on ``motion_from``'s
    planes (``volume`` when None; filled linearly first). Shapes as :func:`interpolate_masked`."""
    filled = interpolate_masked(volume, mask)
    if gap_interp != "flow":
        return filled
    source = None if motion_from is None else interpolate_masked(motion_from, mask)
    return flow_fill_gaps(filled, mask, source)


def fill_scan(array: np.ndarray, mask: np.ndarray, gap_interp: str = "linear") -> torch.Tensor:
    """:func:`fill_masked` of one ``(I, J, K)`` scan (any real dtype; NaN/Inf read as 0) and its bool ``mask``;
    returns the filled ``(I, J, K)`` float32 tensor."""
    scan = torch.from_numpy(np.nan_to_num(np.asarray(array, dtype=np.float32)))[None, None]
    voxel_mask = torch.from_numpy(np.asarray(mask, dtype=bool))[None, None]
    with torch.no_grad():
        return fill_masked(scan, voxel_mask, gap_interp)[0, 0]


def gaussian_smooth(volume: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian smoothing of ``(B, C, D, H, W)`` with ``sigma`` voxels (MONAI separable filter, mirrored edges)."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=3.0, approx="sampled").to(volume)
    kernel = kernel / kernel.sum()
    return separable_filtering(volume, [kernel] * 3, mode="reflect")


def patch_stats(
    volume: torch.Tensor, valid: torch.Tensor, patch: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``(B, N, 1)`` of each patch over its ``valid`` voxels.

    Patches with fewer than two valid voxels take the average statistics of the patches that have them.
    ``volume``, ``valid``: ``(B, 1, D, H, W)``.
    """
    values, weights = patchify(volume.float(), patch), patchify(valid.float(), patch)
    count = weights.sum(-1, keepdim=True)
    mean = (values * weights).sum(-1, keepdim=True) / count.clamp_min(1)
    var = ((values - mean) ** 2 * weights).sum(-1, keepdim=True) / count.clamp_min(1)
    std = (var + 1e-6).sqrt()
    known = count >= 2
    fallback_mean = (mean * known).sum(1, keepdim=True) / known.sum(1, keepdim=True).clamp_min(1)
    fallback_std = (std * known).sum(1, keepdim=True) / known.sum(1, keepdim=True).clamp_min(1)
    return torch.where(known, mean, fallback_mean), torch.where(known, std, fallback_std.clamp_min(1e-3))


class RestorationNet(nn.Module):
    """Inpainting and denoising with a (fine-tuned) MAE and an optional voxel-level refinement.

    Args:
        mae: the masked autoencoder; with ``norm_pix_loss`` its per-patch normalised predictions are
            mapped back with statistics of each patch's intact voxels.
        refiner: voxel-level refinement (:class:`Refiner`, :class:`UNetRefiner` or :class:`DualRefiner`;
            restoration checkpoints); None for a plain pretraining checkpoint.
        guided: the refiner also sees a classical estimate (:meth:`guide`) and predicts a residual over it
            instead of over the MAE's prediction; needs a refiner with 4 inputs.
        smooth_sigma: Gaussian width (voxels) of the denoising guide; 0 makes the guide the noisy input itself
            (the refiner then learns the noise to remove, as residual denoisers do; best for low noise).
        nlm_input: for denoising, the refiner also sees non-local means of the noisy input and a map of its
            estimated noise level (:meth:`denoise_context`); needs a guided refiner with 6 inputs.
        nlm_h: the non-local-means filter strength ``h`` as a multiple of the estimated noise std.
        nlm_guide: with ``nlm_input``, the denoising residual is learned over the non-local means instead of
            the ``smooth_sigma`` guide: an untrained refinement then returns non-local means.
        gap_interp: the inpainting guide across slice gaps: ``linear`` interpolation, or ``flow``
            (motion-compensated, :func:`~medmae.restore.flow.flow_fill_gaps`); other masked voxels are
            always linearly interpolated (:func:`interpolate_masked`).
    """

    def __init__(
        self,
        mae: MaskedAutoencoder3D,
        refiner: AnyRefiner | None = None,
        guided: bool = False,
        smooth_sigma: float = 1.0,
        nlm_input: bool = False,
        nlm_h: float = 0.6,
        nlm_guide: bool = False,
        gap_interp: str = "linear",
    ) -> None:
        super().__init__()
        if gap_interp not in GAP_INTERPOLATIONS:
            raise ValueError(f"gap_interp must be one of {GAP_INTERPOLATIONS}, got {gap_interp!r}")
        if guided and refiner is None:
            raise ValueError("a guided restoration network needs a refiner (refine_channels > 0)")
        if nlm_input and not guided:
            raise ValueError("nlm_input needs a guided refinement (guided: true, refine_channels > 0)")
        if nlm_guide and not nlm_input:
            raise ValueError("nlm_guide needs nlm_input: true")
        if nlm_h <= 0:
            raise ValueError(f"nlm_h must be > 0 (a multiple of the noise std), got {nlm_h}")
        if smooth_sigma < 0:
            raise ValueError(f"smooth_sigma must be >= 0 voxels (0: the noisy input is the guide), got {smooth_sigma}")
        self.mae = mae
        self.refiner = refiner
        self.guided = guided
        self.smooth_sigma = smooth_sigma
        self.nlm_input = nlm_input
        self.nlm_h = nlm_h
        self.nlm_guide = nlm_guide
        self.gap_interp = gap_interp

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.mae.encoder.patch_size

    def patch_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` bool: the patches touching a masked voxel of ``mask`` ``(B, 1, D, H, W)``."""
        pooled = F.max_pool3d(mask.float(), self.patch_size, self.patch_size)
        return pooled.flatten(1) > 0

    def predict_patches(
        self, volume: torch.Tensor, patch_mask: torch.Tensor, stats_valid: torch.Tensor
    ) -> torch.Tensor:
        """The MAE's voxel prediction ``(B, 1, D, H, W)`` for every patch, from the unmasked patches.

        Args:
            volume: ``(B, 1, D, H, W)`` normalised; masked patches are never seen by the encoder.
            patch_mask: ``(B, N)`` bool, True = hidden; samples may hide different numbers of patches.
            stats_valid: ``(B, 1, D, H, W)`` voxels whose statistics de-normalise norm-pix predictions.
        """
        if bool((patch_mask.sum(1) != patch_mask.sum(1)[0]).any()):
            return torch.cat(
                [self.predict_patches(v[None], m[None], s[None]) for v, m, s in zip(volume, patch_mask, stats_valid)]
            )
        if bool(patch_mask.all()):
            return torch.zeros_like(volume)  # nothing visible: the normalised mean
        latent, visible = self.mae.forward_encoder(volume, patch_mask)
        pred = self.mae.forward_decoder(latent, visible, volume.shape).float()
        if self.mae.norm_pix_loss:
            mean, std = patch_stats(volume, stats_valid, self.patch_size)
            pred = pred * std + mean
        grid = self.mae.encoder.check_input(volume)
        return unpatchify(pred, grid, self.patch_size, volume.shape[1]).to(volume.dtype)

    def guide(self, volume: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The classical estimate a guided network refines, ``(B, 1, D, H, W)``; None when not guided.

        ``mask`` given (inpainting): :func:`interpolate_masked`, with slice gaps motion-compensated when
        ``gap_interp`` is ``flow``; None (denoising): :func:`gaussian_smooth` (``smooth_sigma`` 0: the input itself).
        Whole-volume repair computes it once on the whole array and passes windows of it.
        """
        if not self.guided:
            return None
        if mask is None:
            return gaussian_smooth(volume, self.smooth_sigma) if self.smooth_sigma > 0 else volume
        return fill_masked(volume, mask, self.gap_interp)

    def denoise_context(self, volume: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor | None:
        """The extra denoising inputs of an ``nlm_input`` network, ``(B, 2, D, H, W)``; None otherwise.

        Channel 0: :func:`nonlocal_means` of ``volume`` with ``h = nlm_h`` times the noise std ``sigma``
        ``(B,)`` (normalised units; when None, what :func:`estimate_noise_sigma` finds in ``volume``); channel 1:
        that std times ``NOISE_MAP_SCALE``, everywhere. Whole-volume repair computes it once on the whole array
        (a better noise estimate than a window's).
        """
        if not self.nlm_input:
            return None
        sigma = estimate_noise_sigma(volume) if sigma is None else sigma.to(volume.device, torch.float32)
        smoothed = nonlocal_means(volume, sigma, self.nlm_h)
        level = (sigma * NOISE_MAP_SCALE).to(volume.dtype).reshape(-1, 1, 1, 1, 1).expand_as(volume)
        return torch.cat([smoothed, level], dim=1)

    def inpaint(
        self, volume: torch.Tensor, mask: torch.Tensor, guide: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the masked voxels.

        Args:
            volume: ``(B, 1, D, H, W)`` normalised; masked voxels are ignored.
            mask: ``(B, 1, D, H, W)`` bool, True = fill.
            guide: ``(B, 1, D, H, W)`` the interpolation a guided network refines (computed when None).

        Returns:
            The repaired volume (unmasked voxels unchanged) and the MAE's own prediction, both ``(B, 1, D, H, W)``.
        """
        intact = volume.masked_fill(mask, 0.0)
        if self.refiner is None:
            return self.inpaint_plain(volume, mask, intact)
        prediction = self.predict_patches(intact, self.patch_mask(mask), ~mask)
        if self.guided:
            guide = self.guide(intact, mask) if guide is None else guide
            filled = guide + self.refiner(prediction, intact, mask, guide)
        else:
            filled = prediction + self.refiner(prediction, intact, mask)
        return torch.where(mask, filled, volume), prediction

    def inpaint_plain(
        self, volume: torch.Tensor, mask: torch.Tensor, intact: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inpainting with a plain MAE (no refinement): its prediction, anchored on the intact voxels.

        The MAE's prediction ``P`` is off by a smooth bias where it has seen little; the residual ``volume - P``
        on the intact voxels around the mask is interpolated across it (:func:`fill_masked`: with ``gap_interp``
        ``flow``, slice gaps along the motion estimated on the scan) and added, so the fill meets the intact
        voxels at the mask's edge. As the interpolation is linear in the residual, the fill is the scan's
        interpolation plus the MAE's own deviation from interpolating its prediction inside the mask. The
        patches one voxel around the mask are hidden too, so the residual is read where the MAE predicted
        (its output for a visible patch is not what it was trained on).

        Args:
            volume, mask: as :meth:`inpaint`; ``intact`` is ``volume`` with the masked voxels zeroed.

        Returns:
            The repaired volume and the MAE's own prediction, both ``(B, 1, D, H, W)``.
        """
        around = F.max_pool3d(mask.float(), 3, stride=1, padding=1) > 0
        prediction = self.predict_patches(intact, self.patch_mask(around), ~mask)
        residual = fill_masked((volume - prediction).masked_fill(mask, 0.0), mask, self.gap_interp, intact)
        return torch.where(mask, prediction + residual, volume), prediction

    def denoise(
        self,
        volume: torch.Tensor,
        rounds: int = 4,
        generator: torch.Generator | None = None,
        guide: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoise ``(B, 1, D, H, W)`` normalised volumes.

        With a refiner (a restoration checkpoint) the MAE sees every patch and the refinement predicts the
        residual of the noisy input, or with a guided network of its Gaussian smoothing ``guide`` (computed
        when None). Without one (a plain pretraining checkpoint) the prediction is blind-spot
        (Noise2Self-style): patches are split into ``rounds`` groups and each group is predicted while hidden,
        so noise cannot be copied; expect smooth, low-detail results. An ``nlm_input`` network's refinement also
        sees ``context`` (:meth:`denoise_context`, computed when None); with ``nlm_guide`` its non-local means
        replace ``guide``.
        """
        nothing = torch.zeros_like(volume, dtype=torch.bool)
        if self.refiner is not None:
            prediction = self.predict_patches(volume, self.patch_mask(nothing), ~nothing)
            if self.guided:
                guide = self.guide(volume, None) if guide is None else guide
                if self.nlm_input:
                    context = self.denoise_context(volume) if context is None else context
                    guide = context[:, :1] if self.nlm_guide else guide
                    return guide + self.refiner(prediction, volume, nothing, guide, context)
                return guide + self.refiner(prediction, volume, nothing, guide)
            return volume + self.refiner(prediction, volume, nothing)
        grid = self.mae.encoder.check_input(volume)
        scores = torch.rand(self.patch_mask(nothing).shape, generator=generator, device=volume.device)
        groups = scores.argsort(dim=1).argsort(dim=1) % rounds  # (B, N): equal-sized random groups
        out = torch.zeros_like(volume)
        for group in range(rounds):
            hidden = groups == group
            prediction = self.predict_patches(volume, hidden, ~nothing)
            out = torch.where(patch_mask_to_voxels(hidden, grid, self.patch_size), prediction, out)
        return out
