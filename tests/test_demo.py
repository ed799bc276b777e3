"""`medmae demo` end to end on the bundled scans (few steps): every stage runs and reports its files."""

from __future__ import annotations

from pathlib import Path

from medmae.demo import demo_data_dir, run_demo, summary


def test_bundled_data_has_attribution_and_labels() -> None:
    folder = demo_data_dir()
    assert "CC-BY-SA 4.0" in (folder / "ATTRIBUTION.md").read_text()
    images = sorted((folder / "imagesTr").glob("*.nii.gz"))
    assert len(images) == 24
    assert all((folder / "labelsTr" / image.name).is_file() for image in images)


def test_demo_runs_every_stage(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", max_steps=6, max_minutes=2, finetune_steps=3)
    assert result.checkpoint is not None and result.checkpoint.is_file()
    for name in ("reconstruction", "loss curve", "repair", "segmentation"):
        assert result.figures[name].is_file() and result.figures[name].stat().st_size > 1000, name
    assert {"repair PSNR in gap, linear (dB)", "segmentation Dice, held-out scan"} <= set(result.numbers)
    screen = summary(result)
    assert "medmae demo: done" in screen and str(result.checkpoint) in screen
