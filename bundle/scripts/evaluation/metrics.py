"""The paper's segmentation metrics (Table 1, Fig. 3), as plain functions on numpy arrays.

The unit is the slice. A slice is *with nodule* (S+) when its ground truth is non-empty, *without nodule* (S-)
otherwise; ``P`` is the predicted mask (empty when the classifier says "no nodule"), ``G`` the ground truth.

- TP: s in S+ and P overlaps G. FN: s in S+ and P empty. FP: s in S- and P non-empty.
- FP_nodule, two readings (``fp_nodule_rule``):
  ``"exclusive"`` (the weakly supervised rows): s in S+, P non-empty and no overlap with G; TP, FP_nodule and FN
  then partition S+. ``"component"`` (the U-Net row): s in S+ and some connected component of P has no overlap
  with G; such a slice may also be a TP.
- TPR = |TP| / |S+|, FPR_nodule = |FP_nodule| / |S+|, FPR = |FP| / |S-|.
- Dice: mean of dice(P, G) over all of S+ (0 for FN and for slices whose P misses G). TP Dice: mean over TP.
  TP DOA: mean over TP of |area(P) - area(G)| in mm^2 at the slice's own pixel spacing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from scipy import ndimage

__all__ = [
    "FP_NODULE_RULES",
    "slice_outcome",
    "count_found_nodules",
    "mean_sd",
    "detection_summary",
    "binned_mean_sd",
    "classification_summary",
]

FP_NODULE_RULES = ("exclusive", "component")


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}.")
    return ndimage.generate_binary_structure(2, connectivity)


def _check_pair(pred: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, label = np.asarray(pred) > 0, np.asarray(label) > 0
    if pred.shape != label.shape or pred.ndim != 2:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} must be 2-D masks of the same shape.")
    return pred, label


def slice_outcome(
    pred: np.ndarray, label: np.ndarray, spacing: Sequence[float] = (1.0, 1.0), connectivity: int = 2
) -> dict:
    """Score one slice.

    Args:
        pred: ``(rows, cols)`` predicted mask (non-zero = nodule).
        label: ``(rows, cols)`` ground-truth mask (non-zero = nodule); empty for a slice without nodule.
        spacing: pixel spacing ``(row, col)`` in mm, for areas.
        connectivity: 1 or 2 (4- or 8-neighbours) for the components of ``pred``.

    Returns:
        ``positive`` (G non-empty), ``predicted`` (P non-empty), ``overlap`` (P and G share a pixel),
        ``outcome`` (``"TP"``, ``"FP_nodule"``, ``"FN"``, ``"FP"`` or ``"TN"``, the exclusive reading),
        ``unmatched_component`` (some component of P has no overlap with G), ``dice`` (None on S-),
        ``area_pred_mm2``, ``area_label_mm2`` and ``doa_mm2`` (None unless TP).
    """
    pred, label = _check_pair(pred, label)
    pixel_mm2 = float(np.prod(spacing))
    positive, predicted = bool(label.any()), bool(pred.any())
    inter = int(np.count_nonzero(pred & label))
    n_pred, n_label = int(np.count_nonzero(pred)), int(np.count_nonzero(label))
    if positive:
        outcome = "TP" if inter else ("FP_nodule" if predicted else "FN")
    else:
        outcome = "FP" if predicted else "TN"
    unmatched = False
    if predicted:
        components, n = ndimage.label(pred, structure=_structure(connectivity))
        hit = np.unique(components[label & pred])
        unmatched = len(hit) < n
    return {
        "positive": positive,
        "predicted": predicted,
        "overlap": inter > 0,
        "outcome": outcome,
        "unmatched_component": bool(unmatched),
        "dice": 2.0 * inter / (n_pred + n_label) if positive else None,
        "area_pred_mm2": n_pred * pixel_mm2,
        "area_label_mm2": n_label * pixel_mm2,
        "doa_mm2": abs(n_pred - n_label) * pixel_mm2 if outcome == "TP" else None,
    }


def count_found_nodules(pred: np.ndarray, label: np.ndarray, connectivity: int = 2) -> tuple[int, int]:
    """``(found, total)``: connected components of ``label`` (one per nodule) that ``pred`` overlaps."""
    pred, label = _check_pair(pred, label)
    components, total = ndimage.label(label, structure=_structure(connectivity))
    found = np.unique(components[pred & label])
    return int(np.count_nonzero(found)), int(total)


def mean_sd(values: Sequence[float]) -> dict:
    """``{"mean", "sd", "n"}`` of ``values``; population SD (ddof 0); mean and SD are None when empty."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(arr.mean()), "sd": float(arr.std()), "n": int(arr.size)}


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def detection_summary(outcomes: Sequence[dict], fp_nodule_rule: str = "exclusive") -> dict:
    """Table 1's numbers from the per-slice results of :func:`slice_outcome`.

    Args:
        outcomes: one result of :func:`slice_outcome` per slice (slices with one nodule or none).
        fp_nodule_rule: ``"exclusive"`` (P non-empty, no overlap with G) or ``"component"`` (a component of P
            with no overlap with G, also on TP slices); both counts are returned, this one is ``FPR_nodule``.

    Returns:
        counts (``S+``, ``S-``, ``TP``, ``FN``, ``FP``, ``FP_nodule``, ``FP_nodule_exclusive``,
        ``FP_nodule_component``), rates ``TPR``, ``FPR``, ``FPR_nodule`` (None when the denominator is 0) and
        ``dice``, ``tp_dice``, ``tp_doa_mm2`` as :func:`mean_sd`.
    """
    if fp_nodule_rule not in FP_NODULE_RULES:
        raise ValueError(f"fp_nodule_rule must be one of {FP_NODULE_RULES}, got {fp_nodule_rule!r}.")
    pos = [o for o in outcomes if o["positive"]]
    tp = [o for o in pos if o["outcome"] == "TP"]
    counts = {
        "S+": len(pos),
        "S-": len(outcomes) - len(pos),
        "TP": len(tp),
        "FN": sum(o["outcome"] == "FN" for o in pos),
        "FP": sum(o["outcome"] == "FP" for o in outcomes),
        "FP_nodule_exclusive": sum(o["outcome"] == "FP_nodule" for o in pos),
        "FP_nodule_component": sum(o["unmatched_component"] for o in pos),
    }
    counts["FP_nodule"] = counts[f"FP_nodule_{fp_nodule_rule}"]
    return {
        "fp_nodule_rule": fp_nodule_rule,
        "counts": counts,
        "TPR": _rate(counts["TP"], counts["S+"]),
        "FPR": _rate(counts["FP"], counts["S-"]),
        "FPR_nodule": _rate(counts["FP_nodule"], counts["S+"]),
        "dice": mean_sd([o["dice"] for o in pos]),
        "tp_dice": mean_sd([o["dice"] for o in tp]),
        "tp_doa_mm2": mean_sd([o["doa_mm2"] for o in tp]),
    }


def binned_mean_sd(values: Sequence[float], diameters_mm: Sequence[float], edges_mm: Sequence[float]) -> list[dict]:
    """Fig. 3: :func:`mean_sd` of ``values`` per diameter bin ``[edges[i], edges[i + 1])``.

    Values whose diameter falls outside every bin are left out.
    """
    edges = np.asarray(edges_mm, dtype=float)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"diameter bin edges must be at least two increasing numbers, got {list(edges_mm)}.")
    values, diameters = np.asarray(values, dtype=float), np.asarray(diameters_mm, dtype=float)
    if values.shape != diameters.shape:
        raise ValueError(f"{values.size} values but {diameters.size} diameters.")
    bins = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (diameters >= low) & (diameters < high)
        bins.append({"low_mm": float(low), "high_mm": float(high), **mean_sd(values[inside])})
    return bins


def classification_summary(probabilities: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Slice-level ``accuracy`` at ``threshold`` and ROC ``auc`` (None unless both classes occur), with ``n``."""
    prob = np.asarray(probabilities, dtype=float)
    truth = np.asarray(labels, dtype=int)
    if prob.shape != truth.shape or prob.ndim != 1:
        raise ValueError(f"{prob.size} probabilities but {truth.size} labels.")
    if prob.size == 0:
        return {"accuracy": None, "auc": None, "n": 0}
    accuracy = float(np.mean((prob >= threshold) == (truth == 1)))
    auc = None
    if 0 < truth.sum() < truth.size:
        auc = float(compute_roc_auc(torch.as_tensor(prob), torch.as_tensor(truth)))
    return {"accuracy": accuracy, "auc": auc, "n": int(prob.size)}
