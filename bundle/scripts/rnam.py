"""Residual NAM (R-NAM) screening of nodule candidates (the paper's Eq. 4).

Each candidate R_j is filled in the image, all filled copies go through the network in one batch, and
``score_j = sum_{(x, y) in C} (NAM_I - NAM_{I \\ R_j})^2``; the candidate whose removal changes the NAM
in the scope C the most is the nodule.

Cropping: the NAM inside C depends only on the input pixels within the network's context radius of C.
A crop whose origin is a multiple of the network's stride (so pooling grids and the bilinear upsampling
grid coincide with the full image's) and which reaches ``nam_context_radius`` beyond C on every side
gives the same NAM in C as the full image, at the cost of a smaller forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["logits_and_nam", "fill_candidates", "crop_window", "rnam_scores"]


def logits_and_nam(network: Callable, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, 2), nam (B, 1, H, W))`` from one pass when the network offers ``forward_with_nam``."""
    if hasattr(network, "forward_with_nam"):
        return network.forward_with_nam(inputs)
    if hasattr(network, "nam"):
        return network(inputs), network.nam(inputs)
    raise TypeError(f"{type(network).__name__} offers neither forward_with_nam nor nam: it cannot give a NAM")


def fill_candidates(image: torch.Tensor, masks: np.ndarray, fill_value: float) -> torch.Tensor:
    """``(N, C, H, W)`` copies of a ``(C, H, W)`` image, copy j with candidate j set to ``fill_value``."""
    masks_t = torch.as_tensor(np.asarray(masks, bool), device=image.device)[:, None]
    return torch.where(masks_t, torch.as_tensor(fill_value, dtype=image.dtype, device=image.device), image[None])


def crop_window(
    box: tuple[int, int, int, int], shape: tuple[int, int], stride: int, radius: int
) -> tuple[slice, slice] | None:
    """The stride-aligned crop that gives the exact NAM inside ``box``, or None when only the full image will do.

    Args:
        box: ``(row_start, col_start, row_stop, col_stop)`` of the region where the NAM is needed.
        shape: ``(H, W)`` of the image.
        stride: the network's total stride (crop origins and sizes are multiples of it).
        radius: input pixels on each side of a NAM pixel that can influence it.

    Returns:
        ``(rows, cols)`` slices, or None when the image size is not a multiple of the stride (the
        upsampling grid would differ) or the crop would not be smaller than the image.
    """
    if stride < 1 or radius < 0:
        raise ValueError(f"need stride >= 1 and radius >= 0, got {stride}, {radius}")
    if any(n % stride for n in shape):
        return None
    window = []
    for start, stop, n in ((box[0], box[2], shape[0]), (box[1], box[3], shape[1])):
        lo = max(0, (start - radius) // stride * stride)
        hi = min(n, math.ceil((stop + radius) / stride) * stride)
        window.append(slice(lo, hi))
    if (window[0].stop - window[0].start) * (window[1].stop - window[1].start) >= shape[0] * shape[1]:
        return None
    return window[0], window[1]


@torch.no_grad()
def rnam_scores(
    network: Callable,
    image: torch.Tensor,
    nam: np.ndarray,
    scope: np.ndarray,
    masks: np.ndarray,
    fill_value: float,
    crop: bool = True,
    batch_size: int | None = None,
) -> np.ndarray:
    """R-NAM score of each candidate.

    Args:
        network: the classifier that gave ``nam`` (offers ``forward_with_nam`` or ``nam``); its attributes
            ``nam_stride`` and ``nam_context_radius`` enable the exact crop.
        image: ``(C, H, W)`` network input of the slice.
        nam: ``(H, W)`` raw NAM of the unmasked image.
        scope: ``(H, W)`` bool region C where NAMs are compared.
        masks: ``(N, H, W)`` bool candidate masks.
        fill_value: value (in network input units) written into a candidate.
        crop: use the exact stride-aligned crop around C (False: the full image, the reference path).
        batch_size: copies per forward (None: all in one batch).

    Returns:
        ``(N,)`` float64 scores (empty for no candidates).
    """
    masks = np.asarray(masks, bool)
    scope = np.asarray(scope, bool)
    if image.ndim != 3 or masks.ndim != 3 or masks.shape[1:] != image.shape[1:] or scope.shape != image.shape[1:]:
        raise ValueError(
            f"need image (C, H, W), masks (N, H, W) and scope (H, W) of one size; got {tuple(image.shape)}, "
            f"{masks.shape}, {scope.shape}"
        )
    if masks.shape[0] == 0 or not scope.any():
        return np.zeros(masks.shape[0])
    rows, cols = slice(None), slice(None)
    stride, radius = getattr(network, "nam_stride", None), getattr(network, "nam_context_radius", None)
    if crop and stride is not None and radius is not None:
        r, c = np.nonzero(scope)
        window = crop_window((r.min(), c.min(), r.max() + 1, c.max() + 1), image.shape[1:], int(stride), int(radius))
        if window is not None:
            rows, cols = window
    sub_image, sub_masks = image[:, rows, cols], masks[:, rows, cols]
    sub_scope = torch.as_tensor(scope[rows, cols], device=image.device)
    reference = torch.as_tensor(np.asarray(nam)[rows, cols], dtype=torch.float64, device=image.device)
    step = batch_size or masks.shape[0]
    scores = []
    for i in range(0, masks.shape[0], step):
        _, rnam = logits_and_nam(network, fill_candidates(sub_image, sub_masks[i : i + step], fill_value))
        diff = (reference[None] - rnam[:, 0].double()) * sub_scope[None]
        scores.append((diff**2).sum(dim=(1, 2)).cpu().numpy())
    return np.concatenate(scores)
