"""kill -9 in the middle of pretraining, then resume: the last checkpoint is complete and training goes on
from its step with optimizer and schedule state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MEDMAE = Path(sys.executable).parent / "medmae"


@pytest.mark.real_data
def test_kill_nine_then_resume(hippo_manifest: Path, tmp_path: Path) -> None:
    common = [
        str(MEDMAE),
        "pretrain",
        "--config",
        "configs/pretrain/tiny.yaml",
        "--data.manifest",
        str(hippo_manifest),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.val_check_interval",
        "4",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*common, "--trainer.max_steps", "100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "logs" / "version_0" / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not list(checkpoints.glob("best-*.ckpt")):
            time.sleep(0.5)
        time.sleep(1.5)  # let it run on and (maybe) be in the middle of the next save
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    last = checkpoints / "last.ckpt"
    assert last.is_file(), "no checkpoint was written before the kill"
    saved = torch.load(last, weights_only=True)  # complete: writes are atomic
    step = saved["global_step"]
    assert step >= 4 and step % 4 == 0
    assert not [p for p in checkpoints.iterdir() if p.suffix != ".ckpt"], "temporary files left behind"

    resumed = subprocess.run(
        [*common, "--trainer.max_steps", str(step + 4), "--ckpt_path", str(last)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"finished at step {step + 4}" in resumed.stdout
    final = torch.load(checkpoints.parent.parent / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == step + 4
    adam_state = next(iter(final["optimizer_states"][0]["state"].values()))
    assert float(adam_state["step"]) == step + 4
    assert final["lr_schedulers"][0]["last_epoch"] == step + 4
