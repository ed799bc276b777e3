"""What the scan learns from one file, in a worker process: a JSON-able summary, never an exception.

A volume file (NIfTI, NRRD, MHA) is read whole: shape, geometry, dtype and intensity statistics. A DICOM
file gives its header summary (salted series id, geometry, flags) and the statistics of its decoded pixels;
series are assembled later from these summaries. No header value that identifies a person is returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from medmae.data.dicom import classify, series_flags, slice_geometry
from medmae.data.privacy import contains_identifier, header_identifiers, header_uids, salted_hash, uid_depth
from medmae.io.readers import ITK_SUFFIXES, NIFTI_SUFFIXES, read_volume
from medmae.io.volume import VolumeError

MAX_CHANNELS_PER_FILE = 4
# A label map: integer ids from 0 up to this, and nearly every pair of neighbouring labelled (non-zero) voxels
# holds one label. Measured on neighbour pairs of two non-zero voxels: label maps 0.98-1.0 equal (MSD, NRRD
# lesion masks, 117 classes); images 0.02-0.61, even quantised to 6 bits, mapped to uint8 over the full
# Hounsfield range, or upsampled x2 by nearest neighbour (counting pairs that merely touch a non-zero voxel
# puts such images at 0.51-0.61 and small lesion masks at 0.52: no threshold separates them).
MAX_LABEL_ID = 1000
MIN_LABEL_SAME_NEIGHBOURS = 0.8


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES) or path.suffix.lower() in ITK_SUFFIXES


def skipped(code: str, reason: str) -> dict[str, Any]:
    return {"kind": "skip", "code": code, "reason": reason}


def pixel_stats(array: np.ndarray) -> dict[str, Any]:
    """Sums that combine across slices: finite min/max/sum/sum of squares/count, and the non-finite count."""
    values = np.asarray(array)
    finite = np.isfinite(values) if values.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        nonfinite, values = int(values.size - finite.sum()), values[finite]
    else:
        nonfinite = 0
    values = values.astype(np.float64, copy=False).ravel()
    if values.size == 0:
        return {"min": None, "max": None, "sum": 0.0, "sumsq": 0.0, "count": 0, "nonfinite": nonfinite}
    return {
        "min": float(values.min()),
        "max": float(values.max()),
        "sum": float(values.sum()),
        "sumsq": float(np.dot(values, values)),
        "count": int(values.size),
        "nonfinite": nonfinite,
    }


def summarise_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's intensity summary ``{min, max, mean, std, nonfinite}`` from :func:`pixel_stats` parts."""
    count = sum(p["count"] for p in parts)
    nonfinite = sum(p["nonfinite"] for p in parts)
    if count == 0:
        return {"min": None, "max": None, "mean": None, "std": None, "nonfinite": nonfinite}
    mean = sum(p["sum"] for p in parts) / count
    variance = max(sum(p["sumsq"] for p in parts) / count - mean * mean, 0.0)
    return {
        "min": min(p["min"] for p in parts if p["count"]),
        "max": max(p["max"] for p in parts if p["count"]),
        "mean": round(mean, 4),
        "std": round(float(np.sqrt(variance)), 4),
        "nonfinite": nonfinite,
    }


def intensity_problem(summary: dict[str, Any]) -> tuple[str, str] | None:
    """``(code, reason)`` for an image without usable intensities (all NaN/Inf, or constant)."""
    if summary["min"] is None:
        return "non-finite", "every voxel is NaN or Inf"
    if summary["min"] == summary["max"]:
        return "constant", f"constant image (every voxel is {summary['min']:g})"
    return None


def label_map_problem(array: np.ndarray, summary: dict[str, Any]) -> tuple[str, str] | None:
    """``("label-map", reason)`` when ``array`` (C, I, J, K) looks like a segmentation, not an image.

    Integer ids from 0 to at most :data:`MAX_LABEL_ID`, piecewise constant: at least
    :data:`MIN_LABEL_SAME_NEIGHBOURS` of the neighbour pairs of two labelled (non-zero) voxels are equal.
    """
    if summary["min"] != 0 or summary["max"] > MAX_LABEL_ID or summary["nonfinite"]:
        return None
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        return None
    labelled = array != 0
    same = pairs = 0
    for axis in range(1, array.ndim):
        after = tuple(slice(1, None) if a == axis else slice(None) for a in range(array.ndim))
        before = tuple(slice(None, -1) if a == axis else slice(None) for a in range(array.ndim))
        both = labelled[after] & labelled[before]  # views: no copy of the volume per axis
        same += int((array[after] == array[before])[both].sum())
        pairs += int(both.sum())
    if pairs == 0 or same / pairs < MIN_LABEL_SAME_NEIGHBOURS:
        return None
    return "label-map", (
        f"looks like a label map (integer ids 0-{summary['max']:g}, piecewise constant), not an image; "
        "use it as a segmentation label (see `medmae finetune --help`)"
    )


def inspect_volume(path: Path) -> dict[str, Any]:
    """Summary of a NIfTI/NRRD/MHA file; unreadable, 2D, degenerate or constant files are ``skip`` results."""
    try:
        volume = read_volume(path)
    except VolumeError as error:
        return skipped("unreadable", str(error).replace(f"{path}: ", "", 1))
    except MemoryError:
        return skipped("unreadable", "too large to read into memory")
    if volume.num_channels > MAX_CHANNELS_PER_FILE:
        return skipped(
            "4d",
            f"4D image with {volume.num_channels} volumes (a time series?); medmae takes at most "
            f"{MAX_CHANNELS_PER_FILE} channels per file",
        )
    summary = summarise_stats([pixel_stats(volume.array)])
    problem = intensity_problem(summary) or label_map_problem(volume.array, summary)
    if problem:
        return skipped(*problem)
    notes = []
    if volume.num_channels > 1:
        notes.append(f"4D file: {volume.num_channels} volumes kept as channels")
    if summary["nonfinite"]:
        notes.append(f"{summary['nonfinite']} NaN/Inf voxels (replaced by the minimum when preprocessed)")
    return {
        "kind": "volume",
        "shape": list(volume.array.shape),
        "affine": np.round(volume.affine, 6).tolist(),
        "spacing": [round(s, 6) for s in volume.spacing],
        "orientation": volume.orientation,
        "dtype": str(volume.dtype),
        "intensity": summary,
        "notes": notes,
    }


def read_header(path: Path) -> Any:
    """The DICOM header (no pixels), also of files without the 128-byte preamble; None for other files."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError):
        pass
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return None
    return dataset if "SOPClassUID" in dataset and "Modality" in dataset else None


def inspect_dicom(path: Path, salt: str) -> dict[str, Any]:
    """Header summary + pixel statistics of one DICOM file (identifiers are used only to check the path)."""
    try:
        dataset = read_header(path)
    except Exception as error:
        return skipped("unreadable", f"broken DICOM header ({type(error).__name__})")
    if dataset is None:
        return skipped("not-image", "not a NIfTI/NRRD/MHA file nor a DICOM object")
    depth = uid_depth(str(path), header_uids(dataset))  # path parts named after a UID are never written
    problem = classify(dataset)
    if problem:
        return {**skipped(*problem), "uid_depth": depth}
    uid = str(dataset.get("SeriesInstanceUID", "") or "")
    if not uid:  # anonymisers sometimes blank it: fall back to what else ties the slices together
        keys = ("FrameOfReferenceUID", "SeriesDate", "SeriesTime", "Modality", "Rows", "Columns")
        uid = "|".join([str(path.parent.resolve()), *(str(dataset.get(k, "")) for k in keys)])
    result: dict[str, Any] = {
        "kind": "dicom",
        "series": salted_hash(uid, salt),
        "uid_missing": "|" in uid,
        "modality": str(dataset.get("Modality", "") or ""),
        "flag": series_flags(dataset),
        "identifying_path": contains_identifier(str(path.resolve()), header_identifiers(dataset)),
        "uid_depth": depth,
        **slice_geometry(dataset),
    }
    try:
        pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        return skipped("unreadable", "cannot decode the pixel data (compressed with an unsupported codec?)")
    result["dtype"] = str(pixels.dtype)
    result["stats"] = pixel_stats(pixels)
    return result


def inspect_file(task: tuple[str, str]) -> dict[str, Any]:
    """Worker entry point: ``(absolute path, salt)`` → summary dict (see the module docstring)."""
    path, salt = Path(task[0]), task[1]
    try:
        if path.stat().st_size == 0:
            return skipped("empty", "empty file (0 bytes)")
        return inspect_volume(path) if is_volume_file(path) else inspect_dicom(path, salt)
    except Exception as error:  # one bad file never stops the scan
        return skipped("unreadable", f"{type(error).__name__}: {error}".splitlines()[0].replace(str(path), "<file>"))
