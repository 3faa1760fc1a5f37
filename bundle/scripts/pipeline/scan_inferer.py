"""The whole-scan inferer: a windowed CT volume in, its nodule mask and per-slice nodule probabilities out.

``ScanSegmenter`` is a MONAI inferer, what ``configs/inference.json`` (and MONAI Label through it) calls as
``inferer(volume, network)``. The method itself stays 2-D, as in the paper; this module only prepares the slices
the way the dataset writer prepared the training slices and puts the results back:

1. lungs: the 3-D lung mask of the scan (``scripts.pipeline.lungs.segment_lungs``, as the writer does);
2. crop: one ``image_size`` window per scan centred on the lungs (``scripts.pipeline.crop``, the writer's rule);
3. classify: the slices that hold lung, in batches of ``batch_size``, one forward per batch (slices without lung
   are not sent through the network); a 2.5-D model gets each slice with its neighbours (``scripts.pipeline.context``,
   the writer's rule);
4. segment: only the slices called "nodule" go through scope, ICM and R-NAM (``WeaklySupervisedSegmenter``);
5. assemble: each slice's mask pasted back into the volume.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import collate_meta_tensor
from monai.inferers import Inferer

from ..networks.gap_classifier import unwrap
from .context import check_context, stack_context
from .crop import crop, crop_window, uncrop
from .lungs import segment_lungs
from .read import ScanError
from .segmenter import SliceResult, WeaklySupervisedSegmenter

__all__ = ["OUTPUTS", "ScanResult", "ScanSegmenter"]

# The inferer's named outputs.
OUTPUTS = ("mask", "slice_probability", "lungs")
STEPS = ("lungs", "crop", "classify", "segment", "screen", "assemble")


@dataclass
class ScanResult:
    """What the segmenter found on one scan (arrays on the inferer's input grid, ``(rows, cols, slices)``).

    Attributes:
        mask: uint8 nodule mask.
        probability: float32 nodule probability of each slice (0 where a slice holds no lung and is not classified).
        lungs: bool lung mask.
        slices: the ``SliceResult`` of each slice called "nodule", by slice index.
        seconds: time spent in each step of the module docstring; ``screen`` is R-NAM's share of the segmentation
            (its classifier forwards on the masked copies), ``segment`` the rest (scope, ICM, candidates).
        confirmed: how many slices were classified again in float32 after a reduced precision
            (``WeaklySupervisedSegmenter.confirm_margin``; their forwards count in ``classify``).
    """

    mask: np.ndarray
    probability: np.ndarray
    lungs: np.ndarray
    slices: dict[int, SliceResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    confirmed: int = 0


class ScanSegmenter(Inferer):
    """Segment nodules on a whole CT volume slice by slice with a ``WeaklySupervisedSegmenter``.

    Args:
        segmenter: the slice segmenter (mode, threshold, HU window, scope/ICM/R-NAM settings).
        image_size: side of the square window the classifier was trained on (its checkpoint record).
        batch_size: slices per classifier forward.
        lung_mask_fn: ``f(hu (rows, cols, slices), spacing (row, col, slice)) -> bool`` lungs of the volume.
        in_channels: the classifier's input channels (its checkpoint record): 1, or 3 for a 2.5-D model.
        context_mm: a 2.5-D model's distance between its input channels (its checkpoint record).
    """

    def __init__(
        self,
        segmenter: WeaklySupervisedSegmenter,
        image_size: int = 384,
        batch_size: int = 8,
        lung_mask_fn: Callable[[np.ndarray, Sequence[float]], np.ndarray] = segment_lungs,
        in_channels: int = 1,
        context_mm: float | None = None,
    ) -> None:
        if batch_size < 1 or image_size < 16:
            raise ValueError(f"batch_size must be >= 1 and image_size >= 16, got {batch_size} and {image_size}")
        check_context(in_channels, context_mm)
        self.segmenter = segmenter
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.lung_mask_fn = lung_mask_fn
        self.in_channels = int(in_channels)
        self.context_mm = context_mm

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The named outputs (``OUTPUTS``) of a windowed volume ``(1, 1, rows, cols, slices)`` in the axial convention
        (``scripts.pipeline.orient``): ``mask`` the nodule mask, ``slice_probability`` each slice's nodule probability
        over the slice, ``lungs`` the lung mask, each a batch of one ``(1, 1, rows, cols, slices)`` float32 (for
        ``Invertd``), with the volume's meta when it is a MetaTensor (``decollate_batch`` takes the batch apart)."""
        if inputs.ndim != 5 or inputs.shape[0] != 1 or inputs.shape[1] != 1:
            raise ValueError(f"expected one windowed volume (1, 1, rows, cols, slices), got {tuple(inputs.shape)}")
        return self.named_outputs(self.segment_scan(inputs[0], network), inputs[0])

    @staticmethod
    def named_outputs(result: ScanResult, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """What ``__call__`` returns for ``result``, the ``ScanResult`` of ``volume`` ``(1, rows, cols, slices)``."""
        arrays = (result.mask.astype(np.float32), result.probability, result.lungs.astype(np.float32))
        outputs = {}
        for key, array in zip(OUTPUTS, arrays):
            out = torch.as_tensor(array[None], device=volume.device)
            is_meta = isinstance(volume, MetaTensor)
            outputs[key] = collate_meta_tensor([MetaTensor(out, meta=volume.meta)]) if is_meta else out[None]
        return outputs

    def segment_scan(self, volume: torch.Tensor, network: Callable) -> ScanResult:
        """Segment one windowed volume ``(1, rows, cols, slices)`` (see the module docstring)."""
        name = volume.meta.get("filename_or_obj", "the scan") if isinstance(volume, MetaTensor) else "the scan"
        spacing = _spacing(volume)
        seconds = dict.fromkeys(STEPS, 0.0)
        clock = time.perf_counter()
        lo, hi = self.segmenter.intensity_range
        window = volume[0].detach().float().cpu().numpy()
        lungs = np.asarray(self.lung_mask_fn(lo + window.astype(np.float64) * (hi - lo), spacing), bool)
        if not lungs.any():
            raise ScanError(f"{name}: no lungs found (is it a chest CT?)")
        seconds["lungs"] = time.perf_counter() - clock

        clock = time.perf_counter()
        rows, cols, n_slices = window.shape
        corner = crop_window(lungs, self.image_size)
        with_lung = np.flatnonzero(lungs.any(axis=(0, 1)))
        images = crop(window, corner, self.image_size, 0.0)  # 0 = -1000 HU, the writer's air
        lung_windows = crop(lungs[..., with_lung], corner, self.image_size, False)
        seconds["crop"] = time.perf_counter() - clock

        mask = np.zeros(window.shape, np.uint8)
        probability = np.zeros(n_slices, np.float32)
        slices: dict[int, SliceResult] = {}
        n_confirmed = 0
        device = volume.device
        for start in range(0, len(with_lung), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            clock = time.perf_counter()
            inputs = stack_context(images, with_lung[chunk], self.in_channels, spacing[2], self.context_mm)
            batch = torch.as_tensor(np.ascontiguousarray(inputs.transpose(2, 3, 0, 1)), device=device)
            probs, nams, multi_nams, confirmed, forwards = self.segmenter.classify(batch, network)
            seconds["classify"] += time.perf_counter() - clock
            n_confirmed += int(confirmed.sum())
            clock, screened = time.perf_counter(), 0.0  # R-NAM's forwards count as "screen", not "segment"
            for b, index in enumerate(with_lung[chunk]):
                probability[index] = probs[b]
                if probs[b] < self.segmenter.threshold:
                    continue  # only the slices called "nodule" are segmented
                result = self.segmenter.segment(
                    batch[b],
                    unwrap(network),
                    float(probs[b]),
                    nams[b],
                    spacing[:2],
                    lung_mask=lung_windows[..., start + b],
                    multi_nam=None if multi_nams is None else multi_nams[b],
                    precision=self.segmenter.classified_in(bool(confirmed[b])),
                    forward=forwards[b],
                )
                forwards[b] = None  # the kept layers go as soon as the slice is segmented
                slices[int(index)] = result
                screened += result.screen_seconds
                if result.mask.any():
                    mask[..., index] = uncrop(result.mask, corner, (rows, cols))
            seconds["screen"] += screened
            seconds["segment"] += time.perf_counter() - clock - screened
        clock = time.perf_counter()
        probability_volume = np.broadcast_to(probability, window.shape).astype(np.float32)
        seconds["assemble"] = time.perf_counter() - clock
        return ScanResult(mask, probability_volume, lungs, slices, seconds, n_confirmed)


def _spacing(volume: torch.Tensor) -> tuple[float, float, float]:
    """Voxel spacing (row, col, slice) in mm from a MetaTensor's affine (1 mm without one)."""
    if isinstance(volume, MetaTensor):
        return tuple(float(v) for v in volume.pixdim[:3])
    return (1.0, 1.0, 1.0)
