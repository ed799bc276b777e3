"""``medmae finetune-restore``, ``inpaint``, ``denoise`` and ``evaluate-restore``: repairing scans."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

FINETUNE_EXAMPLES = """examples:
  medmae finetune-restore --config configs/restore/tiny.yaml --model.pretrained runs/x/checkpoints/last.ckpt
  medmae finetune-restore --config configs/restore/mr_denoise.yaml --threads 1 --trainer.max_steps 2000

Every argument of medmae.tasks.restore.MAERestoreTask (--model.*), PretrainDataModule (--data.*) and
lightning.Trainer (--trainer.*) can be set in the YAML or on the command line."""

INPAINT_EXAMPLES = """examples:
  medmae inpaint scan.nii.gz -o repaired.nii.gz --ckpt restore.ckpt --slices 40-42,50 --axis z
  medmae inpaint scan.nrrd -o repaired.nrrd --ckpt restore.ckpt --mask damaged.nii.gz
  medmae inpaint dicom_folder/ -o repaired.nii.gz --ckpt restore.ckpt --detect
  medmae inpaint ct.nrrd -o repaired.nrrd --interpolation fitted --slices 20-22   # no checkpoint

Only the selected voxels change; every other voxel is bit-identical to the input. --axis auto (default)
is the thickest axis (z when isotropic). Axes are the file's voxel index axes (i/j/k = x/y/z)."""

DENOISE_EXAMPLES = """examples:
  medmae denoise lowdose.nii.gz -o denoised.nii.gz --ckpt restore-denoise.ckpt
  medmae denoise t1.nii.gz -o t1_denoised.nii.gz --ckpt restore.ckpt --modality MR --device cuda
  medmae denoise lowdose_ct.nrrd -o denoised.nrrd --ckpt ct_denoise.ckpt --noise-sigma 30   # remove 30 HU"""

EVALUATE_EXAMPLES = """examples:
  medmae evaluate-restore --ckpt restore.ckpt --manifest data_manifests/hippocampus.jsonl --held-out \\
      -o docs/restore_eval
  medmae evaluate-restore --ckpt restore.ckpt --scan ../shared/data/ct_mr_samples/example_ct_sm.nii.gz \\
      --tasks inpaint -o out/"""


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: PyTorch's choice; 1 is fastest for tiny models on busy CPUs)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is None:
        return
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _add_input_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="NIfTI, NRRD, MHA file or DICOM series folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file (.nii.gz, .nrrd, .mha)")


def _add_model_options(parser: argparse.ArgumentParser, without_checkpoint: str | None = None) -> None:
    """The options of a repair by a checkpoint; ``without_checkpoint``, the help of ``--interpolation``: the
    repair may instead run without one (exactly one of the two is required)."""
    from medmae.inference.repair import INTERPOLATIONS

    source = parser.add_mutually_exclusive_group(required=True) if without_checkpoint else parser
    source.add_argument(
        "--ckpt",
        type=Path,
        required=not without_checkpoint,
        help="a medmae pretrain or finetune-restore checkpoint",
    )
    if without_checkpoint:
        source.add_argument("--interpolation", choices=INTERPOLATIONS, help=without_checkpoint)
    else:
        parser.set_defaults(interpolation=None)
    parser.add_argument(
        "--modality",
        choices=("auto", "CT", "MR"),
        default="auto",
        help="intensity model (auto: CT for integer scans reaching -500 HU)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: a GPU when present)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="average over the 8 axis flips (test-time mirroring, as nnU-Net; 8x slower)",
    )
    _add_threads(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    finetune = subparsers.add_parser(
        "finetune-restore",
        help="fine-tune a pretrained MAE for inpainting/denoising",
        description=(
            "Fine-tune a pretrained MAE for restoration (LightningCLI: --config, --model.*, --data.*, --trainer.*)."
        ),
        epilog=FINETUNE_EXAMPLES,
        formatter_class=fmt,
        add_help=False,
    )
    finetune.add_argument("-h", "--help", action="store_true", help="show this help (and the LightningCLI options)")
    finetune.add_argument("--ckpt_path", default=None, help="resume this restoration run")
    _add_threads(finetune)
    finetune.set_defaults(func=run_finetune, accepts_extra=True, help_parser=finetune)

    inpaint = subparsers.add_parser(
        "inpaint",
        help="fill corrupted slices or a masked region of a scan",
        epilog=INPAINT_EXAMPLES,
        formatter_class=fmt,
        description="Repair dropped/corrupted slices or a masked region; every other voxel stays bit-identical.",
    )
    _add_input_output(inpaint)
    where = inpaint.add_mutually_exclusive_group(required=True)
    where.add_argument("--slices", help="slice indices and inclusive ranges, e.g. 40-42,50")
    where.add_argument("--mask", type=Path, help="a volume on the input's grid; nonzero voxels are repaired")
    where.add_argument("--detect", action="store_true", help="find corrupted slices automatically and repair them")
    inpaint.add_argument("--axis", default="auto", help="slice axis for --slices/--detect: x, y, z (i, j, k) or auto")
    _add_model_options(
        inpaint,
        without_checkpoint="repair without a checkpoint: linear, flow (along the scan's motion) or fitted (flow "
        "corrected by a regression fitted to the scan's own intact slices; slice gaps)",
    )
    inpaint.set_defaults(func=run_inpaint)

    denoise = subparsers.add_parser(
        "denoise",
        help="denoise a scan",
        epilog=DENOISE_EXAMPLES,
        formatter_class=fmt,
        description="Denoise a scan (a plain pretraining checkpoint gives a smooth blind-spot estimate).",
    )
    _add_input_output(denoise)
    _add_model_options(denoise)
    denoise.add_argument(
        "--noise-sigma",
        type=float,
        default=None,
        help="std of the noise to remove, in the scan's units (HU for CT), for checkpoints trained with nlm_input; "
        "default: estimated from the scan",
    )
    denoise.set_defaults(func=run_denoise)

    evaluate = subparsers.add_parser(
        "evaluate-restore",
        help="score repair against interpolation / classical denoisers",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=fmt,
        description="Corrupt held-out scans with known damage, repair, and report PSNR/SSIM/MAE.",
    )
    evaluate.add_argument("--manifest", type=Path, help="scans to evaluate (JSON Lines manifest)")
    evaluate.add_argument(
        "--held-out", action="store_true", help="only the manifest's validation scans of the checkpoint's split"
    )
    evaluate.add_argument("--scan", type=Path, action="append", default=[], help="a scan to evaluate (repeatable)")
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many manifest scans")
    evaluate.add_argument("--tasks", nargs="+", choices=("inpaint", "denoise"), default=["inpaint", "denoise"])
    evaluate.add_argument("--widths", type=int, nargs="+", default=[1, 3, 5], help="gap widths in slices")
    evaluate.add_argument("--gaps", type=int, default=2, help="random gaps per width and scan")
    evaluate.add_argument(
        "--mr-noise", type=float, nargs="+", default=[0.05], help="Rician sigma, fraction of the robust range"
    )
    evaluate.add_argument("--ct-noise", type=float, nargs="+", default=[30.0], help="Gaussian sigma in HU")
    evaluate.add_argument(
        "--max-size", type=int, default=160, help="evaluate the central crop of at most this many voxels per axis"
    )
    evaluate.add_argument(
        "-o", "--output", type=Path, required=True, help="folder for the table (.md, .json) and figures"
    )
    _add_model_options(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def run_finetune(args: argparse.Namespace) -> int:
    from medmae.tasks.cli import fit_with_cli

    if args.help:
        args.help_parser.print_help()
        print("\nLightningCLI options:\n")
        return fit_with_cli("restore", ["--help"])
    _set_threads(args)
    return fit_with_cli("restore", args.extra, ckpt_path=args.ckpt_path)


def _settings(args: argparse.Namespace, progress: bool = True):
    from medmae.inference.repair import RepairSettings

    if not 0.0 <= args.overlap < 1.0:
        raise ValueError(f"--overlap must be in [0, 1), got {args.overlap}")
    _set_threads(args)
    return RepairSettings(
        overlap=args.overlap,
        batch_size=max(1, args.batch_size),
        device=args.device,
        progress=progress,
        mirror=args.mirror,
    )


def _repair_mask(args: argparse.Namespace, volume):
    import numpy as np

    from medmae.io import read_volume
    from medmae.io.volume import VolumeError
    from medmae.restore.detect import detect_corrupted_slices
    from medmae.restore.slices import parse_axis, parse_slices, slice_mask

    if args.mask is not None:
        mask_volume = read_volume(args.mask)
        if not mask_volume.same_grid(volume):
            raise VolumeError(
                f"{args.mask}: the mask is on another grid than {args.input} (shape {mask_volume.spatial_shape} vs "
                f"{volume.spatial_shape}, or a different affine); give a mask on the input's grid"
            )
        return np.any(mask_volume.array != 0, axis=0)
    axis = parse_axis(args.axis, volume.spacing)
    if args.slices is not None:
        indices = parse_slices(args.slices, volume.spatial_shape[axis])
    else:
        findings = detect_corrupted_slices(volume.array[0], axis)
        for finding in findings:
            print(f"slice {finding.index} (axis {'xyz'[axis]}): {finding.kind}: {finding.reason}")
        if not findings:
            print(f"no corrupted slices found along axis {'xyz'[axis]}; writing an unchanged copy")
        indices = [f.index for f in findings]
    return slice_mask(volume.spatial_shape, axis, indices)


def _modality(volume, args: argparse.Namespace, hparams: dict) -> str:
    """The scan's modality (``--modality``, or guessed), with a note on stderr when the checkpoint never saw it."""
    from medmae.inference.repair import resolve_modality, unseen_modality_note

    modality = resolve_modality(volume, args.modality)
    note = unseen_modality_note(hparams, modality, str(args.input))
    if note:
        print(note, file=sys.stderr)
    return modality


def run_inpaint(args: argparse.Namespace) -> int:
    from medmae.inference.repair import inpaint_volume
    from medmae.io import read_volume, write_volume
    from medmae.io.readers import require_signal
    from medmae.tasks.restore import load_restoration_net

    volume = read_volume(args.input)
    require_signal(volume)
    mask = _repair_mask(args, volume)
    if args.interpolation is not None:
        return _interpolate(args, volume, mask)
    net, hparams = load_restoration_net(args.ckpt)
    modality = _modality(volume, args, hparams)
    repaired = inpaint_volume(net, hparams, volume, mask, modality, _settings(args))
    path = write_volume(repaired, args.output)
    print(f"repaired {int(mask.sum())} voxels; wrote {path}")
    return 0


def _interpolate(args: argparse.Namespace, volume, mask) -> int:
    from medmae.inference.repair import interpolate_volume
    from medmae.io import write_volume

    repaired, fits = interpolate_volume(volume, mask, args.interpolation)
    for fit in fits:
        where = f"slices {fit.first}-{fit.last} (axis {'xyz'[fit.axis]})"
        if all(strength is None for strength in fit.strengths):
            print(f"{where}: flow fill kept ({fit.positions} example gaps; the fit did not predict them better)")
        else:
            gains = ", ".join(f"{gain:.2f}" for gain in fit.held_out_gain)
            print(
                f"{where}: fitted on {fit.positions} example gaps; held-out error of flow / fitted per slice: {gains}"
            )
    path = write_volume(repaired, args.output)
    print(f"repaired {int(mask.sum())} voxels by {args.interpolation} interpolation; wrote {path}")
    return 0


def run_denoise(args: argparse.Namespace) -> int:
    from medmae.inference.repair import denoise_volume
    from medmae.io import read_volume, write_volume
    from medmae.io.readers import require_signal
    from medmae.tasks.restore import load_restoration_net

    volume = read_volume(args.input)
    require_signal(volume)
    net, hparams = load_restoration_net(args.ckpt)
    if args.noise_sigma is not None and not net.nlm_input:
        raise ValueError(
            f"{args.ckpt}: this checkpoint does not take a noise level (it was trained without nlm_input); "
            "drop --noise-sigma, or use a checkpoint trained with nlm_input: true"
        )
    if hparams.get("mode") != "denoise":
        print(
            f"note: {args.ckpt} was not fine-tuned for denoising, so this is a smooth blind-spot estimate; for real "
            "denoising use a `medmae finetune-restore --model.mode denoise` checkpoint",
            file=sys.stderr,
        )
    settings = replace(_settings(args), noise_sigma=args.noise_sigma)
    path = write_volume(denoise_volume(net, hparams, volume, _modality(volume, args, hparams), settings), args.output)
    print(f"wrote {path}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from medmae.restore.evaluate import run_evaluation

    table = run_evaluation(args, _settings(args, progress=False))
    print(table)
    return 0
