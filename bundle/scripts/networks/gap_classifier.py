"""The GAP-CNN slice classifier of Feng et al. (MICCAI 2017) and its nodule activation maps (NAMs).

A VGG16 backbone without pool5 and fc6-8, with one Conv+GAP head after conv5_3 (1-GAP), conv4_3 (2-GAP)
and conv3_3 (3-GAP). The pooled head vectors are concatenated into one linear layer with two logits
(index 1 = nodule). The NAM of a head is its activations weighted by the nodule row of that linear layer;
the NAM of the model is the sum of the head NAMs, each bilinearly upsampled to the input size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .precision import cpu_has_bf16
from .pretrained import imagenet_vgg16_state

__all__ = [
    "VGG16_CONFIG",
    "CONV_NAMES",
    "INPUT_NORMS",
    "GAPClassifier",
    "BackboneTail",
    "CPUBFloat16",
    "trainable_part",
    "unwrap",
]

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
# VGG's names of the 13 convolutions, in order.
CONV_NAMES = tuple(f"conv{block}_{j}" for block, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for j in range(1, n + 1))
# The heads' inputs, in head order: the ReLUs after conv5_3, conv4_3 and conv3_3 (the 13th, 10th and 7th convs;
# in ``features`` indices 29, 22, 15 without batch normalisation and 42, 32, 22 with it, as in torchvision).
_TAP_CONVS = (13, 10, 7)
_NUM_CLASSES = 2

# The per-channel statistics ImageNet weights expect of a [0, 1] input, by convention: torchvision's (RGB, normalised
# by ImageNet's mean and standard deviation) and Caffe's, which the Oxford weights keep (BGR, 0-255 minus the BGR
# means, no division: mean m / 255 and standard deviation 1 / 255 on [0, 1]).
_IMAGENET_STATISTICS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "caffe": ((103.939 / 255, 116.779 / 255, 123.68 / 255), (1 / 255, 1 / 255, 1 / 255)),
}
INPUT_NORMS = (None, *_IMAGENET_STATISTICS)


def _input_statistics(input_norm: str | None, in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation the network normalises its input with.

    An ImageNet convention on one channel uses the averages of its three channels' statistics (*inferred*: ImageNet
    has no grey statistics); ``load_backbone`` folds the per-channel rest into conv1_1, so that the grey model
    computes what the three-channel model computes (see there).
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}.")
    if input_norm is None:
        return [0.0] * in_channels, [1.0] * in_channels
    mean, std = _IMAGENET_STATISTICS[input_norm]
    if in_channels == 3:
        return list(mean), list(std)
    if in_channels == 1:
        return [sum(mean) / 3], [sum(std) / 3]
    raise ValueError(f"input_norm={input_norm!r} needs in_channels 1 (grey) or 3, got {in_channels}.")


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
        pretrained: optional torchvision-layout VGG16 weights for the backbone: a state dict's path, or
            ``"imagenet"`` for torchvision's ImageNet weights through torch.hub (``vgg16_bn``'s with ``batch_norm``;
            needs ``width`` 1). ImageNet (RGB) weights switch on ``input_norm="imagenet"``; see ``load_backbone``.
        batch_norm: batch normalisation after every backbone conv (torchvision's ``vgg16_bn`` layout). Not in the
            paper, which fine-tunes ImageNet weights; without them a plain VGG16 barely trains from scratch.
        input_norm: ``None`` (the input as it comes, [0, 1] after the HU window) or ``"imagenet"``: the network
            subtracts ImageNet's mean and divides by its standard deviation first. The statistics are buffers
            (``input_mean``, ``input_std``), so they travel in every state dict and checkpoint: a model built with
            the defaults and loaded from a checkpoint normalises as the trained model did, with no config change.

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
        input_norm: str | None = None,
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
        mean, std = _input_statistics(input_norm, in_channels)
        # (C, 1, 1): broadcasts over (B, C, H, W) and (C, H, W) inputs alike
        self.register_buffer("input_mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std).view(-1, 1, 1))

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

        self.relu_after_conv = sorted(tap_channels)  # index in ``features`` of the ReLU after each conv, in order
        self.tap_indices = [self.relu_after_conv[n - 1] for n in _TAP_CONVS[:gap_levels]]
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
        self.pretrained_origin: str | None = None  # where the backbone's weights came from (``load_backbone``)
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
        # PyTorch's default (torchvision's N(0, 0.01) suits 4096-wide layers and stalls SGD on narrow heads), with its
        # two rows opposite: the cross-entropy's gradients on the two rows are opposite, so the rows stay opposite
        # (for SGD and Adam, with or without weight decay) and their sum, which no gradient reaches, stays zero. With
        # independent rows that sum keeps its random start for ever and is half of Eq. 2's map (see ``nam_weights``).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.fc.weight[0] = -self.fc.weight[1]
            self.fc.bias[0] = -self.fc.bias[1]

    def config(self) -> dict[str, Any]:
        """The constructor arguments that fix the parameter shapes, and the input normalisation in use (read from
        the buffers, so it is the loaded checkpoint's; it fixes no shape)."""
        return {
            "gap_levels": self.gap_levels,
            "width": self.width,
            "in_channels": self.in_channels,
            "head_channels": self.head_channels,
            "batch_norm": self.batch_norm,
            "input_norm": self._input_norm(),
        }

    def _input_norm(self) -> str | None:
        for name in INPUT_NORMS:
            try:
                mean, std = _input_statistics(name, self.in_channels)
            except ValueError:
                continue
            if torch.allclose(self.input_mean.flatten().double(), torch.tensor(mean, dtype=torch.float64)) and (
                torch.allclose(self.input_std.flatten().double(), torch.tensor(std, dtype=torch.float64))
            ):
                return name
        raise ValueError(
            f"unknown input normalisation: mean {self.input_mean.flatten().tolist()}, std "
            f"{self.input_std.flatten().tolist()}"
        )

    def _set_input_norm(self, input_norm: str | None) -> None:
        mean, std = _input_statistics(input_norm, self.in_channels)
        # built in the buffers' dtype: a float64 model gets float64 statistics, not float32 ones widened
        self.input_mean.copy_(torch.tensor(mean, dtype=self.input_mean.dtype).view(-1, 1, 1))
        self.input_std.copy_(torch.tensor(std, dtype=self.input_std.dtype).view(-1, 1, 1))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a whole state dict saved before the normalisation buffers existed was trained on the input as it came; a
        # partial one (a backbone, loaded with strict=False) leaves the normalisation as it is
        buffers = [prefix + "input_mean", prefix + "input_std"]
        others = [prefix + k for k in self.state_dict() if prefix + k not in buffers]
        if not any(k in state_dict for k in buffers) and all(k in state_dict for k in others):
            for key, value in zip(buffers, _input_statistics(None, self.in_channels)):
                state_dict[key] = torch.tensor(value, dtype=self.input_mean.dtype).view(-1, 1, 1)
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._input_norm()  # a foreign normalisation is an error now, not a surprise in config()

    def load_backbone(self, pretrained: str | os.PathLike) -> None:
        """Load conv1_1 ... conv5_3 from torchvision-layout VGG16 weights (``features.N.weight/bias``).

        ``pretrained`` is a state dict's path, or ``"imagenet"`` for ImageNet weights (torchvision's where they can be
        had, else the Oxford weights from the package index: ``scripts.networks.pretrained``). The heads and ``fc`` keep
        their initialisation; other keys (pool5's classifier) are ignored. Weights whose conv1_1 has 3 input channels
        are ImageNet's, which expect input normalised per channel: the model switches to that convention's
        ``input_norm`` (``"caffe"`` for the Oxford weights and for a file whose name says ``caffe`` or ``oxford``, else
        ``"imagenet"``). With 3 input channels they load as they are. With 1, conv1_1 is folded so that the model
        computes what the 3-channel model computes on a grey slice ``g`` repeated to 3 channels and normalised per
        channel, ``sum_c w_c * (g - m_c) / s_c + b``: the model normalises ``g`` with the channel averages ``m``,
        ``s`` and uses ``w = s * sum_c w_c / s_c`` and ``b = b - sum_c (m_c - m) / s_c * sum(w_c)``. That is exact
        wherever the 3x3 window lies inside the slice; on the one-pixel border the 3-channel model's zero padding
        stands for the grey ``m_c``, this model's for ``m``.

        Raises:
            FileNotFoundError: the file does not exist.
            RuntimeError: ``"imagenet"`` weights cannot be had (offline and no package index); the message says what
                to do.
            ValueError: ``"imagenet"`` with a width other than 1, or a backbone key is missing or has the wrong
                shape.
        """
        if str(pretrained) == "imagenet":
            if self.width != 1.0:
                raise ValueError(
                    f"pretrained='imagenet' is VGG16 as ImageNet trained it, which needs width=1, got {self.width}."
                )
            state, convention, origin = imagenet_vgg16_state(self.batch_norm)
        else:
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained VGG16 state dict not found: {pretrained}")
            origin = str(pretrained)
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
            convention = (
                "caffe" if any(word in Path(origin).name.lower() for word in ("caffe", "oxford")) else "imagenet"
            )
        if not isinstance(state, dict):
            raise ValueError(f"{origin}: expected a state dict, got {type(state).__name__}.")
        own = {k: v for k, v in self.state_dict().items() if k.startswith("features.")}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{origin}: not a torchvision-layout VGG16 state dict, missing keys {missing[:4]}.")
        loaded = {key: state[key] for key in own}
        rgb = loaded["features.0.weight"].ndim == 4 and loaded["features.0.weight"].shape[1] == 3
        if rgb and self.in_channels == 1:
            loaded["features.0.weight"], loaded["features.0.bias"] = _fold_to_grey(
                loaded["features.0.weight"], loaded["features.0.bias"], convention
            )
        for key, target in own.items():
            if loaded[key].shape != target.shape:
                raise ValueError(
                    f"{origin}: {key} has shape {tuple(loaded[key].shape)}, this model (width={self.width}, "
                    f"in_channels={self.in_channels}) needs {tuple(target.shape)}."
                )
        self.load_state_dict(loaded, strict=False)
        if rgb and self.in_channels in (1, 3):
            self._set_input_norm(convention)
        self.pretrained_origin = origin

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the backbone sees it: ``(x - input_mean) / input_std`` (the identity without ImageNet
        weights). Every forward path applies it; code that runs ``features`` itself (incremental R-NAM) must too."""
        return (x - self.input_mean) / self.input_std

    def prefix_length(self, through: str) -> int:
        """The number of layers of ``features`` up to and including the ReLU after the conv named ``through``
        (VGG's names, ``"conv1_1"`` ... ``"conv5_3"``)."""
        if through not in CONV_NAMES:
            raise ValueError(f"unknown layer {through!r}: one of {', '.join(CONV_NAMES)}")
        return self.relu_after_conv[CONV_NAMES.index(through)] + 1

    def head_activations(self, x: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
        """The heads' activations ``(B, K_j, h_j, w_j)``, in head order, of an input ``x`` (``start`` 0), or of
        ``features[:start]``'s output ``x``; ``logits_of`` and ``nam_of`` finish the forward from them."""
        if start == 0:
            x = self.normalize_input(x)
        taps: list[torch.Tensor] = []
        if start - 1 in self.tap_indices:
            taps.append(x)
        for index, layer in enumerate(self.features):
            if index >= start:
                x = layer(x)
                if index in self.tap_indices:
                    taps.append(x)
        # taps are in backbone order (conv3_3 first); heads are in tap order (conv5_3 first)
        activations: list[torch.Tensor] = []
        for j, head in enumerate(self.heads):
            activations.append(head(taps[len(taps) - 1 - j]))
        return activations

    def logits_of(self, activations: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, 2)`` of the heads' activations: each pooled globally, concatenated, through ``fc``."""
        pooled = [a.mean(dim=(2, 3)) for a in activations]
        return self.fc(torch.cat(pooled, dim=1))

    def nam_weights(self) -> torch.Tensor:
        """The weights of Eq. 2, ``(K,)`` over the concatenated head channels: half the difference of ``fc``'s rows.

        A two-class softmax sees only the difference of its logits, so only the difference of the rows is learned.
        A model trained from opposite rows (every model built here since 0.6.0) has ``w_nodule = (w_nodule - w_other)
        / 2``, so this is exactly Eq. 2's ``w_nodule``, and the NAM's spatial mean is half the logit difference less
        the bias. For a checkpoint trained from independent rows (before 0.6.0), ``w_nodule`` also holds the rows'
        untrained random sum; this drops it and keeps what was learned.
        """
        return (self.fc.weight[1] - self.fc.weight[0]) / 2

    def _head_nams(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        weights = torch.split(self.nam_weights(), self.head_sizes)
        return [torch.einsum("bkhw,k->bhw", a, w).unsqueeze(1) for a, w in zip(activations, weights)]

    def nam_of(self, activations: list[torch.Tensor], size: list[int]) -> torch.Tensor:
        """The raw NAM ``(B, 1, *size)`` of the heads' activations: each head's weighted sum, upsampled, summed."""
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in self._head_nams(activations)]
        return torch.stack(maps).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2)`` of ``x`` ``(B, in_channels, H, W)``; index 1 is the nodule class."""
        return self.logits_of(self.head_activations(x))

    @torch.jit.export
    def nam(self, x: torch.Tensor) -> torch.Tensor:
        """The raw nodule activation map ``(B, 1, H, W)`` at input resolution (no ReLU, normalisation or bias)."""
        return self.nam_of(self.head_activations(x), [x.shape[2], x.shape[3]])

    @torch.jit.export
    def head_nams(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The NAM of each head ``(B, 1, h, w)`` at the head's own resolution, in head order.

        The spatial mean of head ``j``'s NAM is that head's contribution to half the logit difference (nodule minus
        other), so the means summed over the heads equal half the logit difference less half the biases' difference.
        """
        return self._head_nams(self.head_activations(x))

    @torch.jit.export
    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, 2)`` and raw NAM ``(B, 1, H, W)`` from one backbone pass."""
        activations = self.head_activations(x)
        return self.logits_of(activations), self.nam_of(activations, [x.shape[2], x.shape[3]])


class BackboneTail(nn.Module):
    """The part of a ``GAPClassifier`` that trains when its backbone is frozen up to a layer: fed that layer's
    activations (``scripts.training.transforms.BackboneFeaturesd`` computes them once per slice), it returns the
    classifier's logits. Its parameters are the classifier's own, so training it trains the classifier; the frozen
    layers' parameters get ``requires_grad=False``.

    *Inferred*: the paper fine-tunes every layer. On a CPU an epoch of VGG16 at width 1 costs minutes; freezing the
    first blocks and caching their activations once makes it seconds (docs: the classifier's recipe).

    Args:
        network: the classifier.
        freeze_through: the last frozen conv (``"conv4_3"``: blocks 1-4 frozen, conv5 block and heads trained). The
            heads must read layers after it, or exactly it.
    """

    def __init__(self, network: GAPClassifier, freeze_through: str) -> None:
        super().__init__()
        self.network = network
        self.start = network.prefix_length(freeze_through)
        if min(network.tap_indices) < self.start - 1:
            raise ValueError(
                f"a {network.gap_levels}-GAP head reads a layer before {freeze_through}: freeze fewer layers"
            )
        for parameter in network.features[: self.start].parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2)`` of the frozen prefix's activations ``x``."""
        return self.network.logits_of(self.network.head_activations(x.float(), self.start))


def unwrap(network: nn.Module) -> nn.Module:
    """The classifier inside a ``DistributedDataParallel`` wrapper (whose ``module`` it is), or ``network`` itself:
    the classifier's own methods (``nam``, ``forward_with_nam``, ``config``) are not the wrapper's."""
    return getattr(network, "module", network)


class CPUBFloat16(nn.Module):
    """Run a module's forward in bfloat16 autocast on a CPU that computes bfloat16 natively; logits in float32.

    MONAI's engines autocast on CUDA only (``amp``); this is the CPU's counterpart for training, where it halves a
    step's time at the quick start's size (docs/classifier.md). The weights and the optimiser stay in float32.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.module(x).float()


def trainable_part(network: GAPClassifier, freeze_through: str | None = None, cpu_bfloat16: bool = False) -> nn.Module:
    """What the trainer updates: the classifier, or its ``BackboneTail`` after ``freeze_through``; with
    ``cpu_bfloat16`` in bfloat16 autocast where the network is on a CPU that has it (else as it is)."""
    part = network if freeze_through is None else BackboneTail(network, freeze_through)
    on_cpu = next(network.parameters()).device.type == "cpu"
    return CPUBFloat16(part) if cpu_bfloat16 and on_cpu and cpu_has_bf16() else part


def _fold_to_grey(weight: torch.Tensor, bias: torch.Tensor, convention: str) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1_1 of 3-channel ImageNet weights for a grey input normalised with the channel averages of ``convention``
    (see ``load_backbone``)."""
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in _IMAGENET_STATISTICS[convention])
    (grey_mean,), (grey_std,) = _input_statistics(convention, 1)
    w, b = weight.double(), bias.double()
    folded = grey_std * (w / std[None, :, None, None]).sum(dim=1, keepdim=True)
    shifted = b - (w.sum(dim=(2, 3)) * (mean - grey_mean) / std).sum(dim=1)
    return folded.to(weight.dtype), shifted.to(bias.dtype)
