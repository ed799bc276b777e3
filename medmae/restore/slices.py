"""Parsing slice selections such as ``40-42,50`` and axis names such as ``z``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

RANGE = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")

AXIS_NAMES = {"x": 0, "y": 1, "z": 2, "i": 0, "j": 1, "k": 2, "0": 0, "1": 1, "2": 2}


def parse_axis(text: str | int, spacing: Sequence[float] | None = None) -> int:
    """Array axis of a name: ``x``/``i``/``0`` → 0, ``y``/``j``/``1`` → 1, ``z``/``k``/``2`` → 2.

    ``"auto"`` picks the thickest axis of ``spacing`` (the slice axis of thick-slice scans; ``z`` when
    all are equal). Axes are the volume's own voxel index axes, as a viewer shows the file.
    """
    key = str(text).strip().lower()
    if key == "auto":
        if spacing is None:
            return 2
        spacing = [float(s) for s in spacing]
        thickest = max(spacing)
        return 2 if spacing[2] >= thickest - 1e-6 else int(np.argmax(spacing))
    if key not in AXIS_NAMES:
        raise ValueError(f"axis {text!r} is not valid; use x, y, z (or i, j, k, 0, 1, 2) or auto")
    return AXIS_NAMES[key]


def parse_slices(text: str, size: int | None = None) -> list[int]:
    """Slice indices of a selection: ``"40-42,50"`` → ``[40, 41, 42, 50]`` (ranges inclusive, sorted, unique).

    Args:
        text: comma-separated indices and inclusive ranges ``a-b``.
        size: number of slices along the axis; every index must be in ``[0, size)``.

    Raises:
        ValueError: a malformed item, a reversed range, or an index out of range.
    """
    indices: set[int] = set()
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            continue
        match = RANGE.fullmatch(item)
        if match is None:
            raise ValueError(f"slice selection {text!r}: {item!r} is not an index or a range; write e.g. 40-42,50")
        start = int(match.group(1))
        stop = int(match.group(2)) if match.group(2) is not None else start
        if stop < start:
            raise ValueError(f"slice selection {text!r}: range {item!r} runs backwards; write {stop}-{start}")
        indices.update(range(start, stop + 1))
    if not indices:
        raise ValueError(f"slice selection {text!r} selects no slices; write e.g. 40-42,50")
    if size is not None:
        bad = sorted(i for i in indices if not 0 <= i < size)
        if bad:
            raise ValueError(
                f"slice index {bad[0]} is out of range: the volume has {size} slices along this axis "
                f"(valid indices 0-{size - 1})"
            )
    return sorted(indices)


def slice_mask(shape: Sequence[int], axis: int, indices: Sequence[int]) -> np.ndarray:
    """Bool voxel mask of ``shape`` ``(I, J, K)``, True on the given slices perpendicular to ``axis``."""
    mask = np.zeros(tuple(shape), dtype=bool)
    index: list[slice | list[int]] = [slice(None)] * len(shape)
    index[axis] = list(indices)
    mask[tuple(index)] = True
    return mask
