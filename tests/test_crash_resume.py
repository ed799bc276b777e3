"""kill -9 in the middle of pretraining, then resume: the last checkpoint is complete and training goes on
from its step with optimizer and schedule state. kill -9 in the middle of ``medmae preprocess``, then run it
again: only the unfinished scans are built, and the cache equals one built without interruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.cli import main
from medmae.data.cache_store import list_cached_ids, read_meta

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


def _preprocess_manifest_with_a_blocking_scan(tmp_path: Path, n_scans: int, blocking: int) -> tuple[Path, Path]:
    """A manifest of ``n_scans`` real hippocampus crops (absolute paths) whose scan number ``blocking`` is a FIFO.

    Reading the FIFO blocks until something writes into it: a run is then held after exactly ``blocking`` scans,
    at a point known in advance. Returns ``(manifest, the real file the FIFO stands for)``.
    """
    rows = [json.loads(line) for line in (ROOT / "data_manifests" / "hippocampus.jsonl").read_text().splitlines()]
    images = [(ROOT / "data_manifests" / row["image"]).resolve() for row in rows[:n_scans]]
    fifo = tmp_path / "archive" / images[blocking].name
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    manifest = tmp_path / "scans.jsonl"
    lines = [
        json.dumps({"id": row["id"], "image": str(fifo if i == blocking else image), "modality": "MR"})
        for i, (row, image) in enumerate(zip(rows, images))
    ]
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, images[blocking]


@pytest.mark.real_data
def test_kill_nine_during_preprocessing_then_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n_scans, blocking = 12, 7
    manifest, real_scan = _preprocess_manifest_with_a_blocking_scan(tmp_path, n_scans, blocking)
    cache, scans = tmp_path / "cache", tmp_path / "cache" / "scans"
    command = [str(MEDMAE), "preprocess", str(manifest), "--cache", str(cache), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None and len(list(scans.glob("*.json"))) < blocking:
            time.sleep(0.1)
        assert process.poll() is None, "the run ended before it was killed"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    finished, unfinished = ids[:blocking], ids[blocking:]
    assert list_cached_ids(cache) == sorted(finished)

    # what a kill in the middle of writing an entry leaves: the array's temporary file half written; or the
    # array renamed into place (here: another scan's array) and the description's temporary file half written
    some_array = (scans / f"{finished[0]}.npy").read_bytes()
    (scans / f".{unfinished[1]}.npy.k3j2l1m0").write_bytes(some_array[: len(some_array) // 2])
    (scans / f"{unfinished[2]}.npy").write_bytes(some_array)
    (scans / f".{unfinished[2]}.json.a8b7c6d5").write_text((scans / f"{finished[0]}.json").read_text()[:60])
    assert list_cached_ids(cache) == sorted(finished), "a half-written entry was taken as complete"
    assert all(read_meta(cache, scan_id) is None for scan_id in unfinished)

    (manifest.parent / "archive" / real_scan.name).unlink()  # the blocking scan becomes the real file
    shutil.copy2(real_scan, manifest.parent / "archive" / real_scan.name)
    stamps = {path.name: path.stat().st_mtime_ns for scan_id in finished for path in scans.glob(f"{scan_id}.*")}
    assert main(["preprocess", str(manifest), "--cache", str(cache), "--no-progress"]) == 0
    built, reused = n_scans - blocking, blocking
    assert f"{cache}: {built} built, {reused} reused, 0 failed" in capsys.readouterr().out
    assert json.loads((cache / "preprocess_report.json").read_text())["removed_temporaries"] == 2
    assert {name: (scans / name).stat().st_mtime_ns for name in stamps} == stamps, "a finished scan was rebuilt"
    assert not [path.name for path in [*cache.iterdir(), *scans.iterdir()] if path.name.startswith(".")]

    reference = tmp_path / "reference"
    assert main(["preprocess", str(manifest), "--cache", str(reference), "--no-progress"]) == 0
    assert sorted(p.name for p in scans.iterdir()) == sorted(p.name for p in (reference / "scans").iterdir())
    assert list_cached_ids(cache) == sorted(ids)
    for scan_id in ids:
        assert read_meta(cache, scan_id) == read_meta(reference, scan_id)
        resumed, direct = (np.load(folder / "scans" / f"{scan_id}.npy") for folder in (cache, reference))
        assert resumed.dtype == direct.dtype
        np.testing.assert_array_equal(resumed, direct)
