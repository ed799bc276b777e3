"""The whole pipeline on a real CT DICOM series with planted identifiers: no identifier in any artefact.

``medmae manifest scan`` → ``preprocess`` → ``pretrain`` (CSV + TensorBoard, reconstruction figures; then a
second run with ``--wandb offline``) → ``export`` → ``finetune-restore`` → ``inpaint`` / ``denoise`` of the
DICOM folder into NIfTI, NRRD and MHA, and of its SimpleITK conversions to NRRD/MHA (which carry the DICOM
tags in their headers) → ``evaluate-restore`` → ``finetune`` → ``segment``, all through ``medmae.cli.main``.
Then every byte each stage wrote (zip members of checkpoints, compressed PNG and image chunks, gzip streams,
TensorBoard events, the wandb offline run), the screen, the log records and the text drawn into figures are
searched for every identifier of the headers, case-insensitively.

Folder and file names stay neutral: paths are the user's choice and are written as given (hyper-parameters,
the manifest's ``source`` list); a path holding one of its series' identifiers is refused by the archive scan
(``tests/test_privacy.py``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from medmae.cli import main
from medmae.data.privacy import header_identifiers
from medmae.io import read_volume, write_volume
from tests.corpus_ingest import copy_files, real_series_files
from tests.test_privacy import IDENTITY

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus" / "imagesTr"
STUDY_UID = "2.25.314159265358979323846264338327"
SERIES_UID = "2.25.271828182845904523536028747135"
SOP_UID_ROOT = "2.25.161803398874989484820458683436"
DICOM_ROOT = "1.2.840.10008."  # the standard's own UIDs (SOP classes, transfer syntaxes) identify nobody

pytestmark = pytest.mark.real_data


def planted_series(target: Path) -> set[str]:
    """The real 20-slice CT series with ``IDENTITY`` and traceable Study/Series/SOP Instance UIDs in every
    header, as ``slice00``...; returns every identifier to hunt for (those of ``header_identifiers`` and
    every instance UID of the headers), lower-cased."""
    target.mkdir(parents=True, exist_ok=True)
    hunted = set()
    for index, path in enumerate(real_series_files()):
        dataset = pydicom.dcmread(path)
        for keyword, value in {**IDENTITY, "StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID}.items():
            setattr(dataset, keyword, value)
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = f"{SOP_UID_ROOT}.{index + 1}"
        dataset.save_as(target / f"slice{index:02d}")
        uids = {str(e.value) for e in dataset if e.VR == "UI" and e.value and not e.value.startswith(DICOM_ROOT)}
        hunted |= header_identifiers(dataset) | uids
    assert {STUDY_UID, SERIES_UID, f"{SOP_UID_ROOT}.20"} <= hunted
    return {value.lower() for value in hunted}


def readable_forms(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """``data`` and what it holds compressed: zip members (checkpoints, ``.pt``), gzip and zlib streams
    anywhere in it (``.nii.gz``, PNG text and image chunks, compressed NRRD/MHA voxels), recursively."""
    forms = [(name, data)]
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                forms += readable_forms(f"{name}:{member}", archive.read(member))
        return forms
    view = memoryview(data)
    for match in re.finditer(rb"\x1f\x8b\x08|\x78[\x01\x5e\x9c\xda]", data):
        try:
            stream = zlib.decompressobj(31 if match.group()[0] == 0x1F else 15).decompress(view[match.start() :])
        except zlib.error:
            continue
        forms += readable_forms(f"{name}:stream@{match.start()}", stream)
    return forms


def record_figure_text(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every string drawn into a matplotlib figure from now on (titles and labels are pixels in a PNG, so
    they are collected as they are drawn)."""
    texts: list[str] = []
    draw = FigureCanvasAgg.draw

    def recording_draw(canvas: FigureCanvasAgg, *args: object, **kwargs: object) -> None:
        texts.extend(text.get_text() for text in canvas.figure.findobj(Text))
        draw(canvas, *args, **kwargs)

    monkeypatch.setattr(FigureCanvasAgg, "draw", recording_draw)
    return texts


def leaks(folder: Path, hunted: set[str], transcript: str) -> list[str]:
    """``"identifier in artefact"`` for every identifier found in a file under ``folder`` or the transcript."""
    found = []
    artefacts = [(str(p.relative_to(folder)), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]
    for name, data in [*artefacts, ("screen and logs", transcript.encode())]:
        for where, form in readable_forms(name, data):
            lowered = form.lower()
            found += [f"{secret!r} in {where}" for secret in sorted(hunted) if secret.encode() in lowered]
    return found


def medmae(*argv: object) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, f"medmae {' '.join(map(str, argv[:2]))} exited with {code}"


def one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def run_folder(folder: Path) -> list[object]:
    """Overrides putting a LightningCLI run's checkpoints and its (one, configured) logger in ``folder``."""
    return ["--trainer.default_root_dir", folder, "--trainer.logger.init_args.save_dir", folder]


def converted_copies(series: Path, folder: Path) -> list[Path]:
    """The series converted to NRRD and MHA the SimpleITK way, the first slice's DICOM tags (``0010|0010``
    ...) copied into the volume's metadata."""
    files = [str(p) for p in sorted(series.iterdir())]
    image, first = sitk.ReadImage(files), sitk.ReadImage(files[0])
    for key in first.GetMetaDataKeys():
        image.SetMetaData(key, first.GetMetaData(key))
    folder.mkdir(parents=True, exist_ok=True)
    converted = [folder / "converted.nrrd", folder / "converted.mha"]
    for path in converted:
        sitk.WriteImage(image, str(path))
        assert b"lovelace" in path.read_bytes().lower()
    return converted


def wandb_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith("WANDB_")}


def scan_and_preprocess(archive: Path, out: Path) -> tuple[Path, list[object]]:
    """``medmae manifest scan`` and ``preprocess``: the manifest and the ``--data.*`` overrides training on it."""
    manifest = out / "archive.jsonl"
    medmae("manifest", "scan", archive, "-o", manifest, "--no-progress")
    medmae("preprocess", manifest, "--cache", out / "cache", "--spacing", 2, 2, 2, "--no-progress")
    assert len(manifest.read_text().splitlines()) == 5  # the CT series and 4 MR scans
    return manifest, ["--data.manifest", manifest, "--data.cache_dir", out / "cache", "--data.spacing", "[2,2,2]",
            "--data.batch_size", 2, "--data.val_fraction", 0.2, "--trainer.enable_progress_bar", "false"]  # fmt: skip


def pretrain_without_wandb(data: list[object], runs: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretraining with CSV and TensorBoard loggers and figures every 2 steps, wandb impossible to import;
    nothing of wandb's appears. Returns the last checkpoint."""
    runs.mkdir(parents=True)
    loggers = runs / "loggers.yaml"
    classes = [f"lightning.pytorch.loggers.{kind}" for kind in ("CSVLogger", "TensorBoardLogger")]
    config = {"trainer": {"logger": [{"class_path": c, "init_args": {"save_dir": str(runs)}} for c in classes]}}
    loggers.write_text(yaml.safe_dump(config))
    environment = wandb_environment()
    with monkeypatch.context() as no_wandb:
        no_wandb.setitem(sys.modules, "wandb", None)  # importing wandb would fail the run
        medmae(
            "pretrain", "--config", ROOT / "configs/pretrain/tiny.yaml", "--config", loggers, *data,
            "--model.figure_every_n_steps", 2, "--trainer.max_steps", 3, "--trainer.val_check_interval", 3,
            "--trainer.log_every_n_steps", 1, "--trainer.default_root_dir", runs,
        )  # fmt: skip
    assert wandb_environment() == environment and not list(runs.parent.rglob("*wandb*"))
    assert len(list(runs.rglob("reconstruction_step*.png"))) == 2 and list(runs.rglob("events.out.tfevents*"))
    return one(runs, "last.ckpt")


def pretrain_with_wandb_offline(data: list[object], runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A short ``--wandb offline`` run: no API key, every wandb folder under ``runs``, no reachable server
    (``tests/test_pretrain.py::test_wandb_offline_needs_no_network`` is the test of that alone)."""
    pytest.importorskip("wandb")
    for variable in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{variable}", str(runs / "home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # --wandb offline alone must keep it offline
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a network attempt fails at once
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    medmae(
        "pretrain", "--config", ROOT / "configs/pretrain/tiny.yaml", "--wandb", "offline", *data,
        "--model.figure_every_n_steps", 1, "--trainer.max_steps", 2, "--trainer.val_check_interval", 2,
        *run_folder(runs),
    )  # fmt: skip
    assert list(runs.rglob("offline-run-*/files/media/images/*.png"))


def repair_stages(series: Path, manifest: Path, data: list[object], pretrained: Path, out: Path) -> None:
    """``finetune-restore``, then ``inpaint`` / ``denoise`` of the DICOM folder into NIfTI, MHA and NRRD,
    ``inpaint`` of its SimpleITK conversions, and ``evaluate-restore`` of the folder and the manifest."""
    medmae(
        "finetune-restore", "--config", ROOT / "configs/restore/tiny.yaml", "--model.pretrained", pretrained, *data,
        "--trainer.max_steps", 2, "--trainer.val_check_interval", 2, *run_folder(out / "runs" / "restore"),
    )  # fmt: skip
    model = ["--ckpt", one(out / "runs" / "restore", "last.ckpt"), "--batch-size", 8]
    ct = read_volume(series)
    box = np.zeros(ct.spatial_shape, dtype=np.uint8)
    box[240:260, 250:270, 8:11] = 1
    mask = write_volume(ct.with_array(box[None]), out / "repair" / "mask.nii.gz")
    for suffix in (".nii.gz", ".mha"):
        medmae("inpaint", series, "-o", out / "repair" / f"inpainted{suffix}", "--mask", mask, *model)
    medmae("denoise", series, "-o", out / "repair" / "denoised.nrrd", *model, "--overlap", 0)
    for converted in converted_copies(series, out.parent / "converted"):
        medmae("inpaint", converted, "-o", out / "repair" / f"inpainted_{converted.name}", "--mask", mask, *model)
    medmae(
        "evaluate-restore", "--scan", series, "--manifest", manifest, "--limit", 1, "--widths", 3, "--gaps", 1,
        "--max-size", 32, "--tasks", "inpaint", "-o", out / "evaluate", *model,
    )  # fmt: skip
    assert len(list((out / "evaluate" / "figures").glob("*.png"))) == 2


def segment_stage(series: Path, labelled_manifest: Path, out: Path) -> None:
    """A 2-step ``finetune`` on labelled hippocampus scans, then ``segment`` of the DICOM folder."""
    medmae(
        "finetune", "--config", ROOT / "configs/segment/tiny.yaml", "--data.manifest", labelled_manifest,
        "--data.num_labeled", 2, "--data.spacing", "[4,4,4]", "--model.sw_overlap", 0,
        "--trainer.max_steps", 2, "--trainer.val_check_interval", 2, "--trainer.enable_progress_bar", "false",
        *run_folder(out / "runs" / "segment"),
    )  # fmt: skip
    checkpoint = one(out / "runs" / "segment", "last.ckpt")
    medmae("segment", series, "-o", out / "segment" / "ct_labels.nrrd", "--ckpt", checkpoint, "--no-progress")


def test_no_identifier_in_any_artefact_of_a_pipeline_run(
    hippo_manifest: Path, tmp_path: Path, capfd: pytest.CaptureFixture, caplog, monkeypatch
) -> None:
    caplog.set_level(logging.DEBUG)
    figure_text = record_figure_text(monkeypatch)
    archive, out = tmp_path / "archive", tmp_path / "out"
    hunted = planted_series(archive / "ct")
    assert {"lovelace", "pid-88412077", "18151210", "acc93811", "hospital saint bartholomew", "petct2"} <= hunted
    copy_files(HIPPO, archive / "mr", [f"hippocampus_{n}.nii.gz" for n in ("001", "003", "004", "006")])

    manifest, data = scan_and_preprocess(archive, out)
    pretrained = pretrain_without_wandb(data, out / "runs" / "pretrain", monkeypatch)
    pretrain_with_wandb_offline(data, out / "runs" / "wandb", monkeypatch)
    medmae("export", pretrained, "-o", out / "export" / "encoder.pt")
    repair_stages(archive / "ct", manifest, data, pretrained, out)
    segment_stage(archive / "ct", hippo_manifest, out)

    captured = capfd.readouterr()
    assert "step 3" in figure_text and any(text.startswith("ct: 3-slice gap") for text in figure_text)
    found = leaks(out, hunted, "\n".join([captured.out, captured.err, caplog.text, *figure_text]))
    assert not found, "\n".join(found)
