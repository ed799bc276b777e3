"""``medmae export``: write a pretrained encoder in a format other tools load."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  medmae export runs/x/logs/version_0/checkpoints/last.ckpt --format monai-vit -o encoder.pt
  medmae export last.ckpt -o encoder.pt --img-size 128 128 128     # position embedding for 128^3 inputs

Then, in Python (any preset; encoder.json holds the matching ViT arguments):
  net = monai.networks.nets.ViT(**json.load(open("encoder.json"))["monai_vit_kwargs"])
  net.load_state_dict(torch.load("encoder.pt", weights_only=True), strict=True)
or, for a base preset with 16^3 patches (MONAI's UNETR builds that ViT):
  net = monai.networks.nets.UNETR(in_channels=1, out_channels=3, img_size=(96, 96, 96))
  net.vit.load_state_dict(torch.load("encoder.pt", weights_only=True), strict=True)
(encoder.safetensors holds the same weights.)"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a pretrained encoder for MONAI's ViT / UNETR",
        description="Export the encoder of a medmae checkpoint.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt written by medmae pretrain")
    parser.add_argument("--format", choices=("monai-vit",), default="monai-vit", help="export format")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="output .pt file (.safetensors and .json beside it)"
    )
    parser.add_argument("--img-size", type=int, nargs=3, default=None, help="input size for the position embedding")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmae.models.checkpoint import export_monai_vit

    for path in export_monai_vit(args.checkpoint, args.output, args.img_size):
        print(f"wrote {path}")
    return 0
