"""Does the classifier look at the nodule? Where its NAM peaks on nodule slices, against chance.

The method stands on one phenomenon: the NAM of a classifier trained on slice labels points at the nodule. Three
figures say whether it does, over the nodule slices of a labelled split:

- ``peak_near``: the share of slices whose NAM maximum lies within ``tolerance_px`` of the ground truth (inside it
  or at most that many pixels away, 8-connected);
- ``chance``: the same share for a lung pixel drawn at random (the area within tolerance over the lungs' area), what
  a NAM blind to the nodule scores;
- ``percentile``: the NAM's percentile rank on the nodule among the slice's lung pixels, averaged over the nodule's
  pixels (50 = blind, 100 = the nodule is where the NAM is highest).

``localisation_summary`` also gives the slice-level AUC and accuracy when probabilities come with the slices, so
that one report says how well the classifier tells the classes apart and whether it looks at the right place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .metrics import classification_summary

__all__ = ["TOLERANCE_PX", "SliceLocalisation", "localise", "localisation_summary", "format_localisation"]

TOLERANCE_PX = 8


@dataclass(frozen=True)
class SliceLocalisation:
    """Where one nodule slice's NAM peaks: ``peak`` (row, col), whether it is ``inside`` the ground truth or
    ``near`` it (within ``tolerance_px``), ``chance`` of a random lung pixel being near, and the NAM's
    ``percentile`` on the nodule."""

    peak: tuple[int, int]
    tolerance_px: int
    inside: bool
    near: bool
    chance: float
    percentile: float


def localise(
    nam: np.ndarray, label: np.ndarray, lung: np.ndarray, tolerance_px: int = TOLERANCE_PX
) -> SliceLocalisation:
    """Score one nodule slice's NAM ``(rows, cols)`` against its ground truth and lung mask (same shape).

    Raises:
        ValueError: the shapes differ, or the ground truth is empty (a slice without nodule has nothing to find).
    """
    nam, label, lung = np.asarray(nam, float), np.asarray(label) > 0, np.asarray(lung) > 0
    if not nam.shape == label.shape == lung.shape or nam.ndim != 2:
        raise ValueError(f"NAM {nam.shape}, label {label.shape} and lungs {lung.shape} must be 2-D of one shape")
    if not label.any():
        raise ValueError("the ground truth is empty: localisation is measured on nodule slices only")
    peak = np.unravel_index(int(np.argmax(nam)), nam.shape)
    around = ndimage.binary_dilation(label, structure=np.ones((3, 3), bool), iterations=tolerance_px)
    # the nodule's own pixels count as lung: a juxtapleural nodule lies partly outside the lung mask
    region = lung | label
    ranked = np.sort(nam[region])
    percentile = float(np.mean(np.searchsorted(ranked, nam[label], side="right") / ranked.size))
    return SliceLocalisation(
        peak=(int(peak[0]), int(peak[1])),
        tolerance_px=tolerance_px,
        inside=bool(label[peak]),
        near=bool(around[peak]),
        chance=float((around & region).sum() / region.sum()),
        percentile=100.0 * percentile,
    )


def localisation_summary(
    found: Sequence[SliceLocalisation],
    probabilities: Sequence[float] | None = None,
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
) -> dict[str, float | int | None]:
    """The figures of a labelled split from its nodule slices' localisations (``localise``), and its slice-level AUC
    and accuracy when every slice's ``probabilities`` and ``classes`` are given.

    Returns ``{"nodule_slices", "tolerance_px", "peak_near", "peak_inside", "chance", "percentile", "auc",
    "accuracy", "slices"}``: shares as fractions, the percentile in percent, ``auc``/``accuracy``/``slices`` None
    without probabilities.
    """
    if not found:
        raise ValueError("no nodule slice: localisation needs slices with a ground truth")
    classified = {"auc": None, "accuracy": None, "n": None}
    if probabilities is not None and classes is not None:
        classified = classification_summary(probabilities, classes, threshold)
    return {
        "nodule_slices": len(found),
        "tolerance_px": found[0].tolerance_px,
        "peak_near": float(np.mean([f.near for f in found])),
        "peak_inside": float(np.mean([f.inside for f in found])),
        "chance": float(np.mean([f.chance for f in found])),
        "percentile": float(np.mean([f.percentile for f in found])),
        "auc": classified["auc"],
        "accuracy": classified["accuracy"],
        "slices": classified["n"],
    }


def format_localisation(summary: Mapping) -> str:
    """One paragraph a user reads first: how well the classifier separates the classes and where its NAM looks."""
    lines = []
    if summary.get("auc") is not None:
        auc, accuracy, n = summary["auc"], summary["accuracy"], summary["slices"]
        lines.append(f"classifier: test AUC {auc:.3f}, accuracy {accuracy:.3f} ({n} slices)")
    lines.append(
        f"NAM: peak within {summary['tolerance_px']} px of the nodule on {100 * summary['peak_near']:.1f} % of "
        f"{summary['nodule_slices']} nodule slices (chance {100 * summary['chance']:.1f} %), inside it on "
        f"{100 * summary['peak_inside']:.1f} %; on the nodule the NAM ranks above {summary['percentile']:.0f} % of the "
        "lungs' pixels (50 % = blind)"
    )
    return "\n".join(lines)
