"""Helpers around the classifier's MONAI preprocessing: the HU window, folder datalists and NAM overlays.

The transform chains themselves live in the configs (``configs/train.json``, ``configs/classify.json``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..networks.precision import reduced_precision

__all__ = ["CheckSliced", "SliceClassd", "BackboneFeaturesd"]

# The lung window of the paper's input, mapped to [0, 1] by ScaleIntensityRanged(clip=True).


class CheckSliced(MapTransform):
    """Stop early, naming the file, when a loaded image is not a channel-first 2-D CT slice of real numbers, or
    not the slices the model was trained on.

    Placed right after ``LoadImaged(ensure_channel_first=True)``: without it a volume or a mask given by mistake
    fails deep inside a later transform or the network with a message that names neither the file nor the problem,
    and slices of another size or pixel spacing than the training slices' run without a word and find nothing.

    Args:
        keys: the image key.
        spatial_size: the model's slice side (its checkpoint record); None: any.
        pixel_spacing_range: ``[least, largest]`` pixel spacing (mm) of the training slices; None: any.
        channels: the model's input channels: 1, or 3 for 2.5-D slices (``scripts.pipeline.context``).
    """

    def __init__(
        self,
        keys: str = "image",
        spatial_size: int | None = None,
        pixel_spacing_range: list | None = None,
        channels: int = 1,
    ) -> None:
        super().__init__(keys)
        self.spatial_size = spatial_size
        self.pixel_spacing_range = pixel_spacing_range
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            name = getattr(image, "meta", {}).get("filename_or_obj", key)
            if image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] in (3, 5) and self.channels == 1:
                raise ValueError(
                    f"{name}: a {image.shape[-1]}-channel (2.5-D) slice, but the model takes one channel: train "
                    f"the classifier with in_channels {image.shape[-1]}, infer with a 2.5-D model, or prepare single "
                    "slices (the U-Net takes those only)"
                )
            if image.ndim != 3 or image.shape[0] != self.channels:
                shape = tuple(image.shape[1:]) if image.ndim > 1 and self.channels == 1 else tuple(image.shape)
                what = "one channel" if self.channels == 1 else f"{self.channels} channels (2.5-D)"
                raise ValueError(f"{name}: expected a 2-D slice with {what}, got an image of shape {shape}")
            if image.dtype == torch.bool or image.is_complex():
                raise ValueError(f"{name}: expected CT values in HU, got data of type {image.dtype}")
            if not torch.isfinite(torch.as_tensor(image)).all():
                raise ValueError(f"{name}: the image has NaN or infinite values")
            size = self.spatial_size
            if size is not None and tuple(image.shape[1:]) != (size, size):
                raise ValueError(
                    f"{name}: a {image.shape[1]} x {image.shape[2]} slice, but the model was trained on {size} x "
                    f"{size} slices: prepare the data with --size {size} (or run configs/inference.json on the scans)"
                )
            if self.pixel_spacing_range is not None and hasattr(image, "pixdim"):
                low, high = self.pixel_spacing_range
                spacing = [float(v) for v in image.pixdim[:2]]
                if any(not low * 0.99 <= s <= high * 1.01 for s in spacing):
                    raise ValueError(
                        f"{name}: pixel spacing {spacing} mm lies outside the model's training range "
                        f"[{low:g}, {high:g}] mm: run configs/inference.json on the scan, which resamples it"
                    )
        return d


class SliceClassd(MapTransform):
    """Make sure an item carries its slice class (0/1) under ``class_key``.

    Items of a prepared dataset have it already. Items that come with a mask only (MONAI Label's training
    datalists are ``{"image", "label"}``) get ``1`` when the mask file has any nodule pixel: the label is read
    here only to derive the class, and never reaches the network.
    """

    def __init__(self, class_key: str = "class", label_key: str = "label") -> None:
        super().__init__(keys=[class_key], allow_missing_keys=True)
        self.class_key, self.label_key = class_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.class_key not in d:
            if self.label_key not in d:
                raise KeyError(f"item {d.get('image', '')} has neither {self.class_key!r} nor {self.label_key!r}")
            label = d[self.label_key]
            mask = nib.load(str(label)).dataobj if isinstance(label, (str, os.PathLike)) else label
            d[self.class_key] = int(np.asarray(mask).any())
        return d


class BackboneFeaturesd(MapTransform):
    """Replace a windowed slice by the activations of the classifier's frozen first layers, once per slice.

    Placed last among the deterministic transforms of a training dataset that caches (``CacheDataset``), it makes
    an epoch cost only the layers that train (``scripts.networks.gap_classifier.BackboneTail``): the frozen layers run
    once per slice, in reduced precision where the device has it (``scripts.networks.precision``), and their output is
    kept in that precision (half the memory). Random spatial transforms cannot follow it: they would act on activations.

    Args:
        keys: the image key.
        network: the classifier (``scripts.networks.gap_classifier.GAPClassifier``); its layers are only read.
        freeze_through: the last frozen conv (``"conv4_3"``).
        device: where the frozen layers run.
        reduced_precision: bfloat16 (CPU) or float16 (CUDA) where the device has it; False: float32.
    """

    def __init__(
        self,
        keys: str,
        network: torch.nn.Module,
        freeze_through: str,
        device: str | torch.device = "cpu",
        reduced_precision: bool = True,
    ) -> None:
        super().__init__(keys)
        self.network = network
        self.start = network.prefix_length(freeze_through)
        self.device = torch.device(device)
        self.reduced_precision = reduced_precision

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        prefix = self.network.features[: self.start]
        modes = [m.training for m in prefix.modules()]
        prefix.eval()  # batch normalisation, if any, with its running statistics, whatever the trainer's mode
        try:
            with torch.no_grad(), reduced_precision(self.device, self.reduced_precision):
                for key in self.key_iterator(d):
                    image = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
                    image = image.to(self.device, torch.float32)[None]
                    d[key] = prefix(self.network.normalize_input(image))[0].cpu()
        finally:
            for module, mode in zip(prefix.modules(), modes):
                module.training = mode
        return d
