"""Running a task's LightningCLI from ``medmae`` subcommands."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI


def default_precision() -> str:
    """bf16 mixed precision on GPUs that support it, full fp32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def task_classes(name: str) -> tuple[type, type]:
    """The (LightningModule, LightningDataModule) classes of a task name."""
    if name == "pretrain":
        from medmae.data.datamodule import PretrainDataModule
        from medmae.tasks.pretrain import MAEPretrainTask

        return MAEPretrainTask, PretrainDataModule
    if name == "segment":
        from medmae.data.seg_datamodule import SegDataModule
        from medmae.tasks.segment import SegmentTask

        return SegmentTask, SegDataModule
    if name == "restore":
        from medmae.data.datamodule import PretrainDataModule
        from medmae.tasks.restore import MAERestoreTask

        return MAERestoreTask, PretrainDataModule
    raise ValueError(f"unknown task {name!r}")


def wandb_logger(mode: str, save_dir: str) -> object:
    """A WandbLogger; ``offline`` runs with no account or network (sync later with ``wandb sync``)."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install 'medmae[wandb]'") from None
    if mode == "offline":
        os.environ.setdefault("WANDB_MODE", "offline")
    return WandbLogger(project="medmae", save_dir=save_dir, offline=mode == "offline")


def fit_with_cli(
    task: str,
    argv: Sequence[str],
    ckpt_path: str | None = None,
    wandb: str | None = None,
) -> int:
    """Parse ``argv`` with LightningCLI for ``task`` and run ``trainer.fit``. Returns the exit code."""
    module_class, data_class = task_classes(task)
    trainer_defaults = {
        "precision": default_precision(),
        "default_root_dir": f"runs/{task}",
        "log_every_n_steps": 10,
    }
    usage_errors = io.StringIO()
    try:
        # argparse prints its whole usage before an error; keep only the error line (--help is untouched)
        with contextlib.redirect_stderr(usage_errors):
            cli = LightningCLI(
                module_class,
                data_class,
                args=list(argv),
                run=False,
                trainer_defaults=trainer_defaults,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": f"medmae {task}"},
            )
    except SystemExit as exit_:
        errors = [line for line in usage_errors.getvalue().splitlines() if line.startswith("error:")]
        if exit_.code:
            message = errors[-1].removeprefix("error: ") if errors else "invalid arguments"
            print(f"medmae: error: {task}: {message} (see `medmae {task} --help`)", file=sys.stderr)
        return int(exit_.code or 0)
    sys.stderr.write(usage_errors.getvalue())
    trainer = cli.trainer
    if wandb:
        trainer.loggers = [*trainer.loggers, wandb_logger(wandb, trainer.default_root_dir)]
    if ckpt_path is not None and ckpt_path != "last" and not Path(ckpt_path).is_file():
        print(f"medmae: error: {ckpt_path}: checkpoint not found", file=sys.stderr)
        return 2
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    print_run_summary(trainer)
    return 0


def print_run_summary(trainer: object) -> None:
    """Where the run's checkpoints, logs and figures are."""
    from medmae.tasks.figures import run_folder

    if not trainer.is_global_zero:
        return
    callback = trainer.checkpoint_callback
    print(f"\nfinished at step {trainer.global_step}")
    if callback is not None:
        print(f"  last checkpoint: {callback.last_model_path}")
        if callback.best_model_path:
            print(f"  best checkpoint: {callback.best_model_path} ({callback.monitor} = {callback.best_model_score})")
    print(f"  logs and figures: {run_folder(trainer)}")
