"""Dice and 95th-percentile Hausdorff distance per class (MONAI metrics), per case and on average.

Predictions and truths are paired by case name: the file name without its volume suffix.

Conventions (as in the Medical Segmentation Decathlon / nnU-Net evaluations): background is not scored;
a class absent from both prediction and truth has Dice NaN and is left out of means; HD95 is in
millimetres (the truth's voxel spacing) and NaN when the class is missing from either map.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from medmae.io.atomic import temporary_beside
from medmae.io.readers import read_volume
from medmae.io.volume import Volume, VolumeError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class CaseScores:
    """Scores of one case: ``dice[c - 1]`` and ``hd95[c - 1]`` for class ``c = 1 .. classes-1``."""

    case: str
    dice: list[float]
    hd95: list[float]


def label_scores(
    prediction: np.ndarray, truth: np.ndarray, num_classes: int, spacing: tuple[float, ...], hd95: bool = True
) -> tuple[list, list]:
    """Dice and HD95 (mm; all NaN unless ``hd95``) of classes ``1 .. num_classes-1`` for two ``(I, J, K)``
    integer label maps."""
    pred = one_hot(torch.as_tensor(prediction.astype(np.int64))[None, None], num_classes)
    true = one_hot(torch.as_tensor(truth.astype(np.int64))[None, None], num_classes)
    dice = compute_dice(pred, true, include_background=False, ignore_empty=True)[0]
    present = (pred.flatten(2).any(2) & true.flatten(2).any(2))[0, 1:]
    hd95 = torch.full_like(dice, float("nan"))
    if present.any():
        with warnings.catch_warnings():  # MONAI warns for each class missing from a map: those are n/a here
            warnings.filterwarnings("ignore", message="the (prediction|ground truth) of class", category=UserWarning)
            warnings.filterwarnings("ignore", message="monai.metrics.utils get_mask_edges", category=FutureWarning)
            distances = compute_hausdorff_distance(
                pred, true, include_background=False, percentile=95, spacing=list(spacing)
            )
        hd95 = torch.where(present, distances[0].to(hd95.dtype), hd95)
    return [float(v) for v in dice], [float(v) for v in hd95]


def score_case(prediction: Volume, truth: Volume, num_classes: int, case: str, hd95: bool = True) -> CaseScores:
    """Scores of one prediction against its truth; both must be single-channel on the same grid."""
    aligned = prediction.aligned_to(truth)  # the same voxels stored in another axis order count as the same grid
    if aligned is None:
        raise VolumeError(
            f"{prediction.path}: prediction is on another grid than its truth {truth.path} "
            f"({prediction.grid_text()} vs {truth.grid_text()}); predict on the truth's image grid"
        )
    prediction = aligned
    for volume in (prediction, truth):
        if volume.num_channels != 1:
            raise VolumeError(f"{volume.path}: a label map must have one channel, got {volume.num_channels}")
        values = np.unique(volume.array)
        if values.min() < 0 or values.max() >= num_classes or not np.all(values == np.round(values)):
            outside = values[(values < 0) | (values >= num_classes)].tolist() or "non-integer"
            raise VolumeError(
                f"{volume.path}: label values {outside} "
                f"outside 0 .. {num_classes - 1}; pass --num-classes including background"
            )
    dice, distances = label_scores(prediction.array[0], truth.array[0], num_classes, truth.spacing, hd95)
    return CaseScores(case, dice, distances)


def case_name(path: Path) -> str:
    """A file's name without its volume suffix: ``case_001.nii.gz`` and ``case_001.nrrd`` are case ``case_001``."""
    suffix = next((s for s in VOLUME_SUFFIXES if path.name.lower().endswith(s)), "")
    return path.name[: len(path.name) - len(suffix)]


def case_files(folder: Path) -> dict[str, Path]:
    """Label-map files of a folder by case name (file name without its volume suffix).

    Raises:
        VolumeError: not a folder, or two files of one case (``a.nii.gz`` and ``a.nrrd``).
    """
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder of label maps")
    files: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES)):
        if case_name(path) in files:
            raise VolumeError(
                f"{folder}: two label maps of case {case_name(path)!r}: {files[case_name(path)].name}"
                f" and {path.name}; keep one"
            )
        files[case_name(path)] = path
    return files


def evaluate_folders(pred_dir: Path, truth_dir: Path, num_classes: int | None = None) -> list[CaseScores]:
    """Score every truth file against the prediction of the same file name.

    Args:
        num_classes: classes including background (default: 1 + the largest label in the truths).
    """
    truths = case_files(truth_dir)
    if not truths:
        raise VolumeError(f"{truth_dir}: no label maps ({', '.join(VOLUME_SUFFIXES)}) found")
    predictions = case_files(pred_dir)
    missing = sorted(set(truths) - set(predictions))
    if missing:
        unmatched = sorted(predictions[name].name for name in set(predictions) - set(truths))
        raise VolumeError(
            f"{pred_dir}: no prediction for {len(missing)} truth file(s), e.g. "
            f"{[truths[name].name for name in missing[:3]]}; unmatched predictions: {unmatched[:3] or 'none'}; "
            "a prediction must have its truth's file name (the volume suffix may differ)"
        )
    pairs = [(read_volume(predictions[name]), read_volume(path), truths[name].name) for name, path in truths.items()]
    if num_classes is None:
        num_classes = 1 + int(max(np.max(truth.array) for _, truth, _ in pairs))
    return [score_case(pred, truth, num_classes, name) for pred, truth, name in pairs]


def mean_scores(cases: list[CaseScores]) -> CaseScores:
    """NaN-ignoring mean per class over cases (NaN for a class that is n/a in every case)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        dice = np.nanmean(np.array([c.dice for c in cases], dtype=float), axis=0) if cases else np.array([])
        hd95 = np.nanmean(np.array([c.hd95 for c in cases], dtype=float), axis=0) if cases else np.array([])
    return CaseScores("mean", dice.tolist(), hd95.tolist())


def score_rows(cases: list[CaseScores]) -> list[dict[str, object]]:
    """One row per case and a final ``mean`` row: ``dice_c``, ``hd95_c`` per class and their means."""
    rows = []
    for scores in [*cases, mean_scores(cases)]:
        row: dict[str, object] = {"case": scores.case}
        for index, (dice, hd95) in enumerate(zip(scores.dice, scores.hd95), start=1):
            row[f"dice_{index}"], row[f"hd95_{index}"] = dice, hd95
        row["dice_mean"] = float(np.nanmean(scores.dice)) if not np.all(np.isnan(scores.dice)) else math.nan
        row["hd95_mean"] = float(np.nanmean(scores.hd95)) if not np.all(np.isnan(scores.hd95)) else math.nan
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, object]], path: Path) -> Path:
    """Write rows as CSV atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict[str, object]]) -> str:
    """A fixed-width text table (Dice with 3 decimals, HD95 in mm with 2)."""
    columns = list(rows[0])
    cells = [
        [str(row["case"])] + [f"{row[c]:.3f}" if c.startswith("dice") else f"{row[c]:.2f}" for c in columns[1:]]
        for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines).replace("nan", "n/a")
