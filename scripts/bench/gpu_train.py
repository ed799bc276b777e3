"""Pretraining on a GPU: throughput and model-FLOP utilisation, the data path's share of it, the largest batch.

Three parts, each printed as a table and kept in one JSON report (rewritten as each row comes in, so a run cut
short keeps what it measured):

1. ``throughput``: MAEPretrainTask's own ``training_step`` (masked forward, masked-patch loss), backward and
   the fused AdamW + schedule of its ``configure_optimizers``, on synthetic on-device input; bf16 autocast on
   a GPU, fp32 on a CPU; for each preset x input size x batch. Steps are timed with CUDA events, with no
   synchronisation inside the timed steps. FLOPs per step: PyTorch's ``FlopCounterMode`` over one forward +
   backward (``pretrain_step.count_step_flops``). MFU is given against the bf16 matmul peak measured in the
   same run and against NVIDIA's dense bf16 figure for the card when its name is known.
2. ``data``: the same step fed by the real DataLoader (``PretrainDataModule`` over a ``medmae preprocess``
   cache built in a temporary folder; pinned memory, non-blocking copies) against synthetic on-device data.
3. ``memory`` (GPU only): the largest batch that fits, with and without gradient checkpointing, found by
   doubling, then bisecting, on out-of-memory errors.

    python scripts/bench/gpu_train.py --json $OUT/gpu_train.json            # all of it, ~8 min on an H100
    python scripts/bench/gpu_train.py --quick --json /tmp/gpu_train.json    # ~2 min
    python scripts/bench/gpu_train.py --device cpu --preset tiny --sizes 32 --patch 8 --batches 2 \\
        --data-scans 4 --data-spacing 1 1 1 --data-batch 2 --workers 1 --json /tmp/cpu.json   # CPU smoke run

The data part reads the first ``--data-scans`` (24) scans of ``--manifest`` (the hippocampus MRIs, resampled to
0.4 mm so that 96³ crops hold mostly anatomy); docs/benchmarks.md says how to take them to a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from medmae.data.cache import PreprocessParams, preprocess_manifest
from medmae.data.cache_store import atomic_write
from medmae.data.datamodule import PretrainDataModule
from medmae.data.manifest import read_manifest, write_manifest
from medmae.tasks.pretrain import MAEPretrainTask

ROOT = Path(__file__).resolve().parents[2]
# dense bf16 tensor-core TFLOP/s of NVIDIA's datasheets (half the "with sparsity" figure); the first match wins
SPEC_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM card
    ("H200", 989.0),
    ("A100", 312.0),
)


def _sibling(name: str) -> ModuleType:
    """``scripts/bench/<name>.py`` as a module (``scripts/bench`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pretrain_step = _sibling("pretrain_step")


@dataclass
class StepRunner:
    """One MAEPretrainTask with its optimizer and schedule, and its training step.

    ``step(image, index)`` runs ``training_step`` under the device's precision, backward, AdamW, schedule;
    ``image``: ``(B, 1, S, S, S)`` on the device. Nothing in it waits for the GPU.
    """

    task: MAEPretrainTask
    optimizer: torch.optim.Optimizer
    schedule: Any
    device: torch.device

    @classmethod
    def build(cls, preset: str, patch: int, device: torch.device, grad_checkpointing: bool = False) -> StepRunner:
        task = MAEPretrainTask(preset=preset, patch_size=patch, grad_checkpointing=grad_checkpointing)
        task = task.to(device).train()
        optimizers = task.configure_optimizers()
        return cls(task, optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"], device)

    def precision(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on a GPU (Lightning's ``bf16-mixed``), fp32 elsewhere."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, image: torch.Tensor, index: int) -> None:
        with self.precision():
            loss = self.task.training_step({"image": image}, index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()

    def flops_per_sample(self, image: torch.Tensor) -> float:
        """Model FLOPs of one forward + backward per sample of ``image``, by ``FlopCounterMode``."""

        def forward() -> torch.Tensor:
            with self.precision():
                return self.task(image).loss

        return pretrain_step.count_step_flops(forward) / image.shape[0]

    def compile_blocks(self) -> None:
        """What ``--model.compile true`` does: ``torch.compile`` every transformer block."""
        for block in [*self.task.model.encoder.blocks, *self.task.model.decoder.blocks]:
            block.compile()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Mark:
    """A point in the step stream: a CUDA event on a GPU (recorded without waiting), a clock reading on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()
        self.time = time.perf_counter()

    def seconds_to(self, later: Mark) -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event) / 1000
        return later.time - self.time


def timed_steps(
    runner: StepRunner, next_image: Callable[[], torch.Tensor], warmup: int, steps: int
) -> dict[str, float]:
    """Run ``warmup`` then ``steps`` training steps on ``next_image()``; the device is synchronised only before
    and after the timed steps.

    Returns:
        ``median_s`` (per-step times between marks), ``mean_s`` (timed wall time / steps) and
        ``loader_wait_fraction`` (share of that wall time spent in ``next_image()``).
    """
    for index in range(warmup):
        runner.step(next_image(), index)
    synchronize(runner.device)
    waited, start = 0.0, time.perf_counter()
    marks = [Mark(runner.device)]
    for index in range(warmup, warmup + steps):
        before = time.perf_counter()
        image = next_image()
        waited += time.perf_counter() - before
        runner.step(image, index)
        marks.append(Mark(runner.device))
    synchronize(runner.device)
    wall = time.perf_counter() - start
    per_step = [a.seconds_to(b) for a, b in itertools.pairwise(marks)]
    return {"median_s": statistics.median(per_step), "mean_s": wall / steps, "loader_wait_fraction": waited / wall}


def is_out_of_memory(error: RuntimeError) -> bool:
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def release(device: torch.device, runner: StepRunner | None = None) -> None:
    """Give cached blocks back after a failed or finished configuration (and ``runner``'s gradients)."""
    if runner is not None:
        runner.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_peak_tflops(device: torch.device, size: int) -> float:
    """Best TFLOP/s of a square matmul in the training dtype: bf16 on a GPU, fp32 on a CPU."""
    if device.type != "cuda":
        return pretrain_step.matmul_peak_gflops(size) / 1000
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for repeat in range(8):
        start = Mark(device)
        for _ in range(10):
            torch.mm(a, b)
        end = Mark(device)
        synchronize(device)
        if repeat >= 2:  # warm-up: clocks and cuBLAS heuristics
            best = min(best, start.seconds_to(end) / 10)
    return 2 * size**3 / best / 1e12


def spec_peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in SPEC_BF16_TFLOPS if key in name), None)


def device_info(device: torch.device, peak_size: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=props.total_memory / 2**30,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    info["dtype"] = "bfloat16 autocast" if device.type == "cuda" else "float32"
    info["measured_peak_tflops"] = measured_peak_tflops(device, peak_size)
    info["measured_peak_matmul"] = f"{peak_size}^3 {'bf16' if device.type == 'cuda' else 'fp32'}"
    info["spec_peak_tflops"] = spec_peak_tflops(info["name"]) if device.type == "cuda" else None
    return info


def throughput_rows(
    args: argparse.Namespace, preset: str, size: int, info: dict[str, Any], compiled: bool
) -> Iterator[dict[str, Any]]:
    """One row per batch for one preset and input size, eager or with compiled blocks."""
    device = torch.device(args.device)
    runner = StepRunner.build(preset, args.patch, device)
    roi = (size, size, size)
    per_sample = runner.flops_per_sample(torch.randn(min(args.batches), 1, *roi, device=device))
    params_m = sum(p.numel() for p in runner.task.parameters()) / 1e6
    if compiled:
        runner.compile_blocks()
    for batch in args.batches:
        row = {"preset": preset, "input": size, "patch": args.patch, "batch": batch, "compiled": compiled}
        row.update(params_m=params_m, flops_per_step=per_sample * batch)
        row.update(measure_throughput(runner, args, roi, batch, row["flops_per_step"], info))
        release(device, runner)
        print_throughput(row)
        yield row


def measure_throughput(
    runner: StepRunner, args: argparse.Namespace, roi: tuple[int, int, int], batch: int, flops: float, info: dict
) -> dict[str, Any]:
    """Step times of ``batch`` synthetic samples (``flops`` per step) and the rates and MFU that follow, or an
    out-of-memory status."""
    device = runner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        image = torch.randn(batch, 1, *roi, device=device)
        row: dict[str, Any] = timed_steps(runner, lambda: image, args.warmup, args.steps)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        return {"status": "out of memory"}
    achieved = flops / row["median_s"] / 1e12
    spec = info["spec_peak_tflops"]
    row.update(status="ok", samples_per_s=batch / row["median_s"], tflops_per_s=achieved)
    row.update(
        mfu_measured_peak=achieved / info["measured_peak_tflops"], mfu_spec_peak=achieved / spec if spec else None
    )
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


THROUGHPUT_HEADER = (
    f"{'preset':<7}{'input':>5} {'mode':<9}{'batch':>6}{'step ms':>10}{'samples/s':>11}{'GFLOP/step':>12}"
    f"{'TFLOP/s':>9}{'MFU meas.':>10}{'MFU spec':>9}{'peak GiB':>9}"
)


def print_throughput(row: dict[str, Any]) -> None:
    name = f"{row['preset']:<7}{row['input']:>4}³ {'compiled' if row['compiled'] else 'eager':<9}{row['batch']:>6}"
    if row["status"] != "ok":
        print(f"{name}  {row['status']}")
        return
    spec = f"{100 * row['mfu_spec_peak']:>8.1f}%" if row["mfu_spec_peak"] is not None else f"{'n/a':>9}"
    memory = f"{row['peak_memory_gib']:>9.1f}" if "peak_memory_gib" in row else f"{'n/a':>9}"
    print(
        f"{name}{1000 * row['median_s']:>10.2f}{row['samples_per_s']:>11.1f}{row['flops_per_step'] / 1e9:>12.1f}"
        f"{row['tflops_per_s']:>9.3g}{100 * row['mfu_measured_peak']:>9.1f}%{spec}{memory}"
    )


def subset_manifest(manifest: Path, count: int | None, folder: Path) -> Path:
    """The first ``count`` records of ``manifest`` as a manifest in ``folder`` (absolute paths).

    Raises:
        FileNotFoundError: a scan of those records is missing (names it and the manifest).
    """
    records = read_manifest(manifest, check_files=False)[:count]
    for record in records:
        for image in record.image:
            if not Path(image).is_file():
                raise FileNotFoundError(f"{manifest}: scan {record.id} is missing ({image}); copy the data there")
    return write_manifest(records, folder / "scans.jsonl", relative=False)


def data_path(args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic on-device input against the real DataLoader over a fresh cache, for each worker count."""
    device = torch.device(args.device)
    preset, size, batch = args.data_preset, args.data_size, args.data_batch
    with tempfile.TemporaryDirectory(prefix="medmae_gpu_bench_") as tmp:
        try:
            manifest = subset_manifest(args.manifest, args.data_scans, Path(tmp))
        except FileNotFoundError as error:
            print(f"\ndata path: skipped, {error}")
            return {"skipped": str(error)}
        start = time.perf_counter()
        report = preprocess_manifest(
            manifest, Path(tmp) / "cache", PreprocessParams(tuple(args.data_spacing)), args.preprocess_workers, False
        )
        cache_mb = sum(p.stat().st_size for p in (Path(tmp) / "cache" / "scans").glob("*.npy")) / 1e6
        result: dict[str, Any] = {"preset": preset, "input": size, "batch": batch, "spacing": args.data_spacing}
        result.update(scans=report["built"], failed=len(report["failed"]), cache_mb=cache_mb)
        result["cache_build_s"] = time.perf_counter() - start
        runner = StepRunner.build(preset, args.patch, device)
        image = torch.randn(batch, 1, size, size, size, device=device)
        result["synthetic"] = timed_steps(runner, lambda: image, args.warmup, args.data_steps)
        result["rows"] = [loader_row(args, runner, Path(tmp), workers, result["synthetic"]) for workers in args.workers]
    print_data_path(result)
    return result


def loader_row(
    args: argparse.Namespace, runner: StepRunner, folder: Path, workers: int, synthetic: dict[str, float]
) -> dict[str, Any]:
    """Steps fed by PretrainDataModule's training DataLoader with ``workers`` worker processes."""
    warmup = args.warmup + 2 * workers  # past the batches the workers prefetch (prefetch_factor 2)
    module = PretrainDataModule(
        str(folder / "scans.jsonl"),
        roi_size=[args.data_size] * 3,
        spacing=list(args.data_spacing),
        batch_size=args.data_batch,
        num_workers=workers,
        samples_per_epoch=(warmup + args.data_steps) * args.data_batch,
        val_fraction=0.0,
        cache_dir=str(folder / "cache"),
    )
    module.setup("fit")
    batches = iter(module.train_dataloader())

    def next_image() -> torch.Tensor:
        return next(batches)["image"].to(runner.device, non_blocking=True)

    row: dict[str, Any] = {"workers": workers, "pinned": torch.cuda.is_available()}  # as the DataModule pins
    row.update(timed_steps(runner, next_image, warmup, args.data_steps))
    row["samples_per_s"] = args.data_batch / row["mean_s"]
    row["busy_fraction"] = synthetic["mean_s"] / row["mean_s"]
    batches = None  # stops the workers
    return row


def print_data_path(result: dict[str, Any]) -> None:
    print(
        f"\n{result['preset']} {result['input']}³ batch {result['batch']}: {result['scans']} cached scans "
        f"({result['cache_mb']:.0f} MB at {result['spacing']} mm, built in {result['cache_build_s']:.1f} s)"
    )
    print(f"{'input':<22}{'step ms (mean)':>15}{'samples/s':>11}{'GPU busy':>10}{'loader wait':>13}")
    synthetic = result["synthetic"]
    print(
        f"{'synthetic on device':<22}{1000 * synthetic['mean_s']:>15.2f}{result['batch'] / synthetic['mean_s']:>11.1f}"
    )
    for row in result["rows"]:
        print(
            f"{'DataLoader, ' + str(row['workers']) + ' workers':<22}{1000 * row['mean_s']:>15.2f}"
            f"{row['samples_per_s']:>11.1f}{100 * row['busy_fraction']:>9.0f}%"
            f"{100 * row['loader_wait_fraction']:>12.0f}%"
        )


def try_batch(runner: StepRunner, roi: tuple[int, int, int], batch: int) -> tuple[float | None, str | None]:
    """Peak GiB allocated by one training step of ``batch`` samples, or ``(None, why it failed)``."""
    device = runner.device
    torch.cuda.reset_peak_memory_stats(device)
    failure = None
    try:
        runner.step(torch.randn(batch, 1, *roi, device=device), 0)
        synchronize(device)
    except RuntimeError as error:  # out of memory, or a kernel refusing the size: either way it does not run
        failure = "out of memory" if is_out_of_memory(error) else str(error).strip().splitlines()[0]
    if failure is not None:
        release(device, runner)
        return None, failure
    return torch.cuda.max_memory_allocated(device) / 2**30, None


def largest_batch(runner: StepRunner, roi: tuple[int, int, int], start: int, cap: int) -> dict[str, Any]:
    """Double from ``start`` until a step fails (or ``cap``), then bisect to within 1/32 of the batch."""
    trials: list[dict[str, Any]] = []

    def fits(batch: int) -> bool:
        peak, failure = try_batch(runner, roi, batch)
        trials.append({"batch": batch, "peak_gib": peak, "failure": failure})
        return peak is not None

    fitting, failing, batch = 0, None, start
    while batch <= cap:
        if not fits(batch):
            failing = batch
            break
        fitting, batch = batch, 2 * batch
    while failing is not None and failing - fitting > max(1, fitting // 32):
        middle = (fitting + failing) // 2
        fitting, failing = (middle, failing) if fits(middle) else (fitting, middle)
    ok = sorted((t["batch"], t["peak_gib"]) for t in trials if t["peak_gib"] is not None)
    per_sample = (ok[-1][1] - ok[-2][1]) / (ok[-1][0] - ok[-2][0]) if len(ok) > 1 else None
    return {
        "max_batch": fitting,
        "first_failing_batch": failing,
        "capped": failing is None,
        "peak_gib_at_max": dict(ok).get(fitting),
        "gib_per_sample": per_sample,
        "trials": trials,
    }


MEMORY_HEADER = (
    f"{'preset':<7}{'input':>6}{'ckpt':>6}{'max batch':>11}{'fails at':>10}{'peak GiB':>10}{'MiB/sample':>12}"
)


def memory_rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The largest batch per preset, input size and gradient checkpointing, one row at a time (GPU only)."""
    device = torch.device(args.device)
    for preset in args.memory_presets:
        for size in args.memory_sizes:
            for checkpointing in (False, True):
                runner = StepRunner.build(preset, args.patch, device, grad_checkpointing=checkpointing)
                row = {"preset": preset, "input": size, "grad_checkpointing": checkpointing}
                row.update(largest_batch(runner, (size, size, size), args.memory_start, args.max_batch))
                runner = None
                release(device)
                failing = "none" if row["capped"] else str(row["first_failing_batch"])
                per_sample = f"{1024 * row['gib_per_sample']:.1f}" if row["gib_per_sample"] else "n/a"
                peak = f"{row['peak_gib_at_max']:.1f}" if row["peak_gib_at_max"] else "n/a"
                print(
                    f"{preset:<7}{size:>5}³{'yes' if checkpointing else 'no':>6}{row['max_batch']:>11}"
                    f"{failing:>10}{peak:>10}{per_sample:>12}"
                )
                yield row


def save(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(json.dumps(report, indent=1) + "\n"), "w")


QUICK = {
    "presets": ["base"],
    "sizes": [96],
    "batches": [32, 128],
    "steps": 10,
    "warmup": 3,
    "compile": "none",
    "workers": [8],
    "data_steps": 60,
    "memory_presets": ["base"],
    "memory_sizes": [96],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="base at 96³ only, fewer batches, steps, workers")
    parser.add_argument(
        "--parts", nargs="+", choices=["throughput", "data", "memory"], default=["throughput", "data", "memory"]
    )
    parser.add_argument("--presets", "--preset", nargs="+", default=["base", "small", "large"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128], help="cube input sizes")
    parser.add_argument("--patch", type=int, default=16, help="patch edge in voxels")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--compile",
        choices=["none", "target", "all"],
        default="target",
        help="also time compiled blocks: for base at 96³ (target), for every row (all)",
    )
    parser.add_argument("--peak-size", type=int, help="matmul edge of the measured peak (8192 GPU, 1024 CPU)")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data_manifests" / "hippocampus.jsonl")
    parser.add_argument("--data-scans", type=int, default=24, help="use the first N scans of the manifest")
    parser.add_argument("--data-spacing", type=float, nargs=3, default=[0.4, 0.4, 0.4], help="cache voxel size, mm")
    parser.add_argument("--data-preset", help="default: base if timed, else the first preset")
    parser.add_argument("--data-size", type=int, help="default: the first size")
    parser.add_argument("--data-batch", type=int, default=32)
    parser.add_argument("--workers", nargs="+", type=int, default=[4, 8, 14], help="DataLoader workers to try")
    parser.add_argument("--data-steps", type=int, default=200)
    parser.add_argument("--preprocess-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--memory-presets", nargs="+", default=["base", "large"])
    parser.add_argument("--memory-sizes", nargs="+", type=int, default=[96, 128])
    parser.add_argument("--memory-start", type=int, default=8, help="first batch of the doubling")
    parser.add_argument("--max-batch", type=int, default=8192, help="largest batch tried")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "bench_gpu_train.json")
    if "--quick" in (argv if argv is not None else sys.argv[1:]):
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.data_preset = args.data_preset or ("base" if "base" in args.presets else args.presets[0])
    args.data_size = args.data_size or args.sizes[0]
    args.peak_size = args.peak_size or (8192 if args.device.startswith("cuda") else 1024)
    if "data" in args.parts and not args.manifest.is_file():
        parser.error(f"--manifest {args.manifest}: no such file")
    return args


def run_throughput(args: argparse.Namespace, report: dict[str, Any], compiled: bool) -> None:
    """Throughput rows into ``report``, saved as each comes in; compiled: only ``base`` at 96³ unless ``all``."""
    started = time.perf_counter()
    configs = [(preset, size) for preset in args.presets for size in args.sizes]
    if compiled and args.compile == "target":
        configs = [config for config in configs if config == ("base", 96)]
    if compiled and (args.compile == "none" or not configs):
        return
    print(f"\n{THROUGHPUT_HEADER}")
    for preset, size in configs:
        for row in throughput_rows(args, preset, size, report["device"], compiled):
            report.setdefault("throughput", []).append(row)
            report["seconds"]["compiled" if compiled else "throughput"] = time.perf_counter() - started
            save(report, args.json)


def run_memory(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The memory rows into ``report`` (GPU only), saved as each comes in."""
    if torch.device(args.device).type != "cuda":
        print("\nmemory: skipped, it needs a CUDA device (scripts/bench/memory.py computes it on a CPU)")
        report["memory"] = {"skipped": "needs a CUDA device"}
        return
    started = time.perf_counter()
    print(f"\n{MEMORY_HEADER}")
    report["memory"] = {"how": "measured: one training step per batch; out of memory = does not fit", "rows": []}
    for row in memory_rows(args):
        report["memory"]["rows"].append(row)
        report["seconds"]["memory"] = time.perf_counter() - started
        save(report, args.json)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the parts asked for (compiled throughput rows last: a compiler failure loses nothing else); returns
    the report written to ``--json``."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; there is no Trainer here
    started = time.perf_counter()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    info = device_info(torch.device(args.device), args.peak_size)
    report: dict[str, Any] = {"device": info, "settings": settings, "seconds": {}}
    spec = f"{info['spec_peak_tflops']:.0f}" if info["spec_peak_tflops"] else "unknown"
    print(f"{info['name']}, torch {info['torch']}, CUDA {info.get('cuda')}, {info['dtype']}")
    print(
        f"matmul peak: measured {info['measured_peak_tflops']:.1f} TFLOP/s ({info['measured_peak_matmul']}), ", end=""
    )
    print(f"spec {spec}")
    save(report, args.json)
    if "throughput" in args.parts:
        run_throughput(args, report, compiled=False)
    if "data" in args.parts:
        part_started = time.perf_counter()
        report["data_path"] = data_path(args)
        report["seconds"]["data"] = time.perf_counter() - part_started
        save(report, args.json)
    if "memory" in args.parts:
        run_memory(args, report)
    if "throughput" in args.parts:
        run_throughput(args, report, compiled=True)
    report["elapsed_s"] = time.perf_counter() - started
    save(report, args.json)
    print(f"\nwrote {args.json} ({report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
