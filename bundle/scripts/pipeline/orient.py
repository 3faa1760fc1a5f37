"""Bringing a scan to the grid the classifier was trained on: axial slices in DICOM row/column order, and pixels no
finer or coarser than the training slices'.

The dataset writer stores each slice as DICOM stores it: rows run from anterior to posterior, columns from the
patient's right to left, slices in ascending z (pylidc's order). In the axis codes of MONAI's ``Orientationd``
(the direction each index grows towards, RAS-based) that is ``"PLS"``. ``Orientationd`` only permutes and flips
axes, and ``Invertd`` undoes it and the resampling of ``ModelSpacingd`` exactly, so outputs land on the input grid.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Spacingd

__all__ = ["AXIAL_AXCODES", "axial_affine", "target_pixel_spacing", "ModelSpacingd"]

AXIAL_AXCODES = "PLS"
# A scan's pixel spacing within this fraction of the training range counts as inside it.
SPACING_TOLERANCE = 0.01


def axial_affine(spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """The voxel-to-RAS affine of a ``(rows, cols, slices)`` array in the axial convention (``AXIAL_AXCODES``):
    rows run to posterior, columns to the patient's left, slices upwards; ``origin`` is voxel 0's RAS position."""
    affine = np.zeros((4, 4))
    affine[1, 0], affine[0, 1], affine[2, 2] = -float(spacing[0]), -float(spacing[1]), float(spacing[2])
    affine[:3, 3], affine[3, 3] = [float(v) for v in origin], 1.0
    return affine


def target_pixel_spacing(current: Sequence[float], training_range: Sequence[float] | None) -> list[float]:
    """The in-plane spacing (row, col) a scan is resampled to: its own where it lies within the training slices'
    range of pixel spacings (the paper's slices keep their native spacing), else the nearest end of that range."""
    if training_range is None:
        return [float(current[0]), float(current[1])]
    low, high = float(training_range[0]), float(training_range[1])
    target = []
    for spacing in current[:2]:
        inside = low * (1 - SPACING_TOLERANCE) <= spacing <= high * (1 + SPACING_TOLERANCE)
        target.append(float(spacing) if inside else float(np.clip(spacing, low, high)))
    return target


class ModelSpacingd(Spacingd):
    """``Spacingd`` whose in-plane target is chosen per scan by ``target_pixel_spacing``; the slice spacing is kept.

    Args:
        keys: the image key (after ``Orientationd`` to ``AXIAL_AXCODES``: axes 0 and 1 are rows and columns).
        pixel_spacing_range: ``[least, largest]`` pixel spacing (mm) of the model's training slices, from its
            checkpoint record; None keeps every scan's own spacing.
        kwargs: passed to ``Spacingd`` (``mode``, ``padding_mode`` ...).
    """

    def __init__(self, keys: str, pixel_spacing_range: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(keys, pixdim=(-1.0, -1.0, -1.0), **kwargs)
        self.pixel_spacing_range = None if pixel_spacing_range is None else [float(v) for v in pixel_spacing_range]

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode, padding_mode, align_corners, dtype, scale_extent in self.key_iterator(
            d, self.mode, self.padding_mode, self.align_corners, self.dtype, self.scale_extent
        ):
            current = [float(v) for v in d[key].pixdim[:2]]
            target = target_pixel_spacing(current, self.pixel_spacing_range)
            # -1 keeps an axis' spacing as it is (the slice axis always), and a scan already in range is not resampled
            pixdim = [t if t != c else -1.0 for t, c in zip(target, current)]
            self.spacing_transform.pixdim = np.array([*pixdim, -1.0], dtype=np.float64)
            # the array transform, not Spacingd's loop: that one also writes the resampled meta into every
            # "<key>_*" entry, which breaks on MONAI Label's "image_path" and would change the affine MONAI Label
            # writes its result with (the result is on the input grid)
            d[key] = self.spacing_transform(
                d[key],
                mode=mode,
                padding_mode=padding_mode,
                align_corners=align_corners,
                dtype=dtype,
                scale_extent=scale_extent,
                lazy=self.lazy if lazy is None else lazy,
            )
        return d
