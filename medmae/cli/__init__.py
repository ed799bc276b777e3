"""The ``medmae`` command: one subcommand per stage.

Each stage lives in its own module exposing ``register(subparsers)``; the module adds its parser and
sets ``func(args) -> int`` on it. Heavy imports happen inside ``func`` so ``medmae --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from medmae.errors import report_error, root_cause
from medmae.io.volume import VolumeError

# Stage modules, in the order ``medmae --help`` lists them.
COMMAND_MODULES = (
    "medmae.cli.demo",
    "medmae.cli.manifest",
    "medmae.cli.preprocess",
    "medmae.cli.pretrain",
    "medmae.cli.export",
    "medmae.cli.repair",
    "medmae.cli.segment",
)

EPILOG = """examples:
  medmae demo                                   # the built-in end-to-end demo on bundled real scans
  medmae manifest scan /data/archive -o data_manifests/archive.jsonl
  medmae pretrain --config configs/pretrain/tiny.yaml --data.manifest data_manifests/archive.jsonl
  medmae export runs/x/checkpoints/last.ckpt --format monai-vit -o encoder.pt

run `medmae COMMAND --help` for each command's options and an example."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medmae",
        description="Self-supervised masked-autoencoder pretraining, repair and transfer for 3D medical scans.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medmae`` console command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.version:
        from medmae import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 1
    if rest and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    args.extra = rest
    try:
        return int(args.func(args) or 0)
    except (VolumeError, ValueError, OSError) as error:
        return report_error(error)
    except RuntimeError as error:  # MONAI wraps transform errors; report ours, re-raise real crashes
        if isinstance(root_cause(error), (VolumeError, ValueError, OSError)):
            return report_error(root_cause(error))
        raise


if __name__ == "__main__":
    sys.exit(main())
