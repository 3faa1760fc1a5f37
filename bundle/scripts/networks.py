"""The GAP-CNN slice classifier of Feng et al. (MICCAI 2017) and its nodule activation maps (NAMs).

A VGG16 backbone without pool5 and fc6-8, with one Conv+GAP head after conv5_3 (1-GAP), conv4_3 (2-GAP)
and conv3_3 (3-GAP). The pooled head vectors are concatenated into one linear layer with two logits
(index 1 = nodule). The NAM of a head is its activations weighted by the nodule row of that linear layer;
the NAM of the model is the sum of the head NAMs, each bilinearly upsampled to the input size.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import Inferer
from torch import nn

__all__ = ["VGG16_CONFIG", "GAPClassifier", "NAMInferer"]

# torchvision's VGG16 "D" layout: channel counts, "M" = 2x2 max pooling (pool5 left out).
VGG16_CONFIG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
# The heads' inputs, in head order: the ReLUs after conv5_3, conv4_3 and conv3_3 (the 13th, 10th and 7th convs;
# in ``features`` indices 29, 22, 15 without batch normalisation and 42, 32, 22 with it, as in torchvision).
_TAP_CONVS = (13, 10, 7)
_NUM_CLASSES = 2


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class GAPClassifier(nn.Module):
    """VGG16 with 1, 2 or 3 Conv+GAP heads and one linear layer; the NAM is read from the heads.

    ``features`` has the indices of torchvision's ``vgg16().features[:30]`` (conv1_1 ... conv5_3 with their
    ReLUs and pools 1-4), so a torchvision-layout state dict loads into it. Heads are ordered conv5_3,
    conv4_3, conv3_3; the linear layer ``fc`` sees their pooled vectors concatenated in that order.

    Args:
        gap_levels: number of Conv+GAP heads (1: conv5_3; 2: + conv4_3; 3: + conv3_3).
        width: multiplier of every channel count (1.0 = the paper's VGG16 and 1024-channel heads).
        in_channels: input channels (1 for a CT slice).
        head_channels: channels of each head's 3x3 convolution at ``width`` 1.
        pretrained: optional path to a torchvision-layout VGG16 state dict; see ``load_backbone``.
        batch_norm: batch normalisation after every backbone conv (torchvision's ``vgg16_bn`` layout). Not in the
            paper, which fine-tunes ImageNet weights; without them a plain VGG16 barely trains from scratch.

    Attributes:
        nam_stride: the largest head stride in input pixels (16, the conv5_3 head).
        nam_context_radius: for input sizes divisible by ``nam_stride``, NAM pixel ``(y, x)`` depends only on
            input pixels ``(y', x')`` with ``|y' - y| <= r`` and ``|x' - x| <= r``. It is computed from the
            layers: the receptive field of each head's conv (backbone + the head's 3x3 conv) widened by the
            two head pixels that bilinear upsampling (``align_corners=False``) mixes into one output pixel;
            the maximum over heads and over the sides. So a crop whose origin is a multiple of ``nam_stride``
            gives the full image's NAM on pixels at least ``r`` away from the crop's borders (inside the image).
    """

    def __init__(
        self,
        gap_levels: int = 1,
        width: float = 1.0,
        in_channels: int = 1,
        head_channels: int = 1024,
        pretrained: str | os.PathLike | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if gap_levels not in (1, 2, 3):
            raise ValueError(f"gap_levels must be 1, 2 or 3, got {gap_levels}.")
        if width <= 0 or in_channels < 1 or head_channels < 1:
            raise ValueError(
                f"width, in_channels and head_channels must be positive, got {width}, {in_channels}, {head_channels}."
            )
        self.gap_levels = gap_levels
        self.width = float(width)
        self.in_channels = in_channels
        self.head_channels = head_channels
        self.batch_norm = bool(batch_norm)

        layers: list[nn.Module] = []
        channels = in_channels
        tap_channels: dict[int, int] = {}
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _scaled(int(item), width)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            if self.batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
            tap_channels[len(layers) - 1] = out
        self.features = nn.Sequential(*layers)

        relu_after_conv = sorted(tap_channels)  # index in ``features`` of the ReLU after each conv, in order
        self.tap_indices = [relu_after_conv[n - 1] for n in _TAP_CONVS[:gap_levels]]
        n_head = _scaled(head_channels, width)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(tap_channels[i], n_head, kernel_size=3, padding=1), nn.ReLU(inplace=True))
            for i in self.tap_indices
        )
        self.fc = nn.Linear(n_head * gap_levels, _NUM_CLASSES)
        self.head_sizes = [n_head] * gap_levels
        strides, radii = self._head_geometry()
        self.head_strides = strides
        self.nam_stride = max(strides)
        self.nam_context_radius = max(radii)
        self._init_weights()
        if pretrained is not None:
            self.load_backbone(pretrained)

    def _head_geometry(self) -> tuple[list[int], list[int]]:
        """Stride and NAM context radius of every head, from the layers (see the class docstring)."""
        stride, lo, hi = 1, 0, 0  # head pixel i sees input pixels [stride * i + lo, stride * i + hi]
        at_tap: dict[int, tuple[int, int, int]] = {}
        for index, layer in enumerate(self.features):
            if isinstance(layer, nn.Conv2d):
                half = layer.kernel_size[0] // 2
                lo, hi = lo - half * stride, hi + half * stride
            elif isinstance(layer, nn.MaxPool2d):
                lo, hi = lo, hi + stride
                stride *= 2
            at_tap[index] = (stride, lo, hi)
        strides, radii = [], []
        for tap, head in zip(self.tap_indices, self.heads):
            stride, lo, hi = at_tap[tap]
            half = head[0].kernel_size[0] // 2
            lo, hi = lo - half * stride, hi + half * stride
            radius = 0
            for x in range(stride):  # one period of the upsampling grid, away from the image borders
                # align_corners=False: source coordinate (x + 0.5) / stride - 0.5 mixes head pixels i0 and i0 + 1
                i0 = math.floor((x + 0.5) / stride - 0.5)
                radius = max(radius, x - (stride * i0 + lo), stride * (i0 + 1) + hi - x)
            strides.append(stride)
            radii.append(radius)
        return strides, radii

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation for the convolutions (it trains without batch normalisation); fc keeps
        # PyTorch's default: torchvision's N(0, 0.01) suits 4096-wide layers and stalls SGD on narrow heads.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def config(self) -> dict[str, Any]:
        """The constructor arguments that fix the parameter shapes."""
        return {
            "gap_levels": self.gap_levels,
            "width": self.width,
            "in_channels": self.in_channels,
            "head_channels": self.head_channels,
            "batch_norm": self.batch_norm,
        }

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Load conv1_1 ... conv5_3 from a torchvision-layout VGG16 state dict (``features.N.weight/bias``).

        The heads and ``fc`` keep their random initialisation; other keys of the file (pool5's classifier) are
        ignored. When the file's conv1_1 has 3 input channels (ImageNet RGB) and this model has 1, the weights
        are summed over the RGB axis: a grey slice repeated to RGB gives ``sum_c w_c * x = (sum_c w_c) * x``,
        so the 1-channel model computes exactly what the RGB model computes on the repeated slice.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: a backbone key is missing or has the wrong shape.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained VGG16 state dict not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}.")
        own = {k: v for k, v in self.state_dict().items() if k.startswith("features.")}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{path}: not a torchvision-layout VGG16 state dict, missing keys {missing[:4]}.")
        loaded = {}
        for key, target in own.items():
            value = state[key]
            if key == "features.0.weight" and value.shape[1] == 3 and target.shape[1] == 1:
                value = value.sum(dim=1, keepdim=True)
            if value.shape != target.shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(value.shape)}, this model (width={self.width}, "
                    f"in_channels={self.in_channels}) needs {tuple(target.shape)}."
                )
            loaded[key] = value
        self.load_state_dict(loaded, strict=False)

    def _head_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.tap_indices:
                taps.append(x)
        # taps are in backbone order (conv3_3 first); heads are in tap order (conv5_3 first)
        activations: list[torch.Tensor] = []
        for j, head in enumerate(self.heads):
            activations.append(head(taps[len(taps) - 1 - j]))
        return activations

    def _logits(self, activations: list[torch.Tensor]) -> torch.Tensor:
        pooled = [a.mean(dim=(2, 3)) for a in activations]
        return self.fc(torch.cat(pooled, dim=1))

    def _head_nams(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        weights = torch.split(self.fc.weight[1], self.head_sizes)
        return [torch.einsum("bkhw,k->bhw", a, w).unsqueeze(1) for a, w in zip(activations, weights)]

    def _nam(self, activations: list[torch.Tensor], size: list[int]) -> torch.Tensor:
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self._head_nams(activations)]
        return torch.stack(maps).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2)`` of ``x`` ``(B, in_channels, H, W)``; index 1 is the nodule class."""
        return self._logits(self._head_activations(x))

    @torch.jit.export
    def nam(self, x: torch.Tensor) -> torch.Tensor:
        """The raw nodule activation map ``(B, 1, H, W)`` at input resolution (no ReLU, normalisation or bias)."""
        return self._nam(self._head_activations(x), [x.shape[2], x.shape[3]])

    @torch.jit.export
    def head_nams(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The NAM of each head ``(B, 1, h, w)`` at the head's own resolution, in head order.

        The spatial mean of head ``j``'s NAM is that head's contribution to the nodule logit, so the means summed
        over the heads equal the nodule logit minus the bias of ``fc``.
        """
        return self._head_nams(self._head_activations(x))

    @torch.jit.export
    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, 2)`` and raw NAM ``(B, 1, H, W)`` from one backbone pass."""
        activations = self._head_activations(x)
        return self._logits(activations), self._nam(activations, [x.shape[2], x.shape[3]])


class NAMInferer(Inferer):
    """Run a ``GAPClassifier`` in a MONAI engine, returning the nodule probability and the NAM in one pass.

    Returns ``{"probability": (B, 1) softmax probability of the nodule class, "nam": (B, 1, H, W) raw NAM}``;
    ``FlattenSubKeysd(keys="pred")`` moves both to the top level of a decollated item.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        model = getattr(network, "module", network)  # DistributedDataParallel wraps the classifier
        logits, nam = model.forward_with_nam(inputs)
        return {"probability": torch.softmax(logits.float(), dim=1)[:, 1:], "nam": nam}
