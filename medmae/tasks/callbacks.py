"""Callbacks every task uses: best + last checkpoints, and the learning rate in the logs."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint


def checkpoint_callbacks(trainer: L.Trainer | None, monitor: str, mode: str = "min") -> list[L.Callback]:
    """``best-{step}.ckpt`` by ``monitor`` and ``last.ckpt`` (written at each validation and at the end);
    a learning-rate monitor when the trainer has a logger."""
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
    return callbacks
