"""Pieces the classifier's bundle configs plug into MONAI's engines: batch preparation, metric inputs,
resume look-up and the TensorBoard / PNG handlers that show nodule activation maps."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from skimage.io import imsave

from ..data.dataset import slice_stem
from ..utils.io import write_atomically
from .transforms import nam_overlay

__all__ = [
    "PrepareClassBatch",
    "PrepareMaskBatch",
    "logits_and_labels",
    "nodule_probability_and_labels",
    "last_checkpoint",
    "LearningRateTensorBoardHandler",
    "NAMTensorBoardHandler",
    "NAMOverlaySaver",
]


def _plain(tensor: Any) -> torch.Tensor:
    # a MetaTensor copies its metadata through every operation of the network and of its backward pass: 6-15 % of a
    # CPU training step at the quick start's size (bench/bench_training.py --compare), for metadata nothing in
    # training reads. The arithmetic is the same to the bit.
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


def _batched(output: dict | Sequence[dict], key: str) -> torch.Tensor:
    """``output[key]`` of an engine, batched again when the engine decollated its output."""
    if isinstance(output, dict):
        return output[key]
    return torch.stack([torch.as_tensor(item[key]) for item in output])


def logits_and_labels(output: dict | Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, 2), class (B,))`` from an engine output: the input of ignite's Accuracy and Loss."""
    return _batched(output, "pred").float(), _batched(output, "label").long()


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


class LearningRateTensorBoardHandler:
    """Write the learning rate of every optimiser parameter group at the end of each epoch.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        optimizer: the trainer's optimiser.
        tag: scalar tag; group ``i`` is written as ``{tag}/group{i}``.
    """

    def __init__(self, summary_writer: Any, optimizer: torch.optim.Optimizer, tag: str = "lr") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            self.writer.add_scalar(f"{self.tag}/group{index}", group["lr"], engine.state.epoch)


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel


class NAMTensorBoardHandler:
    """Show a few validation slices with their NAM overlaid in TensorBoard, once per validation run.

    Attached to the evaluator: after its first iteration, the first ``max_images`` slices of the batch (nodule
    slices first) are run through ``engine.network.nam`` and written as RGB overlays at the trainer's epoch.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        max_images: number of slices shown.
        tag: image tag.
    """

    def __init__(self, summary_writer: Any, max_images: int = 4, tag: str = "validation/nam") -> None:
        self.writer = summary_writer
        self.max_images = max_images
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        # MONAI's evaluator restarts its iteration count at every validation run
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        images = _batched(engine.state.output, "image")
        labels = _batched(engine.state.output, "label")
        order = torch.argsort(-labels.float(), stable=True)[: self.max_images]
        network = _unwrap(engine.network)
        with torch.no_grad():
            nams = network.nam(images[order].float())
        pictures = np.stack([nam_overlay(images[i], nam) for i, nam in zip(order, nams)])
        self.writer.add_images(self.tag, pictures, engine.state.epoch, dataformats="NCHW")


class NAMOverlaySaver:
    """Save PNG overlays of the NAM on its image for the first ``max_images`` slices an evaluator processes.

    Reads the decollated engine output items ``image`` and ``nam`` (both ``(1, H, W)``); the file is named after
    the image file (``<name>_nam.png``), written to a temporary name and renamed when complete.

    Args:
        output_dir: folder for the PNG files (created).
        max_images: number of slices saved.
        image_key: key of the image in the engine output items.
        nam_key: key of the NAM in the engine output items.
    """

    def __init__(
        self, output_dir: str | os.PathLike, max_images: int = 16, image_key: str = "image", nam_key: str = "nam"
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_images = max_images
        self.image_key = image_key
        self.nam_key = nam_key
        self._saved = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._saved = 0

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = [output] if isinstance(output, dict) else list(output)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item in items:
            if self._saved >= self.max_images:
                return
            image = item[self.image_key]
            source = getattr(image, "meta", {}).get("filename_or_obj", f"slice_{self._saved:05d}")
            name = slice_stem(str(source))
            picture = (nam_overlay(image, item[self.nam_key]).transpose(1, 2, 0) * 255).round().astype(np.uint8)
            target = self.output_dir / f"{name}_nam.png"
            write_atomically(target, lambda tmp: imsave(tmp, picture, check_contrast=False))
            self._saved += 1
