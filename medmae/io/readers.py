"""Read NIfTI, NRRD, MHA/MHD and DICOM series into a :class:`~medmae.io.volume.Volume`."""

from __future__ import annotations

from pathlib import Path

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


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """``nib.load``, but a ``.nii.gz`` is decompressed in one call (about twice as fast as streaming it)."""
    if not path.name.lower().endswith(".gz"):
        return nib.load(str(path), mmap=False)  # in memory: a later rename over the file cannot break the array
    try:
        data = gunzip(path.read_bytes())
    except GzipError as error:
        raise OSError(f"corrupt gzip data ({error})") from None
    image_class = nib.Nifti2Image if data[:4] in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") else nib.Nifti1Image
    return image_class.from_bytes(data)


def _read_nifti(path: Path) -> Volume:
    image = _load_nifti(path)
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


def _read_itk_file(path: Path, fmt: str) -> Volume:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
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


def read_dicom_series(files: list[str], name: Path) -> Volume:
    """Read an ordered list of single-frame DICOM files as one volume (header: non-identifying tags only)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise VolumeError(f"{name}: cannot decode the DICOM series ({error})".splitlines()[0]) from None
    return _from_itk(image, name, "dicom", {})


def read_volume(path: str | Path) -> Volume:
    """Read one scan with its geometry.

    Args:
        path: a NIfTI/NRRD/MHA/MHD file or a folder holding a single DICOM series.

    Returns:
        The volume, ``array`` shaped ``(C, I, J, K)`` in the file's dtype. It is usually a strided view
        (NIfTI data are Fortran-ordered, ITK's are ``(z, y, x)``), not a C-contiguous array: numpy, torch
        and MONAI accept it as is; call ``np.ascontiguousarray`` where C order is really needed.

    Raises:
        VolumeError: the file is missing, unreadable, not 3D, or of an unsupported type.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    fmt = volume_format(path)
    try:
        if fmt == "nifti":
            return _read_nifti(path)
        if fmt == "dicom":
            return read_dicom_series(dicom_series_files(path), path)
        return _read_itk_file(path, fmt)
    except VolumeError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, nib.filebasedimages.ImageFileError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VolumeError(f"{path}: cannot read as {fmt} ({first_line}); expected a valid {SUPPORTED}") from None
