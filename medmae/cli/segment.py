"""``medmae finetune`` / ``segment`` / ``evaluate-seg``: few-label segmentation on a pretrained encoder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FINETUNE_EXAMPLES = """examples:
  medmae finetune --config configs/segment/tiny.yaml --model.pretrained runs/x/logs/version_0/checkpoints/last.ckpt
  medmae finetune --config configs/segment/hippocampus.yaml --data.num_labeled 5 --data.seed 1 \\
      --model.pretrained encoder.pt --model.freeze_encoder_steps 100
  medmae finetune --config configs/segment/hippocampus.yaml --model.arch unet      # CNN baseline from scratch

Every argument of medmae.tasks.segment.SegmentTask (--model.*), medmae.data.seg_datamodule.SegDataModule
(--data.*) and lightning.Trainer (--trainer.*) can be set in the YAML or on the command line;
`medmae finetune --print_config` shows the full resolved config. The best checkpoint is chosen by
validation Dice (best-*.ckpt)."""

SEGMENT_EXAMPLES = """examples:
  medmae segment scan.nii.gz -o scan_seg.nii.gz --ckpt runs/segment/logs/version_0/checkpoints/best-400.ckpt
  medmae segment dicom_series_folder/ -o seg.nrrd --ckpt best.ckpt
  medmae segment imagesTs/ -o predictions/ --ckpt best.ckpt        # a folder of scans → a folder of label maps
  medmae segment t1.nii.gz t2.nii.gz flair.nii.gz -o seg.nii.gz --ckpt best.ckpt   # channels, manifest order

For a multi-channel model, a folder of nnU-Net-style files (CASE_0000.nii.gz, CASE_0001.nii.gz, ...) is
segmented case by case into CASE.nii.gz; with --channels t1,t2,flair, files <subject>_t1.nii.gz ... into
<subject>.nii.gz (as `medmae manifest scan --channels` groups them). A channel may also be one 4D file.

The label map is on the input's own grid (shape, orientation, spacing, origin) in an integer dtype.
A scan of a folder that cannot be segmented (unreadable, NaN/Inf, constant...) is skipped and listed on
screen and in OUTPUT/segment_report.json; the exit code is 0 when at least one scan was segmented, 2 when
none was (and for any failure of a single scan)."""

EVALUATE_EXAMPLES = """examples:
  medmae evaluate-seg --pred predictions/ --truth labelsTs/
  medmae evaluate-seg --pred predictions/ --truth labelsTs/ --num-classes 3 --csv scores.csv

Files are matched by name. Dice is NaN (n/a) for a class absent from both maps; HD95 (mm) is n/a when a
class is missing from either map; means ignore n/a."""


def register(subparsers: argparse._SubParsersAction) -> None:
    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a segmentation model (pretrained ViT + UNETR, or a baseline) on labelled scans",
        description="Fine-tune for segmentation (LightningCLI: --config, --model.*, --data.*, --trainer.*).",
        epilog=FINETUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    finetune.add_argument("-h", "--help", action="store_true", help="show this help (and the LightningCLI options)")
    finetune.add_argument("--ckpt_path", default=None, help="resume from this checkpoint (optimizer, schedule, step)")
    finetune.set_defaults(func=run_finetune, accepts_extra=True, help_parser=finetune)

    segment = subparsers.add_parser(
        "segment",
        help="segment a scan (or a folder of scans) with a fine-tuned checkpoint",
        description="Predict a label map on the input's own grid.",
        epilog=SEGMENT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    segment.add_argument(
        "input",
        type=Path,
        nargs="+",
        help="NIfTI/NRRD/MHA file, DICOM series folder, or folder of scans; several files: the channels of one scan",
    )
    segment.add_argument("-o", "--output", type=Path, required=True, help="output label map file (or folder)")
    segment.add_argument("--ckpt", type=Path, required=True, help="a checkpoint written by medmae finetune")
    segment.add_argument(
        "--channels",
        default="",
        help="for a folder: channel names, files <subject>_<name>.<ext> (as `manifest scan --channels`), in order",
    )
    segment.add_argument("--no-progress", action="store_true", help="no progress bar")
    segment.set_defaults(func=run_segment)

    evaluate = subparsers.add_parser(
        "evaluate-seg",
        help="Dice and HD95 per class of predicted label maps against the truth",
        description="Score a folder of predicted label maps against a folder of reference label maps.",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps")
    evaluate.add_argument("--truth", type=Path, required=True, help="folder of reference label maps (same names)")
    evaluate.add_argument(
        "--num-classes", type=int, default=None, help="classes incl. background (default: from truth)"
    )
    evaluate.add_argument("--csv", type=Path, default=None, help="CSV output (default: PRED/scores.csv)")
    evaluate.set_defaults(func=run_evaluate)


def run_finetune(args: argparse.Namespace) -> int:
    from medmae.tasks.cli import fit_with_cli

    if args.help:
        args.help_parser.print_help()
        print("\nLightningCLI options:\n")
        return fit_with_cli("segment", ["--help"])
    return fit_with_cli("segment", args.extra, ckpt_path=args.ckpt_path)


def run_segment(args: argparse.Namespace) -> int:
    from medmae.inference.segment import segment_paths
    from medmae.io.volume import VolumeError

    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    run = segment_paths(args.ckpt, args.input, args.output, progress=not args.no_progress, channels=channels)
    for note in run.notes:
        print(note, file=sys.stderr)
    for path in run.written:
        print(f"wrote {path}")
    for _, reason in run.skipped:
        print(f"skipped {reason}")
    if run.report is not None:
        print(f"{len(run.written)} segmented, {len(run.skipped)} skipped; wrote {run.report}")
    if run.skipped and not run.written:
        raise VolumeError(
            f"{args.input[0]}: none of its {len(run.skipped)} scans could be segmented (see {run.report})"
        )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from medmae.evaluation.seg_metrics import evaluate_folders, format_table, score_rows, write_csv

    rows = score_rows(evaluate_folders(args.pred, args.truth, args.num_classes))
    print(format_table(rows))
    print(f"wrote {write_csv(rows, args.csv or args.pred / 'scores.csv')}")
    return 0
