"""Write anti-aliased copies of scans at coarser in-plane spacings, plus a manifest listing originals and copies.

A restoration model learns the scale of the detail it sees: a denoiser trained only on 0.6 mm in-plane CT
smooths away real structure of a 2-3 mm scan. Training on each scan at several in-plane spacings covers the
resolutions the model will be used on (``docs/repair.md``, CT denoising). Each copy is Gaussian-smoothed to the
new voxel size first (FWHM = sqrt(new^2 - old^2) per axis), then linearly resampled; the slice axis (the
scan's third index axis) keeps its spacing. Integer scans stay in their dtype (rounded); sources are only read.

    python scripts/resolution_copies.py runs/ct_lung.jsonl --spacings 1 2 3 -o runs/ct_multires
    # writes runs/ct_multires/<id>_<s>mm.nii.gz and runs/ct_multires/manifest.jsonl
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import SimpleITK as sitk

from medmae.data.manifest import read_manifest, write_manifest

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def coarser_copy(image: sitk.Image, in_plane_mm: float) -> sitk.Image:
    """``image`` resampled to ``in_plane_mm`` along its first two index axes, same origin and direction."""
    old = image.GetSpacing()
    new = (in_plane_mm, in_plane_mm, old[2])
    if any(n < o for n, o in zip(new[:2], old[:2])):
        raise ValueError(f"{in_plane_mm} mm is finer than the scan's in-plane spacing {old[:2]}; only coarser")
    sigmas = [max(math.sqrt(n * n - o * o) / FWHM_PER_SIGMA, 1e-3) for n, o in zip(new, old)]
    sigmas[2] = 1e-3  # the slice axis is not resampled
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigmas)
    size = [max(1, round(image.GetSize()[i] * old[i] / new[i])) for i in range(3)]
    background = float(sitk.GetArrayViewFromImage(image).min())
    resampled = sitk.Resample(
        smooth, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), new, image.GetDirection(), background
    )
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        return sitk.Cast(resampled, image.GetPixelID())
    return sitk.Cast(sitk.Round(resampled), image.GetPixelID())


def write_copies(manifest: Path, spacings: Sequence[float], out_dir: Path) -> Path:
    """Copies of every single-file record of ``manifest`` at ``spacings``; returns the new manifest's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for record in read_manifest(manifest):
        if len(record.image) != 1 or not Path(record.image[0]).is_file():
            raise ValueError(
                f"{manifest}: record {record.id!r} needs one existing image file (multi-channel records "
                f"and DICOM folders are not supported here); got {record.image}"
            )
        records.append(record)
        image = sitk.ReadImage(record.image[0])
        for spacing in spacings:
            target = out_dir / f"{record.id}_{spacing:g}mm.nii.gz"
            sitk.WriteImage(coarser_copy(image, spacing), str(target))
            records.append(replace(record, id=target.name.removesuffix(".nii.gz"), image=[str(target.resolve())]))
            print(f"wrote {target}")
    written = write_manifest(records, out_dir / "manifest.jsonl")
    print(f"wrote {written} ({len(records)} records)")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="JSON Lines manifest with one image file per record")
    parser.add_argument("--spacings", type=float, nargs="+", required=True, help="in-plane spacings in mm")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the copies and manifest")
    args = parser.parse_args()
    write_copies(args.manifest, args.spacings, args.output)


if __name__ == "__main__":
    main()
