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
from monai.inferers import Inferer
from torch import nn

__all__ = [
    "VGG16_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGENET_URLS",
    "GAPClassifier",
    "NAMInferer",
    "imagenet_vgg16_state",
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
# The heads' inputs, in head order: the ReLUs after conv5_3, conv4_3 and conv3_3 (the 13th, 10th and 7th convs;
# in ``features`` indices 29, 22, 15 without batch normalisation and 42, 32, 22 with it, as in torchvision).
_TAP_CONVS = (13, 10, 7)
_NUM_CLASSES = 2

# The per-channel (RGB) statistics that torchvision's ImageNet weights expect on [0, 1] input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageNet VGG16 weights (``vgg16`` / ``vgg16_bn``), fetched through torch.hub for "imagenet".
IMAGENET_URLS = {
    False: "https://download.pytorch.org/models/vgg16-397923af.pth",
    True: "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}
INPUT_NORMS = (None, "imagenet")


def _input_statistics(input_norm: str | None, in_channels: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation the network normalises its input with.

    ``"imagenet"`` on one channel uses the means of ImageNet's RGB statistics (*inferred*: ImageNet has no grey
    statistics); ``load_backbone`` folds the per-channel rest into conv1_1, so that the grey model computes what the
    RGB model computes (see there).
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {input_norm!r}.")
    if input_norm is None:
        return [0.0] * in_channels, [1.0] * in_channels
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if in_channels == 1:
        return [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
    raise ValueError(f"input_norm='imagenet' needs in_channels 1 (grey) or 3 (RGB), got {in_channels}.")


def imagenet_vgg16_state(batch_norm: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 (``batch_norm``: ``vgg16_bn``) state dict, from the torch.hub cache or the web.

    Raises:
        RuntimeError: the weights are not cached and cannot be downloaded (offline); the message says where to put
            the file.
    """
    url = IMAGENET_URLS[bool(batch_norm)]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except OSError as error:  # URLError (offline, refused, DNS) and HTTPError are OSErrors
        raise RuntimeError(
            f"pretrained='imagenet': cannot download torchvision's ImageNet VGG16 weights from {url} ({error}). "
            f"Offline? Download that file on a machine that is online and copy it to {cached} (the torch.hub cache; "
            "set TORCH_HOME to move it), or give its path instead: pretrained=/path/to/"
            f"{os.path.basename(url)} (--pretrained on the command line)."
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{cached}: expected a state dict, got {type(state).__name__}.")
    return state


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

        ``pretrained`` is a state dict's path, or ``"imagenet"`` for torchvision's ImageNet weights through torch.hub
        (see ``imagenet_vgg16_state``). The heads and ``fc`` keep their random initialisation; other keys (pool5's
        classifier) are ignored. Weights whose conv1_1 has 3 input channels are ImageNet's (RGB), which expect input
        normalised per channel: the model switches to ``input_norm="imagenet"``. With 3 input channels they load as
        they are. With 1, conv1_1 is folded so that the model computes what the RGB model computes on a grey slice
        ``g`` repeated to RGB and normalised per channel, ``sum_c w_c * (g - m_c) / s_c + b``: the model normalises
        ``g`` with the channel averages ``m``, ``s`` and uses ``w = s * sum_c w_c / s_c`` and
        ``b = b - sum_c (m_c - m) / s_c * sum(w_c)``. That is exact wherever the 3x3 window lies inside the slice;
        on the one-pixel border the RGB model's zero padding stands for the grey ``m_c``, this model's for ``m``.

        Raises:
            FileNotFoundError: the file does not exist.
            RuntimeError: ``"imagenet"`` cannot be downloaded (offline); the message says what to do.
            ValueError: ``"imagenet"`` with a width other than 1, or a backbone key is missing or has the wrong
                shape.
        """
        if str(pretrained) == "imagenet":
            if self.width != 1.0:
                raise ValueError(
                    f"pretrained='imagenet' is torchvision's VGG16, which needs width=1, got {self.width}."
                )
            origin = f"torchvision's ImageNet VGG16 ({IMAGENET_URLS[self.batch_norm]})"
            state = imagenet_vgg16_state(self.batch_norm)
        else:
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained VGG16 state dict not found: {pretrained}")
            origin = str(pretrained)
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{origin}: expected a state dict, got {type(state).__name__}.")
        own = {k: v for k, v in self.state_dict().items() if k.startswith("features.")}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{origin}: not a torchvision-layout VGG16 state dict, missing keys {missing[:4]}.")
        loaded = {key: state[key] for key in own}
        rgb = loaded["features.0.weight"].ndim == 4 and loaded["features.0.weight"].shape[1] == 3
        if rgb and self.in_channels == 1:
            loaded["features.0.weight"], loaded["features.0.bias"] = _fold_rgb_conv(
                loaded["features.0.weight"], loaded["features.0.bias"]
            )
        for key, target in own.items():
            if loaded[key].shape != target.shape:
                raise ValueError(
                    f"{origin}: {key} has shape {tuple(loaded[key].shape)}, this model (width={self.width}, "
                    f"in_channels={self.in_channels}) needs {tuple(target.shape)}."
                )
        self.load_state_dict(loaded, strict=False)
        if rgb and self.in_channels in (1, 3):
            self._set_input_norm("imagenet")

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the backbone sees it: ``(x - input_mean) / input_std`` (the identity without ImageNet
        weights). Every forward path applies it; code that runs ``features`` itself (incremental R-NAM) must too."""
        return (x - self.input_mean) / self.input_std

    def _head_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize_input(x)
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


def _fold_rgb_conv(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1_1 of RGB ImageNet weights for a grey input normalised with the RGB averages (see ``load_backbone``)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    (grey_mean,), (grey_std,) = _input_statistics("imagenet", 1)
    w, b = weight.double(), bias.double()
    folded = grey_std * (w / std[None, :, None, None]).sum(dim=1, keepdim=True)
    shifted = b - (w.sum(dim=(2, 3)) * (mean - grey_mean) / std).sum(dim=1)
    return folded.to(weight.dtype), shifted.to(bias.dtype)


class NAMInferer(Inferer):
    """Run a ``GAPClassifier`` in a MONAI engine, returning the nodule probability and the NAM in one pass.

    Returns ``{"probability": (B, 1) softmax probability of the nodule class, "nam": (B, 1, H, W) raw NAM}``;
    ``FlattenSubKeysd(keys="pred")`` moves both to the top level of a decollated item.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        model = getattr(network, "module", network)  # DistributedDataParallel wraps the classifier
        logits, nam = model.forward_with_nam(inputs)
        return {"probability": torch.softmax(logits.float(), dim=1)[:, 1:], "nam": nam}
