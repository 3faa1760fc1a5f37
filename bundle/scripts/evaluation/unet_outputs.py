"""Per-slice outputs of the fully supervised U-Net baseline, in the format every method's predictions share.

``<output_dir>/masks/<stem>.nii.gz``: uint8 mask with the source image's shape (its slice's, for a 2.5-D image) and
affine;
``<output_dir>/records/<stem>.json``: ``{"probability": max sigmoid output on the slice, "pixels": mask size}``.
The stem is the image file name without ``.nii.gz``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Transform

from ..data.dataset import slice_stem
from ..utils.io import write_json, write_nifti

__all__ = ["write_slice_prediction", "SaveSlicePredictiond"]


def write_slice_prediction(
    mask: np.ndarray | torch.Tensor,
    source_image: str | os.PathLike,
    output_dir: str | os.PathLike,
    probability: float | None = None,
) -> Path:
    """Write one slice's mask (and record, when ``probability`` is given) with the geometry of ``source_image``.

    Args:
        mask: ``(rows, cols)`` or ``(1, rows, cols)``; non-zero = nodule.
        source_image: the slice's image file, whose shape and affine the mask takes.
        output_dir: the prediction folder (``masks/`` and ``records/`` are made inside).
        probability: the slice's nodule probability for ``records/<stem>.json``.

    Returns:
        the mask's path.
    """
    source = nib.load(str(source_image))
    arr = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != source.shape[:2]:  # a 2.5-D image (rows, cols, channels) has one mask, of its slice
        raise ValueError(f"{source_image}: the mask's shape {arr.shape} differs from the image's {source.shape[:2]}.")
    arr = (arr > 0).astype(np.uint8)
    stem, output_dir = slice_stem(source_image), Path(output_dir)
    path = output_dir / "masks" / f"{stem}.nii.gz"
    write_nifti(path, arr, source.affine)
    if probability is not None:
        write_json(
            output_dir / "records" / f"{stem}.json", {"probability": float(probability), "pixels": int(arr.sum())}
        )
    return path


class SaveSlicePredictiond(Transform):
    """Post-processing that writes :func:`write_slice_prediction` for one decollated item.

    Args:
        output_dir: the prediction folder.
        mask_key: the thresholded prediction.
        prob_key: the probability map whose maximum is the record's probability; None writes no record.
        source_key: the loaded image, whose ``meta["filename_or_obj"]`` names the source file.
    """

    def __init__(
        self, output_dir: str | os.PathLike, mask_key: str = "pred", prob_key: str | None = "prob", source_key="image"
    ) -> None:
        self.output_dir, self.mask_key, self.prob_key, self.source_key = output_dir, mask_key, prob_key, source_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Mapping[Hashable, torch.Tensor]:
        source = data[self.source_key].meta["filename_or_obj"]
        prob = None if self.prob_key is None else float(data[self.prob_key].max())
        write_slice_prediction(data[self.mask_key], source, self.output_dir, prob)
        return data
