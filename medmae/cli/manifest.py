"""``medmae manifest``: build JSON Lines manifests from folders or MSD ``dataset.json`` files."""

from __future__ import annotations

import argparse
from pathlib import Path

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
        help="find NIfTI/NRRD/MHA files under a folder",
        epilog="example:\n  medmae manifest scan /data/archive -o data_manifests/archive.jsonl --modality MR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("root", type=Path, help="folder to search recursively")
    scan.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    scan.add_argument("--modality", default=None, help="modality for files that do not say (CT or MR)")
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
    from medmae.data.scan import scan_folder

    return scan_folder(args.root, args.output, modality=args.modality)


def run_from_msd(args: argparse.Namespace) -> int:
    from medmae.data.manifest import write_manifest
    from medmae.data.msd import records_from_msd

    records = records_from_msd(args.dataset_json, include_test=args.include_test)
    write_manifest(records, args.output)
    print(f"wrote {len(records)} records to {args.output}")
    return 0
