"""Volume I/O: one :class:`Volume` type for NIfTI, NRRD, MHA/MHD and DICOM series."""

from medmae.io.readers import read_volume, volume_format
from medmae.io.volume import Volume, VolumeError
from medmae.io.writers import cast_to_dtype, write_volume

__all__ = ["Volume", "VolumeError", "cast_to_dtype", "read_volume", "volume_format", "write_volume"]
