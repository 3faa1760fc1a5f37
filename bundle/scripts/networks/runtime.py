"""The classifier as inference runs it: float32 (the reference), bfloat16 autocast, or the int8 ONNX Runtime model.

``inference_network(network, precision, checkpoint)`` is the one place that chooses; the segmenter calls it with the
``precision`` setting of ``configs/inference.json`` (so MONAI Label, which reads that config, inherits it). Both
reduced paths offer what the pipeline calls on the classifier (``forward``, ``forward_with_nam``, ``nam``,
``config()``, ``in_channels`` and the NAM geometry R-NAM's exact crop needs) and return float32 tensors. The segmenter
screens R-NAM in float32 unless ``screening.reduced_precision`` asks the bfloat16 classifier to, which then takes
R-NAM's incremental path with its own float32/bfloat16 split (``autocast_dtype``, ``float32_prefix``); the int8 model
is never a screener there (``rnam_scores`` would run it through cropped forwards of the masked copies). The segmenter
classifies the slices a reduced precision puts near or above the threshold again with the float32 network
(``WeaklySupervisedSegmenter.confirm_margin``), so that float32 decides them. A CPU without the instructions, or a
network on CUDA (where ``amp`` is the reduced path), runs float32 with a message.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .gap_classifier import GAPClassifier
from .precision import cpu_has_bf16, cpu_has_int8_dot
from .quantize import int8_model

__all__ = ["PRECISIONS", "BFloat16Classifier", "Int8Classifier", "inference_network"]

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "int8")


class _ReducedClassifier(nn.Module):
    """What the pipeline reads of the float32 classifier, beside a reduced forward (``forward_with_nam``)."""

    def __init__(self, network: GAPClassifier) -> None:
        super().__init__()
        self.network = network  # not ``module``: ``unwrap`` would take the wrapper off
        self.in_channels = network.in_channels
        self.nam_stride = network.nam_stride
        self.nam_context_radius = network.nam_context_radius

    def config(self) -> dict[str, Any]:
        return self.network.config()

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_nam(x)[0]

    def nam(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_nam(x)[1]


class BFloat16Classifier(_ReducedClassifier):
    """The classifier's convolutions from conv1_2 on in ``torch.autocast("cpu", bfloat16)``; conv1_1, the pooled
    logits and the NAM's weighted sum in float32.

    Why the two float32 ends (measured on the quick start's test split, docs/precision.md): conv1_1 reads the HU
    window's fine steps, which bfloat16's 8-bit mantissa rounds (all in bfloat16 the slice probabilities moved by up
    to 0.021, with conv1_1 in float32 by 0.019); the NAM summed in bfloat16 has ties that move its peak (on 52 % of
    nodule slices; 4 % summed in float32, 2 % with conv1_1 in float32 too). Both cost under 1 % of a width-1 forward.
    """

    autocast_dtype = torch.bfloat16

    def __init__(self, network: GAPClassifier) -> None:
        super().__init__(network)
        self.float32_prefix = network.prefix_length("conv1_1")  # features[:float32_prefix] run in float32

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        network = self.network
        first = network.features[: self.float32_prefix](network.normalize_input(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            activations = network.head_activations(first, start=self.float32_prefix)
        activations = [a.float() for a in activations]
        return network.logits_of(activations), network.nam_of(activations, [x.shape[2], x.shape[3]])


class Int8Classifier(_ReducedClassifier):
    """The int8 model of ``scripts.networks.quantize`` in an ONNX Runtime CPU session, as many threads as torch."""

    def __init__(self, network: GAPClassifier, model: str | os.PathLike) -> None:
        import onnxruntime

        super().__init__(network)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # OMP_NUM_THREADS and torch.set_num_threads hold
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    def forward_with_nam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.ascontiguousarray(x.detach().float().cpu().numpy())
        logits, nam = self.session.run(["logits", "nam"], {"image": image})
        return torch.from_numpy(logits).to(x.device), torch.from_numpy(nam).to(x.device)


def inference_network(
    network: nn.Module, precision: str = "float32", checkpoint: str | os.PathLike | None = None
) -> nn.Module:
    """``network`` run in ``precision`` (``PRECISIONS``) where this machine can, else ``network`` (float32) with a
    logged message. ``checkpoint``: the file the weights came from, beside which int8 finds its model.

    Raises:
        ValueError: an unknown precision; int8 without a ``checkpoint`` or with a network other than a
            ``GAPClassifier``.
        StaleModelError: int8 and the quantised model is missing or was made from other weights (the message says
            how to make it).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32" or isinstance(network, _ReducedClassifier):
        return network
    if not isinstance(network, GAPClassifier):
        raise ValueError(f"precision {precision} needs a GAPClassifier, got {type(network).__name__}")
    device = next(network.parameters()).device
    if device.type != "cpu":
        logger.info("precision %s is a CPU path; the classifier is on %s: float32 (amp covers CUDA)", precision, device)
        return network
    if precision == "bfloat16":
        if cpu_has_bf16():
            return BFloat16Classifier(network)
        logger.warning("precision bfloat16: this CPU has no native bfloat16 (AVX512-BF16 or AMX): running float32")
        return network
    if checkpoint is None:
        raise ValueError("precision int8 needs the checkpoint the weights came from (its int8 model lies beside it)")
    model = int8_model(checkpoint)  # a missing or stale model is an error whatever the CPU: the user must know
    if not cpu_has_int8_dot():
        logger.warning("precision int8: this CPU has no int8 dot-product instructions (VNNI): running float32")
        return network
    try:
        return Int8Classifier(network, model)
    except ImportError:
        logger.warning("precision int8: onnxruntime is not installed: running float32")
        return network
