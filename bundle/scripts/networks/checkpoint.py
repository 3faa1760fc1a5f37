"""What a classifier checkpoint records about its training, and loading it without repeating the training flags.

``models/model.pt`` holds ``{"model": state_dict, "config": record}``. The record says what the network is (its
``GAPClassifier.config()``) and what it was trained on: the slices' size and pixel spacing and the HU window, which
inference must reproduce (a model trained on 2.25 mm pixels fed 0.7 mm pixels finds nothing), and the bundle
version. MONAI Label and ``monai.bundle ckpt_export`` read the weights under ``"model"`` as they do for any bundle.

``resolve_settings`` is what the inference configs call: the record's values, with any value a user gave
explicitly checked against it. Checkpoints saved before the record existed (a bare state dict) still load: their
settings are then the given values or the defaults, and ``load_checkpoint`` checks them against the weights' shapes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from .gap_classifier import GAPClassifier, unwrap

__all__ = [
    "TrainingRecord",
    "read_checkpoint",
    "resolve_settings",
    "load_checkpoint",
    "inference_classifier",
    "warm_start",
    "optional_classifier",
    "bundle_version",
]

# The settings inference needs and their defaults for a checkpoint without a record. ``pixel_spacing_mm`` is the
# [least, largest] pixel spacing of the training slices; None: use every scan at its own spacing. ``context_mm`` is
# the distance between the channels of a 2.5-D model's input (``scripts.pipeline.context``); None for single slices.
# ``threshold`` is the nodule probability from which a slice is called a nodule slice, chosen on the validation split
# in training (``scripts.training.handlers.DecisionThreshold``); inference uses it unless it is given one.
DEFAULTS: dict[str, Any] = {
    "gap_levels": 1,
    "width": 1.0,
    "in_channels": 1,
    "head_channels": 1024,
    "batch_norm": False,
    "image_size": 384,
    "pixel_spacing_mm": None,
    "hu_window": [-1000.0, 400.0],
    "context_mm": None,
    "threshold": 0.5,
}


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The ``version`` of ``<bundle_root>/configs/metadata.json`` ("unknown" when there is none)."""
    path = Path(bundle_root) / "configs" / "metadata.json"
    if not path.is_file():
        return "unknown"
    try:
        return str(json.loads(path.read_text()).get("version", "unknown"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err})") from None


def _context_mm(items: list[Mapping[str, Any]], in_channels: int) -> float | None:
    """The one ``context_mm`` of 2.5-D training items (None for single slices)."""
    if in_channels == 1:
        return None
    steps = {float(item["context_mm"]) for item in items if "context_mm" in item}
    if len(steps) != 1:
        raise ValueError(
            f"a {in_channels}-channel model needs training slices prepared with one context_mm (prepare the dataset "
            f"with --in_channels {in_channels}); these have {sorted(steps) or 'none'}"
        )
    return steps.pop()


def _pixel_spacing(item: Mapping[str, Any]) -> tuple[float, float]:
    if "spacing_mm" in item:
        return float(item["spacing_mm"][0]), float(item["spacing_mm"][1])
    zooms = nib.load(str(item["image"])).header.get_zooms()  # a header read: the pixels stay on disk
    return float(zooms[0]), float(zooms[1])


class TrainingRecord:
    """The record saved beside the weights (``CheckpointSaver(save_dict={"model": ..., "config": record})``).

    Args:
        network: the classifier being trained (its ``config()`` is recorded).
        datalist: the training items; their pixel spacing is ``spacing_mm`` when the dataset writer made them, else
            read from the image headers (MONAI Label's datalists); a 2.5-D network's ``context_mm`` is theirs.
        image_size: side of the square slices the network sees.
        hu_window: the HU window mapped to [0, 1].
        bundle_root: where ``configs/metadata.json`` gives the bundle version.
        freeze_through: the last conv kept frozen in training (None: every layer trained); with the backbone's
            origin (``pretrained``), recorded so that a checkpoint says how it was made.
        initial_weights: the checkpoint the training started from (``warm_start``; None: from ``pretrained`` or
            from scratch), recorded as given.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        datalist: Iterable[Mapping[str, Any]],
        image_size: int,
        hu_window: Sequence[float],
        bundle_root: str | os.PathLike = ".",
        freeze_through: str | None = None,
        initial_weights: str | os.PathLike | None = None,
    ) -> None:
        items = list(datalist)
        spacings = np.array([_pixel_spacing(item) for item in items], dtype=float).reshape(-1, 2)
        spacing = None if not spacings.size else [float(spacings.min()), float(spacings.max())]
        model = unwrap(network)
        self.record = {
            **model.config(),
            "context_mm": _context_mm(items, model.config()["in_channels"]),
            "image_size": int(image_size),
            "pixel_spacing_mm": spacing,
            "hu_window": [float(hu_window[0]), float(hu_window[1])],
            "bundle_version": bundle_version(bundle_root),
            "threshold": DEFAULTS["threshold"],  # until a validation run chooses one (DecisionThreshold)
            "pretrained": getattr(model, "pretrained_origin", None),
            "freeze_through": freeze_through,
            "initial_weights": None if initial_weights is None else str(initial_weights),
        }

    def state_dict(self) -> dict[str, Any]:
        """The record (what ignite's checkpoint saves)."""
        return dict(self.record)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take a saved record (ignite's checkpoint loader calls this when resuming)."""
        self.record = dict(state)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict and the training record (None for a checkpoint saved before records) of ``path``.

    Accepts ``{"model": state_dict, "config": record}`` (``models/model.pt``), a training checkpoint with the state
    dict under ``"model"`` (``last*.pt``), or a bare state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}.")
    record = state.get("config") if isinstance(state.get("config"), dict) else None
    if isinstance(state.get("model"), dict):
        state = state["model"]
    if "features.0.weight" not in state:
        raise ValueError(f"{path}: not a GAPClassifier checkpoint (no features.0.weight)")
    return state, record


def _same(key: str, given: Any, recorded: Any) -> bool:
    if key in ("width", "hu_window", "pixel_spacing_mm", "context_mm"):
        if given is None or recorded is None:
            return given is None and recorded is None
        return bool(np.allclose(np.asarray(given, float), np.asarray(recorded, float), rtol=1e-6, atol=1e-9))
    return given == recorded


def resolve_settings(path: str | os.PathLike, **given: Any) -> dict[str, Any]:
    """The settings inference runs with: the checkpoint's record, checked against every value given explicitly.

    Args:
        path: the checkpoint. When it does not exist (yet), the given values and the defaults are returned, so that
            a config can be parsed without weights (``verify_net_in_out``); loading the weights then fails clearly.
        given: ``gap_levels``, ``width``, ``in_channels``, ``head_channels``, ``batch_norm``, ``image_size``,
            ``pixel_spacing_mm``, ``hu_window``, ``context_mm``; None means "as recorded".

    Raises:
        ValueError: a given value contradicts the record (naming the file, the key and both values), or an unknown
            key is given.
    """
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; known: {sorted(DEFAULTS)}")
    record = read_checkpoint(path)[1] if os.path.isfile(path) else None
    settings = {**DEFAULTS, **(record or {})}
    for key, value in given.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = [float(v) for v in value]
        if record is not None and key in record and not _same(key, value, record[key]):
            raise ValueError(
                f"{path} was trained with {key}={record[key]}, but {key}={value} was given: leave {key} unset to use "
                "the checkpoint's value"
            )
        settings[key] = value
    return settings


def _head_channels(state: Mapping[str, torch.Tensor]) -> list[int]:
    """The output channels of each GAP head of a state dict, in head order."""
    return [v.shape[0] for k, v in state.items() if k.startswith("heads.") and k.endswith(".0.weight")]


def _describe(state: Mapping[str, torch.Tensor]) -> str:
    convs = [
        v.shape[0] for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4
    ]
    heads = _head_channels(state)
    batch_norm = any(k.endswith("running_mean") for k in state)
    in_channels = state["features.0.weight"].shape[1]
    return (
        f"{len(heads)} GAP head(s) of {heads[0] if heads else 0} channels, convs of {convs[0]}..{convs[-1]} channels, "
        f"{in_channels} input channel(s), batch_norm={batch_norm}"
    )


def load_checkpoint(model: GAPClassifier, path: str | os.PathLike) -> GAPClassifier:
    """Load the weights of ``path`` into ``model`` and return it.

    The model's parameter shapes are compared with the checkpoint's, channel count by channel count (a width of
    0.1 gives 6-channel first convs, which no reconstructed width would match), and a mismatch is a ValueError
    describing both networks.
    """
    return _load_state(model, read_checkpoint(path)[0], path)


def _load_state(model: GAPClassifier, state: dict[str, torch.Tensor], path: str | os.PathLike) -> GAPClassifier:
    """``load_checkpoint`` on a state dict already read from ``path`` (named in the error)."""
    own = model.state_dict()
    if model.config().get("input_norm") is None:
        # checkpoints saved before the input normalisation buffers existed had none: the identity, as the model's
        state = {**{k: own[k] for k in ("input_mean", "input_std") if k in own and k not in state}, **state}
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        config = ", ".join(f"{k}={v}" for k, v in model.config().items())
        raise ValueError(
            f"checkpoint {path} holds a network with {_describe(state)}; this model ({config}) has {_describe(own)}. "
            "Give the settings it was trained with, or leave them unset when the checkpoint records them."
        )
    model.load_state_dict(state)
    return model


def _with_fewer_levels(model: GAPClassifier, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with ``state``, a network of the same backbone and fewer GAP levels, laid into it; None
    when ``state`` is not such a network.

    The heads come in the order conv5_3, conv4_3, conv3_3, so the checkpoint's heads are the model's first ones, and
    its ``fc`` columns the first columns. ``fc``'s rows are written opposite, each half the checkpoint's row
    difference: the logit difference (what the softmax sees) and the NAM are the checkpoint's, and the rows stay
    opposite in training (``GAPClassifier._init_weights``). The new heads and their ``fc`` columns keep the model's
    initialisation.
    """
    own = model.state_dict()
    levels = len(_head_channels(state))
    shared = [k for k in state if not k.startswith("fc.")]
    if not 0 < levels < model.gap_levels or any(k not in own or own[k].shape != state[k].shape for k in shared):
        return None
    columns = sum(model.head_sizes[:levels])
    if state["fc.weight"].shape != (2, columns) or state["fc.bias"].shape != own["fc.bias"].shape:
        return None
    weight, bias = own["fc.weight"].clone(), own["fc.bias"].clone()
    half = (state["fc.weight"][1] - state["fc.weight"][0]) / 2
    weight[1, :columns], weight[0, :columns] = half, -half
    half_bias = (state["fc.bias"][1] - state["fc.bias"][0]) / 2
    bias[1], bias[0] = half_bias, -half_bias
    return {**own, **{k: state[k] for k in shared}, "fc.weight": weight, "fc.bias": bias}


def warm_start(model: GAPClassifier, path: str | os.PathLike | None) -> GAPClassifier:
    """``model`` started from the checkpoint at ``path``, or as it is when ``path`` is None: a training that starts
    from an earlier model (the real-CT model starts from the quick start's).

    A checkpoint of the same network loads whole (``load_checkpoint``). One with fewer GAP levels and the same
    backbone starts the shared layers, and the new heads keep their initialisation (``_with_fewer_levels``): the
    full quick start's 3-GAP classifier starts from its trained 2-GAP one.
    """
    if path is None:
        return model
    state, _ = read_checkpoint(path)  # read once: tried as a network of fewer levels, else loaded whole
    grown = _with_fewer_levels(model, state)
    if grown is None:
        return _load_state(model, state, path)
    model.load_state_dict(grown)
    return model


def inference_classifier(model: GAPClassifier, path: str | os.PathLike) -> GAPClassifier:
    """``load_checkpoint`` in evaluation mode: what the inference configs give every consumer (batch normalisation
    with its running statistics, not the batch's, which move a trained model's probabilities)."""
    return load_checkpoint(model, path).eval()


def optional_classifier(model: torch.nn.Module, path: str, enabled: bool = True) -> torch.nn.Module | None:
    """``inference_classifier`` when ``enabled``, else None (a config switch)."""
    if not enabled:
        return None
    return inference_classifier(model, path)
