"""The 2.5-D input: each slice with its neighbours above and below as the network's input channels.

One definition for the dataset writer (training slices) and the whole-scan inference, as ``scripts.pipeline.crop`` is
for the crop. A model with ``in_channels = 2k + 1`` sees, for slice ``s``, the slices at ``-k .. k`` steps of
``context_mm``
from it, in that order (the slice itself in the middle channel). The neighbours are taken at a distance in mm, not
in slices, so that a model trained on 2.5 mm slices sees the same anatomy on a scan of 1.25 mm slices; between
slices the value is interpolated linearly, and beyond the scan's first and last slice the end slice is repeated.

*Inferred*: the paper feeds single slices (its ImageNet VGG16 takes the grey slice as three equal channels). The
slice with its neighbours as the three channels is the usual 2.5-D input; it shows a nodule as a blob that grows and
shrinks across the channels, where a vessel runs through all three.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_CONTEXT_MM", "centre_channel", "check_context", "context_offsets", "stack_context"]

# The distance between the channels of a 2.5-D input by default: the synthetic source's slice spacing and the most
# common one in LIDC-IDRI (so that the neighbours are the adjacent slices there, with no interpolation).
DEFAULT_CONTEXT_MM = 2.5


def context_offsets(in_channels: int) -> np.ndarray:
    """The channels' positions in steps of ``context_mm``: ``[0]`` for one channel, ``[-1, 0, 1]`` for three."""
    if in_channels < 1 or in_channels % 2 == 0:
        raise ValueError(f"in_channels must be odd (the slice and as many neighbours on each side), got {in_channels}")
    k = (in_channels - 1) // 2
    return np.arange(-k, k + 1, dtype=float)


def check_context(in_channels: int, context_mm: float | None) -> None:
    """Refuse an even channel count, or a 2.5-D input without a positive ``context_mm``."""
    context_offsets(in_channels)
    if in_channels > 1 and (context_mm is None or not context_mm > 0):
        raise ValueError(f"a {in_channels}-channel (2.5-D) input needs context_mm > 0, got context_mm={context_mm}")


def centre_channel(in_channels: int) -> int:
    """Index of the channel that holds the slice itself (the one that is segmented)."""
    context_offsets(in_channels)  # validates
    return in_channels // 2


def stack_context(
    volume: np.ndarray,
    slices: Sequence[int],
    in_channels: int,
    slice_spacing_mm: float,
    context_mm: float | None = DEFAULT_CONTEXT_MM,
) -> np.ndarray:
    """The network inputs of ``slices`` of ``volume`` ``(rows, cols, n)``: ``(rows, cols, len(slices), in_channels)``.

    Args:
        volume: a volume with slices along its last axis (HU, a windowed image, or anything interpolable).
        slices: indices of the slices to stack.
        in_channels: channels per input, odd (see ``context_offsets``).
        slice_spacing_mm: the volume's slice spacing.
        context_mm: distance between neighbouring channels; needed when ``in_channels > 1``.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"stack_context expects a volume (rows, cols, slices), got shape {volume.shape}")
    slices = np.asarray(slices, dtype=int).reshape(-1)
    check_context(in_channels, context_mm)
    if in_channels == 1:
        return volume[..., slices][..., None]
    if not slice_spacing_mm > 0:
        raise ValueError(f"a {in_channels}-channel (2.5-D) input needs a slice spacing > 0, got {slice_spacing_mm}")
    offsets = context_offsets(in_channels)
    last = volume.shape[2] - 1
    positions = np.clip(slices[:, None] + offsets[None] * (context_mm / slice_spacing_mm), 0, last)
    below = np.floor(positions).astype(int)
    above = np.minimum(below + 1, last)
    weight = (positions - below).astype(np.float32)
    exact = weight == 0  # the usual case (context_mm a multiple of the spacing): no interpolation, dtype kept
    if exact.all():
        return volume[..., below]
    low, high = volume[..., below].astype(np.float32), volume[..., above].astype(np.float32)
    return low + weight * (high - low)
