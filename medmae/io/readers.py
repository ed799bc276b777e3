"""Read NIfTI, NRRD, MHA/MHD and DICOM series into a :class:`~medmae.io.volume.Volume`."""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medmae.io.volume import LPS_TO_RAS, Volume, VolumeError

try:  # ISA-L's gzip decoder is about twice as fast as zlib's; the standard library's is the fallback
    from isal.igzip import decompress as gunzip
    from isal.isal_zlib import error as GzipError
except ImportError:  # pragma: no cover - depends on the environment
    from gzip import decompress as gunzip
    from zlib import error as GzipError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mhd"}
# the default memory budget of one read: 2**31 voxels is a 1290^3 volume, 8 GiB as float32; users change it
# without code through this environment variable
MAX_VOXELS = 2**31
BUDGET_VARIABLE = "MEDMAE_MAX_VOXELS"
BUDGET_REFUSAL = "above the memory budget"  # in the message of a volume refused for its size
# what nibabel raises for a malformed header (none of them a ValueError)
NIBABEL_ERRORS = (nib.filebasedimages.ImageFileError, nib.wrapstruct.WrapStructError, nib.spatialimages.HeaderDataError)
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def volume_format(path: str | Path) -> str:
    """The format name for a path (``"nifti"``, ``"nrrd"``, ``"mha"``, ``"mhd"``, ``"dicom"``).

    Raises:
        VolumeError: the suffix is not a supported volume format.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in ITK_SUFFIXES:
        return ITK_SUFFIXES[path.suffix.lower()]
    if path.is_dir():
        return "dicom"
    raise VolumeError(f"{path}: unsupported file type; medmae reads {SUPPORTED}")


def itk_affine(image: sitk.Image) -> np.ndarray:
    """The RAS+ 4x4 affine of an ITK image, for the ``(x, y, z)`` index order."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ lps


def _check_spatial(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Reject data medmae cannot treat as a 3D scan; ``array`` is ``(C, I, J, K)``."""
    spatial = array.shape[1:]
    if any(s < 2 for s in spatial):
        raise VolumeError(
            f"{path}: image is 2D or degenerate (spatial shape {tuple(spatial)}); medmae needs 3D volumes "
            "with at least 2 voxels along each axis"
        )
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{path}: the affine contains NaN or Inf; a valid 3D affine is needed")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(
            f"{path}: degenerate geometry (voxel spacing {np.round(spacing, 6).tolist()}); "
            "spacing must be positive and the axes independent"
        )
    axes = affine[:3, :3] / spacing
    if np.abs(axes.T @ axes - np.eye(3)).max() > 1e-3:
        raise VolumeError(
            f"{path}: the affine is not orthogonal (sheared axes); medmae, ITK and nnU-Net need orthogonal "
            "voxel axes: resample the scan onto an orthogonal grid first"
        )


def max_voxels_from_env() -> int | None:
    """The default memory budget of one read: ``$MEDMAE_MAX_VOXELS`` when set (read at each call), else 2**31.

    Raises:
        ValueError: the variable is neither a positive whole number (``4000000000``, ``4e9``) nor ``none``.
    """
    text = os.environ.get(BUDGET_VARIABLE, "").strip().replace("_", "")
    if not text:
        return MAX_VOXELS
    if text.lower() == "none":
        return None
    try:
        voxels = float(text)
    except ValueError:
        voxels = math.nan
    if not (math.isfinite(voxels) and voxels >= 1 and voxels == int(voxels)):
        raise ValueError(
            f"{BUDGET_VARIABLE}={os.environ[BUDGET_VARIABLE]!r} is not a memory budget: give a positive whole "
            f"number of voxels (e.g. {BUDGET_VARIABLE}=4000000000 or 4e9), or 'none' for no limit"
        )
    return int(voxels)


@dataclass(frozen=True)
class Budget:
    """The memory budget of one read.

    Args:
        voxels: the most voxels a volume may declare (None: no limit).
        from_env: the budget is the default, which :data:`BUDGET_VARIABLE` sets: the refusal says how to raise it.
    """

    voxels: int | None
    from_env: bool = False

    @classmethod
    def of(cls, max_voxels: int | Literal["env"] | None) -> Budget:
        """The budget ``read_volume(max_voxels=...)`` means (``"env"``: :func:`max_voxels_from_env`)."""
        return cls(max_voxels_from_env(), from_env=True) if max_voxels == "env" else cls(max_voxels)

    def check(self, path: Path, shape: Sequence[int]) -> None:
        """Refuse a declared ``shape`` above the budget before any voxel is allocated."""
        voxels = math.prod(int(s) for s in shape)
        if self.voxels is None or voxels <= self.voxels:
            return
        advice = "crop or downsample it first"
        if self.from_env:
            advice += f", or set {BUDGET_VARIABLE}={voxels} (or more) to raise the budget"
        raise VolumeError(
            f"{path}: declares {tuple(shape)} = {voxels:.3g} voxels ({voxels * 4 / 2**30:.3g} GiB as float32), "
            f"{BUDGET_REFUSAL} of {self.voxels:.3g} voxels; {advice}"
        )


def _load_nifti(path: Path, budget: Budget) -> nib.Nifti1Image:
    """The file read into memory (a ``.nii.gz`` decompressed in one call, twice as fast as streaming it).

    In memory, a later rename over the file cannot break the array. The raw header is checked before the
    voxels are decoded: declared size against the file's bytes and the memory budget, zero spacing.
    """
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gunzip(data)
        except GzipError as error:
            raise OSError(f"corrupt gzip data ({error})") from None
    image_class = nib.Nifti2Image if data[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Image
    size = image_class.header_class.sizeof_hdr
    if len(data) < size:
        raise VolumeError(f"{path}: {len(data)} bytes, shorter than a NIfTI header ({size} bytes); the file is cut")
    header = image_class.header_class(data[:size], check=False)
    shape, itemsize = header.get_data_shape(), header.get_data_dtype().itemsize
    budget.check(path, shape)
    needed = int(header["vox_offset"]) + math.prod(shape) * itemsize
    if needed > len(data):
        raise VolumeError(
            f"{path}: the header declares {tuple(shape)} voxels ({needed} bytes) but the data holds {len(data)} "
            "bytes; the file is truncated or its header is wrong"
        )
    if len(shape) >= 3 and np.any(header["pixdim"][1:4] == 0):
        raise VolumeError(
            f"{path}: voxel spacing (pixdim) {header['pixdim'][1:4].tolist()} has a zero; spacing must be positive"
        )
    return image_class.from_bytes(data)


def _read_nifti(path: Path, budget: Budget) -> Volume:
    image = _load_nifti(path, budget)
    header = image.header
    shape = image.shape
    if len(shape) == 2:
        raise VolumeError(
            f"{path}: image is 2D (shape {tuple(shape)}); medmae needs 3D volumes (optionally with channels)"
        )
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise VolumeError(
            f"{path}: image has {len(shape)} dimensions {tuple(shape)}; medmae reads 3D volumes "
            "or 4D volumes whose 4th axis holds channels"
        )
    slope, inter = header.get_slope_inter()
    if slope is None or (slope == 1 and not inter):
        data = np.asanyarray(image.dataobj)  # raw dtype, no float conversion
    else:
        data = np.asarray(image.dataobj, dtype=np.float32)
    data = data.reshape((*shape[:3], -1), order="F") if data.ndim != 3 else data[..., None]
    array = np.moveaxis(data, -1, 0)  # a view of the Fortran-ordered data: a C-order copy costs as much as gunzip
    affine = np.asarray(image.affine, dtype=np.float64)
    _check_spatial(path, array, affine)
    return Volume(array, affine, path, "nifti", header.copy())


def _from_itk(image: sitk.Image, path: Path, fmt: str, header: dict[str, str]) -> Volume:
    if image.GetDimension() != 3:
        raise VolumeError(
            f"{path}: image has {image.GetDimension()} spatial dimensions (size {image.GetSize()}); "
            "medmae needs 3D volumes"
        )
    data = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, C): one plain copy, owned by numpy
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    array = np.transpose(data, (0, 3, 2, 1))  # (C, x, y, z), a view (Fortran order for one channel)
    affine = itk_affine(image)
    _check_spatial(path, array, affine)
    return Volume(array, affine, path, fmt, header)


def _read_itk_file(path: Path, fmt: str, budget: Budget) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    budget.check(path, reader.GetSize())
    if reader.GetDimension() == 2:
        raise VolumeError(f"{path}: image is 2D (size {reader.GetSize()}); medmae needs 3D volumes")
    image = reader.Execute()
    header = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    return _from_itk(image, path, fmt, header)


def dicom_series_files(folder: Path, series_uid: str | None = None) -> list[str]:
    """Sorted slice files of one DICOM series in ``folder`` (files may have no extension)."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"{folder}: no DICOM image series found in this folder")
    if series_uid is None:
        if len(series) > 1:
            raise VolumeError(
                f"{folder}: holds {len(series)} DICOM series; pass one series UID, or run "
                "`medmae manifest scan` to split the folder into series"
            )
        series_uid = series[0]
    elif series_uid not in series:
        raise VolumeError(f"{folder}: series {series_uid!r} not found; found {len(series)} other series")
    return list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))


def check_series_budget(name: Path, files: Sequence[str], budget: Budget) -> None:
    """Refuse a DICOM series of ``files`` above ``budget`` from its first file's header (no pixel decoded)."""
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.ReadImageInformation()
    budget.check(name, (len(files), *first.GetSize()))


def read_dicom_series(files: list[str], name: Path) -> Volume:
    """Read an ordered list of single-frame DICOM files as one volume (header: non-identifying tags only)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(f"{name}: cannot decode the DICOM series ({error})".splitlines()[0]) from None
    return _from_itk(image, name, "dicom", {})


def require_signal(volume: Volume) -> None:
    """Refuse a volume a single-scan command cannot use: NaN/Inf voxels, or one constant value.

    ``volume.array`` is ``(C, I, J, K)``. The archive scan keeps such scans with a note; a command that writes
    a repaired or segmented copy would turn them into fabricated or non-finite voxels.
    """
    finite = np.isfinite(volume.array)
    if not finite.all():
        raise VolumeError(
            f"{volume.name}: {int(finite.size - finite.sum())} of {finite.size} voxels are NaN or Inf; "
            "replace them (e.g. with the background value) before running this command"
        )
    low, high = volume.array.min(), volume.array.max()
    if low == high:
        raise VolumeError(f"{volume.name}: the image is constant (every voxel is {low}); it holds no anatomy")


def _regular_dicom_files(folder: Path) -> list[str]:
    """The series' files; a series with missing slices or a gantry tilt is refused (the archive scan resamples)."""
    from medmae.data.dicom import SeriesRejected, plan_series, read_geometry

    files = dicom_series_files(folder)
    try:
        plan = plan_series(files, read_geometry(files), min_slices=2, max_gap_ratio=np.inf, max_tilt_deg=90.0)
    except SeriesRejected as error:
        raise VolumeError(f"{folder}: {error.reason}; the DICOM series cannot be read as one volume") from None
    if plan.resample:
        problems = "; ".join(note.split(" resampled")[0] for note in plan.notes)
        raise VolumeError(
            f"{folder}: the slices are not on a regular grid ({problems}: missing slices or a gantry tilt); "
            "run `medmae manifest scan` on the folder, which resamples the series onto a regular grid"
        )
    return plan.files


def _open_error(path: Path) -> VolumeError:
    """Why an existing-looking path cannot be opened: a symbolic link loop, a dangling link, or missing."""
    try:
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return VolumeError(f"{path}: a symbolic link loop (the link points back to itself); give the real file")
    if path.is_symlink():
        return VolumeError(f"{path}: file not found (a symbolic link to {os.readlink(path)}, which does not exist)")
    return VolumeError(f"{path}: file not found")


def _reason(error: BaseException) -> str:
    """The informative line of a reader's error (ITK's first line names its own source file, its last the cause)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Exception thrown in SimpleITK"):
        return lines[-1].removeprefix("sitk::ERROR:").removeprefix("itk::ERROR:").strip()
    return lines[0] if lines else type(error).__name__


def read_volume(path: str | Path, max_voxels: int | Literal["env"] | None = "env") -> Volume:
    """Read one scan with its geometry.

    Args:
        path: a NIfTI/NRRD/MHA/MHD file or a folder holding a single DICOM series.
        max_voxels: the memory budget; a larger declared size is refused before any allocation (None: no limit;
            ``"env"``: ``$MEDMAE_MAX_VOXELS`` when set, else 2**31 voxels, see :func:`max_voxels_from_env`).

    Returns:
        The volume, ``array`` shaped ``(C, I, J, K)`` in the file's dtype. It is usually a strided view
        (NIfTI data are Fortran-ordered, ITK's are ``(z, y, x)``), not a C-contiguous array: numpy, torch
        and MONAI accept it as is; call ``np.ascontiguousarray`` where C order is really needed.

    Raises:
        VolumeError: the file is missing, unreadable, not 3D, above the budget, or of an unsupported type.
        ValueError: ``$MEDMAE_MAX_VOXELS`` is not a valid budget.
    """
    budget = Budget.of(max_voxels)
    path = Path(path)
    if not path.exists():
        raise _open_error(path)
    fmt = volume_format(path)
    if path.is_file() and path.stat().st_size == 0:
        raise VolumeError(f"{path}: the file is empty (0 bytes); expected a valid {SUPPORTED}")
    if fmt != "dicom" and path.is_dir():
        raise VolumeError(f"{path}: a folder, not a {fmt} file; a folder is read only as a DICOM series")
    try:
        if fmt == "nifti":
            return _read_nifti(path, budget)
        if fmt == "dicom":
            files = _regular_dicom_files(path)
            check_series_budget(path, files, budget)
            return read_dicom_series(files, path)
        return _read_itk_file(path, fmt, budget)
    except VolumeError:
        raise
    except PermissionError:
        raise VolumeError(f"{path}: permission denied; medmae needs read access to the file") from None
    except (OSError, EOFError, RuntimeError, ValueError, *NIBABEL_ERRORS) as error:
        first_line = _reason(error)
        raise VolumeError(f"{path}: cannot read as {fmt} ({first_line}); expected a valid {SUPPORTED}") from None
