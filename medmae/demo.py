"""The built-in demo: real scans bundled with the package → manifest → pretraining → figures.

Later stages (repair, segmentation) add their own steps through :data:`EXTRA_STEPS`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from medmae.data.datamodule import PretrainDataModule

DEMO_DATASET = "hippocampus"
PATCH = 8  # 32^3 crops of ~35x50x35 scans: 64 patches, 16 visible


def demo_data_dir() -> Path:
    """Folder of the bundled MSD-style demo dataset (``dataset.json``, ``imagesTr``, ``labelsTr``)."""
    return Path(str(resources.files("medmae") / "demo_data" / DEMO_DATASET))


@dataclass
class DemoResult:
    """What the demo produced; ``lines`` are printed as the closing screen."""

    output_dir: Path
    manifest: Path
    checkpoint: Path | None = None
    held_out: list[Path] = field(default_factory=list)
    finetune_steps: int | None = None  # overrides the repair/segmentation steps' defaults (quick runs, tests)
    figures: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def loss_curve(metrics_csv: Path, output: Path) -> Path:
    """Plot ``train/loss`` and ``val/loss`` against the step from a Lightning CSVLogger file."""
    curves: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key, points in curves.items():
                if row.get(key):
                    points.append((int(row["step"]), float(row[key])))
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, points in curves.items():
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if key.startswith("val") else None, label=key)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("masked-patch MSE")
    axis.set_title("MAE pretraining loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


def crop_datamodule(manifest: Path, seed: int) -> PretrainDataModule:
    """32³ crops of the bundled scans at their own 1 mm spacing, 15 % of the scans held out."""
    from medmae.data.datamodule import PretrainDataModule

    return PretrainDataModule(
        str(manifest),
        roi_size=[32, 32, 32],
        spacing=None,
        batch_size=4,
        val_fraction=0.15,
        seed=seed,
        samples_per_epoch=64,
    )


def pretrain_step(result: DemoResult, max_steps: int, max_minutes: float, seed: int) -> None:
    """Pretrain a small MAE on the bundled scans; fills the checkpoint, figures and loss numbers."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from medmae.data.manifest import read_manifest
    from medmae.tasks.pretrain import MAEPretrainTask

    L.seed_everything(seed, verbose=False)
    run_dir = result.output_dir / "pretrain"
    task = MAEPretrainTask(
        preset="tiny",
        patch_size=PATCH,
        norm_pix_loss=False,
        lr=1e-3,
        warmup_steps=20,
        mask_seed=seed,
        figure_every_n_steps=max(1, max_steps // 4),
    )
    data = crop_datamodule(result.manifest, seed)
    trainer = L.Trainer(
        max_steps=max_steps,
        max_time={"minutes": max_minutes},
        accelerator="auto",
        devices=1,
        default_root_dir=str(run_dir),
        logger=CSVLogger(str(run_dir), name="logs"),
        log_every_n_steps=5,
        val_check_interval=max(1, max_steps // 6),
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(task, datamodule=data)
    minutes = (time.perf_counter() - started) / 60
    log_dir = Path(trainer.log_dir)
    result.checkpoint = Path(trainer.checkpoint_callback.last_model_path)
    val_ids = {scan_id for scan_id, _ in data.val_dataset.volumes} if data.val_dataset else set()
    records = {r.id: r for r in read_manifest(result.manifest)}
    result.held_out = [Path(records[scan_id].image[0]) for scan_id in sorted(val_ids)]
    figures = sorted((log_dir / "figures").glob("reconstruction_step*.png"))
    if figures:
        result.figures["reconstruction"] = figures[-1]
    result.figures["loss curve"] = loss_curve(log_dir / "metrics.csv", result.output_dir / "loss_curve.png")
    losses = [float(r["train/loss"]) for r in csv.DictReader((log_dir / "metrics.csv").open()) if r.get("train/loss")]
    if losses:
        head, tail = losses[: max(1, len(losses) // 5)], losses[-max(1, len(losses) // 5) :]
        result.numbers["train loss, first steps"] = sum(head) / len(head)
        result.numbers["train loss, last steps"] = sum(tail) / len(tail)
    result.lines.append(
        f"pretrained a tiny 3D ViT MAE for {trainer.global_step} steps in {minutes:.1f} min "
        f"on {len(data.train_dataset.volumes)} scans ({len(data.skipped)} skipped)"
    )


def restoration_finetune(result: DemoResult, seed: int, max_steps: int) -> Path:
    """Fine-tune the pretrained MAE for slice inpainting (guided: a learned residual over interpolation)."""
    import lightning as L

    from medmae.tasks.restore import MAERestoreTask

    L.seed_everything(seed, verbose=False)
    task = MAERestoreTask(
        pretrained=str(result.checkpoint),
        mode="inpaint",
        modality="MR",
        refine_depth=4,
        guided=True,
        gap_axes=[2],
        region_prob=0.1,
        mae_loss_weight=0.2,
        lr=1e-3,
        warmup_steps=max(1, max_steps // 10),
        noise_seed=seed,
    )
    data = crop_datamodule(result.manifest, seed)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        default_root_dir=str(result.output_dir / "restore"),
        logger=False,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
        enable_model_summary=False,
    )
    trainer.fit(task, datamodule=data)
    return Path(trainer.checkpoint_callback.last_model_path)


def repair_step(result: DemoResult, seed: int) -> None:
    """Zero a 3-slice gap in a held-out scan; repair it with the plain pretrained MAE and with a briefly
    fine-tuned restoration model; compare both with linear interpolation."""
    from medmae.restore.demo import run_repair_demo

    if not result.held_out or result.checkpoint is None:
        return
    scan = result.held_out[0]
    max_steps = result.finetune_steps or 300
    plain = run_repair_demo(result.output_dir / "plain", result.checkpoint, scan)
    restore_ckpt = restoration_finetune(result, seed, max_steps)
    repair = run_repair_demo(result.output_dir, restore_ckpt, scan)
    result.figures["repair"] = Path(repair["figure"])
    result.numbers["repair PSNR in gap, plain MAE (dB)"] = plain["psnr_model"]
    result.numbers["repair PSNR in gap, restoration (dB)"] = repair["psnr_model"]
    result.numbers["repair PSNR in gap, linear (dB)"] = repair["psnr_linear"]
    result.numbers["repair PSNR in gap, fitted (dB)"] = repair["psnr_fitted"]
    result.lines.append(
        f"zeroed slices {repair['slices']} (axis {repair['axis']}) of held-out {scan.name} and repaired them: "
        f"{plain['psnr_model']:.1f} dB with the plain pretrained MAE, {repair['psnr_model']:.1f} dB after "
        f"{max_steps} restoration fine-tuning steps, {repair['psnr_linear']:.1f} dB by linear interpolation, "
        f"{repair['psnr_fitted']:.1f} dB by interpolation fitted to the scan (no model; `medmae inpaint "
        f"--interpolation fitted`) (PSNR in the gap); {repair['repaired']}"
    )


def segmentation_step(result: DemoResult, seed: int) -> None:
    """Fine-tune the pretrained encoder on 5 labelled bundled scans and segment a held-out one."""
    from medmae.tasks.segment_demo import run_segmentation_demo

    if result.checkpoint is None:
        return
    max_steps = result.finetune_steps or 150
    segmentation = run_segmentation_demo(result.output_dir / "segment", result.checkpoint, result.manifest, max_steps)
    result.figures["segmentation"] = Path(segmentation["figure"])
    result.numbers["segmentation Dice, held-out scan"] = segmentation["dice"]
    result.lines.append(
        f"fine-tuned the pretrained encoder with a UNETR-style decoder on {len(segmentation['train_scans'])} "
        f"labelled scans for {max_steps} steps: Dice {segmentation['dice']:.3f} on held-out "
        f"{Path(segmentation['scan']).name}"
    )


# name -> step(result, seed), run in order after pretraining.
EXTRA_STEPS: dict[str, Callable[[DemoResult, int], None]] = {"repair": repair_step, "segmentation": segmentation_step}


def run_demo(
    output_dir: Path, max_steps: int = 1000, max_minutes: float = 4.0, seed: int = 0, finetune_steps: int | None = None
) -> DemoResult:
    """Run every demo step into ``output_dir`` and return what was produced."""
    from medmae.data.manifest import write_manifest
    from medmae.data.msd import records_from_msd

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records = records_from_msd(demo_data_dir() / "dataset.json")
    manifest = write_manifest(records, output_dir / "manifest.jsonl", relative=False)
    result = DemoResult(output_dir, manifest, finetune_steps=finetune_steps)
    result.lines.append(f"built a manifest of {len(records)} bundled real MRI scans: {manifest}")
    pretrain_step(result, max_steps, max_minutes, seed)
    for step in EXTRA_STEPS.values():
        step(result, seed)
    return result


def summary(result: DemoResult) -> str:
    """The closing screen: what was done and where everything is."""
    out: list[Any] = ["", "medmae demo: done", "=" * 60]
    out += [f"- {line}" for line in result.lines]
    if result.numbers:
        out.append("numbers:")
        out += [f"  {name:<40} {value:.4f}" for name, value in result.numbers.items()]
    out.append("files:")
    if result.checkpoint:
        out.append(f"  {'checkpoint':<40} {result.checkpoint}")
    out += [f"  {name:<40} {path}" for name, path in result.figures.items()]
    out.append(f"  {'everything':<40} {result.output_dir}")
    out.append("next: medmae pretrain --help   (train on your own archive)")
    return "\n".join(str(line) for line in out)
