"""Settings a user changes on the command line train, with a logger on: Lightning merges the model's and the
data's hyperparameters when it logs them, and refuses a key that both have with different values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmae.cli import main
from medmae.tasks.pretrain import MAEPretrainTask

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = [
    "--trainer.max_steps",
    "1",
    "--trainer.val_check_interval",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]

pytestmark = pytest.mark.real_data


def logged_lines(root: Path) -> set[str]:
    """The top-level lines of the one ``hparams.yaml`` the logger wrote under ``root``."""
    (hparams,) = root.rglob("hparams.yaml")
    return set(hparams.read_text().splitlines())


def test_seeds_and_unclipped_mr_intensities_set_on_the_command_line_train(hippo_manifest: Path, tmp_path: Path) -> None:
    pretrain_dir = tmp_path / "pretrain"
    run = ["--trainer.default_root_dir", str(pretrain_dir), "--trainer.logger.init_args.save_dir", str(pretrain_dir)]
    config = ["--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--data.manifest", str(hippo_manifest)]
    assert main(["pretrain", *config, "--data.seed", "3", "--model.mask_seed", "4", *run, *ONE_STEP]) == 0
    assert {"seed: 3", "mask_seed: 4"} <= logged_lines(pretrain_dir)

    (checkpoint,) = pretrain_dir.rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["hyper_parameters"]["mask_seed"] == 4
    restore_dir = tmp_path / "restore"
    run = ["--trainer.default_root_dir", str(restore_dir), "--trainer.logger.init_args.save_dir", str(restore_dir)]
    config = ["--config", str(ROOT / "configs/restore/tiny.yaml"), "--data.manifest", str(hippo_manifest)]
    seeds = ["--data.seed", "3", "--model.noise_seed", "5", "--model.pretrained", str(checkpoint)]
    assert main(["finetune-restore", *config, *seeds, *run, *ONE_STEP]) == 0
    assert {"seed: 3", "noise_seed: 5"} <= logged_lines(restore_dir)

    unclipped_dir = tmp_path / "unclipped"
    run = ["--trainer.default_root_dir", str(unclipped_dir), "--trainer.logger.init_args.save_dir", str(unclipped_dir)]
    denoiser = ["--model.mode", "denoise", "--model.mr_noise_scale", "robust", "--data.mr_percentiles", "[0, 100]"]
    assert main(["finetune-restore", *config, "--model.pretrained", str(checkpoint), *denoiser, *run, *ONE_STEP]) == 0
    (denoise_ckpt,) = unclipped_dir.rglob("last.ckpt")
    hparams = torch.load(denoise_ckpt, weights_only=False)["hyper_parameters"]
    assert hparams["mr_percentiles"] == [0.0, 100.0] and hparams["mr_noise_scale"] == "robust"  # repair reads them


def test_the_masking_generator_follows_mask_seed() -> None:
    draws = []
    for seed in (0, 0, 1):
        task = MAEPretrainTask(preset="tiny", patch_size=8, mask_seed=seed)
        draws.append(torch.rand(8, generator=task.mask_generator()))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
