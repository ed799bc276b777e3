"""Pure restoration helpers against references: slice parsing, intensity maps, interpolation, metrics, detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from medmae.data.transforms import robust_zscore
from medmae.evaluation.restore_baselines import interpolate_slices
from medmae.evaluation.restore_metrics import psnr_in_mask, restore_scores
from medmae.inference.repair import ct_intensity_map, guess_modality, mr_intensity_map
from medmae.io import read_volume
from medmae.models.checkpoint import CheckpointError
from medmae.restore.corrupt import corrupt_slices, noisy_volume
from medmae.restore.detect import detect_corrupted_slices
from medmae.restore.net import DualRefiner, Refiner, UNetRefiner, gaussian_smooth, interpolate_masked
from medmae.restore.slices import parse_axis, parse_slices, slice_mask
from medmae.tasks.restore import load_refiner_state

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus" / "imagesTr"
CT = DATA / "ct_mr_samples" / "example_ct_sm.nii.gz"


def test_parse_slices_ranges_and_lists():
    assert parse_slices("40-42,50") == [40, 41, 42, 50]
    assert parse_slices(" 7, 3-4 ,3") == [3, 4, 7]


@pytest.mark.parametrize("text", ["a", "5-3", "-3", "", "1,,x"])
def test_parse_slices_rejects_malformed(text):
    with pytest.raises(ValueError, match="slice selection"):
        parse_slices(text)


def test_parse_slices_out_of_range_names_valid_range():
    with pytest.raises(ValueError, match=r"out of range.*10 slices.*0-9"):
        parse_slices("8-10", size=10)


def test_parse_axis():
    assert [parse_axis(a) for a in ("x", "j", "2", "Z")] == [0, 1, 2, 2]
    assert parse_axis("auto", (0.6, 0.6, 5.0)) == 2
    assert parse_axis("auto", (5.0, 1.0, 1.0)) == 0
    assert parse_axis("auto", (1.0, 1.0, 1.0)) == 2
    with pytest.raises(ValueError, match="axis 'w'"):
        parse_axis("w")


def test_slice_mask_matches_loop():
    mask = slice_mask((4, 5, 6), 1, [1, 3])
    for j in range(5):
        assert mask[:, j, :].all() == (j in (1, 3)) and mask[:, j, :].any() == (j in (1, 3))


def test_mr_intensity_map_is_robust_zscore_made_explicit():
    array = read_volume(HIPPO / "hippocampus_003.nii.gz").array[0]
    imap = mr_intensity_map(array, (0.5, 99.5))
    reference = robust_zscore(torch.from_numpy(array[None].astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(imap.forward(array), reference, atol=1e-4)
    inside = (array > imap.low) & (array < imap.high)
    np.testing.assert_allclose(imap.inverse(imap.forward(array))[inside], array[inside], rtol=1e-4)


def test_ct_window_map_and_modality_guess():
    volume = read_volume(CT)
    imap = ct_intensity_map((-1000, 1000))
    assert imap.forward(np.array([-1000.0, 0.0, 1000.0, 3000.0])).tolist() == [0.0, 0.5, 1.0, 1.0]
    assert guess_modality(volume.array) == "CT"
    assert guess_modality(read_volume(HIPPO / "hippocampus_001.nii.gz").array) == "MR"


def test_linear_interpolation_matches_plain_loop():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(3, 4, 10))
    out = interpolate_slices(array, 2, [4, 5, 6], "linear")
    for k, t in zip((4, 5, 6), (0.25, 0.5, 0.75)):
        np.testing.assert_allclose(out[:, :, k], (1 - t) * array[:, :, 3] + t * array[:, :, 7])
    np.testing.assert_array_equal(out[:, :, 7:], array[:, :, 7:])
    cubic = interpolate_slices(array, 2, [4, 5, 6], "cubic")
    np.testing.assert_array_equal(cubic[:, :, :4], array[:, :, :4])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_interpolate_masked_is_linear_interpolation_across_slice_gaps(axis):
    array = read_volume(HIPPO / "hippocampus_003.nii.gz").array[0].astype(np.float64)
    gap = [6, 7, 8]
    mask = slice_mask(array.shape, axis, gap)
    out = interpolate_masked(torch.from_numpy(array)[None, None], torch.from_numpy(mask)[None, None])[0, 0]
    np.testing.assert_allclose(out.numpy(), interpolate_slices(array, axis, gap, "linear"), rtol=1e-12, atol=1e-9)


def test_interpolate_masked_box_by_hand():
    volume = torch.zeros(1, 1, 5, 5, 5, dtype=torch.float64)
    volume[0, 0, 1, 2, 2], volume[0, 0, 3, 2, 2] = 2.0, 4.0  # along D: span 2, midpoint 3
    volume[0, 0, 2, 1, 2], volume[0, 0, 2, 4, 2] = 3.0, 9.0  # along H: span 3, 1/3 of the way: 5
    volume[0, 0, 2, 2, 0] = 7.0  # along W: one side only (the other is masked up to the edge)
    mask = torch.zeros_like(volume, dtype=torch.bool)
    mask[0, 0, 2, 2:4, 2] = True
    mask[0, 0, 2, 2, 1:] = True
    out = interpolate_masked(volume, mask)[0, 0]
    weights = np.array([1 / 2**2, 1 / 3**2, 1e-6 / 5**2])
    expected = float(np.dot(weights, [3.0, 5.0, 7.0]) / weights.sum())
    assert out[2, 2, 2].item() == pytest.approx(expected)
    np.testing.assert_array_equal(out[~mask[0, 0]].numpy(), volume[0, 0][~mask[0, 0]].numpy())
    everything = torch.ones_like(mask)
    assert interpolate_masked(volume, everything).abs().max() == 0  # nothing intact: the (empty) mean, 0


def test_gaussian_smooth_matches_scipy():
    array = read_volume(HIPPO / "hippocampus_003.nii.gz").array[0].astype(np.float64)
    out = gaussian_smooth(torch.from_numpy(array)[None, None], 1.5)[0, 0].numpy()
    np.testing.assert_allclose(out, gaussian_filter(array, 1.5, mode="mirror", truncate=3.0), atol=1e-9 * array.max())


@pytest.mark.parametrize(("channels", "inputs", "depth"), [(0, 3, 3), (8, 0, 3), (8, 4, 1)])
def test_refiner_rejects_bad_sizes(channels, inputs, depth):
    with pytest.raises(ValueError, match="refinement needs"):
        Refiner(channels, inputs, depth)


def test_refiner_starts_at_zero_and_every_parameter_learns():
    refiner = Refiner(4, inputs=4, depth=4)
    inputs = [torch.randn(2, 1, 6, 6, 6) for _ in range(3)] + [torch.zeros(2, 1, 6, 6, 6, dtype=torch.bool)]
    out = refiner(*inputs)
    assert out.shape == (2, 1, 6, 6, 6) and out.abs().max() == 0
    (out - 1).square().mean().backward()
    assert refiner.layers[-1].weight.grad.abs().sum() > 0


def test_unet_refiner_starts_at_zero_on_odd_windows_and_learns():
    torch.manual_seed(0)
    refiner = UNetRefiner(4, inputs=6)
    inputs = [torch.randn(2, 1, 35, 50, 19) for _ in range(6)]  # edges that do not halve evenly four times
    out = refiner(*inputs)
    assert out.shape == (2, 1, 35, 50, 19) and out.abs().max() == 0
    (out - 1).square().mean().backward()
    assert refiner.unet.final_conv.weight.grad.abs().sum() > 0
    torch.nn.init.normal_(refiner.unet.final_conv.weight, std=0.1)  # "trained": the residual now depends on
    moved = [x.clone() for x in inputs]  # voxels far away (it sees the whole window), unlike a 4-layer stack
    moved[1][:, :, 30:, 45:, 15:] += 5.0
    difference = (refiner(*moved) - refiner(*inputs)).abs()[0, 0]
    assert difference[:10, :10, :5].max() > 0
    with pytest.raises(ValueError, match="channels >= 1"):
        UNetRefiner(0, inputs=6)


def test_widened_unet_refiner_computes_what_the_narrow_one_did_and_grows_new_channels():
    torch.manual_seed(0)
    narrow = UNetRefiner(4, inputs=6).double()  # float64: float32 rounding would swamp the comparison
    for parameter in narrow.parameters():  # a "trained" U-Net: no zero last layer
        torch.nn.init.normal_(parameter, std=0.2)
    inputs = [torch.randn(2, 1, 35, 20, 19, dtype=torch.float64) for _ in range(6)]
    wide = UNetRefiner(8, inputs=6).double()
    wide.load_narrower(narrow.state_dict())
    torch.testing.assert_close(wide(*inputs), narrow(*inputs))
    (wide(*inputs) - 1).square().mean().backward()
    assert wide.unet.final_conv.weight.grad[:, 4:].abs().sum() > 0  # the new channels feed the output from step 1
    upcat = wide.unet.upcat_4.convs.conv_0.conv.weight  # reads cat([skip 32 (old 16), upsampled 32 (old 16)])
    assert upcat.grad[:16, 16:32].abs().sum() > 0 and upcat.grad[:16, 48:].abs().sum() > 0
    more_inputs = UNetRefiner(8, inputs=7).double()
    more_inputs.load_narrower(narrow.state_dict())
    extra = torch.randn(2, 1, 35, 20, 19, dtype=torch.float64)
    torch.testing.assert_close(more_inputs(*inputs, extra), narrow(*inputs))
    with pytest.raises(ValueError, match=r"cannot load unet.conv_0.conv_0.conv.weight \(4, 6, 3, 3, 3\)"):
        UNetRefiner(3, inputs=6).load_narrower(narrow.state_dict())
    with pytest.raises(ValueError, match="not a U-Net refinement"):
        UNetRefiner(8, inputs=6).load_narrower(Refiner(4, inputs=6).state_dict())


def test_dual_refiner_checkpoint_loads_into_a_wider_unet(tmp_path: Path):
    torch.manual_seed(0)
    narrow = DualRefiner(4, inputs=6, depth=3)
    for parameter in narrow.unet.parameters():  # a "trained" U-Net: no zero last layer
        torch.nn.init.normal_(parameter, std=0.05)
    path = tmp_path / "restore.ckpt"
    torch.save({"state_dict": {f"refiner.{k}": v for k, v in narrow.state_dict().items()}}, path)
    wide = DualRefiner(4, inputs=6, depth=3, unet_channels=8)
    load_refiner_state(str(path), wide, widen_unet=True)
    window = [torch.randn(1, 1, 16, 16, 16) for _ in range(6)]
    torch.testing.assert_close(wide(*window), narrow(*window))
    with pytest.raises(CheckpointError, match=r"restore\.ckpt: refinement weights do not match its settings"):
        load_refiner_state(str(path), DualRefiner(6, inputs=6, depth=3, unet_channels=8), widen_unet=True)


def test_widened_refiner_computes_what_the_narrow_one_did_and_grows_new_channels():
    torch.manual_seed(0)
    narrow = Refiner(4, inputs=4, depth=4)
    for layer in narrow.layers:  # a "trained" refinement: no zero last layer
        if isinstance(layer, torch.nn.Conv3d):
            torch.nn.init.normal_(layer.weight, std=0.1)
            torch.nn.init.normal_(layer.bias, std=0.1)
    wide = Refiner(7, inputs=4, depth=4)
    wide.load_narrower(narrow.state_dict())
    inputs = [torch.randn(2, 1, 6, 6, 6) for _ in range(4)]
    torch.testing.assert_close(wide(*inputs), narrow(*inputs))
    (wide(*inputs) - 1).square().mean().backward()
    assert wide.layers[-1].weight.grad[:, 4:].abs().sum() > 0  # the new channels feed the output from step 1
    more_inputs = Refiner(7, inputs=6, depth=4)  # e.g. a non-local-means estimate and a noise map added
    more_inputs.load_narrower(narrow.state_dict())
    extra = [torch.randn(2, 1, 6, 6, 6) for _ in range(2)]
    torch.testing.assert_close(more_inputs(*inputs, *extra), narrow(*inputs))
    (more_inputs(*inputs, *extra) - 1).square().mean().backward()
    assert more_inputs.layers[0].weight.grad[:, 4:].abs().sum() > 0  # the new inputs learn from step 1
    with pytest.raises(ValueError, match="cannot narrow"):
        Refiner(3, inputs=4, depth=4).load_narrower(narrow.state_dict())
    with pytest.raises(ValueError, match="at most 3 inputs"):
        Refiner(7, inputs=3, depth=4).load_narrower(narrow.state_dict())
    with pytest.raises(ValueError, match="not a refinement of depth 3 with at most 4 inputs"):
        Refiner(7, inputs=4, depth=3).load_narrower(narrow.state_dict())


def test_psnr_in_mask_by_hand():
    truth = np.zeros((4, 4, 4))
    truth[1, 1, 1], truth[2, 2, 2] = 10.0, 5.0
    prediction = truth.copy()
    prediction[2, 2, 2] = 6.0
    mask = truth > 0
    # normalised by the ground-truth maximum (10): errors (0, 0.1) -> MSE 0.005 -> 23.01 dB
    assert psnr_in_mask(prediction, truth, mask) == pytest.approx(10 * np.log10(1 / 0.005))
    scores = restore_scores(prediction, truth, mask)
    assert scores.mae == pytest.approx(0.05)


def test_rician_noise_level():
    array = read_volume(HIPPO / "hippocampus_003.nii.gz").array[0].astype(np.float64)
    noisy = noisy_volume(array, "MR", 0.05, seed=1)
    bright = array > np.percentile(array, 90)  # high SNR: Rician ~ Gaussian with the given sigma
    low, high = np.percentile(array, [0.5, 99.5])
    assert np.std((noisy - array)[bright]) == pytest.approx(0.05 * (high - low), rel=0.15)
    assert (noisy >= 0).all()


CLEAN = [
    HIPPO / "hippocampus_001.nii.gz",
    HIPPO / "hippocampus_017.nii.gz",
    CT,
    DATA / "pyradiomics" / "lung1_image.nrrd",
]


@pytest.mark.parametrize("path", CLEAN, ids=lambda p: p.name)
def test_detection_flags_nothing_in_clean_scans(path):
    volume = read_volume(path)
    assert detect_corrupted_slices(volume.array[0], parse_axis("auto", volume.spacing)) == []


@pytest.mark.parametrize("kind", ["zero", "stripes", "shift", "intensity"])
@pytest.mark.parametrize("path", [HIPPO / "hippocampus_017.nii.gz", CT], ids=lambda p: p.name)
def test_detection_finds_planted_slices(path, kind):
    array = read_volume(path).array[0]
    rng = np.random.default_rng(3)
    corrupted = corrupt_slices(array, 2, [9, 17], kind, rng)
    findings = detect_corrupted_slices(corrupted, 2)
    assert [f.index for f in findings] == [9, 17]
    assert all(f.kind == kind and f.reason for f in findings)


def test_unseen_modality_note_names_what_the_checkpoint_trained_on() -> None:
    from medmae.inference.repair import unseen_modality_note

    note = unseen_modality_note({"modalities": ["MR"]}, "CT", "scan.nii.gz")
    assert note is not None and "trained on MR scans only" in note and "scan.nii.gz is repaired as CT" in note
    assert unseen_modality_note({"modalities": ["CT", "MR"]}, "CT", "scan.nii.gz") is None
    assert unseen_modality_note({}, "CT", "scan.nii.gz") is None  # checkpoints from before the record


@pytest.mark.parametrize("gap_interp", ["linear", "flow"])
def test_plain_mae_inpainting_is_anchored_on_the_intact_voxels_around_the_mask(gap_interp: str) -> None:
    """A plain MAE whose prediction is right up to a constant bias inside the patches it hides (and wrong
    everywhere else, as an MAE's output for visible patches may be) fills the gap exactly: the bias is read off
    the intact voxels next to the gap, which are hidden too, and removed (interpolated linearly or along the
    scan's motion: either carries a constant across)."""
    from medmae.models import build_mae, mae_config
    from medmae.restore.net import RestorationNet

    net = RestorationNet(build_mae(mae_config("tiny", patch_size=8)).eval(), gap_interp=gap_interp)
    crop = read_volume(HIPPO / "hippocampus_001.nii.gz").array[:, :32, :32, :32]
    truth = torch.from_numpy(crop.astype(np.float32))[None]
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[..., 16:19] = True  # the gap starts on a patch boundary: slice 15 belongs to a patch the gap misses
    hidden_seen = []

    def biased(volume: torch.Tensor, patch_mask: torch.Tensor, stats_valid: torch.Tensor) -> torch.Tensor:
        hidden_seen.append(patch_mask)
        hidden = net.patch_mask(mask | (F.max_pool3d(mask.float(), 3, 1, 1) > 0))
        voxels = hidden.reshape(1, 1, 4, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
        return torch.where(voxels, truth + 5.0, truth - 100.0)

    net.predict_patches = biased
    repaired, prediction = net.inpaint(truth.masked_fill(mask, 0.0), mask)
    torch.testing.assert_close(repaired, truth, rtol=0, atol=1e-4)
    torch.testing.assert_close(prediction[mask], truth[mask] + 5.0)
    assert int(hidden_seen[0].sum()) == 32  # the 16 patches the gap touches and the 16 before slice 16
