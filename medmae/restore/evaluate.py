"""``medmae evaluate-restore``: corrupt known slices / add noise to held-out real scans, repair, score.

Inpainting: gaps of 1, 3 and 5 adjacent slices along the slice axis (the thickest axis; ``z`` when
isotropic), scored inside the gap against linear and cubic interpolation along that axis and motion-compensated
interpolation (``flow``, :mod:`medmae.restore.flow`, what ``gap_interp: flow`` models refine) and that
interpolation corrected by a regression fitted to the scan's own intact slices (``fitted``,
:mod:`medmae.restore.fitted`). Denoising:
Rician (MR) or Gaussian HU (CT) noise, scored over the foreground against Gaussian smoothing and
non-local means (scikit-image's, and medmae's own that ``nlm_input`` denoisers use) with oracle-tuned
parameters. See :mod:`medmae.evaluation.restore_metrics`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medmae.errors import SCAN_ERRORS, one_line
from medmae.evaluation.restore_baselines import (
    flow_interpolation,
    gaussian_denoise,
    interpolate_slices,
    nlm_denoise,
)
from medmae.evaluation.restore_metrics import foreground_mask, psnr_in_mask, restore_scores
from medmae.inference.repair import RepairSettings, denoise_array, inpaint_array, unseen_modality_note
from medmae.restore.corrupt import corrupt_slices, gap_indices, noise_sigma, noisy_volume
from medmae.restore.fitted import fitted_fill_gaps
from medmae.restore.net import RestorationNet
from medmae.restore.slices import parse_axis, slice_mask


@dataclass(frozen=True)
class EvalScan:
    """One clean scan to corrupt: a name, its ``(I, J, K)`` array, voxel spacing and modality."""

    name: str
    array: np.ndarray
    spacing: tuple[float, float, float]
    modality: str


@dataclass(frozen=True)
class ScoreRow:
    scan: str
    modality: str
    task: str
    setting: str
    method: str
    psnr: float
    ssim: float
    mae: float


def centre_crop(array: np.ndarray, max_size: int) -> np.ndarray:
    """The central ``<= max_size`` voxels along each axis (keeps evaluation of 512x512 CTs affordable)."""
    starts = [max(0, (s - max_size) // 2) for s in array.shape]
    return array[tuple(slice(b, b + min(s, max_size)) for b, s in zip(starts, array.shape))]


def comparison_figure(
    truth: np.ndarray,
    plane_axis: int,
    images: dict[str, np.ndarray],
    path: Path,
    title: str,
    error_range: float = 0.5,
) -> Path:
    """PNG of the central plane perpendicular to ``plane_axis``: each image above its error map against ``truth``.

    For a slice gap along ``axis`` pass ``plane_axis = (axis + 1) % 3``: the gap then shows as rows.
    Grey levels span the truth's 1st-99th percentiles; error maps ``error_range`` times that span.
    """
    mid = truth.shape[plane_axis] // 2

    def plane(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, mid, axis=plane_axis)

    low, high = np.percentile(truth, [1, 99])
    names = list(images)
    figure, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.4), squeeze=False)
    for col, name in enumerate(names):
        axes[0, col].imshow(plane(images[name]).T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect="auto")
        axes[0, col].set_title(name, fontsize=9)
        error = np.abs(plane(images[name]).astype(np.float64) - plane(truth))
        axes[1, col].imshow(
            error.T, cmap="magma", vmin=0, vmax=(high - low) * error_range, origin="lower", aspect="auto"
        )
        axes[1, col].set_title("|error|", fontsize=8)
        for row in (0, 1):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def inpainting_rows(
    net: RestorationNet,
    hparams: dict,
    scan: EvalScan,
    widths: Sequence[int],
    gaps: int,
    settings: RepairSettings,
    rng: np.random.Generator,
    figure_dir: Path | None = None,
) -> list[ScoreRow]:
    """Score the model and interpolation on ``gaps`` random gaps of each width in ``scan``."""
    axis = parse_axis("auto", scan.spacing)
    rows = []
    for width in widths:
        for repeat in range(gaps):
            gap = gap_indices(scan.array.shape[axis], width, rng)
            mask = slice_mask(scan.array.shape, axis, gap)
            corrupted = corrupt_slices(scan.array, axis, gap, "zero", rng).astype(scan.array.dtype)
            results = {
                "model": inpaint_array(net, hparams, corrupted, mask, scan.modality, settings),
                "linear": interpolate_slices(corrupted, axis, gap, "linear"),
                "cubic": interpolate_slices(corrupted, axis, gap, "cubic"),
                "flow": flow_interpolation(corrupted, mask),
                "fitted": fitted_fill_gaps(corrupted, mask)[0],
            }
            for method, result in results.items():
                score = restore_scores(result, scan.array, mask)
                rows.append(
                    ScoreRow(scan.name, scan.modality, "inpaint", f"{width}-slice gap", method, **asdict(score))
                )
            if figure_dir is not None and repeat == 0 and width == 3:
                comparison_figure(
                    scan.array,
                    (axis + 1) % 3,
                    {"ground truth": scan.array, "corrupted": corrupted, **results},
                    figure_dir / f"inpaint_{scan.name}.png",
                    f"{scan.name}: 3-slice gap (slices {gap[0]}-{gap[-1]})",
                )
    return rows


def denoising_rows(
    net: RestorationNet,
    hparams: dict,
    scan: EvalScan,
    levels: Sequence[float],
    settings: RepairSettings,
    figure_dir: Path | None = None,
) -> list[ScoreRow]:
    """Score the model, Gaussian smoothing and both non-local means on noisy copies of ``scan`` (foreground).

    A checkpoint trained with the noise level as an input (``known_noise``) is told the true level, as the
    baselines are; it is also scored with the level estimated from the noisy scan (``model (sigma estimated)``),
    as ``medmae denoise`` runs without ``--noise-sigma``.
    """
    mask = foreground_mask(scan.array)
    rows = []
    for index, level in enumerate(levels):
        noisy = noisy_volume(scan.array, scan.modality, level)

        def score(result: np.ndarray) -> float:
            return psnr_in_mask(result, scan.array, mask)

        sigma = noise_sigma(scan.array, scan.modality, level)
        known = net.nlm_input and bool(hparams.get("known_noise", False))
        told = replace(settings, noise_sigma=sigma) if known else settings
        results = {
            "noisy input": noisy,
            "model": denoise_array(net, hparams, noisy.astype(np.float32), scan.modality, told),
            "gaussian": gaussian_denoise(noisy, score)[1],
            "nl-means": nlm_denoise(noisy, score, sigma)[1],
            "nl-means (medmae)": nlm_denoise(noisy, score, sigma, backend="medmae")[1],
        }
        if known:  # the model above was told the noise level, as the oracle baselines are; here it estimates it
            results["model (sigma estimated)"] = denoise_array(
                net, hparams, noisy.astype(np.float32), scan.modality, settings
            )
        setting = f"sigma {level:g} HU" if scan.modality == "CT" else f"rician {level:g}"
        if figure_dir is not None and index == 0:
            comparison_figure(
                scan.array,
                parse_axis("auto", scan.spacing),
                {"ground truth": scan.array, **results},
                figure_dir / f"denoise_{scan.name}.png",
                f"{scan.name}: {setting} noise",
                error_range=0.15,
            )
        for method, result in results.items():
            rows.append(
                ScoreRow(
                    scan.name,
                    scan.modality,
                    "denoise",
                    setting,
                    method,
                    **asdict(restore_scores(result, scan.array, mask)),
                )
            )
    return rows


def summarise(rows: Sequence[ScoreRow]) -> str:
    """A markdown table of mean PSNR / SSIM / MAE per (modality, task, setting, method)."""
    groups: dict[tuple[str, str, str, str], list[ScoreRow]] = defaultdict(list)
    for row in rows:
        groups[(row.modality, row.task, row.setting, row.method)].append(row)
    lines = [
        "| modality | task | setting | method | scans x repeats | PSNR (dB) | SSIM | MAE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (modality, task, setting, method), group in groups.items():
        psnr = np.mean([r.psnr for r in group])
        ssim = np.mean([r.ssim for r in group])
        mae = np.mean([r.mae for r in group])
        lines.append(
            f"| {modality} | {task} | {setting} | {method} | {len(group)} | {psnr:.2f} | {ssim:.3f} | {mae:.4f} |"
        )
    return "\n".join(lines)


def evaluation_scans(
    manifest: Path | None,
    held_out: bool,
    scans: Sequence[Path],
    ckpt: Path,
    modality: str,
    limit: int | None,
    max_size: int,
) -> tuple[list[EvalScan], list[tuple[str, str]]]:
    """The clean scans to evaluate: a manifest's (optionally the checkpoint's validation split) and files.

    Manifest records are read as ``medmae preprocess`` reads them (:func:`~medmae.data.preprocess.load_record`):
    a DICOM series from its listed files (``source`` names or positions), since its folder may hold others.

    Returns:
        The scans, and ``(name, reason)`` for each scan skipped: missing, unreadable, NaN/Inf or constant.

    Raises:
        ManifestError: the manifest itself is malformed (not JSON, unknown keys, repeated ids).
        ValueError: nothing to evaluate, or every scan was skipped.
    """
    from medmae.data.datamodule import split_records
    from medmae.data.manifest import ScanRecord, read_manifest
    from medmae.data.preprocess import load_record
    from medmae.inference.repair import resolve_modality
    from medmae.io import read_volume
    from medmae.io.readers import require_signal
    from medmae.models.checkpoint import load_checkpoint

    entries: list[tuple[str, Path | ScanRecord, str]] = []
    if manifest is not None:
        records = read_manifest(manifest, check_files=False)  # a missing scan is skipped below, with the others
        if held_out:
            split = load_checkpoint(ckpt).get("datamodule_hyper_parameters") or {}
            records = split_records(records, float(split.get("val_fraction", 0.1)), int(split.get("seed", 0)))[1]
        entries += [(r.id, r, r.modality if r.modality in ("CT", "MR") else modality) for r in records[:limit]]
    entries += [(Path(p).name.split(".")[0], Path(p), modality) for p in scans]
    if not entries:
        raise ValueError("nothing to evaluate: pass --manifest and/or --scan")
    out, skipped = [], []
    for name, source, scan_modality in entries:
        try:
            volume = (
                load_record(source, Path(manifest).parent) if isinstance(source, ScanRecord) else read_volume(source)
            )
            require_signal(volume)
        except SCAN_ERRORS as error:
            skipped.append((name, one_line(error)))
            continue
        array = centre_crop(volume.array[0], max_size)
        out.append(EvalScan(name, array, volume.spacing, resolve_modality(volume, scan_modality)))
    if not out:
        raise ValueError(f"none of the {len(entries)} scans can be evaluated; the first: {skipped[0][1]}")
    return out, skipped


def report_text(checkpoint: Path, table: str, skipped: Sequence[tuple[str, str]]) -> str:
    """The ``restore_eval.md`` report: the checkpoint, the table, and the scans skipped with their reason."""
    lines = [f"checkpoint: {checkpoint.name}", "", table]
    if skipped:
        lines += ["", f"skipped {len(skipped)} scan(s):", *(f"- {name}: {reason}" for name, reason in skipped)]
    return "\n".join(lines) + "\n"


def run_evaluation(args: object, settings: RepairSettings) -> str:
    """Everything ``medmae evaluate-restore`` does; returns the markdown table (also written to ``args.output``).

    A scan that cannot be evaluated is skipped, printed and listed in ``restore_eval.md``.
    """
    import json

    from medmae.tasks.restore import load_restoration_net

    net, hparams = load_restoration_net(args.ckpt)
    scans, skipped = evaluation_scans(
        args.manifest, args.held_out, args.scan, args.ckpt, args.modality, args.limit, args.max_size
    )
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", flush=True)
    rng = np.random.default_rng(0)
    output = Path(args.output)
    rows: list[ScoreRow] = []
    for scan in scans:
        note = unseen_modality_note(hparams, scan.modality, scan.name)
        if note:
            print(note, flush=True)
        if "inpaint" in args.tasks:
            rows += inpainting_rows(net, hparams, scan, args.widths, args.gaps, settings, rng, output / "figures")
        if "denoise" in args.tasks:
            levels = args.ct_noise if scan.modality == "CT" else args.mr_noise
            rows += denoising_rows(net, hparams, scan, levels, settings, output / "figures")
        print(f"evaluated {scan.name}", flush=True)
    table = summarise(rows)
    output.mkdir(parents=True, exist_ok=True)
    (output / "restore_eval.md").write_text(report_text(Path(args.ckpt), table, skipped))
    (output / "restore_eval.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return table
