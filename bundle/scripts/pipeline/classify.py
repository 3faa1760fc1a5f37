"""Classify: the GAP classifier's nodule logits and its nodule activation map (NAM) from one forward pass.

``logits_and_nam`` is what the segmenter and R-NAM call; ``NAMInferer`` runs it in a MONAI engine
(``configs/classify.json``) and names its outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from ..networks.gap_classifier import unwrap

__all__ = ["logits_and_nam", "NAMInferer"]


def logits_and_nam(network: Callable, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, 2), nam (B, 1, H, W))`` from one pass when the network offers ``forward_with_nam``."""
    if hasattr(network, "forward_with_nam"):
        return network.forward_with_nam(inputs)
    if hasattr(network, "nam"):
        return network(inputs), network.nam(inputs)
    raise TypeError(f"{type(network).__name__} offers neither forward_with_nam nor nam: it cannot give a NAM")


class NAMInferer(Inferer):
    """Run a ``GAPClassifier`` in a MONAI engine, returning the nodule probability and the NAM in one pass.

    Returns ``{"probability": (B, 1) softmax probability of the nodule class, "nam": (B, 1, H, W) raw NAM}``;
    ``FlattenSubKeysd(keys="pred")`` moves both to the top level of a decollated item.
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        model = unwrap(network)
        logits, nam = model.forward_with_nam(inputs)
        return {"probability": torch.softmax(logits.float(), dim=1)[:, 1:], "nam": nam}
