"""Callbacks every task uses: best + last checkpoints, the learning rate in the logs, a step-aware progress bar."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar


class StepRunProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the ``Epoch 0/-2`` it shows for runs limited by ``max_steps``
    (where ``max_epochs`` is -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"


def checkpoint_callbacks(trainer: L.Trainer | None, monitor: str, mode: str = "min") -> list[L.Callback]:
    """``best-{step}.ckpt`` by ``monitor`` and ``last.ckpt`` (written at each validation and at the end);
    a learning-rate monitor when the trainer has a logger; :class:`StepRunProgressBar` in place of Lightning's
    rich progress bar."""
    best = ModelCheckpoint(
        filename="best-{step}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    callbacks: list[L.Callback] = [best]
    if trainer is not None and trainer.loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if trainer is not None and type(trainer.progress_bar_callback) is RichProgressBar:
        callbacks.append(StepRunProgressBar())
    return callbacks
