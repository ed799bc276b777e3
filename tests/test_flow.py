"""Motion-compensated slice-gap interpolation (``medmae.restore.flow``) on real scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmae.evaluation.restore_baselines import interpolate_slices
from medmae.evaluation.restore_metrics import psnr_in_mask
from medmae.io import read_volume
from medmae.restore.flow import demons_field, flow_fill_gaps, interpolate_between, warp
from medmae.restore.net import RestorationNet, fill_masked, interpolate_masked
from medmae.restore.slices import slice_mask
from tests.conftest import DATA, HIPPO

pytestmark = pytest.mark.real_data
CT_SERIES = DATA / "ct_dicom_series" / "series"


def _plane(path, index: int, axis: int = 2) -> torch.Tensor:
    """One real plane ``(1, 1, H, W)``, float32."""
    array = read_volume(path).array[0].astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.take(array, index, axis=axis)))[None, None]


def test_warp_samples_at_the_displaced_position_like_a_plain_loop() -> None:
    image = _plane(HIPPO / "imagesTr" / "hippocampus_001.nii.gz", 18)
    generator = torch.Generator().manual_seed(0)
    field = torch.rand((1, 2, *image.shape[2:]), generator=generator) * 6 - 3
    out = warp(image, field)[0, 0]
    plane, (height, width) = image[0, 0].double(), image.shape[2:]
    for row, col in [(0, 0), (5, 7), (20, 11), (height - 1, width - 1), (13, width - 2)]:
        y = min(max(row + float(field[0, 0, row, col]), 0.0), height - 1)  # border values outside
        x = min(max(col + float(field[0, 1, row, col]), 0.0), width - 1)
        y0, x0 = min(int(y), height - 2), min(int(x), width - 2)
        fy, fx = y - y0, x - x0
        expected = (
            (1 - fy) * (1 - fx) * plane[y0, x0]
            + (1 - fy) * fx * plane[y0, x0 + 1]
            + fy * (1 - fx) * plane[y0 + 1, x0]
            + fy * fx * plane[y0 + 1, x0 + 1]
        )
        assert float(out[row, col]) == pytest.approx(float(expected), rel=1e-4, abs=1e-3)


def test_demons_recovers_a_known_shift_of_a_real_ct_slice() -> None:
    fixed = _plane(CT_SERIES, 10)[..., 176:336, 176:336]  # a 160 x 160 crop of the 512 x 512 slice
    shift = torch.tensor([1.5, -2.25]).view(1, 2, 1, 1)
    moving = warp(fixed, -shift.expand(1, 2, *fixed.shape[2:]))  # moving(x + shift) = fixed(x)
    field = demons_field(fixed, moving)
    interior = field[0, :, 20:-20, 20:-20].flatten(1).median(1).values
    assert torch.allclose(interior, shift.flatten(), atol=0.25), interior
    identity = demons_field(fixed, fixed)
    assert float(identity.abs().max()) < 1e-3


def test_a_uniform_motion_is_interpolated_far_better_than_linearly() -> None:
    plane = _plane(CT_SERIES, 10)[..., 160:352, 160:352]
    step = torch.tensor([0.0, 4.0]).view(1, 2, 1, 1).expand(1, 2, *plane.shape[2:])
    before, middle, after = plane, warp(plane, step / 2), warp(plane, step)
    made = interpolate_between(before, after, torch.tensor([[0.5]]))[:, 0]
    inner = (..., slice(16, -16), slice(16, -16))
    flow_error = float(((made - middle)[inner] ** 2).mean())
    linear_error = float(((0.5 * (before + after) - middle)[inner] ** 2).mean())
    assert flow_error < 0.1 * linear_error, (flow_error, linear_error)


def test_flow_fill_changes_only_slice_gaps_and_equals_linear_without_motion() -> None:
    array = read_volume(HIPPO / "imagesTr" / "hippocampus_004.nii.gz").array[0].astype(np.float32)
    volume = torch.from_numpy(array)[None, None]
    gap = torch.from_numpy(slice_mask(array.shape, 2, [10, 11, 12]))[None, None]
    box = torch.zeros_like(gap)
    box[..., 5:9, 6:12, 20:24] = True
    mask = gap | box
    linear = interpolate_masked(volume, mask)
    filled = flow_fill_gaps(linear, mask)
    assert torch.equal(filled[~mask.expand_as(filled)], volume[~mask.expand_as(volume)])
    assert torch.equal(filled[box & ~gap], linear[box & ~gap])  # boxes keep the linear fill
    assert not torch.equal(filled[gap], linear[gap])
    static = volume[..., 20:21].expand(-1, -1, -1, -1, array.shape[2]).contiguous()  # no motion along z
    assert torch.allclose(flow_fill_gaps(interpolate_masked(static, gap), gap), interpolate_masked(static, gap))
    assert torch.equal(fill_masked(volume, mask, "linear"), linear)
    assert torch.equal(fill_masked(volume, mask, "flow"), filled)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training: registration stays in fp32
        assert torch.equal(fill_masked(volume, mask, "flow"), filled)


@pytest.mark.parametrize(
    ("path", "axis"),
    [(HIPPO / "imagesTr" / "hippocampus_006.nii.gz", 2), (CT_SERIES, 2)],
)
def test_flow_fill_beats_linear_interpolation_in_three_slice_gaps_of_real_scans(path, axis) -> None:
    array = read_volume(path).array[0].astype(np.float64)
    if array.shape[0] > 160:
        array = array[176:336, 176:336]
    rng = np.random.default_rng(0)
    gains = []
    for start in rng.choice(np.arange(3, array.shape[axis] - 6), size=3, replace=False):
        gap = [int(start), int(start) + 1, int(start) + 2]
        mask = slice_mask(array.shape, axis, gap)
        corrupted = array.copy()
        np.moveaxis(corrupted, axis, 0)[gap] = 0
        volume, voxels = torch.from_numpy(corrupted).float()[None, None], torch.from_numpy(mask)[None, None]
        flow = fill_masked(volume, voxels, "flow")[0, 0].double().numpy()
        linear = interpolate_slices(corrupted, axis, gap, "linear")
        gains.append(psnr_in_mask(flow, array, mask) - psnr_in_mask(linear, array, mask))
    assert np.mean(gains) > 0.3, gains


def test_restoration_net_guide_follows_gap_interp() -> None:
    from medmae.models.presets import build_mae, mae_config
    from medmae.restore.net import Refiner

    mae = build_mae(mae_config("tiny", patch_size=8))
    array = read_volume(HIPPO / "imagesTr" / "hippocampus_001.nii.gz").array[0, :32, :32, :32].astype(np.float32)
    volume = torch.from_numpy(array)[None, None]
    mask = torch.from_numpy(slice_mask(array.shape, 1, [14, 15, 16]))[None, None]
    for interp in ("linear", "flow"):
        net = RestorationNet(mae, Refiner(8, inputs=4), guided=True, gap_interp=interp).eval()
        with torch.no_grad():
            repaired, _ = net.inpaint(volume, mask)  # an untrained refinement adds nothing to its guide
        assert torch.allclose(repaired, fill_masked(volume.masked_fill(mask, 0.0), mask, interp).where(mask, volume))
    with pytest.raises(ValueError, match="gap_interp must be one of"):
        RestorationNet(mae, Refiner(8, inputs=4), guided=True, gap_interp="cubic")
