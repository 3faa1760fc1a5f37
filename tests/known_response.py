"""A slice classifier whose response is known, for testing the scan path without training one.

``SpotNet`` looks at given places of the slice window (the test computes them from the ground truth, independently
of the pipeline): its NAM is the dense tissue there, weighted by a Gaussian around each place, and it calls a slice
"nodule" when dense tissue fills ``fill`` of a place's Gaussian weight (a vessel crossing the place fills less).
It offers ``forward_with_nam`` like ``GAPClassifier``, so the segmenter and R-NAM run on it unchanged: masking the
candidate that covers a place with the parenchyma value removes its dense pixels and collapses the NAM there, so
R-NAM picks it.
"""

import numpy as np
import torch
from scripts.transforms import HU_WINDOW
from torch import nn


def window(hu: float) -> float:
    """A HU value in the [0, 1] input window."""
    return (hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])


class SpotNet(nn.Module):
    """Known-response "classifier": dense tissue at given (row, col) places of the window.

    Args:
        spots: (row, col) pixel places in the slice window the network sees.
        size: side of that window.
        sigma_px: spread of each place's Gaussian weight.
        dense_hu: HU above which a pixel counts as dense.
    """

    def __init__(self, spots, size: int, sigma_px: float = 3.0, dense_hu: float = -300.0, fill: float = 0.5):
        super().__init__()
        self.spots = [(float(r), float(c)) for r, c in spots]
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        weights = np.stack([np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * sigma_px**2)) for r, c in spots])
        self.register_buffer("weight", torch.as_tensor(weights, dtype=torch.float32)[None])  # (1, spots, H, W)
        self.dense, self.fill = window(dense_hu), fill

    def forward_with_nam(self, x):
        dense = torch.sigmoid((x[:, :1] - self.dense) * 60.0)
        share = (dense * self.weight).sum(dim=(2, 3)) / self.weight.sum(dim=(2, 3))  # (B, spots)
        logits = torch.stack([torch.zeros(len(x)), (share.amax(dim=1) - self.fill) * 40.0], dim=1)
        return logits, dense * self.weight.amax(dim=1, keepdim=True)

    def forward(self, x):
        return self.forward_with_nam(x)[0]
