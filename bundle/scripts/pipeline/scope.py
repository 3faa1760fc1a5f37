"""The screening scope C: the most prominent blob of a nodule activation map (NAM), found by watershed.

Recipe (*inferred*: the paper names the watershed, not its settings): smooth the NAM, normalise a copy to [0, 1],
keep values >= ``threshold`` as the domain, seed the watershed of ``-nam`` with the local maxima and take the basin
of the highest peak. Choosing by peak (not by area or integral) keeps a sharp nodule response ahead of a broad
diffuse one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

__all__ = ["nam_basins", "screening_scope", "top_scopes", "refine_scope", "bounding_box"]


def _normalised(nam: np.ndarray, sigma: float) -> np.ndarray | None:
    """Smoothed copy of the NAM scaled to [0, 1], or None for a NAM that holds no blob (flat or non-finite)."""
    nam = np.asarray(nam, dtype=np.float64)
    if nam.ndim != 2:
        raise ValueError(f"the NAM must be 2-D, got shape {nam.shape}")
    if nam.size == 0 or not np.isfinite(nam).all():
        return None
    smooth = ndi.gaussian_filter(nam, sigma) if sigma > 0 else nam
    low, high = float(smooth.min()), float(smooth.max())
    if high - low <= 1e-12 * max(1.0, abs(high)):
        return None
    return (smooth - low) / (high - low)


def nam_basins(
    nam: np.ndarray, sigma: float = 1.0, threshold: float = 0.2, min_distance: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Watershed basins of a NAM, numbered by the height of their peak.

    Args:
        nam: 2-D raw NAM (any scale; it is normalised internally).
        sigma: Gaussian smoothing in pixels before normalisation (0: none).
        threshold: the domain is where the normalised NAM is >= this value.
        min_distance: least distance in pixels between two markers (about half the NAM's stride).

    Returns:
        ``(basins, peaks)``: int32 basin labels (0 outside the domain; basin 1 holds the global maximum,
        then descending peak height) and the normalised peak height of each basin. For a flat, empty
        or non-finite NAM: all-zero labels and an empty ``peaks``.
    """
    norm = _normalised(nam, sigma)
    if norm is None:
        return np.zeros(np.shape(nam), np.int32), np.zeros(0)
    domain = norm >= threshold
    coords = peak_local_max(norm, min_distance=max(int(min_distance), 1), threshold_abs=threshold, exclude_border=False)
    # the global maximum always seeds a basin, also on plateaus where peak_local_max may skip it
    coords = np.vstack([np.unravel_index(np.argmax(norm), norm.shape), coords.reshape(-1, 2)])
    markers = np.zeros(norm.shape, np.int32)
    markers[coords[:, 0], coords[:, 1]] = np.arange(1, len(coords) + 1)
    basins = watershed(-norm, markers, mask=domain)
    n = int(basins.max())
    peaks = ndi.maximum(norm, basins, index=np.arange(1, n + 1)) if n else np.zeros(0)
    present = np.flatnonzero(np.bincount(basins.ravel(), minlength=n + 1)[1:])
    order = present[np.argsort(-np.asarray(peaks)[present], kind="stable")]
    relabel = np.zeros(n + 1, np.int32)
    relabel[order + 1] = np.arange(1, order.size + 1, dtype=np.int32)
    return relabel[basins], np.asarray(peaks)[order]


def top_scopes(
    nam: np.ndarray, k: int = 2, sigma: float = 1.0, threshold: float = 0.2, min_distance: int = 8
) -> list[np.ndarray]:
    """The ``k`` basins with the highest peaks, as bool masks (fewer when the NAM has fewer blobs)."""
    basins, peaks = nam_basins(nam, sigma, threshold, min_distance)
    return [basins == i + 1 for i in range(min(k, peaks.size))]


def screening_scope(
    nam: np.ndarray, sigma: float = 1.0, threshold: float = 0.2, min_distance: int = 8
) -> np.ndarray | None:
    """The scope C (bool mask of the most prominent blob), or None when the NAM has no blob."""
    scopes = top_scopes(nam, 1, sigma, threshold, min_distance)
    return scopes[0] if scopes else None


def refine_scope(
    nam: np.ndarray,
    base: np.ndarray,
    sigma: float = 1.0,
    threshold: float = 0.2,
    min_distance: int = 8,
    min_peak: float = 0.5,
) -> tuple[np.ndarray, bool]:
    """Multi-GAP scope: the most prominent blob of ``nam`` inside the baseline scope ``base``, if any.

    A blob counts when its peak lies in ``base`` and reaches ``min_peak`` of the NAM's normalised range
    (so a faint ripple does not replace C1). The blob is clipped to ``base``.

    Returns:
        ``(scope, refined)``: the blob within ``base`` and True, or ``base`` itself and False.
    """
    base = np.asarray(base, bool)
    if base.shape != np.shape(nam):
        raise ValueError(f"base scope shape {base.shape} differs from the NAM shape {np.shape(nam)}")
    basins, peaks = nam_basins(nam, sigma, threshold, min_distance)
    norm = _normalised(nam, sigma)
    for i, peak in enumerate(peaks):
        if peak < min_peak:
            break
        blob = basins == i + 1
        if base[np.unravel_index(np.argmax(np.where(blob, norm, -np.inf)), blob.shape)]:
            return blob & base, True
    return base, False


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row_start, col_start, row_stop, col_stop)`` of a 2-D mask (stops exclusive), None when empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1
