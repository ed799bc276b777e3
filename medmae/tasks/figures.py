"""Pictures of what the MAE reconstructs: orthogonal mid-slices of input, masked input and reconstruction."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from medmae.models.patching import patch_mask_to_voxels

VIEWS = ("axial", "coronal", "sagittal")


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a RAS ``(X, Y, Z)`` volume, oriented for display."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def reconstruction_figure(
    volume: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray, title: str = ""
) -> plt.Figure:
    """A 3x3 grid: rows are views, columns input / masked input / reconstruction. Inputs are ``(X, Y, Z)``."""
    low, high = np.percentile(volume, [1, 99])
    figure, axes = plt.subplots(3, 3, figsize=(9, 9))
    columns = (("input", volume), ("masked input", masked), ("reconstruction", reconstruction))
    for col, (name, data) in enumerate(columns):
        for row, image in enumerate(mid_slices(data)):
            axis = axes[row, col]
            axis.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name)
            if col == 0:
                axis.set_ylabel(VIEWS[row])
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


@torch.no_grad()
def render_reconstruction(task: L.LightningModule, volume: torch.Tensor, title: str, path: Path) -> plt.Figure:
    """Run the task's MAE on one ``(1, C, D, H, W)`` volume with a fixed mask and save the figure to ``path``."""
    model = task.model
    generator = torch.Generator(device=volume.device).manual_seed(0)
    was_training = model.training
    model.eval()
    output = model(volume, None, generator)
    model.train(was_training)
    recon = model.reconstruct(volume, output)
    grid = model.encoder.check_input(volume)
    voxel_mask = patch_mask_to_voxels(output.mask, grid, model.encoder.patch_size)[0, 0]
    first = volume[0, 0].float().cpu().numpy()
    masked = np.where(voxel_mask.cpu().numpy(), np.nan, first)
    figure = reconstruction_figure(first, masked, recon[0, 0].float().cpu().numpy(), title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return figure


def run_folder(trainer: L.Trainer) -> Path:
    """The logger's version folder (the root dir without a logger); unlike ``trainer.log_dir`` this needs
    no collective call, so it is safe on one rank of a distributed run."""
    logger = trainer.logger
    folder = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(folder or trainer.default_root_dir)


class ReconstructionFigures(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), save a reconstruction PNG under
    ``<run folder>/figures/`` and send it to TensorBoard or wandb when those loggers are used.

    The volume shown is the first validation crop (the first training crop when there is no validation).
    """

    def __init__(self, every_n_steps: int = 200) -> None:
        self.every_n_steps = every_n_steps
        self.sample: torch.Tensor | None = None
        self.saved: list[Path] = []

    def _pick_sample(self, trainer: L.Trainer) -> torch.Tensor | None:
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, "val_dataset", None) or getattr(datamodule, "train_dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        return torch.as_tensor(dataset[0]["image"])[None]

    def _render(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.sample is None:
            self.sample = self._pick_sample(trainer)
            if self.sample is None:
                return
        step = trainer.global_step
        path = run_folder(trainer) / "figures" / f"reconstruction_step{step:06d}.png"
        figure = render_reconstruction(task, self.sample.to(task.device), f"step {step}", path)
        self.saved.append(path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):  # TensorBoard
                experiment.add_figure("reconstruction", figure, global_step=step)
            elif type(logger).__name__ == "WandbLogger":
                logger.log_image(key="reconstruction", images=[str(path)], step=step)
        plt.close(figure)

    def on_train_batch_end(self, trainer: L.Trainer, task: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self._render(trainer, task)

    def on_train_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self._render(trainer, task)
