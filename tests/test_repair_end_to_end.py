"""Repair on real scans: bit-exact outside the mask, grid/dtype kept, input untouched; restoration fit; CLI errors."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from medmae.cli import main
from medmae.data.datamodule import PretrainDataModule
from medmae.evaluation.restore_baselines import flow_interpolation, interpolate_slices
from medmae.evaluation.restore_metrics import psnr_in_mask
from medmae.inference.repair import (
    RepairSettings,
    denoise_volume,
    inpaint_volume,
    intensity_map,
    roi_of,
    run_windows,
)
from medmae.io import read_volume, write_volume
from medmae.io.writers import cast_to_dtype
from medmae.restore.corrupt import corrupt_slices, robust_range
from medmae.restore.demo import run_repair_demo
from medmae.restore.net import UNetRefiner, gaussian_smooth
from medmae.restore.nonlocal_means import estimate_noise_sigma, nonlocal_means
from medmae.restore.slices import slice_mask
from medmae.tasks.pretrain import MAEPretrainTask
from medmae.tasks.restore import MAERestoreTask, load_restoration_net, noise_reference

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus" / "imagesTr"
CT = DATA / "ct_mr_samples" / "example_ct_sm.nii.gz"
HELD_OUT = [HIPPO / f"hippocampus_{n}.nii.gz" for n in ("367", "393", "394")]  # not in the 16-scan manifest

pytestmark = pytest.mark.real_data


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared CI cores: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit(task: L.LightningModule, manifest: Path, root: Path, steps: int) -> Path:
    datamodule = PretrainDataModule(str(manifest), roi_size=[32, 32, 32], spacing=None, batch_size=4, val_fraction=0.25)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=datamodule)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def pretrain_ckpt(hippo_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    L.seed_everything(0, verbose=False)
    task = MAEPretrainTask(preset="tiny", patch_size=8, norm_pix_loss=False, lr=2e-3, warmup_steps=3)
    return fit(task, hippo_manifest, tmp_path_factory.mktemp("pretrain"), 30)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("scan", "suffix"),
    [
        (HIPPO / "hippocampus_367.nii.gz", ".nii.gz"),
        (CT, ".nii.gz"),
        (DATA / "pyradiomics" / "brain1_image.nrrd", ".nrrd"),
    ],
    ids=["mr-float", "ct-int16", "mr-nrrd"],
)
def test_inpaint_changes_only_masked_voxels(
    pretrain_ckpt: Path, scan: Path, suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = digest(scan)
    volume = read_volume(scan)
    output = tmp_path / f"repaired{suffix}"
    assert (
        main(
            ["inpaint", str(scan), "-o", str(output), "--ckpt", str(pretrain_ckpt), "--slices", "5-7,12", "--axis", "z"]
        )
        == 0
    )
    # the checkpoint trained on MR crops only: repairing a CT says so, repairing an MR does not
    assert ("trained on MR scans only" in capsys.readouterr().err) == (scan == CT)
    repaired = read_volume(output)
    assert digest(scan) == before
    assert repaired.dtype == volume.dtype and repaired.same_grid(volume, atol=1e-6)
    mask = slice_mask(volume.spatial_shape, 2, [5, 6, 7, 12])
    np.testing.assert_array_equal(repaired.array[0][~mask], volume.array[0][~mask])
    assert not np.array_equal(repaired.array[0][mask], volume.array[0][mask])


def test_inpaint_with_mask_file_and_detection(pretrain_ckpt: Path, tmp_path: Path, capsys) -> None:
    volume = read_volume(CT)
    damaged = volume.with_array(
        corrupt_slices(volume.array[0], 2, [14], "stripes", np.random.default_rng(0)).astype(np.int16)[None]
    )
    damaged_path = write_volume(damaged, tmp_path / "damaged.nii.gz")
    assert (
        main(
            ["inpaint", str(damaged_path), "-o", str(tmp_path / "out.nii.gz"), "--ckpt", str(pretrain_ckpt), "--detect"]
        )
        == 0
    )
    assert "slice 14 (axis z): stripes" in capsys.readouterr().out
    repaired = read_volume(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(np.delete(repaired.array, 14, axis=3), np.delete(damaged.array, 14, axis=3))
    mask = np.zeros(volume.spatial_shape, dtype=np.uint8)
    mask[40:60, 30:50, 10:14] = 1
    mask_path = write_volume(volume.with_array(mask[None]), tmp_path / "mask.nii.gz")
    assert (
        main(
            [
                "inpaint",
                str(CT),
                "-o",
                str(tmp_path / "m.nii.gz"),
                "--ckpt",
                str(pretrain_ckpt),
                "--mask",
                str(mask_path),
            ]
        )
        == 0
    )
    out = read_volume(tmp_path / "m.nii.gz").array[0]
    np.testing.assert_array_equal(out[mask == 0], volume.array[0][mask == 0])


def test_bad_inputs_give_one_line_errors(pretrain_ckpt: Path, tmp_path: Path, capsys) -> None:
    scan = HIPPO / "hippocampus_367.nii.gz"
    other = write_volume(read_volume(CT), tmp_path / "other_grid.nii.gz")
    common = [str(scan), "-o", str(tmp_path / "o.nii.gz"), "--ckpt", str(pretrain_ckpt)]
    assert main(["inpaint", *common, "--mask", str(other)]) == 2
    assert "mask is on another grid" in capsys.readouterr().err
    assert main(["denoise", *common, "--noise-sigma", "20"]) == 2
    assert "does not take a noise level (it was trained without nlm_input)" in capsys.readouterr().err
    assert main(["inpaint", *common, "--slices", "3,400", "--axis", "z"]) == 2
    assert "slice index 400 is out of range" in capsys.readouterr().err
    foreign = tmp_path / "seg.ckpt"
    torch.save({"hyper_parameters": {"task": "segment"}, "state_dict": {}}, foreign)
    assert main(["inpaint", str(scan), "-o", str(tmp_path / "o.nii.gz"), "--ckpt", str(foreign), "--slices", "3"]) == 2
    assert "segment checkpoint; expected one of ['mae-pretrain', 'mae-restore']" in capsys.readouterr().err
    assert main(["inpaint", str(scan), "-o", str(scan), "--ckpt", str(pretrain_ckpt), "--slices", "3"]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert main(["inpaint", *common, "--slices", "3", "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err


def test_denoise_keeps_grid_and_dtype(pretrain_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["denoise", str(CT), "-o", str(tmp_path / "d.nrrd"), "--ckpt", str(pretrain_ckpt), "--device", "cpu"]) == 0
    )
    assert "was not fine-tuned for denoising" in capsys.readouterr().err  # a pretraining checkpoint: says so
    denoised, volume = read_volume(tmp_path / "d.nrrd"), read_volume(CT)
    assert denoised.dtype == np.int16 and denoised.same_grid(volume, atol=1e-4)


def gap_psnr(ckpt: Path | MAERestoreTask) -> float:
    """Mean PSNR in 3-slice gaps of the held-out scans repaired by a checkpoint, or by a task's network as it is."""
    if isinstance(ckpt, MAERestoreTask):
        net, hparams = ckpt.net.eval(), dict(ckpt.hparams)
    else:
        net, hparams = load_restoration_net(ckpt)
    scores = []
    for path in HELD_OUT:
        volume = read_volume(path)
        for start in (8, 14, 20):
            mask = slice_mask(volume.spatial_shape, 2, [start, start + 1, start + 2])
            repaired = inpaint_volume(net, hparams, volume, mask, "MR", RepairSettings(device="cpu"))
            scores.append(psnr_in_mask(repaired.array[0], volume.array[0], mask))
    return float(np.mean(scores))


def test_restoration_fit_improves_gap_psnr(pretrain_ckpt: Path, hippo_manifest: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task = MAERestoreTask(
        str(pretrain_ckpt), mode="inpaint", refine_channels=8, gap_widths=(1, 5), gap_axes=[2], lr=2e-3, warmup_steps=2
    )
    restore_ckpt = fit(task, hippo_manifest, tmp_path, 150)
    state = torch.load(restore_ckpt, weights_only=True)
    assert state["hyper_parameters"]["task"] == "mae-restore"
    assert {k.split(".")[0] for k in state["state_dict"]} == {"model", "refiner"}
    # the plain checkpoint's repair is anchored on the intact voxels along the scan's motion (18.52 dB here); the
    # untrained restoration network is motion-compensated interpolation (18.55); 150 steps learn a residual
    # over it (measured 18.68; 100 steps: 18.64)
    fitted = gap_psnr(restore_ckpt)
    assert fitted > gap_psnr(pretrain_ckpt) + 0.1
    assert fitted > gap_psnr(MAERestoreTask(str(pretrain_ckpt), mode="inpaint", refine_channels=8)) + 0.08
    # a further stage with the same refinement settings continues from its weights, a wider one from the
    # same function (new channels added), a deeper one starts fresh
    trained = {k.removeprefix("refiner."): v for k, v in state["state_dict"].items() if k.startswith("refiner.")}
    again = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=8, loss="mse")
    for key, value in again.refiner.state_dict().items():
        torch.testing.assert_close(value, trained[key])
    wider = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=12)
    inputs = [torch.randn(1, 1, 8, 8, 8) for _ in range(4)]
    torch.testing.assert_close(wider.refiner(*inputs), again.refiner(*inputs))
    assert wider.refiner(*inputs).abs().max() > 0
    deeper = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=8, refine_depth=4)
    assert not deeper.refiner.layers[-1].weight.any()
    # another gap guide (the fit used flow): the weights carry over, the residual restarts at zero
    relinear = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=8, gap_interp="linear")
    torch.testing.assert_close(relinear.refiner.layers[0].weight, again.refiner.layers[0].weight)
    assert again.refiner.layers[-1].weight.any() and not relinear.refiner.layers[-1].weight.any()
    # non-local-means inputs added: the same function until they are trained; over a new base: zero residual
    nlm = MAERestoreTask(str(restore_ckpt), mode="denoise", refine_channels=8, nlm_input=True)
    extra = [torch.randn(1, 1, 8, 8, 8) for _ in range(2)]
    torch.testing.assert_close(nlm.refiner(*inputs, *extra), again.refiner(*inputs))
    nlm_based = MAERestoreTask(str(restore_ckpt), mode="denoise", refine_channels=8, nlm_input=True, nlm_guide=True)
    torch.testing.assert_close(nlm_based.refiner.layers[0].weight, nlm.refiner.layers[0].weight)
    assert not nlm_based.refiner.layers[-1].weight.any()
    # another architecture starts untrained; a U-Net beside the stack starts at what the stack computed
    unet = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=8, refine_arch="unet")
    assert isinstance(unet.refiner, UNetRefiner) and not unet.refiner.unet.final_conv.weight.any()
    dual = MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_channels=12, refine_arch="convs+unet")
    window = [torch.randn(1, 1, 16, 16, 16) for _ in range(4)]  # a U-Net needs edges >= 16
    torch.testing.assert_close(dual.refiner(*window), again.refiner(*window))
    (dual.refiner(*window) - 1).square().mean().backward()
    assert dual.refiner.unet.unet.final_conv.weight.grad.abs().sum() > 0  # the U-Net learns from step 1
    options = r"\('convs', 'unet', 'convs\+unet'\)"
    with pytest.raises(ValueError, match=rf"refine_arch must be one of {options}, got 'resnet'"):
        MAERestoreTask(str(restore_ckpt), mode="inpaint", refine_arch="resnet")


def test_untrained_guided_network_is_the_classical_estimate(pretrain_ckpt: Path, tmp_path: Path) -> None:
    """Zero-initialised residual: a new guided restoration net is its interpolation / Gaussian smoothing."""
    task = MAERestoreTask(str(pretrain_ckpt), refine_channels=4, guided=True, gap_interp="linear")
    net, hparams = task.net.eval(), dict(task.hparams)
    volume = read_volume(CT)
    gap = [10, 11, 12]
    mask = slice_mask(volume.spatial_shape, 2, gap)
    repaired = inpaint_volume(net, hparams, volume, mask, "CT", RepairSettings(device="cpu", overlap=0.25))
    assert volume.array.max() > 1000  # bone beyond the HU window: interpolated around the model
    linear = interpolate_slices(volume.array[0], 2, gap, "linear")
    difference = repaired.array[0].astype(np.int32) - cast_to_dtype(linear, np.int16)
    assert np.abs(difference).max() <= 1  # float32 windowing vs float64 interpolation: rounding only
    noisy = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.denoise(noisy), gaussian_smooth(noisy, 1.0))
    # motion-compensated guide (the default): on a scan inside the HU window, the whole-scan flow interpolation
    flow_task = MAERestoreTask(str(pretrain_ckpt), refine_channels=4, guided=True)
    assert flow_task.hparams["gap_interp"] == "flow"
    windowed = write_volume(replace(volume, array=volume.array.clip(-1000, 1000)), tmp_path / "windowed.nii.gz")
    inside = read_volume(windowed)
    repaired = inpaint_volume(
        flow_task.net.eval(), dict(flow_task.hparams), inside, mask, "CT", RepairSettings(device="cpu")
    )
    corrupted = np.where(mask, 0, inside.array[0]).astype(np.float64)
    difference = repaired.array[0].astype(np.int32) - cast_to_dtype(flow_interpolation(corrupted, mask), np.int16)
    assert np.abs(difference).max() <= 2  # float32 in [0, 1] vs float32 in HU: rounding only
    assert np.abs(repaired.array[0].astype(np.int32) - cast_to_dtype(linear, np.int16))[mask].max() > 20


def test_evaluate_restore_scores_every_method(pretrain_ckpt: Path, tmp_path: Path) -> None:
    scan = HIPPO / "hippocampus_394.nii.gz"
    argv = ["evaluate-restore", "--ckpt", str(pretrain_ckpt), "--scan", str(scan), "--widths", "3", "--gaps", "1"]
    assert main([*argv, "--threads", "1", "-o", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "restore_eval.json").read_text())
    methods = {(r["task"], r["method"]): r["psnr"] for r in rows}
    assert set(methods) == {("inpaint", m) for m in ("model", "linear", "cubic", "flow", "fitted")} | {
        ("denoise", m) for m in ("noisy input", "model", "gaussian", "nl-means", "nl-means (medmae)")
    }
    assert methods[("denoise", "nl-means")] > methods[("denoise", "noisy input")]
    assert methods[("denoise", "nl-means (medmae)")] > methods[("denoise", "noisy input")]
    assert methods[("denoise", "gaussian")] > methods[("denoise", "noisy input")]
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert figures == {"inpaint_hippocampus_394.png", "denoise_hippocampus_394.png"}


def test_repair_demo_step(pretrain_ckpt: Path, tmp_path: Path) -> None:
    result = run_repair_demo(tmp_path, pretrain_ckpt, HIPPO / "hippocampus_394.nii.gz")
    assert result["figure"].is_file() and result["figure"].stat().st_size > 10_000
    assert np.isfinite(result["psnr_model"]) and np.isfinite(result["psnr_linear"])
    truth = read_volume(HIPPO / "hippocampus_394.nii.gz").array[0]
    linear = interpolate_slices(truth, 2, result["slices"], "linear")
    mask = slice_mask(truth.shape, 2, result["slices"])
    assert result["psnr_linear"] == pytest.approx(psnr_in_mask(linear, truth, mask))
    assert result["psnr_fitted"] > result["psnr_linear"]


def test_mirroring_averages_the_eight_flipped_predictions(pretrain_ckpt: Path) -> None:
    """``--mirror``: the mean over all axis flips of the prediction on the flipped scan, flipped back."""
    net, hparams = load_restoration_net(pretrain_ckpt)
    image = read_volume(HELD_OUT[0]).array[0].astype(np.float32)  # 35 x 51 x 35 (no padding at ROI 32)
    image = (image - image.mean()) / image.std()
    mask = slice_mask(image.shape, 2, [16, 17, 18])
    roi = roi_of(net, hparams)
    plain = RepairSettings(device="cpu", overlap=0.25)
    mirrored = run_windows(net, image, mask, roi, replace(plain, mirror=True))
    reference = np.zeros_like(image)
    for axes in itertools.chain.from_iterable(itertools.combinations(range(3), n) for n in range(4)):
        flipped = np.ascontiguousarray(np.flip(image, axes)), np.ascontiguousarray(np.flip(mask, axes))
        reference += np.flip(run_windows(net, *flipped, roi, plain), axes) / 8
    np.testing.assert_allclose(mirrored, reference, atol=1e-5)
    assert np.abs(mirrored - run_windows(net, image, mask, roi, plain))[mask].max() > 1e-3


def test_untrained_residual_denoiser_returns_its_input(pretrain_ckpt: Path) -> None:
    """``smooth_sigma: 0``: the guide is the noisy input, so an untrained network changes nothing."""
    task = MAERestoreTask(str(pretrain_ckpt), mode="denoise", refine_channels=4, guided=True, smooth_sigma=0.0)
    noisy = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(task.net.eval().denoise(noisy), noisy)
    with pytest.raises(ValueError, match="smooth_sigma must be >= 0"):
        MAERestoreTask(str(pretrain_ckpt), mode="denoise", refine_channels=4, smooth_sigma=-1.0)


def test_untrained_nlm_based_denoiser_is_nonlocal_means_of_the_whole_scan(pretrain_ckpt: Path) -> None:
    """``nlm_guide``: an untrained network returns non-local means with the noise level of the whole scan."""
    task = MAERestoreTask(
        str(pretrain_ckpt), mode="denoise", modality="CT", refine_channels=4, nlm_input=True, nlm_guide=True
    )
    net, hparams = task.net.eval(), dict(task.hparams)
    noisy = torch.randn(2, 1, 16, 16, 16) * torch.tensor([0.1, 0.3]).reshape(2, 1, 1, 1, 1)
    with torch.no_grad():
        expected = nonlocal_means(noisy, estimate_noise_sigma(noisy), 0.6)
        torch.testing.assert_close(net.denoise(noisy), expected)
    volume = read_volume(CT)  # int16 HU, 30 slices: mirrored up to the 32-voxel window
    settings = RepairSettings(device="cpu", overlap=0.25)
    denoised = denoise_volume(net, hparams, volume, "CT", settings).array[0].astype(np.int32)
    imap = intensity_map(volume.array[0], "CT", hparams)
    image = imap.forward(volume.array[0])
    padded = torch.from_numpy(np.pad(image, [(0, 0), (0, 0), (1, 1)], mode="symmetric"))[None, None]
    whole = nonlocal_means(padded, estimate_noise_sigma(padded), 0.6)[0, 0, :, :, 1:-1].numpy()
    reference = cast_to_dtype(imap.inverse(whole) + imap.excess(volume.array[0]), np.int16)
    assert np.abs(denoised - reference).max() <= 1  # windows blend identical values: rounding only
    told = denoise_volume(net, hparams, volume, "CT", replace(settings, noise_sigma=30.0)).array[0].astype(np.int32)
    whole = nonlocal_means(padded, torch.tensor([30.0 / 2000.0]), 0.6)[0, 0, :, :, 1:-1].numpy()  # HU window 2000
    reference = cast_to_dtype(imap.inverse(whole) + imap.excess(volume.array[0]), np.int16)
    assert np.abs(told - reference).max() <= 1
    with pytest.raises(ValueError, match="noise sigma must be > 0"):
        denoise_volume(net, hparams, volume, "CT", replace(settings, noise_sigma=0.0))
    with pytest.raises(ValueError, match="known_noise is the noise-level input of nlm_input"):
        MAERestoreTask(str(pretrain_ckpt), mode="denoise", refine_channels=4, known_noise=True)
    with pytest.raises(ValueError, match="nlm_input needs a guided refinement"):
        MAERestoreTask(str(pretrain_ckpt), mode="denoise", refine_channels=4, guided=False, nlm_input=True)


def test_noise_level_known_in_training_is_the_level_added(pretrain_ckpt: Path) -> None:
    task = MAERestoreTask(
        str(pretrain_ckpt), mode="denoise", modality="CT", refine_channels=4, nlm_input=True, known_noise=True
    )
    clean = torch.full((3, 1, 16, 16, 16), 0.5)
    noisy, sigma = task.add_noise(clean, torch.Generator().manual_seed(0))
    assert sigma.shape == (3,) and bool(((sigma >= 10 / 2000) & (sigma <= 60 / 2000)).all())  # 10-60 HU
    torch.testing.assert_close((noisy - clean).flatten(1).std(1), sigma, rtol=0.05, atol=0.0)


def test_mr_noise_levels_are_fractions_of_the_span_or_the_robust_range(pretrain_ckpt: Path) -> None:
    """``mr_noise_scale``: the std added to each crop is the level times the crop's max - min (``span``) or its
    0.5-99.5th percentile range (``robust``, the evaluation's definition: ``robust_range``)."""
    scan = read_volume(HIPPO / "hippocampus_394.nii.gz").array[0].astype(np.float32)
    crops = np.stack([scan[:16, :16, :16], scan[-16:, -16:, -16:]])  # unclipped intensities, bright voxels kept
    clean = torch.from_numpy(crops)[:, None]
    expected = {
        "span": [float(c.max() - c.min()) for c in crops],
        "robust": [robust_range(c) for c in crops],
    }
    assert expected["span"][1] > 1.15 * expected["robust"][1]  # the two differ on unclipped real data
    for scale, ranges in expected.items():
        task = MAERestoreTask(
            str(pretrain_ckpt), mode="denoise", refine_channels=4, mr_noise=(0.1, 0.1), mr_noise_scale=scale
        )
        noisy, sigma = task.add_noise(clean, torch.Generator().manual_seed(0))
        torch.testing.assert_close(sigma, 0.1 * torch.tensor(ranges), rtol=1e-5, atol=0.0)
        for crop, noisy_crop, std in zip(clean, noisy, sigma):
            bright = crop - crop.min() > 3 * std  # Rician noise is near Gaussian where the signal is well above it
            assert abs(float((noisy_crop - crop)[bright].std()) / float(std) - 1) < 0.2
    with pytest.raises(ValueError, match="mr_noise_scale must be one of"):
        MAERestoreTask(str(pretrain_ckpt), mode="denoise", refine_channels=4, mr_noise_scale="max")
    # a crop past torch.quantile's input-size limit: N(0, 1)'s 0.5-99.5th percentile range is 2 x 2.5758
    standard = torch.randn(1, 260**3, generator=torch.Generator().manual_seed(0))
    assert abs(float(noise_reference(standard, "robust")[0]) - 2 * 2.5758) < 0.02


def test_unclipped_mr_normalisation_passes_nothing_around_the_model() -> None:
    """A checkpoint trained on ``mr_percentiles: [0, 100]`` maps every voxel through the model and back."""
    scan = read_volume(HIPPO / "hippocampus_394.nii.gz").array[0]
    for percentiles, clipped in (((0.5, 99.5), True), ((0.0, 100.0), False)):
        imap = intensity_map(scan, "MR", {"mr_percentiles": list(percentiles)})
        excess = imap.excess(scan)
        assert bool(excess.any()) == clipped  # unclipped: exactly nothing
        if not clipped:
            np.testing.assert_allclose(imap.inverse(imap.forward(scan)), scan, rtol=0, atol=1e-3)


def test_nlm_denoiser_checkpoint_through_the_commands(
    pretrain_ckpt: Path, hippo_manifest: Path, tmp_path: Path, capsys
) -> None:
    """A short fit of a non-local-means denoiser with a U-Net refinement, then ``denoise --noise-sigma`` and
    ``evaluate-restore``."""
    L.seed_everything(0, verbose=False)
    settings = dict(mode="denoise", refine_channels=4, refine_arch="unet", smooth_sigma=0.0, nlm_input=True)
    task = MAERestoreTask(str(pretrain_ckpt), **settings, nlm_guide=True, known_noise=True, warmup_steps=1)
    ckpt = fit(task, hippo_manifest, tmp_path, 2)
    net = load_restoration_net(ckpt)[0]
    assert net.nlm_input and net.nlm_guide and net.refiner.unet.conv_0.conv_0.conv.in_channels == 6
    assert net.refiner.unet.final_conv.weight.any()  # trained away from zero
    again = MAERestoreTask(str(ckpt), **settings, nlm_guide=True, refine_depth=7)  # depth: unused by a U-Net
    for key, value in again.refiner.state_dict().items():
        torch.testing.assert_close(value, net.refiner.state_dict()[key])
    wider = MAERestoreTask(str(ckpt), **settings, nlm_guide=True, unet_channels=8)  # widened: the same function
    assert wider.refiner.unet.conv_0.conv_0.conv.out_channels == 8
    window = [torch.randn(1, 1, 16, 16, 16) for _ in range(6)]
    torch.testing.assert_close(wider.refiner(*window), net.refiner(*window))
    with pytest.raises(ValueError, match="unet_channels must be >= 0"):
        MAERestoreTask(str(ckpt), **settings, unet_channels=-1)
    scan = HIPPO / "hippocampus_394.nii.gz"
    out = tmp_path / "denoised.nii.gz"
    assert (
        main(["denoise", str(scan), "-o", str(out), "--ckpt", str(ckpt), "--noise-sigma", "20", "--device", "cpu"]) == 0
    )
    assert read_volume(out).same_grid(read_volume(scan), atol=1e-4)
    assert (
        main(["denoise", str(scan), "-o", str(tmp_path / "x.nii.gz"), "--ckpt", str(ckpt), "--noise-sigma", "0"]) == 2
    )
    assert "noise sigma must be > 0" in capsys.readouterr().err
    argv = ["evaluate-restore", "--ckpt", str(ckpt), "--scan", str(scan), "--tasks", "denoise", "--mr-noise", "0.05"]
    assert main([*argv, "--threads", "1", "-o", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "restore_eval.json").read_text())
    methods = {r["method"]: r["psnr"] for r in rows}
    assert {"model", "model (sigma estimated)", "nl-means (medmae)"} <= set(methods)
    assert methods["model"] > methods["noisy input"]
