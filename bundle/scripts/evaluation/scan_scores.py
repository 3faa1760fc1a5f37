"""Whole-scan scores, counted per nodule and per scan as LUNA16 and the Model Zoo's detection bundle count.

The unit is the 3-D nodule: a connected component (26-neighbours) of the predicted mask, as in the nodule table
(``scripts.pipeline.assemble.nodule_table``). A true nodule is *found* when some predicted nodule overlaps it; its
3-D Dice is taken against the union of the predicted nodules that overlap it. A predicted nodule that overlaps no
true nodule is a *false positive*, unless it overlaps an *ignored* region (LUNA16's irrelevant findings: a mark of a
single reader, a nodule under 3 mm), which counts neither way. The per-slice figures of the paper's Table 1 are
computed on the same masks along the axial axis (``scripts.evaluation.metrics.slice_outcome``): slices with a true
nodule are S+, slices with no true nodule and no ignored mark are S-.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .metrics import slice_outcome

__all__ = ["score_scan"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def score_scan(
    predicted: np.ndarray,
    nodules: Mapping[str, np.ndarray],
    ignore: np.ndarray | None = None,
    axis: int = 2,
    spacing: Sequence[float] = (1.0, 1.0),
) -> dict[str, Any]:
    """Score one scan's predicted nodule mask against its true nodules.

    Args:
        predicted: ``(X, Y, Z)`` predicted nodule mask on the scan's grid (non-zero = nodule).
        nodules: each true nodule's name and ``(X, Y, Z)`` mask on the same grid.
        ignore: ``(X, Y, Z)`` regions that count neither as a nodule found nor as a false positive, or None.
        axis: the axial (slice) axis of the grid.
        spacing: the in-plane pixel spacing in mm (the two other axes, in order), for the slices' area errors.

    Returns:
        ``nodules``: per true nodule ``{"found", "dice_3d", "voxels"}``; ``found``, ``missed`` and
        ``false_positives`` (counts), ``ignored`` (predicted nodules on ignored regions only), ``predicted``
        (predicted nodules); ``slices``: the per-slice TP, FN, FP_nodule and FP counts, TPR, FPR, FPR_nodule, and the
        TP slices' mean Dice.

    Raises:
        ValueError: a mask whose shape differs from ``predicted``'s.
    """
    predicted = np.asarray(predicted) > 0
    shapes = {name: np.shape(mask) for name, mask in nodules.items()}
    if ignore is not None:
        shapes["ignore"] = np.shape(ignore)
    wrong = {name: shape for name, shape in shapes.items() if shape != predicted.shape}
    if wrong:
        raise ValueError(f"masks {wrong} differ in shape from the prediction {predicted.shape}")
    labels, count = ndimage.label(predicted, structure=np.ones((3, 3, 3), bool))
    truth = np.zeros(predicted.shape, bool)
    per_nodule, on_truth = {}, set()
    for name, mask in nodules.items():
        mask = np.asarray(mask) > 0
        truth |= mask
        hits = set(np.unique(labels[mask]).tolist()) - {0}
        on_truth |= hits
        found = np.isin(labels, sorted(hits)) if hits else np.zeros_like(mask)
        per_nodule[name] = {
            "found": bool(hits),
            "dice_3d": round(_dice(found, mask), 4) if hits else 0.0,
            "voxels": int(mask.sum()),
        }
    ignored_region = np.asarray(ignore) > 0 if ignore is not None else np.zeros_like(predicted)
    on_ignored = set(np.unique(labels[ignored_region]).tolist()) - {0}
    others = set(range(1, count + 1)) - on_truth
    return {
        "nodules": per_nodule,
        "found": sum(n["found"] for n in per_nodule.values()),
        "missed": sum(not n["found"] for n in per_nodule.values()),
        "false_positives": len(others - on_ignored),
        "ignored": len(others & on_ignored),
        "predicted": int(count),
        "slices": _slice_figures(predicted, truth, ignored_region, axis, spacing),
    }


def _slice_figures(
    predicted: np.ndarray, truth: np.ndarray, ignored: np.ndarray, axis: int, spacing: Sequence[float]
) -> dict[str, Any]:
    counts = {"TP": 0, "FN": 0, "FP_nodule": 0, "FP": 0, "TN": 0}
    tp_dice = []
    for k in range(predicted.shape[axis]):
        pred, label = np.take(predicted, k, axis), np.take(truth, k, axis)
        if not label.any() and np.take(ignored, k, axis).any():
            continue  # a slice with only an ignored mark is neither S+ nor S-
        outcome = slice_outcome(pred, label, spacing)
        counts[outcome["outcome"]] += 1
        if outcome["outcome"] == "TP":
            tp_dice.append(outcome["dice"])
    positives = counts["TP"] + counts["FN"] + counts["FP_nodule"]
    negatives = counts["FP"] + counts["TN"]
    return {
        **counts,
        "TPR": round(counts["TP"] / positives, 4) if positives else None,
        "FPR_nodule": round(counts["FP_nodule"] / positives, 4) if positives else None,
        "FPR": round(counts["FP"] / negatives, 4) if negatives else None,
        "TP_dice": round(float(np.mean(tp_dice)), 4) if tp_dice else None,
    }
