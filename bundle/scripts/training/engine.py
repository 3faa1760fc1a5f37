"""Pieces the classifier's bundle configs plug into MONAI's engines: batch preparation, metric inputs and the
resume look-up."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

__all__ = [
    "PrepareClassBatch",
    "PrepareMaskBatch",
    "logits_and_labels",
    "nodule_probability_and_labels",
    "last_checkpoint",
]


def _plain(tensor: Any) -> torch.Tensor:
    # a MetaTensor copies its metadata through every operation of the network and of its backward pass, a measurable
    # share of a CPU training step (bench/bench_training.py --compare), for metadata nothing in training reads. The
    # arithmetic is the same to the bit.
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


class PrepareClassBatch(PrepareBatch):
    """Give the engines ``(image, class)`` as plain tensors: the prepared items keep the mask path under ``label``.

    Args:
        image_key: key of the input image in the batch.
        label_key: key of the slice's class (1 = nodule) in the batch.
    """

    def __init__(self, image_key: str = "image", label_key: str = "class") -> None:
        self.image_key = image_key
        self.label_key = label_key

    @staticmethod
    def _target(label: torch.Tensor) -> torch.Tensor:
        return label.long()  # the class index cross-entropy takes

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.label_key not in batchdata:
            raise ValueError(f"batch has no {self.label_key!r} key (found {sorted(batchdata)}).")
        image = _plain(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = self._target(_plain(batchdata[self.label_key])).to(device=device, non_blocking=non_blocking)
        return image, label


class PrepareMaskBatch(PrepareClassBatch):
    """Give the U-Net's engines ``(image, mask)`` as plain tensors, the mask as it is (see :class:`PrepareClassBatch`;
    ``label_key`` names the nodule mask)."""

    @staticmethod
    def _target(label: torch.Tensor) -> torch.Tensor:
        return label


def batched(output: dict | Sequence[dict], key: str) -> torch.Tensor:
    """``output[key]`` of an engine, batched again when the engine decollated its output."""
    if isinstance(output, dict):
        return output[key]
    return torch.stack([torch.as_tensor(item[key]) for item in output])


def logits_and_labels(output: dict | Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, 2), class (B,))`` from an engine output: the input of ignite's Accuracy and Loss."""
    return batched(output, "pred").float(), batched(output, "label").long()


def nodule_probability_and_labels(output: dict | Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nodule probability (B,), class (B,))`` from an engine output: the input of ROCAUC."""
    logits, labels = logits_and_labels(output)
    return torch.softmax(logits, dim=1)[:, 1], labels


def last_checkpoint(checkpoint_dir: str | os.PathLike, prefix: str = "last") -> str:
    """Path of the newest ``{prefix}_checkpoint_epoch=N.pt`` that ``CheckpointSaver(file_prefix=prefix)`` wrote.

    Raises:
        FileNotFoundError: there is none in ``checkpoint_dir``.
    """
    pattern = re.compile(rf"{re.escape(prefix)}_checkpoint_epoch=(\d+)\.pt")
    found = {}
    if Path(checkpoint_dir).is_dir():
        for path in Path(checkpoint_dir).iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"cannot resume: no {prefix}_checkpoint_epoch=N.pt in {checkpoint_dir}")
    return str(found[max(found)])
