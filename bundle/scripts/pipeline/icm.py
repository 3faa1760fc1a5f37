"""Multi-phase segmentation by iterated conditional modes (ICM): Gaussian phases with a Potts prior.

The energy minimised is, over the pixels ``s`` of the mask,

    U = sum_s [(I_s - mu_L)^2 / (2 sigma_L^2) + ln sigma_L] + beta * sum_{8-neighbours (s, t)} [L_s != L_t]

The 8-neighbourhood graph is 4-colourable by ``(row % 2, col % 2)``: no two pixels of one colour are
neighbours, so updating a whole colour at once is exactly the sequential ICM update of those pixels
(vectorised, deterministic, and the energy never rises within a sweep).
"""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_multiotsu

__all__ = ["icm_segmentation", "initial_labels", "NEIGHBOUR_OFFSETS", "COLOURS"]

# the 8 neighbours, and the 4 colours of the 8-neighbourhood graph, in update order
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
COLOURS = ((0, 0), (0, 1), (1, 0), (1, 1))


def initial_labels(values: np.ndarray, phases: int) -> np.ndarray:
    """Phase index (0 .. phases-1, ascending intensity) of each value by multi-Otsu thresholds.

    With at most ``phases`` distinct levels (a noise-free phantom, a flat region) each level is a phase of its own;
    when multi-Otsu fails otherwise, quantile thresholds are used.
    """
    levels, level_index = np.unique(values, return_inverse=True)
    if levels.size <= phases:  # quantiles of so few levels coincide and would put every value in one phase
        return level_index.astype(np.int64)
    try:
        # 128 bins: the search grows as nbins ** (phases - 1) and the sweeps refine the phases anyway
        thresholds = threshold_multiotsu(values, classes=phases, nbins=128)
    except ValueError:
        thresholds = np.quantile(values, np.linspace(0, 1, phases + 1)[1:-1])
    return np.digitize(values, thresholds).astype(np.int64)


def _estimate(values: np.ndarray, labels: np.ndarray, means: np.ndarray, variances: np.ndarray, min_var: float):
    """Re-estimate each phase's mean and variance; a phase left empty keeps its previous parameters."""
    means, variances = means.copy(), variances.copy()
    for k in range(means.size):
        v = values[labels == k]
        if v.size:
            means[k] = v.mean()
            variances[k] = max(v.var(), min_var)
    return means, variances


def _first_minimum(energies: np.ndarray) -> np.ndarray:
    """``np.argmin(energies, axis=0)`` as int8 (the first phase of the lowest energy), by one comparison per phase:
    numpy's argmin along the first axis walks the array across its memory layout."""
    best = np.zeros(energies.shape[1:], np.int8)
    lowest = energies[0]
    for k in range(1, energies.shape[0]):
        lower = energies[k] < lowest
        best[lower] = k
        lowest = np.where(lower, energies[k], lowest)
    return best


def icm_segmentation(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    phases: int = 4,
    beta: float = 0.7,
    max_sweeps: int = 15,
    min_std: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment a 2-D image into ``phases`` intensity phases with a Potts prior on 8-neighbours.

    Args:
        image: 2-D array (e.g. CT values in HU).
        mask: optional 2-D bool array; only these pixels are labelled, and the phases are fitted on
            them (pass the lung mask to keep ground-glass nodules apart from parenchyma).
        phases: number of phases.
        beta: weight of the Potts prior per disagreeing neighbour (0 gives per-pixel classification).
        max_sweeps: the most ICM sweeps; it stops earlier when a sweep changes nothing.
        min_std: floor on a phase's standard deviation (keeps a constant phase from dominating);
            default 1 % of the intensity range inside the mask.

    Returns:
        ``(labels, means)``: int32 labels of the image's shape, 1..phases in ascending order of the
        phase mean and 0 outside the mask; and the ``(phases,)`` phase means (NaN for an empty phase).

    Raises:
        ValueError: on a non 2-D image, a mask of another shape, non-finite values in the mask,
            ``phases`` outside 2..127, ``beta < 0`` or ``max_sweeps < 0``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"icm_segmentation expects a 2-D image, got shape {image.shape}")
    if not 2 <= phases <= 127 or beta < 0 or max_sweeps < 0:
        raise ValueError(f"need phases >= 2, beta >= 0, max_sweeps >= 0; got {phases}, {beta}, {max_sweeps}")
    mask = np.ones(image.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    labels_out = np.zeros(image.shape, np.int32)
    if not mask.any():
        return labels_out, np.full(phases, np.nan)
    rows, cols = np.nonzero(mask)
    # crop to the mask's box, from even indices so the colour classes (and the result) stay those of the full image
    box = (slice(rows.min() // 2 * 2, rows.max() + 1), slice(cols.min() // 2 * 2, cols.max() + 1))
    img, inside = image[box].astype(np.float64), mask[box]
    values = img[inside]
    if not np.isfinite(values).all():
        raise ValueError("icm_segmentation: the image has NaN or infinite values inside the mask")

    span = float(values.max() - values.min())
    min_var = (0.01 * span if min_std is None else float(min_std)) ** 2 or np.finfo(float).eps
    lab = initial_labels(values, phases)
    means, variances = _estimate(values, lab, np.zeros(phases), np.full(phases, min_var), min_var)

    h, w = img.shape
    labels = np.full((h, w), -1, np.int8)  # -1 outside the mask: never equal to a phase
    labels[inside] = lab
    # phase k's pixels, with a rim of zeros: a pixel's count of neighbours in phase k is a sum of 8 shifted views
    phase_ids = np.arange(phases, dtype=np.int8)[:, None, None]
    member = np.zeros((phases, h + 2, w + 2), np.int8)
    member[:, 1:-1, 1:-1] = labels[None] == phase_ids
    for _ in range(max_sweeps):
        data = (img[None] - means[:, None, None]) ** 2 / (2 * variances[:, None, None])
        data += 0.5 * np.log(variances)[:, None, None]
        changed = 0
        for r0, c0 in COLOURS:
            centre, sub_inside = labels[r0::2, c0::2], inside[r0::2, c0::2]
            same = np.zeros((phases, *centre.shape), np.int8)
            for dr, dc in NEIGHBOUR_OFFSETS:
                same += member[:, 1 + r0 + dr : 1 + h + dr : 2, 1 + c0 + dc : 1 + w + dc : 2]
            # minimising beta * #different == minimising -beta * #same (the neighbour count is fixed)
            best = _first_minimum(data[:, r0::2, c0::2] - beta * same)
            moved = sub_inside & (best != centre)
            if moved.any():
                changed += int(np.count_nonzero(moved))
                centre[moved] = best[moved]
                member[:, 1 + r0 : 1 + h : 2, 1 + c0 : 1 + w : 2] = centre[None] == phase_ids
        if changed == 0:
            break
        means, variances = _estimate(values, labels[inside], means, variances, min_var)

    counts = np.bincount(labels[inside], minlength=phases)
    means = np.where(counts > 0, means, np.nan)
    order = np.argsort(np.where(np.isnan(means), np.inf, means), kind="stable")
    rank = np.empty(phases, np.int32)
    rank[order] = np.arange(1, phases + 1, dtype=np.int32)
    labels_out[box][inside] = rank[labels[inside]]
    return labels_out, means[order]
