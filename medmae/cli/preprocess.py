"""``medmae preprocess``: preprocess a manifest once into a cache that training reads crops from."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  medmae preprocess data_manifests/archive.jsonl --cache cache/archive --workers 8
  medmae preprocess data_manifests/archive.jsonl --cache cache/archive --spacing 1.5 1.5 2.0 --ct-window -1000 1000
  # then train from it
  medmae pretrain --config configs/pretrain/tiny.yaml --data.manifest data_manifests/archive.jsonl \\
      --data.cache_dir cache/archive"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="reorient, resample, normalise and crop every scan of a manifest into a crop cache",
        description=(
            "Preprocess each 'ok' record of MANIFEST once (RAS, target spacing, per-modality normalisation, "
            "foreground crop) into memory-mappable arrays under --cache. Resumable: scans already cached with "
            "the same parameters and unchanged sources are reused; changed parameters rebuild them."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path, help="manifest (.jsonl) from `medmae manifest scan`")
    parser.add_argument("--cache", type=Path, required=True, help="cache folder (created when missing)")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=[1.5, 1.5, 1.5],
        metavar=("X", "Y", "Z"),
        help="target voxel size in mm (default 1.5 1.5 1.5)",
    )
    parser.add_argument("--keep-spacing", action="store_true", help="do not resample")
    parser.add_argument(
        "--ct-window",
        type=float,
        nargs=2,
        default=[-1000.0, 1000.0],
        metavar=("LOW", "HIGH"),
        help="Hounsfield window mapped to [0, 1] (default -1000 1000)",
    )
    parser.add_argument(
        "--mr-percentiles",
        type=float,
        nargs=2,
        default=[0.5, 99.5],
        metavar=("LOW", "HIGH"),
        help="percentile clip before the MR z-score (default 0.5 99.5)",
    )
    parser.add_argument("--no-crop", action="store_true", help="keep the whole field of view")
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from medmae.data.cache import PreprocessParams, preprocess_manifest
    from medmae.data.transforms import IntensityConfig

    intensity = IntensityConfig(tuple(args.ct_window), tuple(args.mr_percentiles))
    spacing = None if args.keep_spacing else tuple(args.spacing)
    params = PreprocessParams(spacing, intensity, not args.no_crop)
    report = preprocess_manifest(args.manifest, args.cache, params, args.workers, progress=not args.no_progress)
    print(f"{args.cache}: {report['built']} built, {report['reused']} reused, {len(report['failed'])} failed")
    for failure in report["failed"]:
        print(f"  failed {failure['id']}: {failure['reason']}")
    return 0
