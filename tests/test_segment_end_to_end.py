"""Segmentation end to end on real scans: transfer of a pretraining checkpoint, a tiny fit that raises
Dice, predictions back on the input grid (LPS, anisotropic), the CLI commands and their errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.utils import one_hot

from medmae.cli import main
from medmae.data.datamodule import PretrainDataModule
from medmae.data.seg_datamodule import SegDataModule
from medmae.data.transforms import IntensityConfig, preprocessing_transforms
from medmae.evaluation.seg_metrics import evaluate_folders, label_scores
from medmae.inference.segment import inference_transforms, load_segmenter, to_input_grid
from medmae.io import Volume, read_volume, write_volume
from medmae.io.volume import reorder_axes
from medmae.models.checkpoint import load_pretrained_mae
from medmae.tasks.pretrain import MAEPretrainTask
from medmae.tasks.segment import SegmentTask
from medmae.tasks.segment_demo import TINY_MODEL, run_segmentation_demo

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "ct_mr_samples"
MR_LPS = SAMPLES / "example_mr_sm.nii.gz"  # 117 x 91 x 20, 3 mm slices, LPS
CT_HU = SAMPLES / "example_ct_sm.nii.gz"  # abdominal CT in Hounsfield units, down to -1100
MR_LPS_SEG = SAMPLES / "example_seg_mr.nii.gz"

pytestmark = pytest.mark.real_data


def quiet_trainer(root: Path, steps: int, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        **kwargs,
    )


@pytest.fixture(scope="module")
def pretrain_ckpt(hippo_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    L.seed_everything(0, verbose=False)
    task = MAEPretrainTask(
        preset="tiny", patch_size=8, norm_pix_loss=False, lr=1e-3, warmup_steps=1, figure_every_n_steps=100
    )
    data = PretrainDataModule(str(hippo_manifest), [32, 32, 32], None, batch_size=2, val_fraction=0.2)
    trainer = quiet_trainer(tmp_path_factory.mktemp("pretrain"), 3, limit_val_batches=1)
    trainer.fit(task, datamodule=data)
    return Path(trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="module")
def fitted(hippo_manifest: Path, pretrain_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pretrained tiny UNETR fine-tuned for 30 steps on 5 real scans; Dice before and after."""
    L.seed_everything(0, verbose=False)
    data = SegDataModule(
        str(hippo_manifest),
        3,
        num_labeled=5,
        roi_size=[32, 32, 32],
        spacing=None,
        batch_size=2,
        test_fraction=0.25,
        val_fraction=0.2,
        preprocess_workers=1,
    )
    task = SegmentTask(3, pretrained=str(pretrain_ckpt), **{**TINY_MODEL, "lr": 3e-3}, warmup_steps=3)
    trainer = quiet_trainer(
        tmp_path_factory.mktemp("finetune"), 30, val_check_interval=30, check_val_every_n_epoch=None
    )
    before = trainer.validate(task, datamodule=data, verbose=False)[0]["val/dice"]
    trainer.fit(task, datamodule=data)
    after = trainer.callback_metrics["val/dice"].item()
    return {"before": before, "after": after, "ckpt": Path(trainer.checkpoint_callback.best_model_path), "data": data}


def test_pretraining_checkpoint_transfers_with_exactly_the_decoder_missing(pretrain_ckpt: Path) -> None:
    task = SegmentTask(3, pretrained=str(pretrain_ckpt), **TINY_MODEL)
    decoder = {k for k in task.model.state_dict() if not k.startswith("encoder.")}
    assert set(task.transfer_report["missing"]) == decoder and decoder
    assert task.transfer_report["unexpected"] == []
    mae, _ = load_pretrained_mae(pretrain_ckpt)
    for name, value in mae.encoder.state_dict().items():
        assert torch.equal(task.model.encoder.state_dict()[name], value), name


def test_pretrained_encoder_must_match_the_configured_one(pretrain_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"differs from the configured one .*'depth': \(6, 4\)"):
        SegmentTask(3, pretrained=str(pretrain_ckpt), **{**TINY_MODEL, "feature_layers": [1, 2]}, depth=6)


def test_tiny_fit_raises_dice(fitted: dict) -> None:
    assert fitted["after"] > fitted["before"] + 0.05
    model = load_segmenter(fitted["ckpt"])
    assert model.hparams["roi_size"] == [32, 32, 32] and model.hparams["modality"] == "MR"


def test_class_count_mismatch_between_data_and_model(hippo_manifest: Path, tmp_path: Path) -> None:
    data = SegDataModule(
        str(hippo_manifest), 4, num_labeled=2, roi_size=[32, 32, 32], spacing=None, preprocess_workers=1
    )
    with pytest.raises(ValueError, match=r"class-count mismatch: --data\.num_classes 4 but --model\.num_classes 3"):
        quiet_trainer(tmp_path, 1).fit(SegmentTask(3, **TINY_MODEL), datamodule=data)


@pytest.mark.parametrize("spacing", [None, [2.0, 2.0, 2.0]])
def test_probabilities_return_exactly_to_an_lps_anisotropic_grid(spacing: list[float] | None) -> None:
    """The truth, pushed through the training preprocessing and back, must land on its own voxels."""
    hparams = {"modality": "MR", "spacing": spacing, "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]}
    image = inference_transforms(hparams)({"image": str(MR_LPS)})["image"]
    labelled = preprocessing_transforms("MR", spacing, IntensityConfig(), "label", crop_foreground=False)
    label = labelled({"image": str(MR_LPS), "label": str(MR_LPS_SEG)})["label"]
    assert tuple(label.shape) == tuple(image.shape)
    truth = read_volume(MR_LPS_SEG)
    assert truth.orientation == "LPS"
    foreground = (torch.as_tensor(label) > 0).long()[None]
    probabilities = image.clone().set_array(one_hot(foreground, 2)[0].float())
    back = to_input_grid(probabilities, truth)
    assert back.shape == truth.spatial_shape
    dice = label_scores(back, truth.array[0] > 0, 2, truth.spacing)[0][0]
    assert dice == 1.0 if spacing is None else dice > 0.97


def test_segment_cli_writes_on_the_input_grid(fitted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = torch.load(fitted["ckpt"], weights_only=True)
    checkpoint["hyper_parameters"]["spacing"] = [2.0, 2.0, 2.0]  # exercise resampling as well as reorientation
    resampling = tmp_path / "resampling.ckpt"
    torch.save(checkpoint, resampling)
    for output in (tmp_path / "mr_seg.nii.gz", tmp_path / "mr_seg.nrrd"):
        assert main(["segment", str(MR_LPS), "-o", str(output), "--ckpt", str(resampling), "--no-progress"]) == 0
        source, labels = read_volume(MR_LPS), read_volume(output)
        assert labels.spatial_shape == source.spatial_shape == (117, 91, 20)
        np.testing.assert_allclose(labels.affine, source.affine, atol=1e-4)  # direction, spacing, origin
        assert labels.orientation == "LPS" and labels.dtype == np.uint8
        assert set(np.unique(labels.array)) <= {0, 1, 2}
    assert "note:" not in capsys.readouterr().err  # an MR scan for an MR model
    ct_output = tmp_path / "ct_seg.nii.gz"
    assert main(["segment", str(CT_HU), "-o", str(ct_output), "--ckpt", str(fitted["ckpt"]), "--no-progress"]) == 0
    assert "reaches -1100 (Hounsfield air?) but the model trained on MR" in capsys.readouterr().err


def test_segment_folder_and_evaluate(fitted: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, truths = tmp_path / "images", tmp_path / "truths"
    images.mkdir()
    truths.mkdir()
    for record in fitted["data"].splits.test[:2]:
        (images / f"{record.id}.nii.gz").symlink_to(record.image[0])
        (truths / f"{record.id}.nii.gz").symlink_to(record.label)
    predictions = tmp_path / "pred"
    assert main(["segment", str(images), "-o", str(predictions), "--ckpt", str(fitted["ckpt"]), "--no-progress"]) == 0
    assert main(["evaluate-seg", "--pred", str(predictions), "--truth", str(truths)]) == 0
    out = capsys.readouterr().out
    assert "dice_1" in out and "hd95_2" in out and "mean" in out
    rows = (predictions / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("case,dice_1,hd95_1,dice_2,hd95_2,dice_mean,hd95_mean") and len(rows) == 4


def test_cli_errors_are_one_line(pretrain_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["segment", str(MR_LPS), "-o", str(tmp_path / "x.nii.gz"), "--ckpt", str(pretrain_ckpt)]) == 2
    assert "mae-pretrain checkpoint; expected a 'segment' one" in capsys.readouterr().err
    truths = tmp_path / "t"
    truths.mkdir()
    (truths / "a.nii.gz").symlink_to(MR_LPS_SEG)
    assert main(["evaluate-seg", "--pred", str(tmp_path), "--truth", str(truths)]) == 2
    assert "no prediction for 1 truth file(s)" in capsys.readouterr().err


def test_demo_step(pretrain_ckpt: Path, hippo_manifest: Path, tmp_path: Path) -> None:
    result = run_segmentation_demo(tmp_path, pretrain_ckpt, hippo_manifest, max_steps=6)
    assert result["figure"].is_file() and 0.0 <= result["dice"] <= 1.0
    assert result["scan"] not in result["train_scans"] and len(result["train_scans"]) == 5


def test_many_class_probabilities_are_resampled_a_few_classes_at_a_time() -> None:
    """118 classes (TotalSegmentator CT) resampled 3 classes at a time give the one-pass arg-max exactly."""
    truth = read_volume(SAMPLES / "example_seg.nii.gz")
    hparams = {"modality": "CT", "spacing": [4.0, 4.0, 4.0], "ct_window": [-1000, 1000], "mr_percentiles": [0.5, 99.5]}
    image = inference_transforms(hparams)({"image": str(SAMPLES / "example_ct_sm.nii.gz")})["image"]
    logits = torch.randn((118, *image.shape[1:]), generator=torch.Generator().manual_seed(0))
    probabilities = image.clone().set_array(torch.softmax(logits, 0))
    whole = to_input_grid(probabilities, truth, max_elements=10**12)
    chunked = to_input_grid(probabilities, truth, max_elements=3 * int(np.prod(truth.spatial_shape)))
    np.testing.assert_array_equal(chunked, whole)
    assert whole.shape == truth.spatial_shape and len(np.unique(whole)) > 100


def test_evaluate_pairs_by_case_and_accepts_another_axis_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A prediction written RAS as .nrrd scores Dice 1 against its LPS .nii.gz truth; a name mismatch lists both."""
    truth = read_volume(MR_LPS_SEG)
    array, affine = reorder_axes(truth.array, truth.affine, np.eye(4))  # the same voxels in RAS order
    assert "".join(nib.aff2axcodes(affine)) == "RAS" and truth.orientation == "LPS"
    predictions, truths = tmp_path / "pred", tmp_path / "truth"
    predictions.mkdir()
    truths.mkdir()
    write_volume(Volume(array.copy(), affine), predictions / "mr.nrrd")
    (truths / "mr.nii.gz").symlink_to(MR_LPS_SEG)
    (scores,) = evaluate_folders(predictions, truths)
    assert scores.case == "mr.nii.gz" and np.nanmin(scores.dice) == 1.0 and np.nanmax(scores.hd95) == 0.0
    (truths / "mr.nii.gz").rename(truths / "mr_label.nii.gz")
    assert main(["evaluate-seg", "--pred", str(predictions), "--truth", str(truths)]) == 2
    assert "['mr_label.nii.gz']; unmatched predictions: ['mr.nrrd']" in capsys.readouterr().err
