"""End-to-end pretraining on real hippocampus crops: loss falls, resume continues, the CLI runs."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from medmae.cli import main
from medmae.data.datamodule import PretrainDataModule
from medmae.tasks.callbacks import StepRunProgressBar
from medmae.tasks.pretrain import MAEPretrainTask

ROOT = Path(__file__).resolve().parents[1]


def tiny_task(**overrides: object) -> MAEPretrainTask:
    settings = {"preset": "tiny", "patch_size": 8, "norm_pix_loss": False, "lr": 1e-3, "warmup_steps": 5}
    return MAEPretrainTask(**{**settings, **overrides})


def data(manifest: Path, **overrides: object) -> PretrainDataModule:
    settings = {"roi_size": [32, 32, 32], "spacing": None, "batch_size": 4, "val_fraction": 0.25, "seed": 0}
    return PretrainDataModule(str(manifest), **{**settings, **overrides})


def trainer(root: Path, max_steps: int, **overrides: object) -> L.Trainer:
    settings = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "default_root_dir": str(root),
        "logger": CSVLogger(str(root), name="logs"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**settings, **overrides})


@pytest.mark.real_data
def test_tiny_model_loss_falls_on_real_scans(hippo_manifest: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    task, datamodule = tiny_task(), data(hippo_manifest)
    run = trainer(tmp_path, 50, val_check_interval=50, check_val_every_n_epoch=None)
    before = run.validate(task, datamodule=datamodule, verbose=False)[0]["val/loss"]
    run.fit(task, datamodule=datamodule)
    after = run.validate(task, datamodule=datamodule, verbose=False)[0]["val/loss"]
    assert run.global_step == 50
    assert after < 0.9 * before, (before, after)
    figures = list(Path(run.log_dir).glob("figures/reconstruction_step*.png"))
    assert figures and figures[0].stat().st_size > 1000


class StartStep(L.Callback):
    def on_train_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self.step = trainer.global_step
        self.adam_steps = [float(s["step"]) for s in trainer.optimizers[0].state.values()][:1]
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.real_data
def test_resume_restores_step_optimizer_and_schedule(hippo_manifest: Path, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    first = trainer(tmp_path / "a", 6)
    first.fit(tiny_task(), datamodule=data(hippo_manifest, val_fraction=0.0))
    last = Path(first.checkpoint_callback.last_model_path)
    assert last.is_file()
    lr_at_6 = first.optimizers[0].param_groups[0]["lr"]

    probe = StartStep()
    second = trainer(tmp_path / "b", 10, callbacks=[probe])
    second.fit(tiny_task(), datamodule=data(hippo_manifest, val_fraction=0.0), ckpt_path=str(last))
    assert probe.step == 6
    assert probe.adam_steps == [6.0]
    assert probe.lr == pytest.approx(lr_at_6)
    assert second.global_step == 10


@pytest.mark.real_data
def test_cli_pretrain_with_overrides_and_export(
    hippo_manifest: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--trainer.default_root_dir`` alone moves the checkpoints too (the config's logger follows it)."""
    monkeypatch.chdir(tmp_path)  # where the config's own folder (runs/pretrain-tiny) would appear
    code = main(
        [
            "pretrain",
            "--config",
            str(ROOT / "configs/pretrain/tiny.yaml"),
            "--data.manifest",
            str(hippo_manifest),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    assert not (tmp_path / "runs").exists()
    last = next(tmp_path.glob("run/logs/version_*/checkpoints/last.ckpt"))
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["roi_size"] == [32, 32, 32]
    assert main(["export", str(last), "-o", str(tmp_path / "enc" / "encoder.pt")]) == 0
    assert (tmp_path / "enc" / "encoder.safetensors").is_file()
    assert "last checkpoint" in capsys.readouterr().out


@pytest.mark.real_data
def test_unreadable_scan_is_skipped_not_fatal(hippo_manifest: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    manifest = tmp_path / "with_broken.jsonl"
    manifest.write_text(hippo_manifest.read_text() + f'{{"id": "broken", "image": "{broken}", "modality": "MR"}}\n')
    datamodule = data(manifest)
    datamodule.setup("fit")
    assert [scan for scan, _ in datamodule.skipped] == ["broken"]
    assert "broken.nii.gz" in datamodule.skipped[0][1]
    assert len(datamodule.train_dataset.volumes) + len(datamodule.val_dataset.volumes) == 16


@pytest.mark.real_data
def test_wandb_offline_needs_no_network(hippo_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a network attempt fails at once
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code = main(
        [
            "pretrain",
            "--config",
            str(ROOT / "configs/pretrain/tiny.yaml"),
            "--wandb",
            "offline",
            "--data.manifest",
            str(hippo_manifest),
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    wandb = sys.modules["wandb"]
    assert wandb.run is None  # the run was finished: a later run in this process starts its own


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretrain_config_instantiates(config: Path, hippo_manifest: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        MAEPretrainTask,
        PretrainDataModule,
        args=["--config", str(config), "--data.manifest", str(hippo_manifest), "--trainer.logger", "false"],
        run=False,
        save_config_callback=None,
    )
    patch = cli.model.config.patch_size
    assert all(r % p == 0 for r, p in zip(cli.datamodule.roi_size, patch))


@pytest.mark.real_data
def test_a_step_limited_run_shows_its_epoch_without_minus_two(hippo_manifest: Path, tmp_path: Path) -> None:
    """Lightning's rich bar reads ``Epoch 0/-2`` when ``max_epochs`` is -1 (runs limited by steps); ours reads
    ``Epoch 0``, and a run limited by epochs keeps Lightning's ``Epoch 0/1``. (Without ``rich`` Lightning uses its
    tqdm bar, which has no such label; ``rich`` is in the ``dev`` extra so this runs in CI.)"""
    pytest.importorskip("rich")
    for max_steps, max_epochs, expected in ((2, None, "Epoch 0"), (-1, 2, "Epoch 0/1")):
        run = trainer(tmp_path, max_steps, max_epochs=max_epochs, enable_progress_bar=True, limit_train_batches=1)
        run.fit(tiny_task(), datamodule=data(hippo_manifest, val_fraction=0.0))
        bar = run.progress_bar_callback
        assert isinstance(bar, StepRunProgressBar)
        assert bar._get_train_description(0).strip() == expected


def gradient_norm(optimizer: torch.optim.Optimizer) -> float:
    grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class GradientNorms(L.Callback):
    """The total gradient norm before Lightning's clipping and the one the optimizer steps with, and whether
    the optimizer is fused."""

    def on_train_start(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        self.before: list[float] = []
        self.norms: list[float] = []
        optimizer = trainer.optimizers[0]
        self.fused = bool(optimizer.defaults["fused"])
        # the closure inside step() computes the gradients, so they are read after the step
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.norms.append(gradient_norm(optimizer)))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, task: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.before.append(gradient_norm(optimizer))


@pytest.mark.real_data
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
def test_mixed_precision_runs_clip_their_gradients(precision: str, hippo_manifest: Path, tmp_path: Path) -> None:
    """bf16-mixed with gradient clipping (the GPU default of every config) used to stop at its first step:
    Lightning refuses to clip for a fused optimizer. On a CPU no precision uses a gradient scaler, so the
    AdamW stays fused (with a scaler it is not: ``tests/test_optim.py``)."""
    clip = 1e-3
    norms = GradientNorms()
    run = trainer(tmp_path, 3, precision=precision, gradient_clip_val=clip, callbacks=[norms], limit_val_batches=0)
    run.fit(tiny_task(), datamodule=data(hippo_manifest))
    assert run.global_step == 3 and norms.fused
    assert min(norms.before) > 10 * clip  # so clipping had something to do
    assert len(norms.norms) == 3 and all(norm <= clip * 1.001 for norm in norms.norms), norms.norms
