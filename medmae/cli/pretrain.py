"""``medmae pretrain``: MAE pretraining through LightningCLI (``--config`` YAML + dotted overrides)."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  medmae pretrain --config configs/pretrain/tiny.yaml --data.manifest data_manifests/hippocampus.jsonl
  medmae pretrain --config configs/pretrain/mr_base.yaml --data.manifest data_manifests/archive.jsonl \\
      --trainer.max_steps 40 --trainer.default_root_dir runs/x
  medmae pretrain --config configs/pretrain/tiny.yaml --ckpt_path runs/x/.../checkpoints/last.ckpt   # resume
  medmae pretrain --config configs/pretrain/tiny.yaml --wandb offline

Every argument of medmae.tasks.pretrain.MAEPretrainTask (--model.*), medmae.data.datamodule.PretrainDataModule
(--data.*) and lightning.Trainer (--trainer.*) can be set in the YAML or on the command line;
`medmae pretrain --print_config` shows the full resolved config."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain a 3D ViT masked autoencoder on a manifest of scans",
        description="Pretrain a 3D ViT masked autoencoder (LightningCLI: --config, --model.*, --data.*, --trainer.*).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help (and the LightningCLI options)")
    parser.add_argument("--ckpt_path", default=None, help="resume from this checkpoint (optimizer, schedule, step)")
    parser.add_argument(
        "--wandb",
        choices=("online", "offline"),
        default=None,
        help="also log to Weights & Biases (offline needs no account or network)",
    )
    parser.set_defaults(func=run, accepts_extra=True, help_parser=parser)


def run(args: argparse.Namespace) -> int:
    from medmae.tasks.cli import fit_with_cli

    if args.help:
        args.help_parser.print_help()
        print("\nLightningCLI options:\n")
        return fit_with_cli("pretrain", ["--help"])
    return fit_with_cli("pretrain", args.extra, ckpt_path=args.ckpt_path, wandb=args.wandb)
