"""DICOM series: what one file says (header only), which files make a usable volume, and reading it.

A series is the set of files sharing a SeriesInstanceUID, wherever they lie. :func:`plan_series` checks a
series' geometry from the headers alone and decides its regular output grid; slices with irregular spacing
or a gantry tilt are interpolated onto that grid by :func:`read_series` (linear along the slice normal,
in-plane shifts for tilt). Single-frame CT, MR and PET image storage is read; everything else is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.uid import UID
from scipy import ndimage

from medmae.io.readers import read_dicom_series
from medmae.io.volume import LPS_TO_RAS, Volume

VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
}
# Prefixes of SOP classes that are derived, non-image objects (segmentations, reports, RT, presentation states).
DERIVED_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.88",
    "1.2.840.10008.5.1.4.1.1.481",
    "1.2.840.10008.5.1.4.1.1.11",
    "1.2.840.10008.5.1.4.1.1.104",
)
LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "survey", "scanogram")
DERIVED_IMAGE_TYPES = ("PROJECTION IMAGE", "MIP", "MPR", "CURVED", "SCREEN SAVE")


class SeriesRejected(ValueError):
    """A series cannot become a volume; ``code`` is the report's reason category."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def sop_class(dataset: Any) -> str:
    uid = str(dataset.get("SOPClassUID", "") or "")
    meta = getattr(dataset, "file_meta", None)
    if not uid and meta is not None:
        uid = str(meta.get("MediaStorageSOPClassUID", "") or "")
    return uid


def classify(dataset: Any) -> tuple[str, str] | None:
    """``(code, reason)`` when this file cannot be a slice of a volume, else None (header-only checks)."""
    uid = sop_class(dataset)
    name = UID(uid).name if uid else "an object without SOP class"
    if uid.startswith(DERIVED_PREFIXES) or uid == "1.2.840.10008.1.3.10":
        return "derived-object", f"{name} is a derived or non-image object, not a scan"
    if uid not in VOLUME_SOP_CLASSES and not (not uid and dataset.get("Modality") in ("CT", "MR", "PT")):
        return "not-volumetric", f"{name} is not a cross-sectional image (medmae reads CT, MR and PET slices)"
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame", "multi-frame (enhanced) DICOM is not read yet; convert it to NIfTI first"
    if not dataset.get("Rows") or not dataset.get("Columns"):
        return "no-pixels", "the file holds no image (no Rows/Columns)"
    return None


def series_flags(dataset: Any) -> str | None:
    """``"localizer"`` or ``"derived-image"`` for slices that are not part of a diagnostic volume."""
    image_type = [str(v).upper() for v in (dataset.get("ImageType") or [])]
    description = str(dataset.get("SeriesDescription", "") or "").lower()
    if "LOCALIZER" in image_type or any(word in description for word in LOCALIZER_WORDS):
        return "localizer"
    if any(kind in image_type for kind in DERIVED_IMAGE_TYPES):
        return "derived-image"
    return None


def slice_geometry(dataset: Any) -> dict[str, Any]:
    """Rows, columns, pixel spacing, orientation (6) and position (3) of one slice; missing values are None."""

    def floats(keyword: str, n: int) -> list[float] | None:
        value = dataset.get(keyword)
        try:
            numbers = [float(v) for v in value] if value is not None else None
        except (TypeError, ValueError):
            return None
        return numbers if numbers is not None and len(numbers) == n else None

    return {
        "rows": int(dataset.get("Rows", 0) or 0),
        "cols": int(dataset.get("Columns", 0) or 0),
        "pixel_spacing": floats("PixelSpacing", 2),
        "iop": floats("ImageOrientationPatient", 6),
        "ipp": floats("ImagePositionPatient", 3),
    }


@dataclass
class SeriesPlan:
    """Where a series' slices go: ``files`` sorted along the slice normal, the output grid, and notes.

    ``shape`` is ``(I, J, K)`` in ITK index order (columns, rows, slices); ``affine`` maps it to RAS mm.
    """

    files: list[str]
    shape: tuple[int, int, int]
    affine: np.ndarray
    resample: bool = False
    notes: list[str] = field(default_factory=list)
    depths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def _consistent(values: list[list[float]], atol: float) -> bool:
    array = np.asarray(values, dtype=np.float64)
    return bool(np.all(np.abs(array - array[0]) <= atol))


def plan_series(
    files: list[str],
    geometry: list[dict[str, Any]],
    min_slices: int = 10,
    max_gap_ratio: float = 3.0,
    max_tilt_deg: float = 30.0,
) -> SeriesPlan:
    """Check a series' geometry and choose its regular output grid.

    Args:
        files: slice files, any order.
        geometry: :func:`slice_geometry` of each file.
        min_slices: fewer slices are rejected.
        max_gap_ratio: irregular spacing is resampled while the largest gap is at most this many times the
            median gap; beyond it the series is rejected.
        max_tilt_deg: gantry tilts up to this angle are resampled; larger ones are rejected.

    Raises:
        SeriesRejected: too few slices, missing or inconsistent geometry, duplicate positions, gaps or tilt
            beyond the limits.
    """
    if len(files) < min_slices:
        raise SeriesRejected("too-few-slices", f"{len(files)} slice(s); at least {min_slices} needed (--min-slices)")
    if any(g["iop"] is None or g["ipp"] is None or g["pixel_spacing"] is None for g in geometry):
        raise SeriesRejected("no-geometry", "slices lack ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
    if len({(g["rows"], g["cols"]) for g in geometry}) > 1:
        raise SeriesRejected("inconsistent-size", "slices have different matrix sizes")
    if not _consistent([g["iop"] for g in geometry], 1e-3):
        raise SeriesRejected("inconsistent-orientation", "slices have different orientations")
    if not _consistent([g["pixel_spacing"] for g in geometry], 1e-3):
        raise SeriesRejected("inconsistent-spacing", "slices have different pixel spacings")
    iop = np.asarray(geometry[0]["iop"], dtype=np.float64)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row, col)
    dy, dx = geometry[0]["pixel_spacing"]  # DICOM: (between rows, between columns)
    positions = np.asarray([g["ipp"] for g in geometry], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    positions, files = positions[order], [files[i] for i in order]
    depths = (positions - positions[0]) @ normal
    gaps = np.diff(depths)
    if np.any(gaps < 1e-2):
        raise SeriesRejected(
            "duplicate-positions",
            f"{int(np.sum(gaps < 1e-2)) + 1} slices share a position (several echoes, phases or time points "
            "in one series)",
        )
    step = float(np.median(gaps))
    notes = []
    irregular = bool(np.any(np.abs(gaps - step) > max(1e-2, 1e-2 * step)))
    if irregular:
        ratio = float(gaps.max() / step)
        if ratio > max_gap_ratio:
            raise SeriesRejected(
                "irregular-spacing",
                f"slice gaps from {gaps.min():.3g} to {gaps.max():.3g} mm: the largest is {ratio:.1f}x the median "
                f"{step:.3g} mm (gaps up to {max_gap_ratio:g}x are resampled)",
            )
        notes.append(f"irregular slice spacing ({gaps.min():.3g}-{gaps.max():.3g} mm) resampled to {step:.3g} mm")
    shift = (positions - positions[0]) - depths[:, None] * normal[None, :]
    offsets = np.stack([shift @ row / dx, shift @ col / dy], axis=1)  # in-plane voxels, per slice
    tilted = bool(np.abs(offsets).max() > 1e-2)
    if tilted:
        angle = float(np.degrees(np.arctan(np.linalg.norm(shift[-1]) / max(depths[-1], 1e-6))))
        if angle > max_tilt_deg:
            raise SeriesRejected("gantry-tilt", f"gantry tilt of {angle:.1f} degrees exceeds {max_tilt_deg:g}")
        notes.append(f"gantry tilt of {angle:.1f} degrees resampled onto an orthogonal grid")
    low = np.floor(offsets.min(axis=0) + 1e-6) if tilted else np.zeros(2)
    extent = np.ceil(offsets.max(axis=0) - low - 1e-6).astype(int) if tilted else np.zeros(2, int)
    n_slices = round(float(depths[-1]) / step) + 1 if irregular else len(files)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row * dx, col * dy, normal * step
    lps[:3, 3] = positions[0] + low[0] * dx * row + low[1] * dy * col
    shape = (geometry[0]["cols"] + int(extent[0]), geometry[0]["rows"] + int(extent[1]), n_slices)
    return SeriesPlan(files, shape, LPS_TO_RAS @ lps, irregular or tilted, notes, depths, offsets - low)


def read_geometry(files: list[str]) -> list[dict[str, Any]]:
    """:func:`slice_geometry` of each file (headers only)."""
    return [slice_geometry(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]


def _interpolate(slices: np.ndarray, plan: SeriesPlan, background: float) -> np.ndarray:
    """Slices ``(I, J, n)`` at ``plan.depths`` → the regular grid ``plan.shape`` (linear, float32)."""
    out = np.empty(plan.shape, dtype=np.float32)
    step = float(np.linalg.norm(plan.affine[:3, 2]))
    shifted: dict[int, np.ndarray] = {}

    def placed(s: int) -> np.ndarray:
        if s not in shifted:
            plane = slices[..., s].astype(np.float32)
            if plane.shape != plan.shape[:2] or np.any(plan.offsets[s] != 0):
                plane = ndimage.affine_transform(
                    plane,
                    np.ones(2),
                    offset=-plan.offsets[s],
                    output_shape=plan.shape[:2],
                    order=1,
                    cval=background,
                )
            shifted[s] = plane
        return shifted[s]

    last = len(plan.depths) - 1
    for k in range(plan.shape[2]):
        depth = k * step
        s = int(np.clip(np.searchsorted(plan.depths, depth, side="right") - 1, 0, max(last - 1, 0)))
        weight = float(np.clip((depth - plan.depths[s]) / (plan.depths[s + 1] - plan.depths[s]), 0.0, 1.0))
        out[..., k] = placed(s) if weight == 0.0 else (1 - weight) * placed(s) + weight * placed(s + 1)
        for old in [key for key in shifted if key < s]:
            del shifted[old]
    return out


def read_series(files: list[str], name: Path) -> Volume:
    """Read one series onto its regular grid (see :func:`plan_series`); ``array`` is ``(1, I, J, K)``.

    Raises:
        SeriesRejected: the geometry cannot be made regular.
        VolumeError: the pixel data cannot be decoded.
    """
    plan = plan_series(files, read_geometry(files), min_slices=2, max_gap_ratio=np.inf, max_tilt_deg=90.0)
    volume = read_dicom_series(plan.files, name)
    if not plan.resample:
        return volume
    array = _interpolate(volume.array[0], plan, background=float(volume.array.min()))
    return Volume(array[None], plan.affine.copy(), name, "dicom", {}, {"notes": plan.notes})
