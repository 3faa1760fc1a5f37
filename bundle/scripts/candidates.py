"""Nodule candidates R_j: connected components of the dense ICM phases inside the screening scope."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.measure import label as connected_components
from skimage.measure import regionprops

__all__ = ["Candidate", "extract_candidates", "dense_phases", "parenchyma_value"]


@dataclass
class Candidate:
    """One nodule candidate.

    Args:
        mask: 2-D bool mask of the candidate in the slice.
        area_mm2: its area at the slice's pixel spacing.
        bbox: ``(row_start, col_start, row_stop, col_stop)``, stops exclusive.
        score: its R-NAM score (NaN until screened).
    """

    mask: np.ndarray
    area_mm2: float
    bbox: tuple[int, int, int, int]
    score: float = float("nan")

    def to_record(self) -> dict:
        """JSON-ready summary (no mask)."""
        score = None if np.isnan(self.score) else float(self.score)
        return {"area_mm2": float(self.area_mm2), "bbox": [int(v) for v in self.bbox], "rnam_score": score}


def dense_phases(means: np.ndarray, min_value: float = -600.0) -> np.ndarray:
    """Labels (1-based, as returned by ``icm_segmentation``) of the phases whose mean exceeds ``min_value``."""
    means = np.asarray(means, dtype=np.float64)
    return np.flatnonzero(np.nan_to_num(means, nan=-np.inf) > min_value) + 1


def parenchyma_value(
    labels: np.ndarray, means: np.ndarray, region: np.ndarray | None = None, min_value: float = -600.0
) -> float:
    """Mean of the most frequent non-dense phase in ``region`` (lung parenchyma): the fill value for R-NAM.

    Falls back to the lowest phase mean when the region holds no non-dense pixel (NaN when no phase has pixels).
    """
    means = np.asarray(means, dtype=np.float64)
    region = labels > 0 if region is None else (np.asarray(region, bool) & (labels > 0))
    counts = np.bincount(labels[region], minlength=means.size + 1)[1:].astype(float)
    counts[np.nan_to_num(means, nan=np.inf) > min_value] = 0
    if counts.max() > 0:
        return float(means[np.argmax(counts)])
    finite = means[np.isfinite(means)]
    return float(finite.min()) if finite.size else float("nan")


def extract_candidates(
    labels: np.ndarray,
    means: np.ndarray,
    scope: np.ndarray,
    lung_mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
    min_value: float = -600.0,
    min_area_mm2: float = 7.0,
) -> list[Candidate]:
    """8-connected components of the dense phases within the scope (and the lungs), large enough to be nodules.

    Args:
        labels: ICM phase labels (0 = not labelled, 1..P).
        means: the ``(P,)`` phase means, in the units of ``min_value`` (HU).
        scope: bool mask of the screening scope C.
        lung_mask: optional bool lung mask; candidates are kept to it (it must hold juxtapleural nodules).
        spacing: ``(row, col)`` pixel spacing in mm.
        min_value: phases with a mean above this are dense (nodule-like).
        min_area_mm2: smaller components are dropped.

    Returns:
        The candidates in raster order of their first pixel.
    """
    labels = np.asarray(labels)
    region = np.asarray(scope, bool)
    if lung_mask is not None:
        region = region & np.asarray(lung_mask, bool)
    if labels.shape != region.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the scope/lung mask shape {region.shape}")
    if len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"spacing must be two positive numbers (mm), got {tuple(spacing)}")
    dense = np.isin(labels, dense_phases(means, min_value)) & region
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    components = connected_components(dense, connectivity=2)
    found = []
    for prop in regionprops(components):
        area = prop.area * pixel_mm2
        if area >= min_area_mm2:
            r0, c0, r1, c1 = prop.bbox
            mask = np.zeros(labels.shape, bool)
            mask[r0:r1, c0:c1] = prop.image
            found.append(Candidate(mask=mask, area_mm2=float(area), bbox=(r0, c0, r1, c1)))
    return found
