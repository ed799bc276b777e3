"""Whole-volume segmentation back on the input's own grid.

A scan goes through the checkpoint's own preprocessing (reorient to RAS, resample to the training
spacing, normalise — the same transforms as training, without the foreground crop), the network runs on
overlapping windows of the training ROI blended with Gaussian weights (MONAI ``sliding_window_inference``),
and the class probabilities are resampled from the preprocessed grid onto the input grid (MONAI
``SpatialResample`` with the two affines: this undoes the reorientation and the resampling together)
before the arg-max. The label map is written with the input's header and grid in an integer dtype.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, SpatialResample
from tqdm import tqdm

from medmae.data.cache_store import atomic_write
from medmae.data.scan_volumes import split_channel, strip_suffix
from medmae.data.seg_datamodule import run_pipeline
from medmae.data.transforms import IntensityConfig, preprocessing_transforms
from medmae.errors import SCAN_ERRORS, one_line
from medmae.io.readers import read_volume, require_signal, volume_format
from medmae.io.volume import Volume, VolumeError
from medmae.io.writers import write_volume
from medmae.models.checkpoint import CheckpointError, load_task_checkpoint, load_weights
from medmae.tasks.segment import GEOMETRY_KEYS, TASK_NAME, SegmentTask

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
RESAMPLE_ELEMENTS = 2**27  # class probabilities resampled onto the input grid at once (1 GiB in float64)
REPORT_NAME = "segment_report.json"  # written into the output folder when a folder of scans is segmented


def load_segmenter(path: str | Path) -> SegmentTask:
    """The fine-tuned model of a ``medmae finetune`` checkpoint, in eval mode, on the CPU."""
    state, hparams = load_task_checkpoint(path, (TASK_NAME,))
    missing = [k for k in GEOMETRY_KEYS if k not in hparams]
    if missing:
        raise CheckpointError(
            f"{path}: no preprocessing record {missing} in the checkpoint; it was not written by a "
            "`medmae finetune` run that reached training"
        )
    names = set(inspect.signature(SegmentTask.__init__).parameters) - {"self"}
    try:
        model = SegmentTask(**{**{k: v for k, v in hparams.items() if k in names}, "pretrained": None})
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: its hyper-parameters do not describe a segmentation model ({error})") from None
    model.hparams.update({k: hparams[k] for k in GEOMETRY_KEYS})
    load_weights(model, state, path, "segmentation model")
    return model.eval()


def inference_transforms(hparams: dict) -> Compose:
    """The training preprocessing of a checkpoint without the foreground crop, keeping the affine."""
    intensity = IntensityConfig(tuple(hparams["ct_window"]), tuple(hparams["mr_percentiles"]))
    full = preprocessing_transforms(hparams["modality"], hparams["spacing"], intensity, crop_foreground=False)
    return Compose([t for t in full.transforms if not isinstance(t, EnsureTyped)])


@torch.no_grad()
def predict_probabilities(model: SegmentTask, image: MetaTensor, progress: bool = False) -> MetaTensor:
    """Softmax ``(classes, X, Y, Z)`` of a preprocessed ``(C, X, Y, Z)`` image, with the image's affine."""
    if image.shape[0] != model.config.in_channels and model.hparams.arch == "vit":
        raise VolumeError(
            f"{image.meta.get('filename_or_obj')}: {image.shape[0]} channel(s), the model expects "
            f"{model.config.in_channels}; give a multi-channel scan as its channel files in the order of the "
            "training manifest's image list (`medmae segment t1.nii.gz t2.nii.gz -o seg.nii.gz`), or as one 4D file"
        )
    logits = model.predict_logits(image.as_tensor()[None].to(model.device), progress=progress)
    return MetaTensor(torch.softmax(logits[0].float(), 0).cpu(), affine=image.affine)


def to_input_grid(probabilities: MetaTensor, reference: Volume, max_elements: int = RESAMPLE_ELEMENTS) -> np.ndarray:
    """Resample ``(classes, ...)`` probabilities onto ``reference``'s grid and take the arg-max ``(I, J, K)``.

    Classes are resampled a few at a time (at most ``max_elements`` output values at once) with a running
    maximum, so a many-class model (117 TotalSegmentator classes) needs memory for a few classes, not all; the
    result is the same as one arg-max over all classes (ties go to the lower class).
    """
    resample = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False)
    target = torch.as_tensor(reference.affine, dtype=torch.float64)
    classes = probabilities.as_tensor()
    step = max(1, max_elements // int(np.prod(reference.spatial_shape)))

    def resampled_max(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = MetaTensor(classes[start : start + step], affine=probabilities.affine)
        part = resample(part, dst_affine=target, spatial_size=reference.spatial_shape)
        value, index = torch.as_tensor(part).max(0)
        return value, index + start

    best, labels = resampled_max(0)
    for start in range(step, classes.shape[0], step):
        value, index = resampled_max(start)
        better = value > best
        best, labels = torch.where(better, value, best), torch.where(better, index, labels)
    return labels.numpy()


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ``num_classes`` labels."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


Source = Path | Sequence[Path]  # one scan: a file or DICOM folder, or its co-registered channel files in order


def source_paths(source: Source) -> list[Path]:
    """The files of one scan, as a list."""
    return [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]


def modality_note(trained: str, array: np.ndarray, name: str) -> str | None:
    """A note when a scan's intensities do not fit the modality its checkpoint trained on, else None.

    Only the two clear cases: values down to Hounsfield air for an MR model, and no negative value for a CT
    model (a CT stored without its rescale, 0-4095, would be windowed as if it were HU).
    """
    low = float(np.nanmin(array))
    if trained == "MR" and low <= -500:
        return f"note: {name} reaches {low:.0f} (Hounsfield air?) but the model trained on MR; a CT needs a CT model"
    if trained == "CT" and low >= 0:
        return (
            f"note: {name} has no value below 0 but the model trained on CT in Hounsfield units (air at -1000); a CT "
            "stored without its rescale slope/intercept must be converted to HU first, and an MR needs an MR model"
        )
    return None


def segment_volume(
    model: SegmentTask, source: Source, progress: bool = False, notes: list[str] | None = None
) -> Volume:
    """Segment one scan (a file, a DICOM folder, or its channel files); the label map ``(1, I, J, K)`` on the
    grid of its (first) file. A :func:`modality_note` about the scan is appended to ``notes``."""
    paths = source_paths(source)
    reference = read_volume(paths[0])
    require_signal(reference)
    note = modality_note(str(model.hparams.get("modality", "")), reference.array, str(paths[0]))
    if note and notes is not None:
        notes.append(note)
    image_key = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
    image = run_pipeline(inference_transforms(model.hparams), {"image": image_key}, str(paths[0]))["image"]
    labels = to_input_grid(predict_probabilities(model, image, progress), reference)
    return reference.with_array(labels[None].astype(label_dtype(model.hparams.num_classes)))


def input_files(folder: Path) -> list[Path]:
    """Entries directly inside ``folder`` named like volumes (empty when it is a DICOM series folder).

    Broken links and folders with a volume suffix are listed too, so that they are reported, not passed over.
    """
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))


CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<suffix>\.[^_]+)$")  # nnU-Net's CASE_0000.nii.gz


Cases = tuple[dict[str, list[Path]], list[tuple[Path, str]]]  # {output file name: channel files}, [(file, why not)]


def named_channel_cases(files: Sequence[Path], names: Sequence[str]) -> Cases:
    """Group files named ``<subject>_<name>.<ext>`` (as ``medmae manifest scan --channels`` does) into cases with
    the channels in the order of ``names``; a subject missing one, or a file named otherwise, is left out."""
    by_subject: dict[str, dict[str, Path]] = {}
    left_out: list[tuple[Path, str]] = []
    for path in files:
        split = split_channel(path.name, tuple(names))
        if split is None:
            left_out.append((path, f"{path.name}: not named <subject>_<channel> for channels {', '.join(names)}"))
            continue
        subject, channel = split
        by_subject.setdefault(subject + path.name[len(strip_suffix(path.name)) :], {})[channel] = path
    cases = {}
    for name, found in sorted(by_subject.items()):
        missing = [c for c in names if c not in found]
        if missing:
            left_out.append((next(iter(found.values())), f"{name}: no file for channel(s) {', '.join(missing)}"))
        else:
            cases[name] = [found[c] for c in names]
    return cases, left_out


def numbered_channel_cases(files: Sequence[Path]) -> Cases | None:
    """Group nnU-Net-style files ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... into cases ``CASE.nii.gz``.

    None when some file is not named that way; a case whose channel numbers have gaps is left out.
    """
    matches = [CHANNEL_FILE.match(path.name) for path in files]
    if not files or not all(matches):
        return None
    grouped: dict[str, dict[int, Path]] = {}
    for path, match in zip(files, matches):
        grouped.setdefault(match["case"] + match["suffix"], {})[int(match["channel"])] = path
    cases, left_out = {}, []
    for name, channels in sorted(grouped.items()):
        numbers = sorted(channels)
        if numbers != list(range(len(numbers))):
            found = ", ".join(f"{n:04d}" for n in numbers)
            reason = f"{name}: channel files {found} found; they must be numbered 0000, 0001, ... without gaps"
            left_out.append((channels[numbers[0]], reason))
        else:
            cases[name] = [channels[n] for n in numbers]
    return cases, left_out


def segment_file(
    model: SegmentTask, source: Source, target: Path, progress: bool = False, notes: list[str] | None = None
) -> Path:
    """Segment one scan (see :func:`segment_volume`) into the label map file ``target``; returns the file written."""
    labels = segment_volume(model, source, progress=progress, notes=notes)
    return write_volume(labels, target, dtype=labels.dtype)


@dataclass(frozen=True)
class SegmentRun:
    """What was segmented: the label maps written, the scans skipped with their reason, the report (folders)."""

    written: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    report: Path | None = None
    notes: list[str] = field(default_factory=list)  # about scans that do not look like the training modality


def segment_folder(
    model: SegmentTask,
    scans: Sequence[Path] | dict[str, list[Path]],
    output: Path,
    checkpoint: str | Path,
    progress: bool = False,
    skipped: Sequence[tuple[Path, str]] = (),
) -> SegmentRun:
    """Segment scans into the folder ``output``; a scan that fails is skipped (added to ``skipped``).

    ``scans``: files, each written under its own name, or ``{output name: channel files}`` (multi-channel cases).
    Writes ``output/segment_report.json``: ``{"checkpoint", "segmented": [file names], "skipped": [{"scan",
    "reason"}]}``.
    """
    jobs = list(scans.items()) if isinstance(scans, dict) else [(path.name, [path]) for path in scans]
    written, skipped, notes = [], list(skipped), []
    for name, paths in tqdm(jobs, desc="segmenting", unit="scan", disable=not progress):
        try:
            written.append(segment_file(model, paths, output / name, notes=notes))
        except SCAN_ERRORS as error:
            skipped.append((paths[0], one_line(error)))
    report = {
        "checkpoint": str(checkpoint),
        "segmented": [p.name for p in written],
        "skipped": [{"scan": str(p), "reason": reason} for p, reason in skipped],
        "notes": notes,
    }
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / REPORT_NAME, lambda handle: handle.write(json.dumps(report, indent=1) + "\n"), "w")
    return SegmentRun(written, skipped, output / REPORT_NAME, notes)


def segment_paths(
    checkpoint: str | Path, source: Source, output: Path, progress: bool = True, channels: Sequence[str] = ()
) -> SegmentRun:
    """Segment ``source`` (a scan, a DICOM series folder, a scan's channel files, or a folder of scans) into
    ``output``.

    A single scan is written to the file ``output``; any failure raises. A folder of scans goes to the folder
    ``output`` under the same file names, skipping the scans that fail: see :func:`segment_folder`. For a
    multi-channel model, a folder of nnU-Net-style channel files (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``)
    is segmented case by case into ``CASE.nii.gz``; with ``channels`` names, files ``<subject>_<name>.<ext>``
    into ``<subject>.<ext>`` (:func:`named_channel_cases`).
    """
    model = load_segmenter(checkpoint)
    paths = source_paths(source)
    folders = [p for p in paths if p.is_dir()]
    if len(paths) > 1 and folders:
        raise VolumeError(f"{folders[0]}: several inputs are the channel files of one scan; give files, not folders")
    files = input_files(paths[0]) if folders else []
    if not files:  # one scan: a file, a DICOM series folder, or the channel files of one scan
        volume_format(output)  # a single scan needs an output file name with a volume suffix
        notes: list[str] = []
        return SegmentRun([segment_file(model, paths, output, progress, notes)], notes=notes)
    source = paths[0]
    if output.exists() and not output.is_dir():
        raise VolumeError(f"{output}: {source} is a folder of {len(files)} scans, so -o must be a folder")
    if output.resolve() == source.resolve():
        raise VolumeError(f"{output}: the input folder itself; write the label maps to another folder")
    if channels:
        cases: Cases | None = named_channel_cases(files, channels)
    else:
        cases = numbered_channel_cases(files) if model.config.in_channels > 1 else None
    if cases is not None:
        return segment_folder(model, cases[0], output, checkpoint, progress, skipped=cases[1])
    return segment_folder(model, files, output, checkpoint, progress)
