"""Write volumes atomically, keeping the grid, header fields and dtype of a reference volume."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medmae.io.atomic import temporary_beside
from medmae.io.readers import volume_format
from medmae.io.volume import LPS_TO_RAS, Volume, VolumeError

# A DICOM header field in ITK metadata: ``gggg|eeee`` (ITK's DICOM reader; SimpleITK conversions to NRRD/MHA
# keep them) or ``DICOM...``.
DICOM_KEY = re.compile(r"[0-9a-f]{4}\|[0-9a-f]{4}|dicom.*", re.IGNORECASE)


def copied_metadata(header: dict[str, str]) -> dict[str, str]:
    """The ITK metadata of an input that its output keeps: none when any field came from DICOM, else all but
    ITK's own fields and the axis kinds.

    A header converted from DICOM holds the patient's name, IDs and birth date, the site and the UIDs, and
    MetaImage splits multi-line values into stray fields named by their fragments ("Basel = ..."), so no
    part of it is safe to copy; the geometry travels in the image itself.
    """
    if any(DICOM_KEY.fullmatch(key) for key in header):
        return {}
    return {key: value for key, value in header.items() if not key.startswith("ITK_") and "kinds" not in key}


def cast_to_dtype(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast voxel data to ``dtype``: integers are rounded and clipped to the dtype's range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(np.nan_to_num(array)), info.min, info.max)
    elif dtype == np.bool_:
        array = array > 0.5
    return array.astype(dtype, copy=False)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _atomic_target(path: Path) -> tuple[Path, int]:
    """A temporary file beside ``path`` with the same suffixes (writers pick the format from them)."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = temporary_beside(path, prefix=path.name.split(".")[0], suffix=suffix)
    return Path(tmp), fd


def _write_nifti(volume: Volume, array: np.ndarray, tmp: Path) -> None:
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    header = volume.header.copy() if isinstance(volume.header, nib.Nifti1Header) else None
    image = nib.Nifti1Image(data, volume.affine, header=header)
    if header is not None:
        image.header.set_data_dtype(array.dtype)
        # keep the input's qform/sform codes, which nibabel resets when given an affine
        qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
        if qform_code or sform_code:
            image.set_qform(volume.affine if qform_code else None, code=qform_code)
            image.set_sform(volume.affine if sform_code else None, code=sform_code)
        image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(tmp))


def _write_itk(volume: Volume, array: np.ndarray, tmp: Path) -> None:
    zyx = np.transpose(array, (0, 3, 2, 1))  # (C, z, y, x)
    if zyx.shape[0] == 1:
        image = sitk.GetImageFromArray(zyx[0])
    else:
        image = sitk.GetImageFromArray(np.moveaxis(zyx, 0, -1), isVector=True)
    lps = LPS_TO_RAS @ volume.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing[None, :]).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    if isinstance(volume.header, dict):
        for key, value in copied_metadata(volume.header).items():
            image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(tmp))
    writer.SetUseCompression(True)
    writer.Execute(image)


def write_volume(volume: Volume, path: str | Path, dtype: np.dtype | None = None) -> Path:
    """Write ``volume`` to ``path`` atomically (a temporary file, then a rename).

    The format follows the path's suffix. When it matches the format the volume was read from,
    the original header fields are kept, except a header converted from DICOM, which identifies the patient
    (:func:`copied_metadata`). The file the volume was read from is never overwritten.

    Args:
        volume: what to write; ``array`` is ``(C, I, J, K)``.
        path: output file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``); DICOM input is written as any of these.
        dtype: output dtype (default: the array's); integers are rounded and clipped.

    Returns:
        The path written.
    """
    path = Path(path)
    fmt = volume_format(path) if not path.is_dir() else "dicom"
    if fmt == "dicom" or path.is_dir():
        raise VolumeError(f"{path}: cannot write a DICOM series; write .nii.gz, .nrrd or .mha instead")
    if volume.path is not None and _same_file(path, volume.path):
        raise VolumeError(f"{path}: refusing to overwrite the input file; choose another output path")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    array = cast_to_dtype(volume.array, np.dtype(dtype) if dtype is not None else volume.array.dtype)
    tmp, fd = _atomic_target(path)
    os.close(fd)
    try:
        if fmt == "nifti":
            if volume.format != "nifti":
                volume = Volume(volume.array, volume.affine, volume.path, volume.format, None)
            _write_nifti(volume, array, tmp)
        else:
            _write_itk(volume, array, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
