"""A slice classifier whose response is known, for testing the scan path without training one.

``SpotNet`` looks at given places of the slice window (the test computes them from the ground truth, independently
of the pipeline): its NAM is the dense tissue there, blurred as a real NAM is (a GAP head's map is upsampled from
a 16-pixel grid, so the scope holds the nodule and the lung around it), weighted by a Gaussian around each place;
it calls a slice
"nodule" when dense tissue fills ``fill`` of a place's Gaussian weight (a vessel crossing the place fills less).
It offers ``forward_with_nam`` like ``GAPClassifier``, so the segmenter and R-NAM run on it unchanged: masking the
candidate that covers a place with the parenchyma value removes its dense pixels and collapses the NAM there, so
R-NAM picks it.
"""

import numpy as np
import torch
from scripts.pipeline.settings import HU_WINDOW
from torch import nn


def given_network_settings(image_size: int, **changes) -> dict:
    """``model_settings`` for a config whose ``network`` is given (no checkpoint to read them from): a 1-GAP model
    on single ``image_size`` slices of any spacing, the bundle's HU window and decision threshold 0.5."""
    settings = {"gap_levels": 1, "width": 1.0, "in_channels": 1, "head_channels": 1024, "batch_norm": False}
    settings.update(image_size=image_size, pixel_spacing_mm=None, hu_window=list(HU_WINDOW), context_mm=None)
    return {**settings, "threshold": 0.5, **changes}


def window(hu: float) -> float:
    """A HU value in the [0, 1] input window."""
    return (hu - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0])


class SpotNet(nn.Module):
    """Known-response "classifier": dense tissue at given (row, col) places of the window.

    Args:
        spots: (row, col) pixel places in the slice window the network sees.
        size: side of that window.
        sigma_px: spread of each place's Gaussian weight, for calling a slice "nodule".
        dense_hu: HU above which a pixel counts as dense.
        fill: share of a place's weight dense tissue must fill.
        blur_px: the NAM's blur (0: none).
        reach_px: spread of the NAM around each place.
    """

    def __init__(
        self,
        spots,
        size: int,
        sigma_px: float = 3.0,
        dense_hu: float = -300.0,
        fill: float = 0.5,
        blur_px: float = 4.0,
        reach_px: float = 12.0,
    ):
        super().__init__()
        self.spots = [(float(r), float(c)) for r, c in spots]
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        weights = np.stack([np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * sigma_px**2)) for r, c in spots])
        self.register_buffer("weight", torch.as_tensor(weights, dtype=torch.float32)[None])  # (1, spots, H, W)
        reach = np.max([np.exp(-((y - r) ** 2 + (x - c) ** 2) / (2 * reach_px**2)) for r, c in spots], axis=0)
        self.register_buffer("reach", torch.as_tensor(reach, dtype=torch.float32)[None, None])
        self.dense, self.fill = window(dense_hu), fill
        r = int(np.ceil(3 * blur_px))
        g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * max(blur_px, 1e-6) ** 2))  # blur_px 0: no blur
        kernel = np.outer(g, g) / np.outer(g, g).sum()
        self.register_buffer("blur", torch.as_tensor(kernel, dtype=torch.float32)[None, None])

    def forward_with_nam(self, x):
        dense = torch.sigmoid((x[:, :1] - self.dense) * 60.0)
        share = (dense * self.weight).sum(dim=(2, 3)) / self.weight.sum(dim=(2, 3))  # (B, spots)
        logits = torch.stack([torch.zeros(len(x)), (share.amax(dim=1) - self.fill) * 40.0], dim=1)
        nam = torch.nn.functional.conv2d(dense, self.blur, padding=self.blur.shape[-1] // 2)
        return logits, nam * self.reach

    def forward(self, x):
        return self.forward_with_nam(x)[0]


class InputRecorder(nn.Module):
    """Calls every slice clean, and keeps what it was shown (to compare the scan path's inputs with the writer's).

    Args:
        in_channels: the channels it takes (3 for a 2.5-D model).
    """

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.seen = []

    def forward_with_nam(self, x):
        self.seen.append(x.clone())
        logits = torch.stack([torch.zeros(len(x)), torch.full((len(x),), -20.0)], dim=1)
        return logits, torch.zeros_like(x[:, :1])


class DomeNet(nn.Module):
    """Calls every slice "nodule", with a NAM that is one broad dome over the whole window: the scope is then nearly
    all of the window, and with every ICM phase counted dense (``dense_rule="fixed"`` with ``dense_hu`` below air) the
    coarse mask is nearly all of the lungs."""

    def forward_with_nam(self, x):
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, x.shape[2]), torch.linspace(-1, 1, x.shape[3]), indexing="ij")
        nam = (2.0 - rows**2 - cols**2).expand(len(x), 1, -1, -1)
        logits = torch.stack([torch.zeros(len(x)), torch.full((len(x),), 20.0)], dim=1)
        return logits, nam

    def forward(self, x):
        return self.forward_with_nam(x)[0]
