"""Multi-sequence scans: the input channels come from the manifest, and a mismatch is refused before training.

The shared data has no co-registered multi-sequence MRI, so the second channel is derived voxel by voxel from the
real T1 crop (its square root, as a stand-in for another contrast on the same grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmae.cli import main
from medmae.data.channels import first_scan_channels
from medmae.data.seg_datamodule import run_pipeline
from medmae.inference.segment import inference_transforms, load_segmenter
from tests.test_config_overrides import ONE_STEP

ROOT = Path(__file__).resolve().parents[1]
HIPPO = ROOT.parent / "shared" / "data" / "hippocampus"

pytestmark = pytest.mark.real_data


def second_sequence(image: Path, out: Path) -> Path:
    scan = nib.load(image)
    array = np.sqrt(np.clip(scan.get_fdata(), 0, None)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, scan.affine), out)
    return out


@pytest.fixture(scope="module")
def two_channel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A manifest of 5 real hippocampus scans with 2 channels each (and labels), and one scan as a 4D file."""
    folder = tmp_path_factory.mktemp("two_channel")
    lines = []
    for name in ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006", "hippocampus_014"):
        image = HIPPO / "imagesTr" / f"{name}.nii.gz"
        extra = second_sequence(image, folder / f"{name}_sqrt.nii.gz")
        label = HIPPO / "labelsTr" / f"{name}.nii.gz"
        lines.append(json.dumps({"id": name, "image": [str(image), str(extra)], "label": str(label), "modality": "MR"}))
    manifest = folder / "two_channel.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    image = HIPPO / "imagesTr" / "hippocampus_008.nii.gz"
    scan = nib.load(image)
    t1 = scan.get_fdata().astype(np.float32)
    stacked = np.stack([t1, np.sqrt(np.clip(t1, 0, None))], axis=-1)
    four_d = folder / "hippocampus_008_2ch.nii.gz"
    nib.save(nib.Nifti1Image(stacked, scan.affine), four_d)
    return manifest, four_d


def run_dir(root: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root)]


def test_first_scan_channels_counts_every_file_and_4d_channels(two_channel: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, four_d = two_channel
    assert first_scan_channels(str(manifest))[0] == 2
    single = tmp_path / "one_4d_file.jsonl"
    single.write_text(json.dumps({"id": "a", "image": str(four_d), "modality": "MR"}) + "\n")
    assert first_scan_channels(str(single))[0] == 2
    assert first_scan_channels(str(tmp_path / "missing.jsonl")) is None  # the data module reports it


def test_two_channel_manifest_pretrains_fine_tunes_and_segments(
    two_channel: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, four_d = two_channel
    pretrain = ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--data.manifest", str(manifest)]
    assert main([*pretrain, *run_dir(tmp_path / "pretrain"), *ONE_STEP]) == 0  # no --model.in_channels given
    assert "2 input channels" in capsys.readouterr().out
    (checkpoint,) = (tmp_path / "pretrain").rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["model_config"]["in_channels"] == 2

    finetune = ["finetune", "--config", str(ROOT / "configs/segment/tiny.yaml"), "--data.manifest", str(manifest)]
    finetune += ["--data.num_labeled", "3", "--model.pretrained", str(checkpoint)]
    assert main([*finetune, *run_dir(tmp_path / "segment"), *ONE_STEP]) == 0
    (seg_checkpoint,) = (tmp_path / "segment").rglob("last.ckpt")
    output = tmp_path / "seg.nii.gz"
    assert main(["segment", str(four_d), "-o", str(output), "--ckpt", str(seg_checkpoint), "--no-progress"]) == 0
    assert nib.load(output).shape == nib.load(four_d).shape[:3]

    one_channel = HIPPO / "imagesTr" / "hippocampus_008.nii.gz"
    capsys.readouterr()
    assert main(["segment", str(one_channel), "-o", str(tmp_path / "x.nii.gz"), "--ckpt", str(seg_checkpoint)]) != 0
    error = capsys.readouterr().err
    assert "1 channel(s), the model expects 2" in error and "channel files" in error and "4D file" in error

    # the same scan as two channel files, on the command line and as an nnU-Net-style folder
    cases = tmp_path / "cases"
    cases.mkdir()
    scan = nib.load(four_d)
    channels = [cases / f"hippocampus_008_000{c}.nii.gz" for c in range(2)]
    for c, path in enumerate(channels):
        nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[..., c], scan.affine), path)
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[..., 0], scan.affine), cases / "gap_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[..., 1], scan.affine), cases / "gap_0002.nii.gz")
    model = load_segmenter(seg_checkpoint)
    stacked = run_pipeline(inference_transforms(model.hparams), {"image": [str(p) for p in channels]}, "files")
    from_4d = run_pipeline(inference_transforms(model.hparams), {"image": str(four_d)}, "4D")
    torch.testing.assert_close(stacked["image"].as_tensor(), from_4d["image"].as_tensor(), rtol=0, atol=0)

    from_files = tmp_path / "from_files.nii.gz"
    assert main(["segment", *map(str, channels), "-o", str(from_files), "--ckpt", str(seg_checkpoint)]) == 0
    np.testing.assert_array_equal(nib.load(from_files).get_fdata(), nib.load(output).get_fdata())
    folder_out = tmp_path / "predictions"
    assert main(["segment", str(cases), "-o", str(folder_out), "--ckpt", str(seg_checkpoint), "--no-progress"]) == 0
    expected = nib.load(output).get_fdata()
    np.testing.assert_array_equal(nib.load(folder_out / "hippocampus_008.nii.gz").get_fdata(), expected)
    report = json.loads((folder_out / "segment_report.json").read_text())
    assert report["segmented"] == ["hippocampus_008.nii.gz"]
    (skipped,) = report["skipped"]
    assert "gap.nii.gz: channel files 0000, 0002 found" in skipped["reason"]

    named = tmp_path / "named"  # files named as `medmae manifest scan --channels t1,sqrt` groups them
    named.mkdir()
    for channel, path in zip(("t1", "sqrt"), channels):
        (named / f"hippocampus_008_{channel}.nii.gz").write_bytes(path.read_bytes())
    (named / "lonely_t1.nii.gz").write_bytes(channels[0].read_bytes())
    named_out = tmp_path / "named_predictions"
    command = ["segment", str(named), "-o", str(named_out), "--ckpt", str(seg_checkpoint), "--channels", "t1,sqrt"]
    assert main([*command, "--no-progress"]) == 0
    np.testing.assert_array_equal(nib.load(named_out / "hippocampus_008.nii.gz").get_fdata(), expected)
    (skipped,) = json.loads((named_out / "segment_report.json").read_text())["skipped"]
    assert "lonely.nii.gz: no file for channel(s) sqrt" in skipped["reason"]


def test_channel_mismatches_are_refused_before_training(
    two_channel: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, four_d = two_channel
    pretrain = ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--data.manifest", str(manifest)]
    assert main([*pretrain, "--model.in_channels", "1", *run_dir(tmp_path / "wrong"), *ONE_STEP]) != 0
    error = capsys.readouterr().err
    assert str(manifest) in error and "2 channel(s) per scan" in error and "--model.in_channels 2" in error
    assert not list((tmp_path / "wrong").rglob("*.ckpt"))

    assert main([*pretrain, *run_dir(tmp_path / "two"), *ONE_STEP]) == 0
    (two_channel_ckpt,) = (tmp_path / "two").rglob("last.ckpt")
    restore = ["finetune-restore", "--config", str(ROOT / "configs/restore/tiny.yaml")]
    restore += ["--data.manifest", str(manifest), *run_dir(tmp_path / "restore"), *ONE_STEP]
    capsys.readouterr()
    assert main([*restore, "--model.pretrained", str(two_channel_ckpt)]) != 0
    assert f"{two_channel_ckpt}: the model was pretrained on 2 channels" in capsys.readouterr().err
    repaired = tmp_path / "repaired.nii.gz"
    assert main(["inpaint", str(four_d), "-o", str(repaired), "--slices", "10", "--ckpt", str(two_channel_ckpt)]) != 0
    assert "needs a single-channel model" in capsys.readouterr().err and not repaired.exists()

    single = tmp_path / "first_channel_only.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    single.write_text("".join(json.dumps({**r, "image": r["image"][0]}) + "\n" for r in records))
    single_pretrain = ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--data.manifest", str(single)]
    assert main([*single_pretrain, *run_dir(tmp_path / "one"), *ONE_STEP]) == 0
    (one_channel_ckpt,) = (tmp_path / "one").rglob("last.ckpt")
    capsys.readouterr()
    assert main([*restore, "--model.pretrained", str(one_channel_ckpt)]) != 0
    error = capsys.readouterr().err
    assert "2 channel(s) per scan" in error and f"its checkpoint {one_channel_ckpt} takes 1 channel(s)" in error


def test_scans_with_another_channel_count_are_skipped_and_reported(
    two_channel: tuple[Path, Path], tmp_path: Path
) -> None:
    from medmae.data.datamodule import PretrainDataModule
    from medmae.data.seg_datamodule import SegDataModule

    manifest, _ = two_channel
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    mixed = tmp_path / "mixed.jsonl"  # the first three keep both channels, the last two only the first
    mixed.write_text(
        "".join(json.dumps({**r, "image": r["image"][:1]} if i >= 3 else r) + "\n" for i, r in enumerate(records))
    )
    one_channel = {r["id"] for r in records[3:]}

    pretrain = PretrainDataModule(str(mixed), roi_size=[32, 32, 32], spacing=None, val_fraction=0.0)
    pretrain.setup("fit")
    assert {scan_id for scan_id, _ in pretrain.skipped} == one_channel
    assert all("1 channel(s), but the manifest's scans have 2" in reason for _, reason in pretrain.skipped)
    assert sorted(scan_id for scan_id, _ in pretrain.train_dataset.volumes) == sorted(r["id"] for r in records[:3])

    cache = tmp_path / "cache"
    assert main(["preprocess", str(mixed), "--cache", str(cache)]) == 0
    cached = PretrainDataModule(str(mixed), roi_size=[32, 32, 32], spacing=None, val_fraction=0.0, cache_dir=str(cache))
    cached.setup("fit")
    assert {scan_id for scan_id, _ in cached.skipped} == one_channel
    assert all(cached.train_dataset[i]["image"].shape[0] == 2 for i in range(len(cached.train_dataset)))

    segment = SegDataModule(
        str(mixed),
        num_classes=3,
        num_labeled=5,
        roi_size=[32, 32, 32],
        spacing=None,
        test_fraction=0.0,
        val_fraction=0.0,
    )
    segment.setup("fit")
    assert {scan_id for scan_id, _ in segment.skipped} == one_channel
    assert all(image.shape[0] == 2 for _, image, _ in segment.train_dataset.volumes)


def test_a_scanned_manifest_gives_its_channels_without_reading_the_scan(tmp_path: Path) -> None:
    """``medmae manifest scan`` records hold the shape (C, X, Y, Z): a DICOM series is not read again for it."""
    manifest = tmp_path / "scanned.jsonl"
    record = {"id": "a", "image": str(tmp_path / "not_read.nii.gz"), "modality": "MR", "shape": [3, 8, 8, 8]}
    manifest.write_text(json.dumps(record) + "\n")
    assert first_scan_channels(str(manifest))[0] == 3
