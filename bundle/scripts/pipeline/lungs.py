"""Lung segmentation of chest CT by thresholding and morphology, slice by slice.

Lungs are the large low-density regions inside the body's convex hull. A morphological closing (by distance
transforms, so its cost does not grow with the radius) and hole filling pull juxtapleural nodules and vessels,
which are dense and would otherwise be cut out, back inside the mask.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from ..utils.morphology import bounding_box, fill_holes

__all__ = ["segment_lungs"]


def _closing(mask: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Binary closing with an (elliptical) disk of the given per-axis radius, via Euclidean distance maps.

    Computed on the mask's bounding box grown by the radius: the closing never reaches further, and the box's
    rim, being out of reach of the dilation, stands in for everything beyond it (the same result as on the whole
    zero-padded slice, for a fraction of the distance transforms' cost)."""
    sampling = 1.0 / np.maximum(radius_px, 1e-6)
    pad = int(np.ceil(radius_px.max())) + 1
    padded = np.pad(mask, pad)
    box = bounding_box(padded, pad)
    dilated = ndimage.distance_transform_edt(~padded[box], sampling=sampling) <= 1.0
    closed = np.zeros_like(padded)
    closed[box] = ndimage.distance_transform_edt(dilated, sampling=sampling) > 1.0
    return closed[pad:-pad, pad:-pad]


def _coarse_convex_hull(mask: np.ndarray, step: int = 4) -> np.ndarray:
    """The convex hull of ``mask`` computed on every ``step``-th pixel, shrunk by ``step`` so that it never
    reaches past the true hull (air just outside the body must stay outside); the lungs lie far inside it.
    Filling the polygon at full resolution is most of the cost of skimage's hull."""
    small = convex_hull_image(mask[::step, ::step])
    hull = np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: mask.shape[0], : mask.shape[1]]
    box = bounding_box(hull, step)  # the erosion is zero beyond, as on the whole slice
    if box is None:  # a body too small to show on the coarse grid
        return mask
    shrunk = np.zeros_like(hull)
    shrunk[box] = ndimage.binary_erosion(hull[box], iterations=step)
    return shrunk | mask


def _segment_slice(
    hu: np.ndarray, spacing: np.ndarray, threshold: float, min_area_mm2: float, closing_mm: float
) -> np.ndarray:
    pixel_area = float(spacing[0] * spacing[1])
    body = ndimage.binary_opening(hu > threshold, iterations=2)
    labels, n = ndimage.label(body)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    body = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    hull = _coarse_convex_hull(body)
    air = (hu <= threshold) & hull
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:] * pixel_area
    keep = np.flatnonzero(sizes >= min_area_mm2) + 1
    lungs = np.isin(labels, keep)
    if not lungs.any():
        return lungs
    lungs = _closing(lungs, closing_mm / spacing[:2])
    return fill_holes(lungs)


def segment_lungs(
    hu: np.ndarray,
    spacing: Sequence[float],
    threshold: float = -400.0,
    min_area_mm2: float = 300.0,
    closing_mm: float = 8.0,
    min_component_fraction: float = 0.1,
    workers: int | None = None,
) -> np.ndarray:
    """Segment the lungs of a CT slice ``(rows, cols)`` or volume ``(rows, cols, slices)``.

    Args:
        hu: CT values in Hounsfield units.
        spacing: pixel spacing in mm, ``(row, col[, slice])``.
        threshold: HU below which a pixel inside the body counts as air or lung.
        min_area_mm2: low-density regions smaller than this (bowel gas, small airways) are dropped, per slice.
        closing_mm: radius of the closing that brings juxtapleural nodules and vessels into the mask.
        min_component_fraction: for volumes, 3-D regions smaller than this fraction of the largest are dropped.
        workers: threads that segment a volume's slices (None: the CPUs this process may use). The slices are
            independent and scipy's morphology releases the GIL, so two threads take about half the time; the mask
            is the same whatever the number.

    Returns:
        bool mask of ``hu``'s shape; all False on slices without lungs.
    """
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3):
        raise ValueError(f"segment_lungs expects a 2-D slice or a 3-D volume, got shape {hu.shape}")
    if not np.isfinite(hu).all():
        raise ValueError("segment_lungs: the image has NaN or infinite values")
    spacing = np.asarray(spacing, dtype=float)
    if spacing.size < 2 or (spacing[:2] <= 0).any():
        raise ValueError(f"segment_lungs: invalid pixel spacing {tuple(spacing)}")
    if hu.ndim == 2:
        return _segment_slice(hu, spacing, threshold, min_area_mm2, closing_mm)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max(1, min(workers, hu.shape[2]))) as pool:
        slices = pool.map(
            lambda s: _segment_slice(hu[..., s], spacing, threshold, min_area_mm2, closing_mm), range(hu.shape[2])
        )
        lungs = np.stack(list(slices), axis=-1)
    # In 3-D the lungs are the big connected regions; bowel gas and air under the back are small and separate.
    labels, n = ndimage.label(lungs)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        lungs = np.isin(labels, np.flatnonzero(sizes >= min_component_fraction * sizes.max()) + 1)
    return lungs
