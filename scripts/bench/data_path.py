"""Benchmark the data path: plain MONAI pipeline vs ``medmae preprocess`` + cached crops, same run, same volumes.

Volumes: the real chest CTs ``pyradiomics/lung{1,2}_image.nrrd``, the real DICOM series ``ct_dicom_series``
and one full-size 512x512x160 int16 CT NIfTI synthesised (in a temporary folder) by resampling lung1 to
1.5 mm slices, as in the issue. Everything runs in one process with one torch thread; costs are CPU seconds
of this process (so other load on the machine does not count) and wall seconds. Each measurement is repeated
(``--repeats``, baseline and medmae interleaved); the summary uses medians and reports the spread.

    python scripts/bench/data_path.py                      # prints a table, writes docs/bench_data_path.json
    python scripts/bench/data_path.py --crops 100 --repeats 5 --output /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from medmae.data.cache import CachedCropDataset
from medmae.data.cache_dataset import CropAugmentation
from medmae.data.cache_store import PreprocessParams, write_entry, write_params
from medmae.data.dicom import read_series
from medmae.data.preprocess import preprocess_volume
from medmae.data.transforms import LoadVolumed, augmentation_transforms
from medmae.io import read_volume

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SPACING = (1.5, 1.5, 2.0)
ROI = (96, 96, 96)
LOADER_BATCH = 4
TIMES = ("baseline_cpu_s", "baseline_wall_s", "preprocess_cpu_s", "preprocess_wall_s")


def baseline_pipeline(nifti: bool) -> Compose:
    """LoadImaged → Orientationd → Spacingd → ScaleIntensityRanged → CropForegroundd → RandSpatialCropd 96³.

    NRRD and DICOM are loaded with medmae's ``LoadVolumed`` (SimpleITK): MONAI's own readers for them need
    the ``itk``/``pynrrd`` packages, which medmae does not install.
    """
    load = [LoadImaged("image", image_only=True), EnsureChannelFirstd("image")] if nifti else [LoadVolumed("image")]
    return Compose(
        [
            *load,
            Orientationd("image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd("image", pixdim=SPACING, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd("image", source_key="image", allow_smaller=True),
            RandSpatialCropd("image", roi_size=ROI, random_size=False),
        ]
    )


def synthesise_full_size_ct(folder: Path) -> Path:
    """lung1 resampled to 512x512x160 at 1.5 mm slices, int16, as a .nii.gz."""
    image = sitk.ReadImage(str(DATA / "pyradiomics" / "lung1_image.nrrd"))
    reference = sitk.Image(512, 512, 160, sitk.sitkInt16)
    reference.SetSpacing((image.GetSpacing()[0], image.GetSpacing()[1], 1.5))
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    path = folder / "ct_512x512x160.nii.gz"
    sitk.WriteImage(resampled, str(path), True)
    return path


def timed(func: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, cpu seconds, wall seconds)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = func()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size


def first_pass(path: Path, cache: Path, params: PreprocessParams) -> None:
    """What one ``medmae preprocess`` worker does for one scan."""
    if path.is_dir():
        files = [str(p) for p in path.iterdir() if p.is_file()]
        volume = read_series(files, path)
    else:
        volume = read_volume(path)
    scan = preprocess_volume(volume, "CT", params.spacing, params.intensity, params.crop_foreground)
    write_entry(cache, path.name.split(".")[0], scan, "CT", params.fingerprint(), "bench")


def time_volumes(volumes: list[Path], cache: Path, params: PreprocessParams, repeats: int) -> list[dict[str, Any]]:
    """Baseline and first pass of each volume, ``repeats`` times each, interleaved (CPU and wall seconds)."""
    rows = []
    for path in volumes:
        source_bytes(path)  # both paths read from the page cache, not the disk
        pipeline = baseline_pipeline(nifti=path.name.endswith(".nii.gz"))
        row: dict[str, Any] = {"volume": path.name, "source_bytes": source_bytes(path)}
        for _ in range(repeats):
            _, base_cpu, base_wall = timed(lambda p=path, f=pipeline: f({"image": str(p)}))
            _, pre_cpu, pre_wall = timed(lambda p=path: first_pass(p, cache, params))
            for key, value in zip(TIMES, (base_cpu, base_wall, pre_cpu, pre_wall), strict=True):
                row.setdefault(key, []).append(value)
        rows.append(row)
    return rows


def time_crops(cache: Path, crops: int, repeats: int) -> dict[str, list[float]]:
    """CPU seconds for ``crops`` augmented crops: fused :class:`CropAugmentation` and MONAI's transforms."""
    datasets = {
        "fused": CachedCropDataset(cache, ROI, samples_per_epoch=crops, augment=CropAugmentation()),
        "monai": CachedCropDataset(cache, ROI, samples_per_epoch=crops, transform=Compose(augmentation_transforms())),
    }
    times: dict[str, list[float]] = {name: [] for name in datasets}
    for dataset in datasets.values():
        draw_crops(dataset, len(dataset.ids))  # map every scan once
    loader = torch.utils.data.DataLoader(datasets["fused"], batch_size=LOADER_BATCH, num_workers=0)
    times["loader"] = []
    for _ in range(repeats):
        for name, dataset in datasets.items():
            times[name].append(timed(lambda d=dataset: draw_crops(d, crops))[1])
        times["loader"].append(timed(lambda: [None for _ in loader])[1])  # + collating batches
    return times


def draw_crops(dataset: CachedCropDataset, count: int) -> None:
    """Draw ``count`` samples, each dropped once drawn as a DataLoader drops it after collating (keeping them
    all would fault in fresh memory for every crop: ~1 ms more per 96³ crop)."""
    for index in range(count):
        dataset[index]


def run(crops: int, repeats: int, output: Path | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    params = PreprocessParams(SPACING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        volumes = [
            synthesise_full_size_ct(tmp_path),
            DATA / "pyradiomics" / "lung1_image.nrrd",
            DATA / "pyradiomics" / "lung2_image.nrrd",
            DATA / "ct_dicom_series" / "series",
        ]
        cache = tmp_path / "cache"
        write_params(cache, params)
        rows = time_volumes(volumes, cache, params, repeats)
        cache_bytes = sum(p.stat().st_size for p in (cache / "scans").glob("*.npy"))
        crop_cpu = time_crops(cache, crops, repeats)
    return summarise(rows, crops, crop_cpu, cache_bytes, output)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise(
    rows: list[dict[str, Any]], crops: int, crop_cpu: dict[str, list[float]], cache_bytes: int, output: Path | None
) -> dict[str, Any]:
    baseline = np.mean([r["baseline_cpu_s"] for r in rows], axis=0)  # per repeat: mean over volumes
    preprocess = np.mean([r["preprocess_cpu_s"] for r in rows], axis=0)
    rates = {name: crops / np.asarray(cpu) for name, cpu in crop_cpu.items()}
    crop_mb = np.prod(ROI) * 4 / 1e6
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads 1",
        "spacing": SPACING,
        "roi": ROI,
        "repeats": len(baseline),
        "volumes": rows,
        "baseline_s_per_crop_cpu": spread(baseline.tolist()),
        "baseline_crops_per_s_per_core": spread((1.0 / baseline).tolist()),
        "preprocess_s_per_volume_cpu": spread(preprocess.tolist()),
        "first_pass_speedup": spread((baseline / preprocess).tolist()),
        "cached_crops_per_s_per_core": spread(rates["fused"].tolist()),
        "cached_crops_per_s_per_core_monai_transforms": spread(rates["monai"].tolist()),
        "cached_crop_MB_per_s": spread((rates["fused"] * crop_mb).tolist()),
        # per repeat: crop rate x that repeat's baseline seconds per crop
        "steady_state_speedup": spread((rates["fused"] * baseline).tolist()),
        "steady_state_speedup_monai_transforms": spread((rates["monai"] * baseline).tolist()),
        f"dataloader_batch{LOADER_BATCH}_crops_per_s_per_core": spread(rates["loader"].tolist()),
        f"dataloader_batch{LOADER_BATCH}_speedup": spread((rates["loader"] * baseline).tolist()),
        "source_MB": sum(r["source_bytes"] for r in rows) / 1e6,
        "cache_MB": cache_bytes / 1e6,
    }
    print(f"{'volume':28s} {'baseline s':>11s} {'preprocess s':>13s} {'speed-up':>9s}   (median CPU s, wall s)")
    for r in rows:
        base, base_wall, pre, pre_wall = (float(np.median(r[key])) for key in TIMES)
        print(f"{r['volume']:28s} {base:5.2f} {base_wall:5.2f} {pre:6.2f} {pre_wall:6.2f} {base / pre:8.1f}x")

    def show(key: str, fmt: str) -> str:
        s = result[key]
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    print(f"median (min-max) of {len(baseline)} repeats:")
    print(f"baseline: {show('baseline_crops_per_s_per_core', '.2f')} crops/s/core")
    print(f"first pass: {show('first_pass_speedup', '.2f')}x faster per volume than the baseline")
    print(
        f"cached augmented {ROI} crops: {show('cached_crops_per_s_per_core', '.0f')}/s/core "
        f"({show('cached_crop_MB_per_s', '.0f')} MB/s), {show('steady_state_speedup', '.0f')}x the baseline"
    )
    print(
        f"  with MONAI's augmentation_transforms instead: {show('cached_crops_per_s_per_core_monai_transforms', '.0f')}"
        f"/s/core, {show('steady_state_speedup_monai_transforms', '.0f')}x"
    )
    print(
        f"  through a DataLoader (batches of {LOADER_BATCH}, collated in this process): "
        f"{show(f'dataloader_batch{LOADER_BATCH}_crops_per_s_per_core', '.0f')}/s/core, "
        f"{show(f'dataloader_batch{LOADER_BATCH}_speedup', '.0f')}x"
    )
    print(f"cache {result['cache_MB']:.1f} MB for {result['source_MB']:.1f} MB of sources")
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=300, help="cached crops to time (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--output", type=Path, default=Path("docs/bench_data_path.json"), help="JSON to write")
    args = parser.parse_args()
    run(args.crops, args.repeats, args.output)


if __name__ == "__main__":
    main()
