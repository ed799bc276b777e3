"""One volume type for every format: a channel-first array that always travels with its affine.

Convention used across medmae:

* ``Volume.array`` has shape ``(C, I, J, K)``: channels first, then voxel indices in the order the
  affine expects (for NIfTI this is the file's own index order; for NRRD/MHA/DICOM it is ITK's
  ``x, y, z`` index order, i.e. the reverse of ``SimpleITK.GetArrayFromImage``).
* ``Volume.affine`` is a 4x4 matrix mapping a voxel index ``(i, j, k, 1)`` to RAS+ world millimetres
  (the nibabel / MONAI convention). ITK's LPS geometry is converted on read and back on write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

# ITK world coordinates are LPS; nibabel/MONAI are RAS. Flipping x and y converts between them.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """A volume cannot be read, written or used; the message names the file and what would be valid."""


@dataclass
class Volume:
    """A 3D (multi-channel) image with its geometry.

    Args:
        array: ``(C, I, J, K)`` voxel data in the file's own dtype.
        affine: ``(4, 4)`` voxel index to RAS+ millimetres.
        path: where it was read from (None for volumes made in memory).
        format: ``"nifti"``, ``"nrrd"``, ``"mha"``, ``"mhd"`` or ``"dicom"``.
        header: format-specific header used to write a file like the input (a nibabel header for
            NIfTI; a dict of ITK metadata for the others).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    format: str = "nifti"
    header: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise VolumeError(f"{self.name}: Volume.array must be (C, I, J, K), got shape {tuple(self.array.shape)}")
        if self.affine.shape != (4, 4):
            raise VolumeError(f"{self.name}: affine must be 4x4, got {self.affine.shape}")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory volume>"

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (nibabel convention: direction each axis points to)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        """True when both volumes have the same spatial shape and affine (within ``atol`` mm)."""
        return self.spatial_shape == other.spatial_shape and bool(np.allclose(self.affine, other.affine, atol=atol))

    def with_array(self, array: np.ndarray) -> Volume:
        """A copy on the same grid and header with new voxel data ``(C, I, J, K)``."""
        return Volume(array, self.affine.copy(), self.path, self.format, self.header, dict(self.extra))

    def aligned_to(self, reference: Volume, atol: float = 1e-3) -> Volume | None:
        """This volume in ``reference``'s voxel order when both cover the same voxels with axes flipped or
        permuted (a label map stored LPS for an RAS image, say), else None. Lossless: no interpolation."""
        array, affine = reorder_axes(self.array, self.affine, reference.affine)
        aligned = Volume(array, affine, self.path, self.format, self.header, dict(self.extra))
        return aligned if aligned.same_grid(reference, atol) else None

    def grid_text(self) -> str:
        """Shape, axis codes, spacing and origin, for messages about grids that differ."""
        return grid_text(self.spatial_shape, self.affine)


def reorder_axes(array: np.ndarray, affine: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose ``(C, I, J, K)`` so its voxel axes point as ``target``'s do; a view, and its new affine."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(target))
    moved = nib.orientations.apply_orientation(np.moveaxis(array, 0, -1), ornt)
    return np.moveaxis(moved, -1, 0), affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[1:])


def grid_text(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """``shape (I, J, K), LPS, spacing (x, y, z) mm, origin (x, y, z) mm`` of a grid (RAS+ world)."""
    spacing = ", ".join(f"{s:.3g}" for s in np.linalg.norm(affine[:3, :3], axis=0))
    origin = ", ".join(f"{o:.1f}" for o in affine[:3, 3])
    codes = "".join(nib.orientations.aff2axcodes(affine))
    return f"shape {tuple(int(s) for s in shape)}, {codes}, spacing ({spacing}) mm, origin ({origin}) mm"
