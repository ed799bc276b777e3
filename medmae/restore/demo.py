"""The repair step of ``medmae demo``: corrupt a 3-slice gap of a bundled scan, repair, compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medmae.evaluation.restore_baselines import interpolate_slices
from medmae.evaluation.restore_metrics import psnr_in_mask
from medmae.inference.repair import RepairSettings, inpaint_volume
from medmae.io import read_volume, write_volume
from medmae.restore.corrupt import corrupt_slices
from medmae.restore.evaluate import comparison_figure
from medmae.restore.fitted import fitted_fill_gaps
from medmae.restore.slices import parse_axis, slice_mask


def run_repair_demo(workdir: Path, pretrain_ckpt: Path, scan: Path) -> dict:
    """Zero a 3-slice gap in the middle of ``scan``, repair it with ``pretrain_ckpt`` and score both repairs.

    Writes ``workdir/repair/{corrupted,repaired}.nii.gz`` and ``repair_demo.png`` (ground truth, corrupted,
    repaired, linear interpolation, the checkpoint-free fitted interpolation and their error maps).

    Returns:
        ``figure``, ``corrupted``, ``repaired`` (paths), ``psnr_model``, ``psnr_linear`` and ``psnr_fitted``
        (dB inside the gap), ``slices`` (the gap) and ``axis``.
    """
    from medmae.tasks.restore import load_restoration_net

    out_dir = Path(workdir) / "repair"
    volume = read_volume(scan)
    truth = volume.array[0]
    axis = parse_axis("auto", volume.spacing)
    centre = truth.shape[axis] // 2
    gap = [centre - 1, centre, centre + 1]
    mask = slice_mask(truth.shape, axis, gap)
    rng = np.random.default_rng(0)
    corrupted = volume.with_array(corrupt_slices(truth, axis, gap, "zero", rng).astype(truth.dtype)[None])
    corrupted_path = write_volume(corrupted, out_dir / "corrupted.nii.gz")
    net, hparams = load_restoration_net(pretrain_ckpt)
    repaired = inpaint_volume(net, hparams, corrupted, mask, "auto", RepairSettings(device="cpu"))
    repaired_path = write_volume(repaired, out_dir / "repaired.nii.gz")
    linear = interpolate_slices(corrupted.array[0], axis, gap, "linear")
    psnr_model = psnr_in_mask(repaired.array[0], truth, mask)
    psnr_linear = psnr_in_mask(linear, truth, mask)
    fitted = fitted_fill_gaps(corrupted.array[0], mask)[0]
    psnr_fitted = psnr_in_mask(fitted, truth, mask)
    images = {"ground truth": truth, "corrupted": corrupted.array[0], "repaired (MAE)": repaired.array[0]}
    figure = comparison_figure(
        truth,
        (axis + 1) % 3,
        {**images, "linear": linear, "fitted (no model)": fitted},
        out_dir / "repair_demo.png",
        f"3-slice gap, PSNR: MAE {psnr_model:.1f} dB, linear {psnr_linear:.1f} dB, fitted {psnr_fitted:.1f} dB",
    )
    return {
        "figure": figure,
        "corrupted": corrupted_path,
        "repaired": repaired_path,
        "psnr_model": float(psnr_model),
        "psnr_linear": float(psnr_linear),
        "psnr_fitted": float(psnr_fitted),
        "slices": gap,
        "axis": "xyz"[axis],
    }
