"""Binary morphology on the part of an array that holds the mask: a lung or a candidate is a small part of its
slice or scan, and scipy's operators cost what the whole array costs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["bounding_box", "fill_holes"]


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """The slices of ``mask``'s bounding box grown by ``margin`` pixels and clipped to the array; None when the mask
    is empty."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` of a boolean ``mask``, computed on its bounding box grown by one pixel: the
    background that touches the box's rim is connected to the array's border, so the holes are the same."""
    filled = mask.copy()
    box = bounding_box(mask, 1)
    if box is not None:
        filled[box] = ndimage.binary_fill_holes(mask[box])
    return filled
