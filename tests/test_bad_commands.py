"""Issue 7 across every command: a bad scan or checkpoint given alone is one line naming the file (exit 2,
no traceback, nothing written); among good scans (a folder, several --scan, a manifest) it is skipped and
reported while the good scans are processed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmae.cli import main
from medmae.data.manifest import read_manifest
from medmae.data.seg_datamodule import SegDataModule, seg_splits
from medmae.inference.segment import REPORT_NAME
from medmae.io import read_volume
from tests.bad_inputs import (
    DATA,
    HIPPO,
    SCAN_KINDS,
    checkpoint_kinds,
    content_kinds,
    file_kinds,
    signal_kinds,
    tiny_pretrain_checkpoint,
    tiny_segment_checkpoint,
    write_bad_scans,
)
from tests.test_bad_inputs import assert_one_line

ROOT = Path(__file__).resolve().parents[1]
HIPPO_DIR = DATA / "hippocampus"
# real labelled MRI crops: six good ones, and one whose label map is damaged in `bad_labels`
CASES = sorted(path.name for path in (HIPPO_DIR / "imagesTr").glob("hippocampus_*.nii.gz"))[:7]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return write_bad_scans(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny untrained checkpoints: the inputs must be refused (or skipped) whatever the model says."""
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "segment": tiny_segment_checkpoint(root / "segment.ckpt"),
        "pretrain": tiny_pretrain_checkpoint(root / "pretrain.ckpt"),
    }


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"modality": "MR", **row}) + "\n" for row in rows))
    return path


def labelled_rows(cases: list[str] = CASES[:6]) -> list[dict]:
    return [
        {
            "id": case.split(".")[0],
            "image": str(HIPPO_DIR / "imagesTr" / case),
            "label": str(HIPPO_DIR / "labelsTr" / case),
        }
        for case in cases
    ]


# --- medmae segment --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCAN_KINDS)
def test_segment_bad_scan_is_one_line_naming_the_file(corpus, ckpts, kind: str, tmp_path: Path, capsys) -> None:
    if kind not in corpus:
        pytest.skip("root reads any file: no unreadable file can be made")
    path, words = corpus[kind]
    output = tmp_path / "seg.nii.gz"
    code = main(["segment", str(path), "-o", str(output), "--ckpt", str(ckpts["segment"]), "--no-progress"])
    assert_one_line(code, capsys.readouterr().err, str(path), words)
    assert not output.exists()


def test_segment_folder_skips_and_reports_each_bad_scan(ckpts, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "scans"
    corpus = {**file_kinds(folder), **content_kinds(folder), **signal_kinds(folder)}
    shutil.copy2(HIPPO, folder / "good.nii.gz")
    output = tmp_path / "labels"
    code = main(["segment", str(folder), "-o", str(output), "--ckpt", str(ckpts["segment"]), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert sorted(p.name for p in output.iterdir()) == ["good.nii.gz", REPORT_NAME]
    labels, scan = read_volume(output / "good.nii.gz"), read_volume(HIPPO)
    assert labels.spatial_shape == scan.spatial_shape and np.allclose(labels.affine, scan.affine)
    report = json.loads((output / REPORT_NAME).read_text())
    assert report["segmented"] == ["good.nii.gz"]
    reasons = {Path(item["scan"]).name: item["reason"] for item in report["skipped"]}
    # a folder of scans is its volume files; a DICOM series (a sub-folder) is segmented on its own
    in_folder = {k: v for k, v in corpus.items() if v[0].name.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha"))}
    assert len(in_folder) >= 19
    for kind, (path, words) in in_folder.items():
        assert words.lower() in reasons[path.name].lower(), (kind, reasons.get(path.name))
        assert f"skipped {path}" in out, kind
    assert f"1 segmented, {len(reasons)} skipped" in out


def test_segment_folder_of_only_bad_scans_is_an_error(corpus, ckpts, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    for kind in ("corrupt-gzip", "nan-only"):
        shutil.copy2(corpus[kind][0], folder / corpus[kind][0].name)
    code = main(["segment", str(folder), "-o", str(tmp_path / "out"), "--ckpt", str(ckpts["segment"]), "--no-progress"])
    assert_one_line(code, capsys.readouterr().err, str(folder), "none of its 2 scans")
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["segmented"] == []


def test_segment_refuses_a_damaged_segmentation_checkpoint(ckpts, tmp_path: Path, capsys) -> None:
    checkpoint = torch.load(ckpts["segment"], weights_only=True)
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    last = list(state)[-1]
    damaged = {
        "missing-key": ({k: v for k, v in state.items() if k != last}, hparams, last),
        "wrong-shape": ({**state, last: state[last][:1]}, hparams, "shape"),
        "bad-hparams": (state, {**hparams, "arch": "vitt"}, "unknown arch"),
        "no-preprocessing-record": (state, {k: v for k, v in hparams.items() if k != "roi_size"}, "roi_size"),
    }
    for name, (weights, values, words) in damaged.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": weights, "hyper_parameters": values}, path)
        code = main(["segment", str(HIPPO), "-o", str(tmp_path / "x.nii.gz"), "--ckpt", str(path)])
        assert_one_line(code, capsys.readouterr().err, str(path), words)
    assert not (tmp_path / "x.nii.gz").exists()


# --- medmae export and --ckpt -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return checkpoint_kinds(tmp_path_factory.mktemp("bad_ckpt"))


def test_checkpoint_corpus_has_the_listed_kinds(bad_ckpts) -> None:
    kinds = {"missing", "zero-bytes", "truncated", "text", "nifti", "pickled-code", "other-task", "missing-keys"}
    assert {f"ckpt-{kind}" for kind in kinds | {"wrong-shapes", "no-model-config"}} <= set(bad_ckpts)


@pytest.mark.parametrize("command", ["export", "inpaint"])
def test_bad_checkpoint_is_one_line_naming_the_file(bad_ckpts, command: str, tmp_path: Path, capsys) -> None:
    for kind, (path, words) in bad_ckpts.items():
        if command == "export":
            output = tmp_path / "encoder.pt"
            argv = ["export", str(path), "-o", str(output)]
        else:
            output = tmp_path / "repaired.nii.gz"
            argv = ["inpaint", str(HIPPO), "-o", str(output), "--ckpt", str(path), "--slices", "5"]
        code = main(argv)
        assert_one_line(code, capsys.readouterr().err, str(path), words)
        assert not list(tmp_path.iterdir()), kind
    assert "executed!" not in capsys.readouterr().out


def test_export_refuses_to_overwrite_its_checkpoint(ckpts, tmp_path: Path, capsys) -> None:
    checkpoint = Path(shutil.copy2(ckpts["pretrain"], tmp_path / "last.pt"))
    before = checkpoint.read_bytes()
    assert_one_line(main(["export", str(checkpoint), "-o", str(checkpoint)]), capsys.readouterr().err, "overwrite")
    assert checkpoint.read_bytes() == before and sorted(tmp_path.iterdir()) == [checkpoint]


# --- medmae evaluate-restore ------------------------------------------------------------------------------------

EVALUATE = ["--tasks", "inpaint", "--widths", "1", "--gaps", "1", "--max-size", "32", "--device", "cpu"]


def test_evaluate_restore_skips_each_bad_scan_and_evaluates_the_good(corpus, ckpts, tmp_path: Path, capsys) -> None:
    scans = [arg for path, _ in corpus.values() for arg in ("--scan", str(path))]
    output = tmp_path / "eval"
    argv = ["evaluate-restore", "--ckpt", str(ckpts["pretrain"]), *scans, "--scan", str(HIPPO), "-o", str(output)]
    code = main([*argv, *EVALUATE])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "evaluated hippocampus_001" in out
    rows = json.loads((output / "restore_eval.json").read_text())
    assert {row["scan"] for row in rows} == {"hippocampus_001"}
    report = (output / "restore_eval.md").read_text()
    assert f"skipped {len(corpus)} scan(s)" in report
    for kind, (path, words) in corpus.items():
        line = next(line for line in report.splitlines() if line.startswith(f"- {path.name.split('.')[0]}: "))
        assert str(path) in line and words.lower() in line.lower(), (kind, line)
        assert f"skipped {path.name.split('.')[0]}: {path}" in out, kind


def test_evaluate_restore_manifest_skips_bad_rows(corpus, ckpts, tmp_path: Path, capsys) -> None:
    rows = [
        {"id": "missing", "image": str(tmp_path / "deleted.nii.gz")},
        {"id": "corrupt", "image": str(corpus["corrupt-gzip"][0])},
        {"id": "good", "image": str(HIPPO)},
        {"id": "nan", "image": str(corpus["nan-only"][0])},
        {"id": "unused", "image": str(HIPPO)},
    ]
    manifest = write_manifest(tmp_path / "eval.jsonl", rows)
    argv = ["evaluate-restore", "--ckpt", str(ckpts["pretrain"]), "--manifest", str(manifest), "--limit", "4"]
    assert main([*argv, "-o", str(tmp_path / "eval"), *EVALUATE]) == 0
    out = capsys.readouterr().out
    assert "evaluated good" in out and "evaluated unused" not in out
    for name, words in (("missing", "not found"), ("corrupt", "gzip"), ("nan", "NaN")):
        assert f"skipped {name}: " in out and words in out.split(f"skipped {name}: ")[1].splitlines()[0], name
    assert "- missing: " in (tmp_path / "eval" / "restore_eval.md").read_text()
    write_manifest(manifest, rows[2:4])
    manifest.write_text(manifest.read_text() + "{not json\n")
    assert_one_line(main([*argv, "-o", str(tmp_path / "e2"), *EVALUATE]), capsys.readouterr().err, "eval.jsonl:3")
    write_manifest(manifest, rows[:2])
    code = main([*argv, "-o", str(tmp_path / "e3"), *EVALUATE])
    assert_one_line(code, capsys.readouterr().err, "none of the 2 scans", "deleted.nii.gz")


# --- medmae finetune and finetune-restore -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_labels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, str]]:
    """``{kind: (manifest row, words of the reason)}``: a broken image, and two bad label maps of real scans."""
    root = tmp_path_factory.mktemp("labels")
    label = nib.load(HIPPO_DIR / "labelsTr" / CASES[6])
    array = np.asanyarray(label.dataobj)
    nib.save(nib.Nifti1Image(array[:-3], label.affine), root / "other_grid.nii.gz")
    nib.save(nib.Nifti1Image(array.astype(np.float32) + 0.5, label.affine), root / "fractional.nii.gz")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    image = str(HIPPO_DIR / "imagesTr" / CASES[6])
    return {
        "broken-image": (
            {"id": "broken", "image": str(root / "broken.nii.gz"), "label": label.get_filename()},
            "cannot read",
        ),
        "label-other-grid": ({"id": "grid", "image": image, "label": str(root / "other_grid.nii.gz")}, "grid"),
        "non-integer-label": ({"id": "fraction", "image": image, "label": str(root / "fractional.nii.gz")}, "integer"),
    }


def test_finetune_goes_on_past_bad_scans_and_labels(bad_labels, tmp_path: Path, caplog) -> None:
    rows = labelled_rows() + [row for row, _ in bad_labels.values()]
    manifest = write_manifest(tmp_path / "seg.jsonl", rows)
    config = ["--config", str(ROOT / "configs/segment/tiny.yaml"), "--data.manifest", str(manifest)]
    split = ["--data.num_labeled", "null", "--data.test_fraction", "0.0", "--data.val_fraction", "0.0"]
    run = ["--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    assert main(["finetune", *config, *split, *run, *QUIET]) == 0
    for kind, (row, words) in bad_labels.items():
        warning = next(
            r.getMessage() for r in caplog.records if r.getMessage().startswith(f"skipping scan {row['id']}:")
        )
        named = row["image"] if kind == "broken-image" else row["label"]
        assert named in warning and words in warning, (kind, warning)
    assert "3 scan(s) skipped (reasons above); training on 6 labelled scans" in caplog.text
    assert list(tmp_path.rglob("*.ckpt"))


def test_a_failed_labelled_scan_is_replaced_from_the_pool(bad_labels, tmp_path: Path) -> None:
    rows = labelled_rows() + [row for row, _ in bad_labels.values()]
    manifest = write_manifest(tmp_path / "seg.jsonl", rows)
    bad = {"broken", "grid", "fraction"}
    # a seed whose draw of 6 labelled scans out of 9 takes bad ones: they must be replaced by the good ones left
    seed = next(s for s in range(50) if {r.id for r in seg_splits(read_manifest(manifest), 0, 0, 6, 0, s).train} & bad)
    splits = {"test_fraction": 0.0, "val_fraction": 0.0, "seed": seed}
    data = SegDataModule(str(manifest), 3, num_labeled=6, roi_size=[32, 32, 32], spacing=None, **splits)
    data.setup("fit")
    good = {row["id"] for row in labelled_rows()}
    assert {scan_id for scan_id, _, _ in data.train_dataset.volumes} == good
    assert {record.id for record in data.splits.train} == good
    assert data.skipped and {scan_id for scan_id, _ in data.skipped} <= bad


def test_finetune_restore_goes_on_past_a_bad_scan(corpus, ckpts, tmp_path: Path, caplog) -> None:
    rows = [{"id": row["id"], "image": row["image"]} for row in labelled_rows()]
    rows.append({"id": "broken", "image": str(corpus["truncated-nifti"][0])})
    manifest = write_manifest(tmp_path / "restore.jsonl", rows)
    config = ["--config", str(ROOT / "configs/restore/tiny.yaml"), "--model.pretrained", str(ckpts["pretrain"])]
    run = ["--data.manifest", str(manifest), "--trainer.max_steps", "2", "--trainer.logger", "false"]
    assert main(["finetune-restore", *config, *run, "--trainer.default_root_dir", str(tmp_path), *QUIET]) == 0
    assert "skipping scan broken: " in caplog.text and "truncated" in caplog.text
    assert list(tmp_path.rglob("*.ckpt"))
