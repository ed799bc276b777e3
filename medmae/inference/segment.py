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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, SpatialResample
from tqdm import tqdm

from medmae.data.seg_datamodule import run_pipeline
from medmae.data.transforms import IntensityConfig, preprocessing_transforms
from medmae.io.readers import read_volume, require_signal, volume_format
from medmae.io.volume import Volume, VolumeError
from medmae.io.writers import write_volume
from medmae.models.checkpoint import CheckpointError, checkpoint_task, load_checkpoint
from medmae.tasks.segment import GEOMETRY_KEYS, TASK_NAME, SegmentTask

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def load_segmenter(path: str | Path) -> SegmentTask:
    """The fine-tuned model of a ``medmae finetune`` checkpoint, in eval mode, on the CPU."""
    checkpoint = load_checkpoint(path)
    task = checkpoint_task(checkpoint)
    if task != TASK_NAME:
        raise CheckpointError(
            f"{path}: this is a {task or 'non-medmae'} checkpoint; expected a 'segment' one (from `medmae finetune`)"
        )
    hparams = dict(checkpoint["hyper_parameters"])
    missing = [k for k in GEOMETRY_KEYS if k not in hparams]
    if missing:
        raise CheckpointError(
            f"{path}: no preprocessing record {missing} in the checkpoint; it was not written by a "
            "`medmae finetune` run that reached training"
        )
    names = set(inspect.signature(SegmentTask.__init__).parameters) - {"self"}
    model = SegmentTask(**{**{k: v for k, v in hparams.items() if k in names}, "pretrained": None})
    model.hparams.update({k: hparams[k] for k in GEOMETRY_KEYS})
    model.load_state_dict(checkpoint["state_dict"], strict=True)
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
            f"{model.config.in_channels}"
        )
    logits = model.predict_logits(image.as_tensor()[None].to(model.device), progress=progress)
    return MetaTensor(torch.softmax(logits[0].float(), 0).cpu(), affine=image.affine)


def to_input_grid(probabilities: MetaTensor, reference: Volume) -> np.ndarray:
    """Resample ``(classes, ...)`` probabilities onto ``reference``'s grid and take the arg-max ``(I, J, K)``."""
    resampled = SpatialResample(mode="bilinear", padding_mode="border", align_corners=False)(
        probabilities,
        dst_affine=torch.as_tensor(reference.affine, dtype=torch.float64),
        spatial_size=reference.spatial_shape,
    )
    return torch.as_tensor(resampled).argmax(0).numpy()


def label_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ``num_classes`` labels."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def segment_volume(model: SegmentTask, path: str | Path, progress: bool = False) -> Volume:
    """Segment one scan (file or DICOM folder); returns the label map ``(1, I, J, K)`` on its grid."""
    reference = read_volume(path)
    require_signal(reference)
    image = run_pipeline(inference_transforms(model.hparams), {"image": str(path)}, str(path))["image"]
    labels = to_input_grid(predict_probabilities(model, image, progress), reference)
    return reference.with_array(labels[None].astype(label_dtype(model.hparams.num_classes)))


def input_files(folder: Path) -> list[Path]:
    """Volume files directly inside ``folder`` (empty when it is a DICOM series folder)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES))


def segment_files(model: SegmentTask, pairs: Sequence[tuple[Path, Path]], progress: bool = False) -> list[Path]:
    """Segment ``(input scan, output file)`` pairs with one model; a progress bar over scans when ``progress``."""
    written = []
    for source, target in tqdm(pairs, desc="segmenting", unit="scan", disable=not progress or len(pairs) < 2):
        labels = segment_volume(model, source, progress=progress and len(pairs) == 1)
        written.append(write_volume(labels, target, dtype=labels.dtype))
    return written


def segment_paths(checkpoint: str | Path, source: Path, output: Path, progress: bool = True) -> list[Path]:
    """Segment ``source`` (a scan, a DICOM series folder, or a folder of scans) into ``output``.

    A single scan is written to the file ``output``; a folder of scans to the folder ``output`` under the
    same file names. Returns the files written.
    """
    model = load_segmenter(checkpoint)
    files = input_files(source) if source.is_dir() else []
    if not files:
        volume_format(output)  # a single scan needs an output file name with a volume suffix
        return segment_files(model, [(source, output)], progress)
    if output.exists() and not output.is_dir():
        raise VolumeError(f"{output}: {source} is a folder of {len(files)} scans, so -o must be a folder")
    return segment_files(model, [(path, output / path.name) for path in files], progress)
