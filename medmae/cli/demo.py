"""``medmae demo``: the end-to-end demo on real scans bundled with the package."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  medmae demo                          # writes everything to ./medmae_demo_output
  medmae demo -o /tmp/demo --steps 100 # a quicker run"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the built-in demo on bundled real MRI scans (a few minutes on a CPU)",
        description="Manifest -> MAE pretraining -> reconstruction figure and loss curve, on 24 bundled "
        "hippocampus MRI crops (MSD Task04, CC-BY-SA 4.0).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("medmae_demo_output"), help="output folder")
    parser.add_argument("--steps", type=int, default=1000, help="pretraining steps (default 1000)")
    parser.add_argument("--minutes", type=float, default=4.0, help="pretraining time limit in minutes")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmae.demo import run_demo, summary

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    result = run_demo(args.output, args.steps, args.minutes, args.seed)
    print(summary(result))
    return 0
