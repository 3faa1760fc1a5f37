"""Nodule candidates R_j: connected components of the dense ICM phases inside the screening scope."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.measure import regionprops

from ..utils.morphology import bounding_box, fill_holes
from .icm import icm_segmentation

__all__ = [
    "Candidate",
    "extract_candidates",
    "dense_phases",
    "parenchyma_value",
    "trim_partial_volume",
    "side_tissue",
    "split_attached",
    "split_vessels",
]


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


def dense_phases(
    means: np.ndarray,
    min_value: float = -600.0,
    rule: str = "fixed",
    parenchyma: float | None = None,
    margin_hu: float = 150.0,
) -> np.ndarray:
    """Labels (1-based, as returned by ``icm_segmentation``) of the phases that make candidates.

    ``rule="fixed"``: phases whose mean exceeds ``min_value``. ``rule="relative"``: phases whose mean exceeds the
    parenchyma phase's mean ``parenchyma`` by more than ``margin_hu``.
    """
    means = np.nan_to_num(np.asarray(means, dtype=np.float64), nan=-np.inf)
    if rule == "fixed":
        return np.flatnonzero(means > min_value) + 1
    if rule == "relative":
        if parenchyma is None or not np.isfinite(parenchyma):
            raise ValueError("dense_phases: rule 'relative' needs the parenchyma phase's mean")
        return np.flatnonzero(means > parenchyma + margin_hu) + 1
    raise ValueError(f"dense_phases: rule must be 'fixed' or 'relative', got {rule!r}")


def parenchyma_value(
    labels: np.ndarray,
    means: np.ndarray,
    region: np.ndarray | None = None,
    min_value: float = -600.0,
    min_share: float = 0.1,
) -> float:
    """Mean of the lung parenchyma's phase in ``region``: the fill value for R-NAM, and what the relative rule of
    ``dense_phases`` counts from.

    The parenchyma is the least dense of the phases that are not dense by the fixed cut (mean not above
    ``min_value``) and hold at least ``min_share`` of the region's labelled pixels: aerated lung is the least dense
    tissue, and the share keeps a phase of a few dark noisy pixels from being taken for it. Where a faint nodule fills
    most of a small scope it is the most frequent such phase, but not the least dense (*inferred*;
    ``docs/segmentation_choices.md``). Where no such phase holds that share, the most frequent one; the lowest
    phase mean when the region holds no non-dense pixel (NaN when no phase has pixels).
    """
    means = np.asarray(means, dtype=np.float64)
    region = labels > 0 if region is None else (np.asarray(region, bool) & (labels > 0))
    counts = np.bincount(labels[region], minlength=means.size + 1)[1:].astype(float)
    labelled = counts.sum()
    counts[np.nan_to_num(means, nan=np.inf) > min_value] = 0
    if counts.max() > 0:
        major = counts >= min_share * labelled
        if major.any():
            return float(means[major].min())
        return float(means[np.argmax(counts)])
    finite = means[np.isfinite(means)]
    return float(finite.min()) if finite.size else float("nan")


def _disk(radius_px: np.ndarray) -> np.ndarray:
    """An elliptical disk footprint of per-axis radius ``radius_px``."""
    half = np.floor(radius_px).astype(int)
    rows, cols = np.ogrid[-half[0] : half[0] + 1, -half[1] : half[1] + 1]
    return (rows / radius_px[0]) ** 2 + (cols / radius_px[1]) ** 2 <= 1.0


def trim_partial_volume(component: np.ndarray, hu: np.ndarray, parenchyma: float, iterations: int = 1) -> np.ndarray:
    """The part of ``component`` denser than half way from the parenchyma to the component's median HU.

    A nodule's edge blurs into the parenchyma over a pixel or two; the phases denser than parenchyma take that
    blurred rim too, which makes solid candidates far larger than the experts' outlines. The half-maximum cut,
    taken relative to each candidate's own density, puts the edge where the blur is half way for a solid and for
    a ground-glass nodule alike (*inferred*: the paper says nothing about partial volume). With ``iterations`` > 1
    the cut is taken again from the median of what is left, until nothing changes: on a small solid nodule the rim
    is as large as the nodule and pulls the first median down. Holes are filled; an empty result keeps the last
    non-empty one.
    """
    kept = component
    for _ in range(max(int(iterations), 1)):
        level = float(np.median(hu[kept]))
        if not level > parenchyma:
            break
        trimmed = fill_holes(kept & (hu > parenchyma + 0.5 * (level - parenchyma))) & component
        if not trimmed.any() or np.array_equal(trimmed, kept):
            kept = trimmed if trimmed.any() else kept
            break
        kept = trimmed
    return kept


def side_tissue(
    component: np.ndarray, core: np.ndarray, hu: np.ndarray, parenchyma: float, thick_px: float = 2.0
) -> list[np.ndarray]:
    """The tissue the trim cut off beside ``core``, each piece apart: a ground-glass nodule against a vessel.

    The trim's level is the component's median, which a vessel sets when it is the larger part, and that cuts an
    attached ground-glass nodule away whole. What the trim removed is opened by a disk of ``thick_px`` (partial
    volume, a pixel or two wide, goes), and each remaining piece, grown back inside what was removed, is kept when it
    touches less than half of the core's edge: the blurred edge of a solid nodule and the ground-glass ring of a
    part-solid one surround their core. A kept piece is cut at half way between the parenchyma and its own median,
    and the pixels next to the core are left out so that it stays a candidate of its own (*inferred*; the paper has
    no trim).
    """
    removed = component & ~core
    if not removed.any():
        return []
    edge = ndimage.binary_dilation(core, np.ones((3, 3), bool)) & ~core
    found = []
    for piece in split_attached(removed, np.array([thick_px, thick_px], float), drop_thin=True):
        if (edge & piece).sum() >= 0.5 * max(int(edge.sum()), 1):
            continue
        level = float(np.median(hu[piece]))
        kept = piece & (hu > parenchyma + 0.5 * (level - parenchyma)) & ~edge
        if level > parenchyma and kept.any():
            found.append(kept)
    return found


def split_attached(component: np.ndarray, radius_px: np.ndarray, drop_thin: bool = False) -> list[np.ndarray]:
    """Split a component at necks thinner than a vessel: an opening by a disk of ``radius_px``, each piece then
    grown back by the same disk inside the component. When the opening leaves nothing (the component is thinner
    than the disk everywhere: a vessel seen along its length, a rim along the pleura) it returns ``[]`` with
    ``drop_thin``, else ``[component]``."""
    disk = _disk(radius_px)
    box = bounding_box(component, int(np.ceil(radius_px.max())) + 1)
    local = component[box]
    opened = ndimage.binary_opening(local, disk)
    pieces, n = ndimage.label(opened, np.ones((3, 3), bool))
    if n == 0:
        return [] if drop_thin else [component]
    out = []
    for k in range(1, n + 1):
        grown = ndimage.binary_dilation(pieces == k, disk) & local
        full = np.zeros(component.shape, bool)
        full[box] = grown
        out.append(full)
    return out


def split_vessels(
    component: np.ndarray, vessel_px: np.ndarray, neck_px: np.ndarray, drop_thin: bool = False
) -> list[np.ndarray]:
    """Cut a nodule off the vessels it touches, then split what is left at its necks.

    An opening by a disk of ``vessel_px`` (a vessel's radius) keeps what is wider than a vessel, each piece grown back
    inside the component (``split_attached``); what it took away, the vessels with any nodule narrower than they are,
    is split at necks thinner than ``neck_px`` and kept too, so that nothing a split at ``neck_px`` alone would find
    is lost. When nothing is wider than a vessel it is ``split_attached(component, neck_px, drop_thin)``
    (*inferred*: the paper does not separate vessels; ``experiments/oracle_scope.py``).
    """
    wide = split_attached(component, vessel_px, drop_thin=True)
    if not wide:
        return split_attached(component, neck_px, drop_thin)
    rest = component & ~np.any(wide, axis=0)
    return wide + (split_attached(rest, neck_px, drop_thin) if rest.any() else [])


def extract_candidates(
    labels: np.ndarray,
    means: np.ndarray,
    scope: np.ndarray,
    lung_mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
    min_value: float = -600.0,
    min_area_mm2: float = 7.0,
    hu: np.ndarray | None = None,
    rule: str = "fixed",
    margin_hu: float = 150.0,
    trim: bool = False,
    split_mm: float = 0.0,
    refit: Mapping[str, Any] | None = None,
    drop_thin: bool = False,
    trim_iterations: int = 1,
    side_px: float = 0.0,
    split_vessel_mm: float = 0.0,
) -> list[Candidate]:
    """8-connected components of the dense phases within the scope (and the lungs), large enough to be nodules.

    Args:
        labels: ICM phase labels (0 = not labelled, 1..P).
        means: the ``(P,)`` phase means, in the units of ``min_value`` (HU).
        scope: bool mask of the screening scope C.
        lung_mask: optional bool lung mask; candidates are kept to it (it must hold juxtapleural nodules).
        spacing: ``(row, col)`` pixel spacing in mm.
        min_value: with ``rule="fixed"``, phases with a mean above this are dense (nodule-like).
        min_area_mm2: smaller components are dropped.
        hu: the slice in HU, needed by ``trim``.
        rule: ``"fixed"`` (phase mean above ``min_value``) or ``"relative"`` (phase mean above the parenchyma
            phase's by more than ``margin_hu``; the parenchyma phase is the least dense one in the lungs whose mean
            is not above ``min_value`` and that holds a tenth of them, ``parenchyma_value``).
        margin_hu: see ``rule``.
        trim: cut each component at half way between the parenchyma and its own median HU (``trim_partial_volume``).
        split_mm: when > 0, split components at necks thinner than a disk of this radius (``split_attached``):
            nodules from attached vessels, and thin rims along the pleura.
        refit: when given, ``icm_segmentation`` keyword arguments: the phases are fitted again on the lungs within
            the scope alone (needs ``hu``; ``labels`` and ``means`` are then not used), so that a faint nodule,
            a large share of the scope, gets a phase of its own instead of sharing one with the parenchyma.
        drop_thin: with ``split_mm``, drop components that no disk of ``split_mm`` fits in (see ``split_attached``).
        trim_iterations: with ``trim``, cut again from the median of what is left, up to this many times.
        side_px: with ``trim`` and when > 0, what the trim cut off beside a candidate that is at least this thick
            becomes a candidate of its own (``side_tissue``).
        split_vessel_mm: with ``split_mm`` and when > 0, first cut nodules off the vessels narrower than a disk of
            this radius, then split what that leaves at ``split_mm`` (``split_vessels``).

    Returns:
        The candidates in raster order of their first pixel.
    """
    labels = np.asarray(labels)
    region = np.asarray(scope, bool)
    if lung_mask is not None:
        region = region & np.asarray(lung_mask, bool)
    if labels.shape != region.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the scope/lung mask shape {region.shape}")
    if not region.any():  # a scope outside the lungs holds no candidate
        return []
    if len(spacing) != 2 or min(spacing) <= 0:
        raise ValueError(f"spacing must be two positive numbers (mm), got {tuple(spacing)}")
    if (trim or refit is not None) and (hu is None or np.shape(hu) != labels.shape):
        got = None if hu is None else np.shape(hu)
        raise ValueError(f"trim and refit need the slice in HU of shape {labels.shape}, got {got}")
    if refit is not None:
        labels, means = icm_segmentation(np.asarray(hu, np.float64), region, **refit)
    means = np.asarray(means, dtype=np.float64)
    lungs = labels > 0 if lung_mask is None or refit is not None else np.asarray(lung_mask, bool)
    # the parenchyma is the least dense major phase not dense by the fixed cut: where a large nodule fills most of the
    # scope the most frequent phase of the refit is the nodule itself, and nothing would be denser than it
    parenchyma = parenchyma_value(labels, means, lungs, min_value)
    if rule == "relative" and not np.isfinite(parenchyma):  # no labelled lung pixel: nothing to compare with
        return []
    dense = np.isin(labels, dense_phases(means, min_value, rule, parenchyma, margin_hu)) & region
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    values = None if hu is None else np.asarray(hu, np.float64)
    trimming = trim and np.isfinite(parenchyma)  # no parenchyma level: nothing to cut at
    radius = float(split_mm) / np.asarray(spacing, dtype=float)
    vessel = float(split_vessel_mm) / np.asarray(spacing, dtype=float)
    # each component is worked on in its box grown by what the steps reach beyond it (the side tissue's edge, 1 px;
    # the splits' pad), so that scipy's operators cost the box, not the slice: the same pixels as on the whole slice
    splits = [*(radius if split_mm > 0 else ()), *(vessel if split_vessel_mm > 0 else ())]
    reach = max([side_px if trimming else 0.0, *splits])
    margin = int(np.ceil(reach)) + 1
    components = connected_components(dense, connectivity=2)
    found = []  # (raster index of the first pixel, candidate)
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        window = tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, labels.shape))
        top, left = window[0].start, window[1].start
        masks = [components[window] == k]
        if trimming:
            core = trim_partial_volume(masks[0], values[window], parenchyma, trim_iterations)
            sides = side_tissue(masks[0], core, values[window], parenchyma, side_px) if side_px > 0 else []
            masks = [core, *sides]
        if split_mm > 0:
            masks = [
                piece
                for m in masks
                if m.any()
                for piece in (
                    split_vessels(m, vessel, radius, drop_thin)
                    if split_vessel_mm > 0
                    else split_attached(m, radius, drop_thin)
                )
            ]
        for mask in masks:
            for prop in regionprops(connected_components(mask, connectivity=2)):
                area = prop.area * pixel_mm2
                if area >= min_area_mm2:
                    r0, c0, r1, c1 = prop.bbox
                    piece = np.zeros(labels.shape, bool)
                    piece[top + r0 : top + r1, left + c0 : left + c1] = prop.image
                    first = (top + r0) * labels.shape[1] + left + c0 + int(np.argmax(prop.image[0]))
                    bbox = (top + r0, left + c0, top + r1, left + c1)
                    found.append((first, Candidate(mask=piece, area_mm2=float(area), bbox=bbox)))
    found.sort(key=lambda item: item[0])
    return [candidate for _, candidate in found]
