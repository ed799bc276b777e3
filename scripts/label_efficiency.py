"""Does pretraining pay? Dice on a fixed test split against the number of labelled training scans.

On the MSD hippocampus scans: a fixed test split (never used for pretraining or fine-tuning) is set
aside; a tiny MAE is pretrained on every other scan (unlabelled use); then for each k and seed three
models are fine-tuned through the same code path on the same k scans: the pretrained ViT (UNETR decoder,
layer-wise lr decay), the same ViT from scratch, and a MONAI UNet from scratch. Each is evaluated with
``medmae segment``'s inference on the original test files. Writes ``docs/label_efficiency.{csv,md,png}``.

    python scripts/label_efficiency.py                       # defaults: < 1 h on a 2-core CPU
    python scripts/label_efficiency.py --pretrain-steps 20000 --finetune-steps 1000 --seeds 0 1 2 --preset small
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import lightning as L
import numpy as np

from medmae.data.datamodule import PretrainDataModule
from medmae.data.manifest import write_manifest
from medmae.data.msd import records_from_msd
from medmae.data.seg_datamodule import seg_splits
from medmae.evaluation.seg_metrics import score_case
from medmae.inference.segment import load_segmenter, segment_volume
from medmae.io.readers import read_volume
from medmae.tasks.pretrain import MAEPretrainTask
from medmae.tasks.segment_demo import fit_segmenter

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("pretrained-vit", "scratch-vit", "scratch-unet")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hippocampus")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "label_efficiency")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--ks", nargs="+", default=["1", "2", "5", "10", "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--roi", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--mask-kind", default="random")
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--layer-decay", type=float, default=0.75)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--pretrained-ckpt", type=Path, default=None, help="reuse a pretraining checkpoint")
    parser.add_argument("--resume", action="store_true", help="keep the rows of OUT/label_efficiency.csv, run the rest")
    return parser.parse_args()


def pretrain(args: argparse.Namespace, manifest: Path) -> Path:
    """Pretrain the MAE on the non-test scans; returns the last checkpoint."""
    L.seed_everything(0, verbose=False)
    task = MAEPretrainTask(
        preset=args.preset,
        patch_size=args.patch,
        mask_kind=args.mask_kind,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=False,
        lr=1e-3,
        warmup_steps=args.pretrain_steps // 20,
        figure_every_n_steps=args.pretrain_steps,
    )
    data = PretrainDataModule(str(manifest), [args.roi] * 3, None, batch_size=8, val_fraction=0.05)
    trainer = L.Trainer(
        max_steps=args.pretrain_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(args.workdir / "pretrain"),
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=args.pretrain_steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=data)
    return Path(trainer.checkpoint_callback.last_model_path)


def model_settings(method: str, args: argparse.Namespace, pretrained: Path) -> dict:
    vit = {
        "preset": args.preset,
        "patch_size": args.patch,
        "feature_size": 16,
        "lr": args.lr,
        "num_classes": 3,
        "warmup_steps": args.finetune_steps // 10,
    }
    if method == "pretrained-vit":
        return {**vit, "pretrained": str(pretrained), "layer_decay": args.layer_decay}
    if method == "scratch-vit":
        return {**vit, "layer_decay": 1.0}
    return {
        "arch": "unet",
        "feature_size": 16,
        "lr": args.lr,
        "num_classes": 3,
        "warmup_steps": args.finetune_steps // 10,
    }


def test_dice(checkpoint: Path, test_records: list) -> float:
    """Mean foreground Dice over the test scans, predicted on their original grids."""
    model = load_segmenter(checkpoint)
    scores = [
        score_case(segment_volume(model, r.image[0]), read_volume(r.label), 3, r.id, hd95=False) for r in test_records
    ]
    return float(np.nanmean([np.nanmean(s.dice) for s in scores]))


def previous_rows(path: Path) -> list[dict]:
    """Rows of an earlier run's CSV (typed like fresh rows), or none."""
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{**r, "seed": int(r["seed"]), "test_dice": float(r["test_dice"])} for r in csv.DictReader(handle)]


def write_outputs(rows: list[dict], out: Path, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "label_efficiency.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ks = sorted(dict.fromkeys(r["k"] for r in rows), key=lambda k: float("inf") if k == "all" else int(k))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {(m, k): [r["test_dice"] for r in rows if r["method"] == m and r["k"] == k] for m in methods for k in ks}
    lines = [
        f"Test Dice (mean of anterior/posterior hippocampus, {rows[0]['n_test']} test scans): mean ± sd over the "
        f"seeds run (n per cell), pretraining {args.pretrain_steps} steps, fine-tuning {args.finetune_steps} steps.",
        "",
        "| method | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---" * (len(ks) + 1) + "|",
    ]
    for m in methods:
        cells = [f"{np.mean(v):.3f} ± {np.std(v):.3f} (n={len(v)})" for v in (summary[(m, k)] for k in ks)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    (out / "label_efficiency.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    positions = range(len(ks))
    for m in methods:
        means = [np.mean(summary[(m, k)]) for k in ks]
        stds = [np.std(summary[(m, k)]) for k in ks]
        axis.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=m)
    axis.set_xticks(list(positions), [str(k) for k in ks])
    axis.set_xlabel("labelled training scans k")
    axis.set_ylabel("test Dice")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "label_efficiency.png", dpi=120)


def main() -> None:
    args = parse_args()
    start = time.time()
    records = records_from_msd(args.data / "dataset.json")
    test = seg_splits(records, args.test_fraction, 0.05, None).test
    test_ids = {r.id for r in test}
    unlabelled = write_manifest([r for r in records if r.id not in test_ids], args.workdir / "pretrain.jsonl")
    labelled = write_manifest(records, args.workdir / "all.jsonl")
    pretrained = args.pretrained_ckpt or pretrain(args, unlabelled)
    print(f"pretrained {pretrained} ({time.time() - start:.0f} s); {len(test)} test scans", flush=True)
    rows = previous_rows(args.out / "label_efficiency.csv") if args.resume else []
    done = {(r["method"], r["k"], r["seed"]) for r in rows}
    for k in args.ks:
        for seed in args.seeds:
            for method in args.methods:
                if (method, k, seed) in done:
                    continue
                data = {
                    "manifest": str(labelled),
                    "num_classes": 3,
                    "num_labeled": None if k == "all" else int(k),
                    "roi_size": [args.roi] * 3,
                    "spacing": None,
                    "batch_size": 2,
                    "test_fraction": args.test_fraction,
                    "val_fraction": 0.05,
                    "seed": seed,
                    "preprocess_workers": 1,
                }
                workdir = args.workdir / f"k{k}-s{seed}-{method}"
                checkpoint, datamodule = fit_segmenter(
                    workdir,
                    model_settings(method, args, pretrained),
                    data,
                    args.finetune_steps,
                    max(1, args.finetune_steps // 4),
                    seed,
                )
                assert {r.id for r in datamodule.splits.test} == test_ids
                dice = test_dice(checkpoint, datamodule.splits.test)
                rows.append(
                    {
                        "method": method,
                        "k": k,
                        "seed": seed,
                        "test_dice": round(dice, 4),
                        "n_test": len(test),
                        "n_train": len(datamodule.splits.train),
                    }
                )
                print(f"k={k} seed={seed} {method}: test Dice {dice:.3f} ({time.time() - start:.0f} s)", flush=True)
                write_outputs(rows, args.out, args)
    write_outputs(rows, args.out, args)


if __name__ == "__main__":
    main()
