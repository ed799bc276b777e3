"""scripts/bench/gpu_train.py on the CPU: the tiny preset, 32³ crops, a cache of 4 real hippocampus scans."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCRIPT = ROOT / "scripts" / "bench" / "gpu_train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_mae_flops_per_sample(roi: int = 32, patch: int = 8, mask_ratio: float = 0.75) -> int:
    """Matmul FLOPs of one forward + backward of the tiny MAE, by hand.

    A linear layer on T tokens costs 2·T·in·out forward and twice that backward (input and weight
    gradients), except the patch embedding, whose input needs no gradient. Attention on T tokens of width D
    costs 4·T²·D forward (QKᵀ and AV) and 10·T²·D backward (scores recomputed, four gradient products).
    """
    n = (roi // patch) ** 3
    k = n - int(mask_ratio * n)  # visible tokens
    p = patch**3  # voxels per patch, one channel
    d, m, depth = 96, 384, 4  # vit_tiny encoder
    dd, md, ddepth = 48, 192, 1  # and its decoder

    def block(tokens: int, width: int, mlp: int) -> int:
        return 6 * tokens * (4 * width * width + 2 * width * mlp) + 14 * tokens * tokens * width

    encoder = 4 * k * p * d + depth * block(k, d, m)
    decoder = 6 * k * d * dd + ddepth * block(n, dd, md) + 6 * n * dd * p
    return encoder + decoder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    if not (DATA / "hippocampus").is_dir():
        pytest.skip("needs ../shared/data/hippocampus")
    path = tmp_path_factory.mktemp("bench") / "gpu_train.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--sizes", "32", "--patch", "8", "--batches", "2"]
    argv += ["--steps", "2", "--warmup", "1", "--compile", "none", "--peak-size", "256"]
    argv += ["--manifest", str(ROOT / "data_manifests" / "hippocampus.jsonl"), "--data-scans", "4"]
    argv += ["--data-spacing", "1", "1", "1", "--data-batch", "2", "--data-steps", "2", "--workers", "1"]
    argv += ["--preprocess-workers", "1", "--json", str(path)]
    return load_script().main(argv), path


def test_report_is_written_with_every_part(report):
    result, path = report
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    device = result["device"]
    for key in ("name", "type", "torch", "dtype", "measured_peak_tflops", "measured_peak_matmul", "spec_peak_tflops"):
        assert key in device
    assert device["type"] == "cpu" and device["dtype"] == "float32" and device["spec_peak_tflops"] is None
    assert device["measured_peak_tflops"] > 0
    assert result["settings"]["presets"] == ["tiny"]
    assert result["memory"] == {"skipped": "needs a CUDA device"}
    assert result["elapsed_s"] > 0


def test_throughput_row_counts_the_model_flops(report):
    (row,) = report[0]["throughput"]
    assert (row["preset"], row["input"], row["patch"], row["batch"], row["compiled"]) == ("tiny", 32, 8, 2, False)
    assert row["status"] == "ok"
    assert row["flops_per_step"] == 2 * tiny_mae_flops_per_sample()
    assert row["median_s"] > 0 and row["mean_s"] > 0
    assert math.isclose(row["samples_per_s"], 2 / row["median_s"])
    assert math.isclose(row["tflops_per_s"], row["flops_per_step"] / row["median_s"] / 1e12)
    assert math.isclose(row["mfu_measured_peak"], row["tflops_per_s"] / report[0]["device"]["measured_peak_tflops"])
    assert 0 < row["mfu_measured_peak"] < 1.5 and row["mfu_spec_peak"] is None
    assert 0.5 < row["params_m"] < 0.6


def test_data_path_row_compares_the_loader_with_synthetic_input(report):
    data = report[0]["data_path"]
    assert (data["preset"], data["input"], data["batch"], data["scans"], data["failed"]) == ("tiny", 32, 2, 4, 0)
    assert data["cache_mb"] > 0 and data["cache_build_s"] > 0
    assert set(data["synthetic"]) == {"median_s", "mean_s", "loader_wait_fraction"}
    (row,) = data["rows"]
    assert row["workers"] == 1 and row["pinned"] is False
    assert row["busy_fraction"] > 0  # a ratio of two timings: its size depends on the load, not the code
    assert 0 <= row["loader_wait_fraction"] < 1
    assert math.isclose(row["busy_fraction"], data["synthetic"]["mean_s"] / row["mean_s"])
    assert math.isclose(row["samples_per_s"], 2 / row["mean_s"])


def test_memory_search_doubles_then_bisects_to_the_largest_fitting_batch(monkeypatch):
    """The search on a stand-in for ``try_batch`` that fits up to 100 samples (the real one needs a GPU)."""
    module = load_script()
    tried = []

    def fake_try(trainer, roi, batch):
        tried.append(batch)
        return (1.0 + 0.01 * batch, None) if batch <= 100 else (None, "out of memory")

    monkeypatch.setattr(module, "try_batch", fake_try)
    found = module.largest_batch(None, (32, 32, 32), start=8, cap=4096)
    capped = module.largest_batch(None, (32, 32, 32), start=8, cap=64)
    assert tried[:5] == [8, 16, 32, 64, 128]
    assert 97 <= found["max_batch"] <= 100 and found["first_failing_batch"] - found["max_batch"] <= 3
    assert found["capped"] is False and math.isclose(found["gib_per_sample"], 0.01)
    assert capped["max_batch"] == 64 and capped["capped"] is True


def test_a_batch_that_runs_out_of_memory_is_reported_and_other_errors_raise(monkeypatch):
    module = load_script()
    runner, args = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(warmup=1, steps=1)

    def fail(error: Exception):
        def timed_steps(*_args, **_kwargs):
            raise error

        monkeypatch.setattr(module, "timed_steps", timed_steps)

    fail(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert module.measure_throughput(runner, args, (8, 8, 8), 2, 1e9, {}) == {"status": "out of memory"}
    fail(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert module.measure_throughput(runner, args, (8, 8, 8), 2, 1e9, {}) == {"status": "out of memory"}
    fail(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        module.measure_throughput(runner, args, (8, 8, 8), 2, 1e9, {})
