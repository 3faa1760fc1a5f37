"""The crop around the lungs: one rule for the dataset writer (training slices) and the whole-scan inference.

A scan's slices are cropped to ``size`` x ``size`` pixels centred on its lungs' footprint (the 3-D lung mask
projected on the axial plane), so that every slice of a scan shares one window, as the paper's 384 x 384 crops do.
The window may reach past the image: outside it the crop holds air (-1000 HU) for images and 0 for masks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["crop_window", "crop", "uncrop"]


def crop_window(lung_mask: np.ndarray, size: int, keep: list[tuple[slice, slice]] = ()) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` crop centred on the lung mask, shifted to contain ``keep`` boxes.

    The corner may be negative or run past the image: the crop is then padded with air.

    Raises:
        ValueError: when the boxes in ``keep`` do not fit in one crop.
    """
    rows, cols = lung_mask.shape[:2]
    footprint = lung_mask.any(axis=2) if lung_mask.ndim == 3 else lung_mask
    if footprint.any():
        r = np.flatnonzero(footprint.any(axis=1))
        c = np.flatnonzero(footprint.any(axis=0))
        centre = ((r[0] + r[-1] + 1) / 2, (c[0] + c[-1] + 1) / 2)
    else:
        centre = (rows / 2, cols / 2)
    corner = [int(round(centre[0] - size / 2)), int(round(centre[1] - size / 2))]
    for axis in range(2):
        if not keep:
            break
        low = min(box[axis].start for box in keep)
        high = max(box[axis].stop for box in keep)
        if high - low > size:
            raise ValueError(f"the nodules span {high - low} pixels along axis {axis}, more than the crop size {size}")
        corner[axis] = min(max(corner[axis], high - size), low)
    return corner[0], corner[1]


def crop(array: np.ndarray, corner: tuple[int, int], size: int, fill: float) -> np.ndarray:
    """``array[corner : corner + size]`` along the first two axes, padded with ``fill`` outside the image."""
    out = np.full((size, size) + array.shape[2:], fill, dtype=array.dtype)
    src = [slice(max(c, 0), min(c + size, n)) for c, n in zip(corner, array.shape[:2])]
    dst = [slice(s.start - c, s.stop - c) for s, c in zip(src, corner)]
    out[dst[0], dst[1]] = array[src[0], src[1]]
    return out


def uncrop(window: np.ndarray, corner: tuple[int, int], shape: tuple[int, int], fill: float = 0) -> np.ndarray:
    """The inverse of ``crop``: ``window`` pasted at ``corner`` into an array whose first two axes are ``shape``."""
    size = window.shape[0]
    out = np.full(tuple(shape) + window.shape[2:], fill, dtype=window.dtype)
    dst = [slice(max(c, 0), min(c + size, n)) for c, n in zip(corner, shape)]
    src = [slice(d.start - c, d.stop - c) for d, c in zip(dst, corner)]
    out[dst[0], dst[1]] = window[src[0], src[1]]
    return out
