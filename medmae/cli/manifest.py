"""``medmae manifest``: build JSON Lines manifests from folders or MSD ``dataset.json`` files."""

from __future__ import annotations

import argparse
from pathlib import Path

SCAN_EXAMPLES = """examples:
  medmae manifest scan /data/archive -o data_manifests/archive.jsonl --workers 8
  medmae manifest scan /data/brats -o data_manifests/brats.jsonl --modality MR --channels t1,t2,flair
  # a cluster array job: each task reads one shard, then one run assembles the manifest
  medmae manifest scan /data/archive -o data_manifests/archive.jsonl --shard $SLURM_ARRAY_TASK_ID/16
  medmae manifest scan /data/archive -o data_manifests/archive.jsonl"""

EXAMPLES = """examples:
  medmae manifest scan /data/archive -o data_manifests/archive.jsonl --modality CT
  medmae manifest from-msd ../shared/data/hippocampus/dataset.json -o data_manifests/hippocampus.jsonl"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "manifest",
        help="build a manifest (.jsonl) from a folder of scans or an MSD dataset.json",
        description="Build a JSON Lines manifest, one record per scan.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="manifest_command", metavar="ACTION", required=True)

    scan = actions.add_parser(
        "scan",
        help="find NIfTI/NRRD/MHA files and DICOM series under a folder, validate them, write a report",
        description=(
            "Find every scan under ROOT (NIfTI, NRRD, MHA, DICOM series in any folder layout), check it and "
            "write the manifest, NAME.report.json (counts and one line per skipped file or series) and "
            "NAME.state/ (for incremental re-runs). No patient identifier is written anywhere."
        ),
        epilog=SCAN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("root", type=Path, help="folder to search recursively (never modified)")
    scan.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    scan.add_argument("--modality", default=None, help="modality for every record (default: DICOM's; files: guessed)")
    scan.add_argument("--workers", type=int, default=1, help="reading processes (default 1)")
    scan.add_argument("--shard", default=None, metavar="I/N", help="read only shard I of N (cluster array jobs)")
    scan.add_argument("--min-slices", type=int, default=10, help="skip DICOM series with fewer slices (default 10)")
    scan.add_argument(
        "--max-gap-ratio",
        type=float,
        default=3.0,
        help="resample irregular slice spacing while the largest gap is at most this times the median (default 3)",
    )
    scan.add_argument(
        "--channels",
        default="",
        help="comma-separated channel names: <subject>_<name> files become one record",
    )
    scan.add_argument("--salt-file", type=Path, default=None, help="salt for series ids (default NAME.state/salt)")
    scan.add_argument("--no-progress", action="store_true", help="no progress bar")
    scan.set_defaults(func=run_scan)

    msd = actions.add_parser(
        "from-msd",
        help="convert an MSD-style dataset.json",
        epilog="example:\n  medmae manifest from-msd Task04_Hippocampus/dataset.json -o data_manifests/hippo.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    msd.add_argument("dataset_json", type=Path, help="path to dataset.json")
    msd.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    msd.add_argument("--include-test", action="store_true", help="also add the unlabelled test images")
    msd.set_defaults(func=run_from_msd)


def run_scan(args: argparse.Namespace) -> int:
    from medmae.data.scan import ScanOptions, scan_folder

    channels = tuple(c.strip() for c in args.channels.split(",") if c.strip())
    options = ScanOptions(args.modality, args.min_slices, args.max_gap_ratio, channels)
    return scan_folder(
        args.root,
        args.output,
        workers=args.workers,
        shard=args.shard,
        options=options,
        salt_file=args.salt_file,
        progress=not args.no_progress,
    )


def run_from_msd(args: argparse.Namespace) -> int:
    from medmae.data.manifest import write_manifest
    from medmae.data.msd import records_from_msd

    records = records_from_msd(args.dataset_json, include_test=args.include_test)
    write_manifest(records, args.output)
    print(f"wrote {len(records)} records to {args.output}")
    return 0
