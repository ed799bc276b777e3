"""Distributed pretraining on CPU (gloo): the CLI runs 2 processes, ranks see disjoint scans, gradients
averaged over ranks equal the single-process gradient of the same global batch, and a 2-process run
resumes on 1 process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from medmae.data.datamodule import PretrainDataModule
from medmae.models import build_mae, mae_config
from medmae.models.masking import MaskingConfig

ROOT = Path(__file__).resolve().parents[1]
MEDMAE = Path(sys.executable).parent / "medmae"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(MEDMAE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.real_data
def test_ddp_two_processes_then_resume_on_one(hippo_manifest: Path, tmp_path: Path) -> None:
    common = [
        "pretrain",
        "--config",
        "configs/pretrain/tiny.yaml",
        "--data.manifest",
        str(hippo_manifest),
        "--data.batch_size",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.val_check_interval",
        "2",
    ]
    ddp = run_cli(*common, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    last = next(tmp_path.glob("logs/version_*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 4

    single = run_cli(*common, "--trainer.devices", "1", "--trainer.max_steps", "6", "--ckpt_path", str(last))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "finished at step 6" in single.stdout


@pytest.mark.real_data
def test_ranks_see_disjoint_scans(hippo_manifest: Path) -> None:
    datamodule = PretrainDataModule(str(hippo_manifest), roi_size=[32, 32, 32], spacing=None, val_fraction=0.25)
    datamodule.setup("fit")
    dataset = datamodule.train_dataset
    seen = []
    for rank in (0, 1):  # the sampler Lightning injects under DDP
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen.append([dataset.volumes[i % len(dataset.volumes)][0] for i in sampler])
    assert len(dataset) == 12 and len(seen[0]) == len(seen[1]) == 6
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == {scan for scan, _ in dataset.volumes}


def _ddp_worker(rank: int, store: str, volume: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    # a file store, not a TCP port: a port picked free can be taken by another test's run before gloo binds it,
    # and a rank that meets the wrong peer waits forever; the timeout turns any hang into a failure
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_mae(mae_config("tiny", patch_size=8)))
    half = slice(rank * 2, rank * 2 + 2)
    model(volume[half], mask[half]).loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, out)
    dist.destroy_process_group()


def test_ddp_gradient_equals_single_process_global_batch(tmp_path: Path) -> None:
    volume = torch.randn(4, 1, 16, 16, 16)
    mask = MaskingConfig().sample(4, (2, 2, 2), torch.Generator().manual_seed(0))
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), volume, mask, str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = build_mae(mae_config("tiny", patch_size=8))
    single(volume, mask).loss.backward()
    ddp_grads = torch.load(out, weights_only=True)
    for name, parameter in single.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(ddp_grads[name], parameter.grad, atol=1e-6, rtol=1e-4, msg=name)
