"""Programmatic fine-tuning runs: one ``fit_segmenter`` call per experiment, and the built-in demo's step.

``run_segmentation_demo`` fine-tunes the tiny UNETR on a few labelled scans of a manifest, predicts a
held-out scan on its own grid and saves the predicted segmentation beside the truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from medmae.data.seg_datamodule import SegDataModule
from medmae.evaluation.seg_metrics import score_case
from medmae.inference.segment import load_segmenter, segment_volume
from medmae.io.readers import read_volume
from medmae.tasks.segment import SegmentTask

TINY_MODEL = {"preset": "tiny", "patch_size": 8, "feature_layers": [1, 2], "feature_size": 8}


def fit_segmenter(
    workdir: Path,
    model: dict[str, Any],
    data: dict[str, Any],
    max_steps: int,
    val_every: int | None = None,
    seed: int = 0,
) -> tuple[Path, SegDataModule]:
    """Fine-tune ``SegmentTask(**model)`` on ``SegDataModule(**data)`` on the CPU, quietly.

    Returns:
        The best checkpoint by validation Dice (the last one when there is no validation split) and the
        set-up datamodule (its ``splits`` name the test scans).
    """
    L.seed_everything(seed, verbose=False)
    datamodule = SegDataModule(**data)
    task = SegmentTask(**model)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        default_root_dir=str(workdir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=val_every or max_steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=datamodule)
    callback = trainer.checkpoint_callback
    best = callback.best_model_path or callback.last_model_path
    return Path(best), datamodule


def overlay_figure(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, title: str, path: Path) -> Path:
    """Save the middle slices (axial, coronal, sagittal) of ``(X, Y, Z)`` arrays: truth and prediction over the
    image. The slice through the most foreground is used along each axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def slices(volume: np.ndarray, index: tuple[int, int, int]) -> list[np.ndarray]:
        x, y, z = index
        return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]

    centre = (
        tuple(int(c) for c in np.round(np.argwhere(truth > 0).mean(0)))
        if truth.any()
        else tuple(s // 2 for s in truth.shape)
    )
    figure, axes = plt.subplots(2, 3, figsize=(9, 6))
    low, high = np.percentile(image, [1, 99])
    for row, (name, labels) in enumerate((("truth", truth), ("prediction", prediction))):
        for col, (img, lab) in enumerate(zip(slices(image, centre), slices(labels, centre))):
            axis = axes[row, col]
            axis.imshow(img, cmap="gray", vmin=low, vmax=high, origin="lower")
            axis.imshow(
                np.ma.masked_equal(lab, 0),
                cmap="tab10",
                vmin=0,
                vmax=9,
                alpha=0.5,
                origin="lower",
                interpolation="nearest",
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(name)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_segmentation_demo(workdir: Path, pretrain_ckpt: Path, manifest: Path, max_steps: int) -> dict[str, Any]:
    """Fine-tune the pretrained tiny encoder on 5 labelled scans, segment one held-out scan, draw it.

    Args:
        workdir: where checkpoints and the figure go.
        pretrain_ckpt: a ``medmae pretrain`` checkpoint of the tiny preset with patch 8.
        manifest: labelled scans (the demo bundles ~20 hippocampus crops); one in five is held out.
        max_steps: fine-tuning steps.

    Returns:
        ``{"figure", "dice" (mean over foreground classes), "dice_per_class", "checkpoint", "scan", "train_scans"}``.
    """
    workdir = Path(workdir)
    data = {
        "manifest": str(manifest),
        "num_classes": 3,
        "num_labeled": 5,
        "roi_size": [32, 32, 32],
        "spacing": None,
        "batch_size": 2,
        "test_fraction": 0.2,
        "val_fraction": 0.1,
        "preprocess_workers": 1,
    }
    model = {
        **TINY_MODEL,
        "num_classes": 3,
        "pretrained": str(pretrain_ckpt),
        "lr": 2e-3,
        "warmup_steps": max(1, max_steps // 10),
    }
    checkpoint, datamodule = fit_segmenter(workdir / "finetune", model, data, max_steps, max(1, max_steps // 3))
    record = datamodule.splits.test[0]
    labels = segment_volume(load_segmenter(checkpoint), record.image[0])
    truth = read_volume(record.label)
    scores = score_case(labels, truth, 3, record.id)
    dice = float(np.nanmean(scores.dice))
    figure = overlay_figure(
        read_volume(record.image[0]).array[0],
        truth.array[0],
        labels.array[0],
        f"{record.id} (held out): Dice {dice:.2f} after fine-tuning on {len(datamodule.splits.train)} scans",
        workdir / "segmentation.png",
    )
    return {
        "figure": figure,
        "dice": dice,
        "dice_per_class": scores.dice,
        "checkpoint": checkpoint,
        "scan": record.id,
        "train_scans": [r.id for r in datamodule.splits.train],
    }
