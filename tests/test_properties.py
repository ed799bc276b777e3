"""Property-based tests (hypothesis): manifest parsing, geometry round trips, slice selections, patching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmae.data.manifest import ManifestError, parse_record, read_manifest, write_manifest
from medmae.io import Volume, read_volume, write_volume
from medmae.models.masking import MaskingConfig, split_indices
from medmae.models.patching import patchify, unpatchify
from medmae.restore.slices import parse_slices

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
record_like = st.dictionaries(
    st.sampled_from(["id", "image", "label", "modality", "status", "shape", "extra", "imgae"]), json_values, max_size=6
)


@FAST
@given(raw=record_like | json_values)
def test_parse_record_accepts_or_raises_manifest_error(raw: object) -> None:
    try:
        record = parse_record(raw, Path("/nonexistent"), "m.jsonl:1", check_files=False)
    except ManifestError as error:
        assert str(error).startswith("m.jsonl:1: ")
    else:
        assert isinstance(record.id, str) and record.image and all(Path(p).is_absolute() for p in record.image)


@FAST
@given(
    ids=st.lists(
        st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=8), min_size=1, max_size=5, unique=True
    ),
    channels=st.integers(1, 3),
    modality=st.sampled_from(["CT", "MR", "MRI", "T1w", "pet"]),
)
def test_manifest_round_trip(tmp_path: Path, ids: list[str], channels: int, modality: str) -> None:
    lines = [
        json.dumps({"id": i, "image": [f"s/{i}_{c}.nii.gz" for c in range(channels)], "modality": modality})
        for i in ids
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records = read_manifest(path, check_files=False)
    again = read_manifest(write_manifest(records, tmp_path / "copy" / "m2.jsonl"), check_files=False)
    assert [(r.id, r.image, r.modality) for r in again] == [(r.id, r.image, r.modality) for r in records]
    assert all(len(r.image) == channels for r in again)


def random_affine(seed: int, spacing: tuple[float, float, float]) -> np.ndarray:
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)[None, :]
    affine[:3, 3] = np.random.default_rng(seed + 1).uniform(-200, 200, 3)
    return affine


@FAST
@given(
    seed=st.integers(0, 10_000),
    spacing=st.tuples(*[st.floats(0.3, 6.0)] * 3),
    suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha"]),
)
def test_geometry_survives_every_format(tmp_path: Path, seed: int, spacing: tuple, suffix: str) -> None:
    affine = random_affine(seed, spacing)
    array = np.random.default_rng(seed).integers(-1000, 1000, size=(1, 5, 4, 3)).astype(np.int16)
    written = read_volume(write_volume(Volume(array, affine), tmp_path / f"v{seed}{suffix}"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-4)
    assert np.array_equal(written.array, array)
    np.testing.assert_allclose(written.spacing, spacing, rtol=1e-5)


@FAST
@given(
    size=st.integers(1, 60), picks=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 5)), min_size=1, max_size=4)
)
def test_slice_selection_parses_lists_and_ranges(size: int, picks: list[tuple[int, int]]) -> None:
    text = ",".join(f"{a}-{a + n}" if n else str(a) for a, n in picks)
    expected = sorted({i for a, n in picks for i in range(a, a + n + 1)})
    if expected[-1] >= size:
        with pytest.raises(ValueError, match="slice"):
            parse_slices(text, size)
    else:
        assert parse_slices(text, size) == expected


@FAST
@given(text=st.text(max_size=12))
def test_slice_selection_never_crashes_otherwise(text: str) -> None:
    try:
        parse_slices(text, 50)
    except ValueError as error:
        assert "slice" in str(error)


@FAST
@given(
    grid=st.tuples(*[st.integers(1, 4)] * 3),
    patch=st.tuples(*[st.integers(1, 3)] * 3),
    channels=st.integers(1, 2),
    ratio=st.floats(0.05, 0.95),
    kind=st.sampled_from(["random", "block", "slab"]),
)
def test_patching_and_masking_invariants(grid: tuple, patch: tuple, channels: int, ratio: float, kind: str) -> None:
    volume = torch.randn(2, channels, *(g * p for g, p in zip(grid, patch)))
    assert torch.equal(unpatchify(patchify(volume, patch), grid, patch, channels), volume)
    n = grid[0] * grid[1] * grid[2]
    config = MaskingConfig(kind=kind, ratio=ratio, axis=int(np.argmax(grid)))
    if n < 2 or (kind == "slab" and max(grid) < 2):
        return
    mask = config.sample(2, grid, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [config.masked_count(grid)] * 2
    visible, masked = split_indices(mask)
    assert visible.shape[1] + masked.shape[1] == n and visible.shape[1] >= 1 and masked.shape[1] >= 1
