"""Finding corrupted slices: dropped (constant) slices, intensity jumps, stripes and motion shifts.

Each slice is compared with the prediction from its nearest intact neighbours (their mean). A slice is
flagged when its residual is far larger than the typical residual of the scan (robustly: against the
median over slices), and then explained: a stripe pattern, a shifted copy of its neighbours, or a gain
change. Flagged slices are removed from the neighbour predictions and the search repeats, so one bad
slice does not make its neighbours look bad. Constant slices touching the volume's edge are treated as
padding, not damage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmae.restore.corrupt import robust_range


@dataclass(frozen=True)
class SliceFinding:
    """One corrupted slice: its index along the axis, the defect kind and a readable reason."""

    index: int
    kind: str
    reason: str


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of :func:`detect_corrupted_slices`. Residual ratios are a slice's residual energy over
    the scan's median slice residual; slices at the volume's ends (predicted from one side) need twice as much.

    Args:
        explained_ratio: ratio from which a slice with a recognised defect (stripes, shift, gain) is flagged.
        gain_ratio: (lower) ratio from which a slice with a gain jump is flagged.
        outlier_ratio: ratio from which any slice is flagged, explained or not.
        stripe_fraction: share of the residual explained by a row or column profile that means stripes.
        gain_jump: intensity factor against the neighbours that means a gain jump.
        max_shift: largest in-plane motion (voxels) searched.
        shift_gain: residual reduction by the best shift that means motion.
    """

    explained_ratio: float = 3.0
    gain_ratio: float = 1.5
    outlier_ratio: float = 8.0
    stripe_fraction: float = 0.6
    gain_jump: float = 1.4
    max_shift: int = 8
    shift_gain: float = 0.5


def _neighbour_prediction(planes: np.ndarray, index: int, bad: set[int]) -> np.ndarray | None:
    """Mean of the nearest intact slice on each side of ``index`` (one side at the volume's ends)."""
    below = next((k for k in range(index - 1, -1, -1) if k not in bad), None)
    above = next((k for k in range(index + 1, len(planes)) if k not in bad), None)
    neighbours = [planes[k] for k in (below, above) if k is not None]
    return np.mean(neighbours, axis=0) if neighbours else None


def _stripe_share(residual: np.ndarray) -> tuple[float, int]:
    """Largest share of the residual energy explained by a profile along one in-plane axis."""
    total = float((residual**2).sum()) + 1e-12
    shares = []
    for axis in (0, 1):
        profile = residual.mean(axis=1 - axis, keepdims=True)
        centred = profile - profile.mean()
        shares.append(float((np.broadcast_to(centred, residual.shape) ** 2).sum()) / total)
    best = int(np.argmax(shares))
    return shares[best], best


def _best_shift(plane: np.ndarray, prediction: np.ndarray, max_shift: int) -> tuple[tuple[int, int], float]:
    """The in-plane roll of ``plane`` closest to ``prediction`` and its mean squared residual."""
    best, best_error = (0, 0), float(np.mean((plane - prediction) ** 2))
    limit = min(max_shift, (min(plane.shape) - 1) // 2)
    for dx in range(-limit, limit + 1):
        for dy in range(-limit, limit + 1):
            moved = np.roll(plane, (dx, dy), axis=(0, 1))
            inner = (slice(limit, plane.shape[0] - limit or None), slice(limit, plane.shape[1] - limit or None))
            error = float(np.mean((moved[inner] - prediction[inner]) ** 2))
            if error < best_error:
                best, best_error = (dx, dy), error
    return best, best_error


def _constant_slices(planes: np.ndarray, tolerance: float) -> list[SliceFinding]:
    flat = planes.reshape(len(planes), -1)
    constant = np.ptp(flat, axis=1) <= tolerance
    findings = []
    for index in np.flatnonzero(constant):
        if bool(np.all(constant[: index + 1])) or bool(np.all(constant[index:])):
            continue  # padding at the volume's edge
        value = float(flat[index, 0])
        kind = "zero" if value == 0 else "constant"
        findings.append(SliceFinding(int(index), kind, f"every voxel is {value:g} (dropped slice)"))
    return findings


def _explain(plane: np.ndarray, prediction: np.ndarray, ratio: float, config: DetectionConfig) -> SliceFinding | None:
    """Why a slice with residual ``ratio`` x the scan's median is corrupted (None: it is not)."""
    residual = plane - prediction
    share, stripe_axis = _stripe_share(residual - residual.mean())
    if ratio >= config.explained_ratio and share >= config.stripe_fraction:
        return SliceFinding(-1, "stripes", f"stripes along in-plane axis {stripe_axis} ({share:.0%} of the residual)")
    gain = float((plane * prediction).sum() / max(float((prediction**2).sum()), 1e-12))
    if ratio >= config.gain_ratio and abs(np.log(max(gain, 1e-6))) >= np.log(config.gain_jump):
        return SliceFinding(-1, "intensity", f"intensity x{gain:.2f} against its neighbours")
    if ratio < config.explained_ratio:
        return None
    (dx, dy), shifted_error = _best_shift(plane, prediction, config.max_shift)
    if (dx, dy) != (0, 0) and shifted_error <= (1 - config.shift_gain) * float(np.mean(residual**2)):
        return SliceFinding(-1, "shift", f"matches its neighbours when moved by ({dx}, {dy}) voxels (motion)")
    if ratio >= config.outlier_ratio:
        return SliceFinding(-1, "outlier", f"differs from its neighbours {ratio:.0f}x more than slices usually do")
    return None


def detect_corrupted_slices(
    array: np.ndarray, axis: int = 2, config: DetectionConfig = DetectionConfig()
) -> list[SliceFinding]:
    """Corrupted slices of a ``(I, J, K)`` volume along ``axis``, sorted by index.

    Returns:
        One :class:`SliceFinding` per flagged slice (empty for a clean scan).
    """
    planes = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    scale = robust_range(planes)
    findings = {f.index: f for f in _constant_slices(planes, 1e-6 * scale)}
    flat = planes.reshape(len(planes), -1)
    edge_constant = {k for k in range(len(planes)) if np.ptp(flat[k]) <= 1e-6 * scale} - set(findings)
    for _ in range(len(planes) // 3):
        bad = set(findings) | edge_constant
        energies = {}
        for k in range(len(planes)):
            if k in bad:
                continue
            prediction = _neighbour_prediction(planes, k, bad)
            if prediction is not None:
                energies[k] = float(np.mean((planes[k] - prediction) ** 2))
        if len(energies) < 3:
            break
        typical = max(float(np.median(list(energies.values()))), 1e-12 * scale**2)
        # slices at the ends are predicted from one side only: they need twice the residual
        ratios = {k: e / typical / (2.0 if k in (0, len(planes) - 1) else 1.0) for k, e in energies.items()}
        found = None
        for k in sorted(ratios, key=ratios.get, reverse=True):
            if ratios[k] < config.gain_ratio:
                break
            explained = _explain(planes[k], _neighbour_prediction(planes, k, bad), ratios[k], config)
            if explained is not None:
                found = SliceFinding(k, explained.kind, explained.reason)
                break
        if found is None:
            break
        findings[found.index] = found
    return [findings[k] for k in sorted(findings)]
