"""Slice gaps filled by interpolation fitted to the scan itself (``medmae.restore.fitted``), on real scans."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medmae.cli import main
from medmae.evaluation.restore_baselines import flow_interpolation, interpolate_slices
from medmae.evaluation.restore_metrics import psnr_in_mask
from medmae.inference.repair import interpolate_array
from medmae.io import read_volume
from medmae.restore.evaluate import centre_crop
from medmae.restore.fitted import RIDGE_STRENGTHS, example_starts, fitted_fill_gaps, gap_features, loo_ridge
from medmae.restore.flow import flow_fill_gaps
from medmae.restore.net import fill_masked
from medmae.restore.slices import slice_mask
from tests.conftest import DATA, HIPPO

pytestmark = pytest.mark.real_data
CT_SERIES = DATA / "ct_dicom_series" / "series"
CT = DATA / "ct_mr_samples" / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def ct_series() -> np.ndarray:
    """The real 2 mm CT series, its central 160 x 160 in-plane crop: ``(160, 160, 20)`` int16."""
    return centre_crop(read_volume(CT_SERIES).array[0], 160)


def _planes(path: Path) -> torch.Tensor:
    """A real scan as a ``(D, P, Q)`` stack of its z planes, float32."""
    return torch.from_numpy(read_volume(path).array[0].astype(np.float32)).movedim(2, 0).contiguous()


def test_features_are_the_flow_fill_and_the_shifted_neighbouring_planes() -> None:
    planes = _planes(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    starts, width = [5, 12], 3
    features = gap_features(planes, starts, width)  # (2, 3, 56, P, Q)
    assert features.shape == (2, 3, 56, *planes.shape[1:])
    for row, start in enumerate(starts):
        volume = planes.clone()
        mask = torch.zeros_like(volume, dtype=torch.bool)
        mask[start : start + width] = True
        flow = flow_fill_gaps(fill_masked(volume[None, None], mask[None, None]), mask[None, None])[0, 0]
        torch.testing.assert_close(features[row, :, 0], flow[start : start + width], rtol=1e-5, atol=1e-3)
        # the two halves' centre values add up to the flow fill
        torch.testing.assert_close(features[row, :, 1 + 4] + features[row, :, 1 + 9 + 4], features[row, :, 0])
        for k in range(width):
            # context maps 2..5 are planes s-2, s-1, s+w, s+w+1; within each, neighbour (dy, dx) sits at 3 dy + dx
            for index, plane in enumerate((start - 2, start - 1, start + width, start + width + 1)):
                block = features[row, k, 1 + 9 * (2 + index) : 1 + 9 * (3 + index)]
                assert torch.equal(block[4], planes[plane])  # the centre
                assert torch.equal(block[3 * 2 + 1][:-1], planes[plane][1:])  # one row below
                assert torch.equal(block[3 * 1 + 0][:, 1:], planes[plane][:, :-1])  # one column left
        assert torch.equal(features[row, :, -1], torch.ones_like(features[row, :, -1]))


def _plain_loo_ridge(groups: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float | None, np.ndarray | None]:
    """The same choice made the long way: stacked arrays, each group left out in turn, ``lstsq`` of the
    ridge-augmented system."""
    stacked = np.concatenate([a for a, _ in groups])
    scale = 1.0 / np.sqrt((stacked**2).sum(0))
    features = stacked.shape[1]
    mean_diagonal = float(((stacked * scale) ** 2).sum()) / features  # of the scaled Gram matrix

    def solve(pairs: list[tuple[np.ndarray, np.ndarray]], strength: float) -> np.ndarray:
        a = np.concatenate([x for x, _ in pairs]) * scale
        r = np.concatenate([y for _, y in pairs])
        augmented = np.vstack((a, np.sqrt(strength * mean_diagonal) * np.eye(features)))
        return np.linalg.lstsq(augmented, np.concatenate((r, np.zeros(features))), rcond=None)[0]

    best = (sum(float(r @ r) for _, r in groups), None)
    for strength in RIDGE_STRENGTHS:
        error = 0.0
        for i, (a, r) in enumerate(groups):
            w = solve(groups[:i] + groups[i + 1 :], strength)
            error += float(((a * scale) @ w - r) @ ((a * scale) @ w - r))
        if error < best[0]:
            best = (error, strength)
    if best[1] is None:
        return None, None
    return best[1], solve(groups, best[1]) * scale


def test_leave_one_out_ridge_matches_a_plain_implementation(ct_series: np.ndarray) -> None:
    planes = torch.from_numpy(ct_series.astype(np.float32)).movedim(2, 0).contiguous()[:, ::4, ::4]
    starts, width = [2, 6, 10, 14], 1
    features = gap_features(planes, starts, width).double()[:, 0]  # (4, F, P, Q)
    groups = []
    for row, start in enumerate(starts):
        a = features[row].flatten(1).T.numpy()
        groups.append((a, planes[start].double().flatten().numpy() - a[:, 0]))
    fit = loo_ridge(
        np.stack([a.T @ a for a, _ in groups]),
        np.stack([a.T @ r for a, r in groups]),
        np.array([r @ r for _, r in groups]),
    )
    strength, weights = _plain_loo_ridge(groups)
    assert fit.strength == strength and strength is not None
    np.testing.assert_allclose(fit.weights, weights, rtol=1e-5, atol=1e-8)
    assert fit.held_out_gain > 1.0


def test_example_gaps_keep_clear_of_every_masked_plane() -> None:
    masked = np.zeros(30, dtype=bool)
    masked[14:17] = True
    starts = example_starts(masked, 3)
    assert starts and all(not masked[max(s - 2, 0) : s + 5].any() for s in starts)
    assert min(starts) == 1 and max(starts) == 30 - 3 - 1
    assert 9 in starts and 10 not in starts and 18 not in starts and 19 in starts  # planes s-2 ... s+4 clear of 14-16
    assert len(example_starts(np.zeros(400, dtype=bool), 3)) == 24  # spread, at most MAX_POSITIONS


def test_fitted_beats_flow_and_linear_in_a_real_ct_gap(ct_series: np.ndarray) -> None:
    gap = [10, 11, 12]
    mask = slice_mask(ct_series.shape, 2, gap)
    corrupted = np.where(mask, 0, ct_series).astype(ct_series.dtype)
    filled, fits = fitted_fill_gaps(corrupted, mask)
    np.testing.assert_array_equal(filled[~mask], corrupted[~mask])
    fitted = psnr_in_mask(filled, ct_series, mask)
    flow = psnr_in_mask(flow_interpolation(corrupted, mask), ct_series, mask)
    linear = psnr_in_mask(interpolate_slices(corrupted, 2, gap, "linear"), ct_series, mask)
    assert fitted > flow + 0.5 and fitted > linear + 1.5, (fitted, flow, linear)  # measured 37.80, 36.71, 35.39
    assert len(fits) == 1 and fits[0].positions >= 2 and all(s is not None for s in fits[0].strengths)


def test_without_enough_example_gaps_the_flow_fill_is_kept(ct_series: np.ndarray) -> None:
    thin = ct_series[..., 4:13]  # 9 slices: a 3-slice gap in the middle leaves no intact stretch to learn from
    mask = slice_mask(thin.shape, 2, [3, 4, 5])
    filled, fits = fitted_fill_gaps(thin, mask)
    np.testing.assert_allclose(filled, flow_interpolation(thin, mask), rtol=0, atol=1e-3)
    assert fits[0].positions < 2 and fits[0].strengths == (None, None, None)


def test_a_region_that_is_not_a_slice_gap_is_filled_linearly(ct_series: np.ndarray) -> None:
    mask = np.zeros(ct_series.shape, dtype=bool)
    mask[40:60, 50:70, 8:11] = True
    out, fits = interpolate_array(ct_series, mask, "fitted")
    linear, _ = interpolate_array(ct_series, mask, "linear")
    assert fits == [] and out.dtype == ct_series.dtype
    np.testing.assert_array_equal(out, linear)


def test_inpaint_by_fitted_interpolation_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = hashlib.sha256(CT.read_bytes()).hexdigest()
    volume = read_volume(CT)
    output = tmp_path / "repaired.nii.gz"
    assert main(["inpaint", str(CT), "-o", str(output), "--interpolation", "fitted", "--slices", "9-11"]) == 0
    assert "slices 9-11 (axis z): fitted on" in capsys.readouterr().out
    repaired = read_volume(output)
    assert hashlib.sha256(CT.read_bytes()).hexdigest() == before
    assert repaired.dtype == volume.dtype and repaired.same_grid(volume, atol=1e-6)
    mask = slice_mask(volume.spatial_shape, 2, [9, 10, 11])
    np.testing.assert_array_equal(repaired.array[0][~mask], volume.array[0][~mask])
    expected, _ = fitted_fill_gaps(np.where(mask, 0, volume.array[0]), mask)
    np.testing.assert_array_equal(repaired.array[0][mask], np.clip(np.rint(expected[mask]), -32768, 32767))
    common = ["inpaint", str(CT), "-o", str(tmp_path / "x.nii.gz"), "--slices", "9-11"]
    for argv in ([*common, "--interpolation", "fitted", "--ckpt", str(tmp_path / "a.ckpt")], common):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    errors = capsys.readouterr().err
    assert "--ckpt: not allowed with argument --interpolation" in errors
    assert "one of the arguments --ckpt --interpolation is required" in errors
