"""A corpus of bad single-scan inputs for issue 7: one small file (or folder) per kind.

Kinds that corrupt a scan start from a real one (``../shared/data``): a hippocampus MRI crop, the small
CT's label map, the real CT DICOM series. Synthetic arrays are made only for properties real data lacks
(2D, 5D, NaN, constant...). :func:`write_bad_scans` returns ``{kind: (path, words the error must hold)}``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from tests.corpus_ingest import DICOMDIR_TESTS, PYDICOM_FILES, copy_files, real_series_files, tilted_copy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
HIPPO_LABEL = DATA / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"

# {kind: (path, words the one-line error must hold)}
Expected = dict[str, tuple[Path, str]]
# the single-scan kinds of :func:`write_bad_scans`, in order ("unreadable-permissions" only when not root)
SCAN_KINDS = (
    *("corrupt-gzip", "truncated-gzip", "truncated-nifti", "wrong-magic", "zero-bytes", "empty-dir"),
    *("dir-named-nii-gz", "text-named-nrrd", "nhdr-missing-data", "mha-bad-element-type", "dicom-not-image"),
    *("mixed-dicom-series", "missing-slices", "gantry-tilt", "symlink-loop", "dangling-symlink"),
    *("unreadable-permissions", "2d", "5d", "huge-dimensions", "zero-spacing", "non-orthogonal-affine"),
    *("nan-only", "inf", "constant"),
)


def real_nifti() -> nib.Nifti1Image:
    """The real hippocampus crop, loaded in memory."""
    return nib.Nifti1Image.from_bytes(gzip.decompress(HIPPO.read_bytes()))


def _save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine), str(path))
    return path


def _with_pixdim(path: Path, spacing: tuple[float, float, float]) -> Path:
    """The real crop, uncompressed, with its raw header's pixdim[1:4] overwritten (nibabel would fix it)."""
    plain = bytearray(gzip.decompress(HIPPO.read_bytes()))
    plain[80:92] = np.asarray(spacing, dtype="<f4").tobytes()  # NIfTI-1 pixdim starts at byte 76
    path.write_bytes(bytes(plain))
    return path


def file_kinds(root: Path) -> Expected:
    """Broken files and folders: the read fails, and the message says why."""
    root.mkdir(parents=True, exist_ok=True)
    raw = HIPPO.read_bytes()
    plain = gzip.decompress(raw)
    out: Expected = {}
    (root / "corrupt_gzip.nii.gz").write_bytes(raw[:30] + bytes(400) + raw[430:])
    out["corrupt-gzip"] = (root / "corrupt_gzip.nii.gz", "gzip")
    (root / "truncated_gzip.nii.gz").write_bytes(raw[: len(raw) // 2])
    out["truncated-gzip"] = (root / "truncated_gzip.nii.gz", "cannot read")
    (root / "truncated.nii").write_bytes(plain[: len(plain) // 2])
    out["truncated-nifti"] = (root / "truncated.nii", "truncated")
    (root / "wrong_magic.nii").write_bytes(plain[:344] + b"xyz\x00" + plain[348:])
    out["wrong-magic"] = (root / "wrong_magic.nii", "magic")
    (root / "zero_bytes.nii.gz").write_bytes(b"")
    out["zero-bytes"] = (root / "zero_bytes.nii.gz", "empty")
    (root / "empty_dir").mkdir()
    out["empty-dir"] = (root / "empty_dir", "no DICOM image series")
    (root / "folder.nii.gz").mkdir()
    out["dir-named-nii-gz"] = (root / "folder.nii.gz", "folder")
    (root / "text.nrrd").write_text("this is a text file, not an image\n")
    out["text-named-nrrd"] = (root / "text.nrrd", "cannot read")
    (root / "no_data.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nspace: left-posterior-superior\n"
        "space directions: (1,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n"
        "data file: missing.raw\n\n"
    )
    out["nhdr-missing-data"] = (root / "no_data.nhdr", "missing.raw")
    (root / "bad_type.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_BANANA\n"
        b"ElementDataFile = LOCAL\n" + bytes(64)
    )
    out["mha-bad-element-type"] = (root / "bad_type.mha", "PixelType")
    copy_files(PYDICOM_FILES, root / "dicom_not_image", ["rtstruct.dcm"])
    out["dicom-not-image"] = (root / "dicom_not_image", "no DICOM image series")
    copy_files(DICOMDIR_TESTS / "98892001" / "CT5N", root / "mixed_series")
    copy_files(DICOMDIR_TESTS / "98892001" / "CT2N", root / "mixed_series")
    out["mixed-dicom-series"] = (root / "mixed_series", "DICOM series")
    series = real_series_files()
    missing = root / "missing_slices"
    missing.mkdir()
    for path in series[:8] + series[10:]:
        shutil.copy2(path, missing / path.name)
    out["missing-slices"] = (missing, "slice")
    tilted_copy(root / "gantry_tilt", mm_per_slice=2.0)
    out["gantry-tilt"] = (root / "gantry_tilt", "tilt")
    (root / "loop_a.nii.gz").symlink_to(root / "loop_b.nii.gz")
    (root / "loop_b.nii.gz").symlink_to(root / "loop_a.nii.gz")
    out["symlink-loop"] = (root / "loop_a.nii.gz", "symbolic link")
    (root / "dangling.nii.gz").symlink_to(root / "nowhere.nii.gz")
    out["dangling-symlink"] = (root / "dangling.nii.gz", "not found")
    if os.geteuid() != 0:  # root reads anything: this kind cannot be made
        shutil.copy2(HIPPO, root / "unreadable.nii.gz")
        (root / "unreadable.nii.gz").chmod(0)
        out["unreadable-permissions"] = (root / "unreadable.nii.gz", "permission")
    return out


def content_kinds(root: Path) -> Expected:
    """Files that decode but cannot be a 3D scan: the message names the property."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = np.asanyarray(real_nifti().dataobj).astype(np.float32)
    out: Expected = {}
    out["2d"] = (_save(root / "flat.nii.gz", data[:, :, 10]), "2D")
    out["5d"] = (_save(root / "five_d.nii.gz", rng.normal(size=(6, 6, 6, 2, 2)).astype(np.float32)), "dimensions")
    huge = real_nifti().header.copy()
    huge.set_data_shape((30000, 30000, 30000))  # the largest NIfTI-1 holds: 2.7e13 voxels in a 1 kB file
    huge["vox_offset"] = 352
    (root / "huge.nii").write_bytes(huge.binaryblock + bytes(4) + bytes(1000))
    out["huge-dimensions"] = (root / "huge.nii", "voxels")
    out["zero-spacing"] = (_with_pixdim(root / "zero_spacing.nii", (1, 0, 1)), "spacing")
    shear = np.array([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out["non-orthogonal-affine"] = (_save(root / "shear.nii.gz", data, shear), "orthogonal")
    return out


def negative_spacing(root: Path) -> Path:
    """The real crop with a negative pixdim: read as a flip of that axis (spacing = |pixdim|), like ITK."""
    return _with_pixdim(root / "negative_spacing.nii", (-1, 1, 1))


def label_kinds(root: Path) -> dict[str, tuple[Path, Path, str]]:
    """``{kind: (prediction folder, truth folder, words)}`` for ``medmae evaluate-seg``."""
    label = nib.Nifti1Image.from_bytes(gzip.decompress(HIPPO_LABEL.read_bytes()))
    array = np.asanyarray(label.dataobj)
    out = {}
    for kind, truth, words in (
        ("label-other-grid", nib.Nifti1Image(array[:-3], label.affine), "grid"),
        ("non-integer-labels", nib.Nifti1Image(array.astype(np.float32) + 0.5, label.affine), "integer"),
        ("too-many-classes", nib.Nifti1Image((array * 100).astype(np.int16), label.affine), "classes"),
    ):
        (root / kind / "pred").mkdir(parents=True)
        (root / kind / "truth").mkdir()
        nib.save(label, str(root / kind / "pred" / "case.nii.gz"))
        nib.save(truth, str(root / kind / "truth" / "case.nii.gz"))
        out[kind] = (root / kind / "pred", root / kind / "truth", words)
    return out


def manifest_kinds(root: Path) -> dict[str, tuple[Path, str]]:
    """``{kind: (manifest, words)}``: one bad row after a good one."""
    root.mkdir(parents=True, exist_ok=True)
    good = {"id": "h1", "image": str(HIPPO), "modality": "mr"}
    rows = {
        "manifest-missing-field": ({"image": str(HIPPO)}, "missing required key"),
        "manifest-unknown-key": ({**good, "id": "h2", "imgae": "x"}, "unknown key"),
        "manifest-wrong-type": ({**good, "id": "h2", "image": 3}, "'image' must be"),
        "manifest-duplicate-id": (good, "duplicate id"),
        "manifest-not-json": ("{id: h2,", "not valid JSON"),
    }
    out = {}
    for kind, (row, words) in rows.items():
        path = root / f"{kind}.jsonl"
        second = row if isinstance(row, str) else json.dumps(row)
        path.write_text(json.dumps(good) + "\n" + second + "\n")
        out[kind] = (path, words)
    return out


def signal_kinds(root: Path) -> Expected:
    """Files that read as volumes but hold no usable signal: refused by commands that write a copy."""
    root.mkdir(parents=True, exist_ok=True)
    data = np.asanyarray(real_nifti().dataobj).astype(np.float32)
    with_inf = data.copy()
    with_inf[:, :, 5] = np.inf
    return {
        "nan-only": (_save(root / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32)), "NaN"),
        "inf": (_save(root / "inf.nii.gz", with_inf), "Inf"),
        "constant": (_save(root / "constant.nii.gz", np.full((12, 12, 12), 7, np.int16)), "constant"),
    }


def write_bad_scans(root: Path) -> Expected:
    """Every single-scan kind of :data:`SCAN_KINDS` under ``root``."""
    return {**file_kinds(root / "files"), **content_kinds(root / "content"), **signal_kinds(root / "signal")}


class CodeOnLoad:
    """Unpickling this runs ``print``: a checkpoint holding it must be refused, never loaded."""

    def __reduce__(self) -> tuple:
        return (print, ("executed!",))


def save_lightning(path: Path, state: dict, hparams: dict) -> Path:
    """A checkpoint with the layout Lightning writes (``state_dict`` + ``hyper_parameters``)."""
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    return path


def tiny_pretrain_checkpoint(path: Path) -> Path:
    """An untrained tiny MAE pretraining checkpoint (tests of inputs refused before the model matters)."""
    from medmae.tasks.pretrain import MAEPretrainTask

    task = MAEPretrainTask(preset="tiny", patch_size=8)
    return save_lightning(path, task.state_dict(), dict(task.hparams))


def tiny_segment_checkpoint(path: Path) -> Path:
    """An untrained tiny UNETR checkpoint with the preprocessing record ``medmae finetune`` adds (MR, ROI 32^3)."""
    from medmae.tasks.segment import SegmentTask
    from medmae.tasks.segment_demo import TINY_MODEL

    task = SegmentTask(3, **TINY_MODEL)
    geometry = {"roi_size": [32, 32, 32], "spacing": None, "ct_window": [-1000.0, 1000.0]}
    task.hparams.update(geometry, mr_percentiles=[0.5, 99.5], modality="MR")
    return save_lightning(path, task.state_dict(), dict(task.hparams))


def checkpoint_kinds(root: Path) -> Expected:
    """Bad checkpoints for commands that load a pretraining/restoration one (``export``, ``--ckpt``).

    Each starts from a real (tiny, untrained) checkpoint of the right kind, except the files that are not
    checkpoints at all.
    """
    root.mkdir(parents=True, exist_ok=True)
    good = tiny_pretrain_checkpoint(root / "good.ckpt")
    checkpoint = torch.load(good, weights_only=True)
    state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
    first = next(iter(state))
    out: Expected = {"ckpt-missing": (root / "missing.ckpt", "not found")}
    (root / "zero.ckpt").write_bytes(b"")
    out["ckpt-zero-bytes"] = (root / "zero.ckpt", "empty")
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["ckpt-truncated"] = (root / "truncated.ckpt", "truncated")
    (root / "text.ckpt").write_text("model: tiny\nsteps: 100\n")
    out["ckpt-text"] = (root / "text.ckpt", "not a PyTorch checkpoint")
    shutil.copy2(HIPPO, root / "scan.ckpt")
    out["ckpt-nifti"] = (root / "scan.ckpt", "not a PyTorch checkpoint")
    torch.save({"state_dict": state, "hyper_parameters": hparams, "x": CodeOnLoad()}, root / "code.ckpt")
    out["ckpt-pickled-code"] = (root / "code.ckpt", "refused to load")
    out["ckpt-other-task"] = (tiny_segment_checkpoint(root / "segment.ckpt"), "segment checkpoint")
    torch.save({k.removeprefix("model."): v for k, v in state.items()}, root / "bare_state.ckpt")
    out["ckpt-bare-state-dict"] = (root / "bare_state.ckpt", "hyper_parameters")
    torch.save(torch.zeros(3), root / "tensor.ckpt")
    out["ckpt-not-a-dict"] = (root / "tensor.ckpt", "Tensor")
    save_lightning(root / "no_weights.ckpt", {}, hparams)
    out["ckpt-no-weights"] = (root / "no_weights.ckpt", "state_dict")
    save_lightning(root / "missing_key.ckpt", {k: v for k, v in state.items() if k != first}, hparams)
    out["ckpt-missing-keys"] = (root / "missing_key.ckpt", first.removeprefix("model."))
    save_lightning(root / "wrong_shape.ckpt", {**state, first: state[first][..., :-1]}, hparams)
    out["ckpt-wrong-shapes"] = (root / "wrong_shape.ckpt", "shape")
    save_lightning(root / "no_config.ckpt", state, {k: v for k, v in hparams.items() if k != "model_config"})
    out["ckpt-no-model-config"] = (root / "no_config.ckpt", "model_config")
    config = {**hparams["model_config"], "hiden_size": 96}
    save_lightning(root / "bad_config.ckpt", state, {**hparams, "model_config": config})
    out["ckpt-bad-model-config"] = (root / "bad_config.ckpt", "hiden_size")
    return out
