"""Bringing a scan to the grid the classifier was trained on: axial slices in DICOM row/column order, and pixels no
finer or coarser than the training slices'.

The dataset writer stores each slice as DICOM stores it: rows run from anterior to posterior, columns from the
patient's right to left, slices in ascending z (pylidc's order). In the axis codes of MONAI's ``Orientationd``
(the direction each index grows towards, RAS-based) that is ``"PLS"``. ``Orientationd`` only permutes and flips
axes, and ``Invertd`` undoes it and the resampling of ``ModelSpacingd`` exactly, so outputs land on the input grid.
``ModelSpacingd`` changes only the pixel spacing, so it resamples slice by slice (``resample_slices``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.transforms import InvertibleTransform, MapTransform, Spacing
from monai.utils import TraceKeys

__all__ = ["AXIAL_AXCODES", "axial_affine", "target_pixel_spacing", "resample_slices", "ModelSpacingd"]

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


def resample_slices(
    image: torch.Tensor,
    xform: np.ndarray,
    spatial_size: Sequence[int],
    mode: str = "bilinear",
    padding_mode: str = "border",
    align_corners: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``image`` (C, X, Y, Z) resampled to (C, X', Y', Z) slice by slice; ``xform`` (4 x 4) maps an output voxel to an
    input voxel and leaves the slice axis as it is.

    The same sampling as MONAI's ``SpatialResample`` of the whole volume (its ``AffineTransform`` with the same
    modes), done by one 2-D grid shared by every slice and channel instead of a 3-D grid: on a 512 x 512 x 133 scan
    a third to a sixth of the time (docs/precision.md). Returns float32, each slice contiguous in memory (the layout
    the sampling gives, kept: the inferer reads the volume slice by slice, and a C-order copy cost as much as the
    sampling).
    """
    xform = np.asarray(xform, dtype=np.float64)
    channels, _, _, slices = image.shape
    if not (
        np.allclose(xform[2], [0.0, 0.0, 1.0, 0.0]) and np.allclose(xform[:2, 2], 0.0) and spatial_size[2] == slices
    ):
        raise ValueError(f"resample_slices: the transform moves the slice axis:\n{xform}")
    plane = torch.as_tensor(xform[np.ix_([0, 1, 3], [0, 1, 3])])
    planes = image.permute(0, 3, 1, 2).reshape(1, channels * slices, *image.shape[1:3]).to(dtype)
    sample = AffineTransform(
        normalized=False, mode=mode, padding_mode=padding_mode, align_corners=align_corners, reverse_indexing=True
    )
    out = sample(planes, theta=plane.to(planes), spatial_size=[int(v) for v in spatial_size[:2]])
    return out.reshape(channels, slices, *out.shape[2:]).permute(0, 2, 3, 1).float()


class ModelSpacingd(MapTransform, InvertibleTransform):
    """Resample a scan in-plane to the pixel spacing chosen per scan by ``target_pixel_spacing``; the slice spacing is
    kept. Invertible (``Invertd`` takes the outputs back to the scan's grid, ``nearest_interp`` honoured).

    The output grid is MONAI's ``Spacing``'s for that spacing (planned lazily, not resampled by it); the pixels are
    resampled by ``resample_slices``, one 2-D grid for every slice, where ``Spacing`` would build a 3-D one.

    Args:
        keys: the image key (after ``Orientationd`` to ``AXIAL_AXCODES``: axes 0 and 1 are rows and columns).
        pixel_spacing_range: ``[least, largest]`` pixel spacing (mm) of the model's training slices, from its
            checkpoint record; None keeps every scan's own spacing.
        mode, padding_mode, align_corners: the interpolation, as ``Spacing``'s.
        dtype: the resampling's precision (the output is float32).
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixel_spacing_range: Sequence[float] | None = None,
        mode: str = "bilinear",
        padding_mode: str = "border",
        align_corners: bool = False,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixel_spacing_range = None if pixel_spacing_range is None else [float(v) for v in pixel_spacing_range]
        self.mode, self.padding_mode, self.align_corners, self.dtype = mode, padding_mode, bool(align_corners), dtype

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            current = [float(v) for v in image.pixdim[:2]]
            target = target_pixel_spacing(current, self.pixel_spacing_range)
            # -1 keeps an axis' spacing as it is (the slice axis always), and a scan already in range is not resampled
            pixdim = [t if t != c else -1.0 for t, c in zip(target, current)]
            plan = Spacing(pixdim=[*pixdim, -1.0], align_corners=self.align_corners)(image, lazy=True)
            src_affine = np.asarray(image.affine, np.float64)
            dst_affine = np.asarray(plan.peek_pending_affine(), np.float64)
            size = [int(v) for v in plan.peek_pending_shape()]
            d[key] = self._resample(image, dst_affine, size, self.mode, self.align_corners)
            self.push_transform(
                d[key],
                orig_size=list(image.shape[1:]),
                extra_info={"src_affine": src_affine, "mode": self.mode, "align_corners": self.align_corners},
            )
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            record = self.pop_transform(d[key])
            info = record[TraceKeys.EXTRA_INFO]
            align_corners = info["align_corners"]  # Invertd's nearest_interp sets it to TraceKeys.NONE
            align_corners = self.align_corners if align_corners == TraceKeys.NONE else bool(align_corners)
            d[key] = self._resample(
                d[key], info["src_affine"], record[TraceKeys.ORIG_SIZE], info["mode"], align_corners
            )
        return d

    def _resample(
        self,
        image: MetaTensor,
        dst_affine: np.ndarray,
        size: Sequence[int],
        mode: str,
        align_corners: bool,
    ) -> MetaTensor:
        """``image`` moved from its own grid to the grid of ``dst_affine`` and ``size``, keeping its meta and transform
        record."""
        dst_affine = np.asarray(dst_affine, np.float64)
        xform = np.linalg.solve(np.asarray(image.affine, np.float64), dst_affine)
        values = image.as_tensor()
        if np.allclose(xform, np.eye(4), atol=1e-6) and list(size) == list(image.shape[1:]):
            pixels = values.float()  # already on that grid: as Spacing, no resampling
        else:
            pixels = resample_slices(values, xform, size, mode, self.padding_mode, align_corners, self.dtype)
        out = MetaTensor(pixels, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        out.affine = torch.as_tensor(dst_affine)
        return out
