"""A trained classifier's own answer on a slice: what the probabilities a pipeline writes must equal.

The checkpoint is read and the network built by hand (not through ``scripts.networks.checkpoint``), and the slice is put
in the lung window here, so that a pipeline that loads no weights, or feeds the network other pixels, is seen.
"""

import nibabel as nib
import numpy as np
import torch
from scripts.networks.gap_classifier import GAPClassifier


def trained_classifier(path) -> GAPClassifier:
    """The classifier a training run saved (``{"model": weights, "config": record}``), built from its record and
    loaded, in evaluation mode."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    record = checkpoint["config"]
    keys = ("gap_levels", "width", "in_channels", "head_channels", "batch_norm")
    network = GAPClassifier(**{k: record[k] for k in keys})
    network.load_state_dict(checkpoint["model"])
    return network.eval()


def _logits(network: torch.nn.Module, hu) -> torch.Tensor:
    """``network``'s logits ``(other, nodule)`` for one slice in HU, ``(rows, cols)`` or ``(channels, rows, cols)``,
    mapped to [0, 1] in the lung window (-1000 to 400 HU) as the training slices were: ``(1, 2)``."""
    x = torch.as_tensor(np.clip((np.asarray(hu, np.float64) + 1000.0) / 1400.0, 0.0, 1.0), dtype=torch.float32)
    with torch.no_grad():
        return network(x.reshape(1, -1, *x.shape[-2:]))


def nodule_probability(network: torch.nn.Module, hu) -> float:
    """``network``'s nodule probability for one slice in HU (``_logits``)."""
    return float(torch.softmax(_logits(network, hu), dim=1)[0, 1])


def nodule_logit(network: torch.nn.Module, hu) -> float:
    """``network``'s logit difference, nodule less other, for one slice in HU (``_logits``)."""
    logits = _logits(network, hu)[0]
    return float(logits[1] - logits[0])


def prepared_slice(path) -> np.ndarray:
    """A prepared slice's HU as the network takes them: ``(rows, cols)``, or ``(channels, rows, cols)`` for a 2.5-D
    slice, which the dataset writer stores as ``(rows, cols, channels)``."""
    hu = np.asarray(nib.load(str(path)).dataobj, np.float64)
    return hu.transpose(2, 0, 1) if hu.ndim == 3 else hu
