"""Handlers that show the nodule activation maps while a classifier trains (TensorBoard) or classifies (PNG files),
and the learning rate per parameter group."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.visualize import blend_images
from skimage.io import imsave

from ..data.dataset import slice_stem
from ..networks.gap_classifier import unwrap
from ..pipeline.context import centre_channel
from ..utils.io import write_atomically
from .engine import batched, nodule_probability_and_labels

__all__ = [
    "LearningRateTensorBoardHandler",
    "NAMTensorBoardHandler",
    "NAMOverlaySaver",
    "DecisionThreshold",
    "threshold_at_specificity",
    "nam_overlay",
]


def nam_overlay(
    image: np.ndarray | torch.Tensor, nam: np.ndarray | torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """RGB picture ``(3, H, W)`` in [0, 1] of a NAM blended over its image, both ``(1, H, W)`` or ``(H, W)``.

    The image and a copy of the NAM are min-max scaled for display only; the NAM itself stays raw. A 2.5-D image
    ``(C, H, W)`` shows its centre channel, the slice itself.
    """
    image_t = torch.as_tensor(image, dtype=torch.float32).cpu()
    if image_t.ndim == 3 and image_t.shape[0] > 1:
        centre = centre_channel(image_t.shape[0])
        image_t = image_t[centre : centre + 1]
    nam_t = torch.as_tensor(nam, dtype=torch.float32).cpu()
    if image_t.ndim == 2:
        image_t = image_t[None]
    if nam_t.ndim == 2:
        nam_t = nam_t[None]
    if image_t.shape != nam_t.shape or image_t.shape[0] != 1:
        raise ValueError(f"image and NAM must both be (1, H, W), got {tuple(image_t.shape)} and {tuple(nam_t.shape)}.")
    rgb = blend_images(image_t, nam_t, alpha=alpha, cmap=cmap, rescale_arrays=True, transparent_background=False)
    return np.clip(np.asarray(rgb, dtype=np.float32), 0.0, 1.0)


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
        images = batched(engine.state.output, "image")
        labels = batched(engine.state.output, "label")
        order = torch.argsort(-labels.float(), stable=True)[: self.max_images]
        network = unwrap(engine.network)
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


def threshold_at_specificity(probabilities: np.ndarray, labels: np.ndarray, specificity: float) -> float:
    """The least nodule probability that calls at most ``1 - specificity`` of the slices without nodule positive.

    Raises:
        ValueError: there is no slice without nodule, or ``specificity`` is not in (0, 1].
    """
    if not 0 < specificity <= 1:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    negatives = np.sort(np.asarray(probabilities, float)[np.asarray(labels) == 0])
    if negatives.size == 0:
        raise ValueError("no slice without nodule to choose a threshold on")
    allowed = int(np.floor((1 - specificity) * negatives.size + 1e-9))  # negatives that may reach the threshold
    if allowed == 0:
        return float(np.nextafter(negatives[-1], np.inf))
    return float(np.nextafter(negatives[-allowed - 1], np.inf)) if allowed < negatives.size else float(negatives[0])


class DecisionThreshold:
    """Choose the classifier's decision threshold on each validation run and record it for the checkpoint.

    A classifier trained on balanced classes and kept for its validation AUC is not calibrated at 0.5: the 256 px
    quick-start model called 67 % of the test slices without nodule positive there (docs/classifier.md). The
    threshold that keeps ``specificity`` of the validation split's slices without nodule negative is written to the
    training record (``TrainingRecord.record["threshold"]``), which the checkpoint saved for the same epoch carries
    and inference uses unless a threshold is given. Attach it to the validator before the ``CheckpointSaver``.

    Args:
        record: the ``TrainingRecord`` the checkpoint saves.
        specificity: the share of validation slices without nodule kept below the threshold.
    """

    def __init__(self, record: Any, specificity: float = 0.9) -> None:
        self.record = record
        self.specificity = specificity
        self.probabilities: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._choose)

    def _reset(self, engine: Engine) -> None:
        self.probabilities, self.labels = [], []

    def _collect(self, engine: Engine) -> None:
        probability, label = nodule_probability_and_labels(engine.state.output)
        self.probabilities.append(probability.detach().cpu())
        self.labels.append(label.detach().cpu())

    def _choose(self, engine: Engine) -> None:
        labels = torch.cat(self.labels).numpy()
        if not (labels == 0).any():
            return  # nothing to choose on: the record keeps its threshold
        threshold = threshold_at_specificity(torch.cat(self.probabilities).numpy(), labels, self.specificity)
        self.record.record["threshold"] = threshold
        self.record.record["threshold_rule"] = f"validation specificity {self.specificity:g}"
        engine.state.metrics["val_threshold"] = threshold
